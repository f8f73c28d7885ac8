"""Sessions of API keys: heartbeats, expiry, and what an ended session frees.

A session groups the runs, sampling sessions and uploaded losses of one SDK client. One
that misses heartbeats for `session_timeout` seconds ends; its runs' adapters and
optimizer state, its samplers and its uploaded losses are freed (checkpoints stay), so
memory stays bounded however many sessions come and go. The expiry sweep also forgets
old results of finished requests (`ServiceConfig.future_retention`).

Per-key quotas (ServiceConfig): open sessions (403 beyond), sampling sessions (the
least recently used one is dropped beyond).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

from tinkerd.errors import InvalidRequestError, NotFoundError, QuotaExceededError, TinkerdError
from tinkerd.service.config import ServiceConfig
from tinkerd.service.futures import RequestQueue
from tinkerd.service.store import Store


class Sessions:
    def __init__(
        self,
        store: Store,
        engine: Any,
        queue: RequestQueue,
        config: ServiceConfig,
        losses: Any = None,
    ):
        self.store = store
        self.engine = engine
        self.queue = queue
        self.config = config
        self.losses = losses  # UploadedLosses, freed per session
        # id: (owner, SamplerWeights), least recently used first
        self.sampling: OrderedDict[str, tuple[str | None, Any]] = OrderedDict()
        self.dropped: OrderedDict[str, None] = OrderedDict()  # ids dropped over the quota
        self._sampling_lock = threading.Lock()
        self.samples: dict[str, set[Future]] = {}  # sampling id: its unfinished samples
        self._closed = threading.Event()

    def start_expiry(self) -> None:
        """Sweep for silent sessions every `expiry_interval` seconds, in a daemon thread."""
        interval = self.config.expiry_interval
        if interval is None:
            interval = min(self.config.session_timeout / 4, 5.0)
        if interval > 0:
            threading.Thread(target=self._expire_forever, args=(interval,), daemon=True).start()

    def stop(self) -> None:
        self._closed.set()

    def _expire_forever(self, interval: float) -> None:
        while not self._closed.wait(interval):
            with contextlib.suppress(Exception):  # never let the reaper die
                self.expire()

    def expire(self) -> list[str]:
        """End the sessions that missed heartbeats for `session_timeout` seconds (by
        `config.clock`) and free what they held; their ids."""
        expired = self.store.expire_sessions(self.config.clock() - self.config.session_timeout)
        for session_id in expired:
            self.release(session_id, "expired")
        self.store.prune_futures(self.config.future_retention, self.config.retrieved_grace)
        return expired

    def release(self, session_id: str, status: str) -> None:
        """Free an ended session's runs (adapter and optimizer state) and samplers."""
        for model_id in self.store.active_runs(session_id):
            with contextlib.suppress(TinkerdError):
                self.engine.unload_model(model_id)
            self.store.touch_run(model_id, status=status)
            self.queue.forget_model(model_id)
        prefix = f"{session_id}:"  # its own sampling sessions and its runs' ones
        with self._sampling_lock:
            for sampling_id in [s for s in self.sampling if s.startswith(prefix)]:
                self.sampling.pop(sampling_id, None)
            unread = [f for s, fs in self.samples.items() if s.startswith(prefix) for f in fs]
        for future in unread:  # no one will read them: stop decoding them
            future.cancel()
        if self.losses is not None:
            self.losses.drop_session(session_id)

    def create(
        self, owner: str, tags: list[str], metadata: dict, display_name: str | None = None
    ) -> str:
        limit = self.config.max_sessions_per_key
        if limit is not None and self.store.open_sessions(owner) >= limit:
            raise QuotaExceededError(
                f"this API key has {limit} open sessions (limit --max-sessions-per-key): "
                "close one (or let it expire) first"
            )
        session_id = f"session-{uuid.uuid4().hex[:16]}"
        self.store.add_session(session_id, owner, tags, metadata, display_name)
        return session_id

    def check_owner(self, session_id: str, owner: str | None) -> None:
        if self.store.session_owner(session_id) != owner:
            raise NotFoundError(f"no session {session_id!r}")

    def heartbeat(self, session_id: str, owner: str) -> bool:
        """Keep the session alive; False if it has ended already."""
        self.check_owner(session_id, owner)
        if self.store.session_finished(session_id):
            return False
        self.store.heartbeat(session_id)
        return True

    def finish(self, session_id: str, owner: str, reason: dict | None = None) -> None:
        """End the session; `reason`: what its client reported ({"type": "success" |
        "errored" | "interrupted", "detail": ...})."""
        self.check_owner(session_id, owner)
        self.store.finish_session(session_id, reason)
        self.release(session_id, "finished")

    def list(self, owner: str, limit: int = 20, offset: int = 0) -> list[str]:
        """A page of the owner's session ids, oldest first."""
        if limit < 1 or offset < 0:
            raise InvalidRequestError(f"limit must be >= 1 and offset >= 0, got {limit}, {offset}")
        return self.store.sessions(owner, limit, offset)

    def describe(self, session_id: str, owner: str) -> dict:
        """The SDK's GetSessionResponse: the session's runs (all it ever created), its
        live samplers, its user metadata."""
        self.check_owner(session_id, owner)
        prefix = f"{session_id}:"  # its own sampling sessions and its runs' ones
        samplers = sorted(s for s in list(self.sampling) if s.startswith(prefix))
        metadata, display_name = self.store.session_metadata(session_id)
        return {
            "training_run_ids": self.store.session_runs(session_id),
            "sampler_ids": samplers,
            "user_metadata": {k: str(v) for k, v in metadata.items()},
            "display_name": display_name,
        }

    def check_alive(self, session_id: str, model_id: str) -> None:
        """After a run was created: if its session ended meanwhile (expired while the base
        model loaded), free the run now, since the session's release could not see it.
        The release marks the session finished before it unloads, so one of the two
        always frees the run."""
        if self.store.session_finished(session_id):
            with contextlib.suppress(TinkerdError):
                self.engine.unload_model(model_id)
            raise InvalidRequestError(f"session {session_id} ended while {model_id} was created")

    def add_sampler(self, sampling_id: str, owner: str | None, weights: Any) -> None:
        """Hold a sampling session; over the owner's quota, drop its least recently used."""
        limit = self.config.max_sampling_sessions_per_key
        with self._sampling_lock:
            self.sampling[sampling_id] = (owner, weights)
            self.sampling.move_to_end(sampling_id)
            if owner is None or limit is None:
                return
            mine = [s for s, (o, _) in self.sampling.items() if o == owner]
            for old in mine[: max(0, len(mine) - limit)]:
                del self.sampling[old]
                self.dropped[old] = None
            while len(self.dropped) > 4096:  # only to explain a 404; bounded
                self.dropped.popitem(last=False)

    def track_sample(self, sampling_id: str, future: Future) -> None:
        """Remember a sample of a sampling session until it finishes: if the session
        ends first, it is cancelled (its result would never be read)."""
        with self._sampling_lock:
            self.samples.setdefault(sampling_id, set()).add(future)
        future.add_done_callback(lambda f: self._forget_sample(sampling_id, f))

    def _forget_sample(self, sampling_id: str, future: Future) -> None:
        with self._sampling_lock:
            left = self.samples.get(sampling_id, set())
            left.discard(future)
            if not left:
                self.samples.pop(sampling_id, None)

    def sampler(self, sampling_id: str, owner: str | None) -> Any:
        """The SamplerWeights of the caller's sampling session."""
        with self._sampling_lock:
            owner_and_weights = self.sampling.get(sampling_id)
            if owner_and_weights is not None and owner_and_weights[0] == owner:
                self.sampling.move_to_end(sampling_id)
                return owner_and_weights[1]
            if sampling_id in self.dropped and sampling_id.startswith("session-"):
                sid = sampling_id.split(":", 1)[0]
                if self.store.session_owner(sid) == owner:
                    raise NotFoundError(
                        f"sampling session {sampling_id!r} was dropped: this API key held "
                        f"more than {self.config.max_sampling_sessions_per_key} (limit "
                        "--max-sampling-sessions-per-key); create a new sampling client"
                    )
        raise NotFoundError(f"no sampling session {sampling_id!r}")

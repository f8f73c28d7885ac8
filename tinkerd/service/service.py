"""The service: what the HTTP server and the embedded clients share.

A server builds one over its engine; every embedded client on an engine shares that
engine's `Service.for_engine(engine)`. It validates requests, queues them (seq_id
order, a bound on pending work), schedules and packs them over the engine (one lane per
base model; concurrent forward_backward calls of different runs share a pass), records
training metrics, and hands back `concurrent.futures.Future`s of typed results. It also
holds what outlives a request: sessions (and their expiry), sampling sessions, uploaded
custom losses.

Every verb is a typed request (`tinkerd.requests`) given to `submit(caller, request)`,
which calls that request type's handler (`handlers.py`). The caller (`caller.py`) is the
process's embedded client (`LOCAL`) or an API key (`KeyCaller`), with its policy.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tinkerd.engine import Engine
from tinkerd.errors import InvalidRequestError, QueueFullError, TinkerdError
from tinkerd.futures import done
from tinkerd.requests import Request
from tinkerd.service.access import Catalog
from tinkerd.service.caller import LocalCaller, release_quietly
from tinkerd.service.config import ServiceConfig
from tinkerd.service.futures import RequestQueue
from tinkerd.service.handlers import HANDLERS
from tinkerd.service.memory import trim_heap
from tinkerd.service.sampling import Sampling
from tinkerd.service.scheduler import Scheduler
from tinkerd.service.sessions import Sessions
from tinkerd.service.store import Store
from tinkerd.service.telemetry import Telemetry
from tinkerd.service.uploaded_losses import UploadedLosses

_services: weakref.WeakKeyDictionary[Engine, Service] = weakref.WeakKeyDictionary()
_services_lock = threading.Lock()


class Service:
    def __init__(
        self,
        engine: Engine,
        data_dir: Path | None = None,
        served_models: list[str] | None = None,
        config: ServiceConfig | None = None,
        recover: bool = True,
    ):
        """`served_models`: the base models that may be trained (None: any the engine
        knows). `recover`: this service owns `data_dir` (a server): requests and runs in
        flight when it last stopped are marked failed, and silent sessions expire."""
        self.engine = engine
        self.config = config or ServiceConfig()
        self.served_models = served_models
        self.checkpoints = engine.checkpoints  # opening it finishes what a crash cut off
        self.data_dir = Path(data_dir or engine.data_dir)
        self.telemetry = Telemetry(engine, json_log=self.config.json_log)
        self.scheduler = Scheduler(
            self.config.max_pass_tokens,
            on_idle=trim_heap,
            on_pass=self.telemetry.passed if self.config.telemetry else None,
        )
        self.queue = RequestQueue(
            self.scheduler,
            self.config.gap_timeout,
            self.config.max_pending,
            max_pending_per_tenant=self.config.max_queued_per_key,
        )
        self.telemetry.attach(self.scheduler, self.queue)
        self.losses = UploadedLosses(
            self.config.max_losses_per_key, self.config.max_loss_bytes_per_key
        )
        self.local_runs: dict[str, str] = {}  # model_id: base model, of owner None
        if recover:
            # Runs an earlier server left paged to disk go on (docs/multi-tenant.md).
            restored = engine.restore_runs(self.store.restorable_runs())
            self.store.fail_unfinished(
                "the server restarted before this request finished", self._saved_since, restored
            )
            for model_id in restored:
                self.queue.resume(model_id)
            self.sessions.start_expiry()

    @functools.cached_property
    def store(self) -> Store:
        """Opened on first use: an embedded service that never needs it writes nothing."""
        return Store(self.data_dir, self.config.clock, self.config.max_metric_steps)

    @functools.cached_property
    def catalog(self) -> Catalog:
        return Catalog(self.store, self.checkpoints, self._local_runs)

    @functools.cached_property
    def sessions(self) -> Sessions:
        return Sessions(self.store, self.engine, self.queue, self.config, self.losses)

    @functools.cached_property
    def sampling(self) -> Sampling:
        return Sampling(self)

    @classmethod
    def for_engine(cls, engine: Engine) -> Service:
        """The process's embedded service on `engine`: every embedded client on one engine
        shares it, so their runs' requests are packed together."""
        with _services_lock:
            service = _services.get(engine)
            if service is None:
                # No bound on pending work: an embedded caller holds its own futures.
                config = ServiceConfig(max_pending=sys.maxsize)
                service = _services[engine] = cls(engine, config=config, recover=False)
            return service

    def close(self, suspend: bool = False) -> None:
        """Stop; with `suspend` (a server's clean shutdown), once the work in hand is done,
        page every run out to disk for the next server on this data dir to take back."""
        self.telemetry.stop()
        if "sessions" in vars(self):
            self.sessions.stop()
        self.scheduler.shutdown(wait=True)
        if suspend:
            self.engine.suspend_runs()

    # ---------------------------------------------------------------- requests

    def submit(self, caller: LocalCaller, request: Request) -> Future:
        """Hand `request` to its handler (`handlers.py`) for `caller` (`LOCAL`, or a
        `KeyCaller`); the future gives the request's `response`. A refused request raises
        here (nothing was queued) and uses up its seq_id, except a full queue's 429,
        which the client retries with the same seq_id."""
        handler = HANDLERS[type(request)]
        model_id = request.run_id()
        if model_id is not None:
            caller.check_run(self, model_id)  # another key's run: nothing is released
        try:
            result = handler(self, caller, request)
        except QueueFullError:
            raise
        except Exception:
            if request.ordered:
                self.queue.release(model_id, request.seq_id)
            raise
        return result if isinstance(result, Future) else done(result)

    def unstick(self) -> None:
        """Let requests behind a seq_id missing for longer than the gap timeout run (asked
        on every long-poll, so a client that lost a request does not wait forever)."""
        self.queue.unstick()

    def release_rejected(self, caller: LocalCaller, model_id: Any, seq_id: Any) -> None:
        """Use up the seq_id of a request whose body could not even be decoded."""
        release_quietly(self, caller, model_id, seq_id)

    def run_work(self, caller: LocalCaller, request: Request, work: Any) -> Future:
        """Queue `work` behind the run's earlier requests, in its base model's lane; it
        takes turns as its caller's (fairness per key, then per run: scheduler.py)."""
        model_id = request.run_id()
        lane = self.engine.run(model_id).base.name
        seq_id = getattr(request, "seq_id", None) if request.ordered else None
        return self.queue.submit(lane, work, model_id, seq_id, tenant=caller.owner)

    def create(
        self,
        caller: LocalCaller,
        request: Request,
        model_id: str | None,
        base_model: str,
        create: Callable[[], str],
    ) -> Future[str]:
        """Queue `create() -> model_id` in the base's lane, registering the run."""

        def work() -> str:
            try:
                created = create()
            except Exception:
                caller.run_failed(self, model_id)
                raise
            caller.run_made(self, request, created, base_model)
            return created

        return self.queue.submit(base_model, work, tenant=caller.owner)

    # ---------------------------------------------------------------- helpers

    def _local_runs(self) -> dict[str, tuple[str, int]]:
        """Embedded runs alive in this process (the store does not know them)."""
        runs = {}
        for model_id, base_model in list(self.local_runs.items()):
            with contextlib.suppress(TinkerdError):  # unloaded since
                runs[model_id] = (base_model, self.engine.run(model_id).lora.rank)
        return runs

    def _saved_since(self, path: str, since: float) -> bool:
        """Whether the checkpoint at `path` is complete and was written at or after
        `since` (unix seconds): a save that finished before a crash could report it."""
        try:
            return self.checkpoints.resolve(path).created_at >= since
        except (TinkerdError, ValueError, OSError):
            return False

    def base_model(self, name: str) -> Any:
        """The engine's loaded base model `name` (its tokenizer, special tokens)."""
        return self.engine.base_model(name)

    def check_base(self, base_model: str) -> None:
        if self.served_models is not None and base_model not in self.served_models:
            raise InvalidRequestError(
                f"base model {base_model!r} is not served here; available: {self.served_models}"
            )

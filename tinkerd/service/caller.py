"""Who is asking: the embedded caller, or an API key. Each is an object with its policy.

The handlers (`handlers.py`) ask the caller, never `owner is None`: may it touch this
run, read this checkpoint, make one more run; are its requests recorded for the dashboard.
`KeyCaller` is a key of `tinkerd serve` (its fingerprint is the owner of what it makes);
`LOCAL` is the process's own embedded client, which owns every run and checkpoint of the
process's data directory, has no session, and whose runs the store never records.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from tinkerd.errors import InvalidRequestError, NotFoundError, QuotaExceededError
from tinkerd.service.metrics import record, timed
from tinkerd.service.scheduler import Batchable

if TYPE_CHECKING:
    from tinkerd.engine.checkpoints import CheckpointInfo
    from tinkerd.service.service import Service


def _gone(model_id: str, status: str | None) -> str:
    """What a 404 says about a run of the caller that is listed but not loaded."""
    why = {
        "lost": "the server restarted since it was created, and this run's latest state "
        "was in memory only (it was in use when the server stopped without a clean "
        "shutdown, or a request of it was cut off), so it cannot go on unambiguously",
        "expired": "its session missed heartbeats and expired",
        "finished": "its session was closed",
        "unloaded": "it was unloaded",
        "failed": "it failed to be created",
    }.get(status or "", f"it is {status}")
    return (
        f"no training run {model_id!r} is loaded: {why}. Its checkpoints are kept: make a "
        "new training client from its last one (ServiceClient."
        "create_training_client_from_state_with_optimizer(path), paths from "
        "RestClient.list_checkpoints) and carry on from there"
    )


class LocalCaller:
    """The embedded client of this process."""

    owner: str | None = None
    """Whose runs and checkpoints: None, the process itself."""

    def check_run(self, service: Service, model_id: str) -> None:
        """Every run of the process is the caller's (an unknown one fails in the engine)."""

    def check_base(self, service: Service, base_model: str, lora: Any = None) -> None:
        """Any base model the engine can load."""

    def new_run(self, service: Service, request: Any, base_model: str, lora: dict) -> str | None:
        """The new run's model_id (None: the engine names it)."""
        return None

    def run_made(self, service: Service, request: Any, model_id: str, base_model: str) -> None:
        service.local_runs[model_id] = base_model  # before the caller can see the id

    def run_failed(self, service: Service, model_id: str | None) -> None:
        """Nothing was recorded."""

    def run_unloaded(self, service: Service, model_id: str) -> None:
        service.local_runs.pop(model_id, None)

    def readable(self, service: Service, path: str) -> CheckpointInfo:
        """Any checkpoint of the data directory."""
        return service.checkpoints.resolve(path)

    def recorded(self, service: Service, model_id: str, kind: str, work: Any, tokens: int = 0):
        """`work` as is: the embedded caller's steps are not written to the store."""
        return work

    def expire_after(self, service: Service, path: str, ttl_seconds: int | None) -> None:
        if ttl_seconds is not None:  # no TTL: the store stays unopened
            service.catalog.set_ttl(path, None, ttl_seconds)

    def sampler(self, service: Service, sampling_session_id: str) -> Any:
        """In-process, a sampling session is the engine's sampler id."""
        return service.engine.get_sampler(sampling_session_id)

    def check_session(self, service: Service, session_id: str | None) -> None:
        """The embedded caller has no sessions: anything goes."""

    def check_new_sampler(self, service: Service, name: str | None, sampling_id: str | None):
        """Unnamed sampler weights without a session are the embedded caller's to keep."""

    def add_sampler(self, service: Service, sampling_id: str | None, weights: Any) -> str | None:
        """The id to sample `weights` by: in-process, the engine's sampler id."""
        return weights.sampler_id

    def add_loss(self, service: Service, session_id: str | None, graph: dict) -> str:
        """In-process a traced loss is already compiled and runs where it is."""
        return f"local:{graph.get('name', 'loss')}"


LOCAL = LocalCaller()


class KeyCaller(LocalCaller):
    """An API key of the server: it sees only what it made (or what is published)."""

    def __init__(self, owner: str):
        self.owner = owner

    def check_run(self, service: Service, model_id: str) -> None:
        found_owner, status = service.store.run_owner_status(model_id)
        if found_owner != self.owner:
            raise NotFoundError(f"no training run {model_id!r}")  # another key's looks absent
        if status not in ("active", "unloaded"):  # unloaded: the engine's 409 says so
            try:
                service.engine.run(model_id)
            except NotFoundError:
                raise NotFoundError(_gone(model_id, status)) from None

    def check_base(self, service: Service, base_model: str, lora: Any = None) -> None:
        from tinkerd.engine.adapters import validate_lora_config

        service.check_base(base_model)
        if lora is not None:
            validate_lora_config(lora)

    def new_run(self, service: Service, request: Any, base_model: str, lora: dict) -> str:
        """`<session>:train:<model_seq_id>`, recorded as this key's, within its quota."""
        session_id, model_seq_id = request.session_id, request.model_seq_id
        if session_id is None or model_seq_id is None:
            raise InvalidRequestError("give session_id and model_seq_id")
        service.sessions.check_owner(session_id, self.owner)
        limit = service.config.max_runs_per_key
        if limit is not None and service.store.count_active_runs(self.owner) >= limit:
            raise QuotaExceededError(
                f"this API key has {limit} active training runs (limit --max-runs-per-key): "
                "unload one (or end its session) first"
            )
        model_id = f"{session_id}:train:{model_seq_id}"
        if service.store.run_owner(model_id) is not None:
            raise InvalidRequestError(f"model {model_id!r} already exists")
        metadata = request.user_metadata or {}
        service.store.add_run(model_id, self.owner, session_id, base_model, lora, metadata)
        return model_id

    def run_made(self, service: Service, request: Any, model_id: str, base_model: str) -> None:
        service.sessions.check_alive(request.session_id, model_id)

    def run_failed(self, service: Service, model_id: str | None) -> None:
        if model_id is not None:
            service.store.touch_run(model_id, status="failed")

    def run_unloaded(self, service: Service, model_id: str) -> None:
        service.store.touch_run(model_id, status="unloaded")

    def readable(self, service: Service, path: str) -> CheckpointInfo:
        """Its own checkpoints and published ones; another key's look absent (404)."""
        return service.catalog.readable(path, self.owner)

    def recorded(self, service: Service, model_id: str, kind: str, work: Any, tokens: int = 0):
        """`work` (a function, or a Batchable of a packed pass) recording its metrics for
        the dashboard when it succeeds."""
        if isinstance(work, Batchable):
            work.after = lambda result, seconds: record(
                service.store, service.engine, model_id, kind, result, seconds, tokens
            )
            return work
        return timed(service.store, service.engine, model_id, kind, work, tokens)

    def expire_after(self, service: Service, path: str, ttl_seconds: int | None) -> None:
        service.catalog.set_ttl(path, self.owner, ttl_seconds)  # an overwrite drops the old

    def sampler(self, service: Service, sampling_session_id: str) -> Any:
        return service.sessions.sampler(sampling_session_id, self.owner)

    def check_session(self, service: Service, session_id: str | None) -> None:
        if session_id is None:
            raise InvalidRequestError("give session_id")
        service.sessions.check_owner(session_id, self.owner)

    def check_new_sampler(self, service: Service, name: str | None, sampling_id: str | None):
        if name is None and sampling_id is None:
            raise InvalidRequestError("give a path (a name) or a sampling_session_seq_id")

    def add_sampler(self, service: Service, sampling_id: str | None, weights: Any) -> str | None:
        """A sampling session `sampling_id` of this key on `weights` (None: none)."""
        if sampling_id is not None:
            service.sessions.add_sampler(sampling_id, self.owner, weights)
        return sampling_id

    def add_loss(self, service: Service, session_id: str | None, graph: dict) -> str:
        """Compile an uploaded loss graph for the key's session; its loss_id."""
        self.check_session(service, session_id)
        return service.losses.add(self.owner, session_id, graph)


def release_quietly(service: Service, caller: LocalCaller, model_id: Any, seq_id: Any) -> None:
    """Use up the seq_id of a request refused before its handler ran (a body that fails
    validation or decoding), so the run's next request need not wait for the gap
    timeout. Only the run's own caller may: another key's refusals change nothing."""
    if not isinstance(model_id, str) or type(seq_id) is not int or seq_id <= 0:
        return
    with contextlib.suppress(Exception):
        caller.check_run(service, model_id)
        service.queue.release(model_id, seq_id)

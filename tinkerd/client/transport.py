"""Transports: how a client's requests reach an engine.

Every request method returns a `concurrent.futures.Future` at once; the clients wrap it
in an `APIFuture`. `InProcessTransport` hands requests to the service (tinkerd/service)
on an engine in this process; the HTTP transport speaks Tinker's wire protocol to a
`tinkerd serve` (or any Tinker) server, which hands them to its own service.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tinkerd.futures import failed_future

if TYPE_CHECKING:
    from tinkerd.client.rest_client import RestBackend
    from tinkerd.requests import Request


@dataclass(frozen=True)
class SamplerRef:
    """Weights a SamplingClient samples from, as the transport names them."""

    sampler_id: str
    """The sampling session id (in-process: the engine's sampler id)."""
    base_model: str
    model_path: str | None = None


class Transport(Protocol):
    def submit(self, request: Request) -> Future:
        """Carry `request` (`tinkerd.requests`) to the service; a future of its
        `response`. Requests of one run are made, and run, in call order."""
        ...

    def get_tokenizer(self, model_id: str | None, base_model: str) -> Any: ...

    def rest_backend(self) -> RestBackend:
        """Where a RestClient of this transport goes: the same server, or data dir."""
        ...

    def close(self) -> None: ...


class InProcessTransport:
    """A thin adapter over the process's embedded Service on an engine (one per engine:
    `Service.for_engine`), so the runs of every embedded client on it are scheduled
    together: a run's requests run in order, runs take turns, and concurrent
    forward_backward calls of several runs share a pass. The caller is the local one
    (`service.caller.LOCAL`): no API key, no session."""

    def __init__(self, engine: Any = None, cache_dir: Path | None = None, service: Any = None):
        """`service`: a Service of its own (e.g. with another ServiceConfig) instead of
        the engine's shared one."""
        from tinkerd.service import LOCAL, Service, default_engine  # lazy: no engine import

        if service is not None:
            engine = service.engine
        elif engine is None:
            engine = default_engine() if cache_dir is None else _engine(cache_dir)
        self.engine = engine
        self.service = service or Service.for_engine(engine)
        self._caller = LOCAL

    def submit(self, request: Request) -> Future:
        try:
            return self.service.submit(self._caller, request)
        except Exception as e:  # noqa: BLE001 -- a client sees every failure in its future
            return failed_future(e)

    def get_tokenizer(self, model_id: str | None, base_model: str) -> Any:
        return self.engine.base_model(base_model).tokenizer

    def rest_backend(self) -> RestBackend:
        """The data directory's runs and checkpoints, plus the live embedded runs."""
        from tinkerd.service.local_rest import LocalRest

        return LocalRest(self.service.catalog)

    def close(self) -> None:
        """Nothing to free: the service is shared by every embedded client of the engine."""


def _engine(cache_dir: Path) -> Any:
    from tinkerd.engine import Engine

    return Engine(cache_dir=cache_dir)

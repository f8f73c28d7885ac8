"""Request ids over the service's futures: Tinker's long-poll (`retrieve_future`).

A mutating HTTP request answers `{"request_id"}` at once. The service future behind it
is tracked here: its encoded result (or error) is written to the store, so it can be
fetched again later, and `wait` long-polls it. A re-sent request (same run and seq_id)
gets the same service future back, hence the first request_id.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from tinkerd.errors import TinkerdError
from tinkerd.service.store import Store, StoredFuture
from tinkerd.service.telemetry import Telemetry

log = logging.getLogger("tinkerd.server")

JSON = "application/json"
PROTOBUF = "application/x-protobuf"
Encoded = tuple[str, bytes]  # (content type, body)

ANSWERED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "tinkerd_request_ids", default=None
)
"""The request ids an HTTP request was given (set per request by the server's middleware,
which returns them in the `X-Request-ID` header)."""


def jsonable(value: Any) -> Any:
    """A response as the wire's JSON: a pydantic model without its unset (None) fields."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_none=True)
    return value


def encode_json(value: Any) -> Encoded:
    return JSON, json.dumps(jsonable(value)).encode()


def encode_protobuf(value: Any) -> Encoded:
    """forward_backward's and asample's results travel as protobuf."""
    from tinkerd import wire_proto
    from tinkerd.types import SampleResponse

    if isinstance(value, SampleResponse):
        return PROTOBUF, wire_proto.encode_sample_response(value)
    return PROTOBUF, wire_proto.encode_forward_backward_output(value)


def encode_error(error: BaseException) -> Encoded:
    if isinstance(error, TinkerdError):
        body = {"error": str(error), "category": error.category}
    else:
        body = {"error": f"internal error: {type(error).__name__}: {error}", "category": "server"}
    return JSON, json.dumps(body).encode()


@dataclass
class _Pending:
    owner: str
    kind: str
    done: Future  # resolves to StoredFuture when the result is recorded


class RequestTable:
    def __init__(self, store: Store, telemetry: Telemetry | None = None):
        """`telemetry`: told of every request tracked (its span, metrics, log line)."""
        self.store = store
        self.telemetry = telemetry
        self._pending: dict[str, _Pending] = {}
        self._ids: weakref.WeakKeyDictionary[Future, str] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def track(
        self,
        owner: str,
        kind: str,
        future: Future,
        encode: Callable[[Any], Encoded] = encode_json,
        model_id: str | None = None,
        saves: tuple[str, Encoded] | None = None,
        sampler: str | None = None,
    ) -> str:
        """The request_id of `future` (a new one, unless this future was tracked already).
        `saves`: (tinker path, encoded answer) of a save: its answer if the server dies
        after the checkpoint is complete, before the answer is recorded
        (Store.fail_unfinished). `sampler`: the sampling session a sample reads."""
        answered = ANSWERED.get()
        with self._lock:
            request_id = self._ids.get(future)
            if request_id is not None:
                if answered is not None:
                    answered.append(request_id)
                return request_id
            request_id = self._ids[future] = f"req-{uuid.uuid4().hex}"
            answer = None if saves is None else (saves[0], *saves[1])
            self.store.add_future(request_id, owner, model_id, kind, answer)
            self._pending[request_id] = _Pending(owner, kind, Future())
        if answered is not None:
            answered.append(request_id)
        if self.telemetry is not None:
            self.telemetry.request(request_id, owner, kind, future, model_id or sampler)
        future.add_done_callback(lambda f: self._record(request_id, f, encode))
        return request_id

    def _record(self, request_id: str, future: Future, encode: Callable[[Any], Encoded]) -> None:
        try:
            content_type, body = encode(future.result())
            status = "done"
        except Exception as e:  # noqa: BLE001 -- every failure must reach the client
            if not isinstance(e, TinkerdError):
                log.exception("request %s failed", request_id)
            content_type, body = encode_error(e)
            status = "failed"
        self.store.finish_future(request_id, status, content_type, body)
        with self._lock:
            pending = self._pending.pop(request_id)
        stored = StoredFuture(
            request_id, pending.owner, None, pending.kind, status, content_type, body
        )
        pending.done.set_result(stored)

    async def wait(self, request_id: str, owner: str, timeout: float) -> StoredFuture | None:
        """The finished future, or None if still running after `timeout` seconds.
        Raises KeyError for an unknown id or another owner's."""
        with self._lock:
            pending = self._pending.get(request_id)
        if pending is None:
            stored = self.store.future(request_id)
            if stored is None or stored.owner != owner:
                raise KeyError(request_id)
            self.store.mark_retrieved(request_id)  # kept `retrieved_grace` s from now
            return stored
        if pending.owner != owner:
            raise KeyError(request_id)
        try:
            stored = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(pending.done)), timeout
            )
        except asyncio.TimeoutError:
            return None
        self.store.mark_retrieved(request_id)
        return stored

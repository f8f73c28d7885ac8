"""Futures of queued requests: run in per-model seq_id order, long-polled, recorded.

Every mutating request gets a request_id at once. Its work goes to the scheduler when its
turn comes: requests of one model carry `seq_id` 1, 2, 3, ... and run in that order even
if they arrive out of order (the official SDK posts the chunks of one forward_backward in
parallel), and a request re-sent with a seq_id already seen gets the first one's
request_id back. A request rejected before queueing (bad input) still uses up its
seq_id (`release`), and a seq_id that never arrives holds later ones back for at most
`gap_timeout` seconds. The encoded result (or error) is written to the store, so it can
be fetched again later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from tinkerd.errors import QueueFullError, TinkerdError
from tinkerd.server.scheduler import Batchable, Scheduler
from tinkerd.server.store import Store, StoredFuture

log = logging.getLogger("tinkerd.server")

JSON = "application/json"
PROTOBUF = "application/x-protobuf"
Encoded = tuple[str, bytes]  # (content type, body)
DEDUP_WINDOW = 1024  # seq_ids remembered per model for re-sent requests


def encode_json(value: Any) -> Encoded:
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json", exclude_none=True)
    return JSON, json.dumps(value).encode()


def encode_error(error: BaseException) -> Encoded:
    if isinstance(error, TinkerdError):
        body = {"error": str(error), "category": error.category}
    else:
        body = {"error": f"internal error: {type(error).__name__}: {error}", "category": "server"}
    return JSON, json.dumps(body).encode()


@dataclass
class _Pending:
    owner: str
    done: Future  # resolves to StoredFuture when the result is recorded


class _SeqGate:
    """Releases a model's requests in seq_id order, starting at 1."""

    def __init__(self) -> None:
        self.next_seq = 1
        self.waiting: dict[int, Callable[[], None]] = {}
        self.request_ids: dict[int, str] = {}
        self.released: set[int] = set()  # seq_ids used up without work
        self.stalled_since: float | None = None

    def advance(self, skip_gap: bool = False) -> None:
        """Start every request whose turn has come; with `skip_gap`, jump missing seq_ids."""
        if skip_gap and self.waiting:
            self.next_seq = max(self.next_seq, min(self.waiting))
        while self.next_seq in self.waiting or self.next_seq in self.released:
            self.released.discard(self.next_seq)
            start = self.waiting.pop(self.next_seq, None)
            if start:
                start()
            self.next_seq += 1
        self.stalled_since = time.monotonic() if self.waiting else None
        if len(self.request_ids) > 2 * DEDUP_WINDOW:  # re-sends come within a few requests
            for seq in [s for s in self.request_ids if s < self.next_seq - DEDUP_WINDOW]:
                del self.request_ids[seq]


class FutureTable:
    def __init__(
        self,
        store: Store,
        scheduler: Scheduler,
        gap_timeout: float = 60.0,
        max_pending: int = 4096,
    ):
        self.store = store
        self.gap_timeout = gap_timeout
        self.max_pending = max_pending
        self.scheduler = scheduler
        self._pending: dict[str, _Pending] = {}
        self._gates: dict[str, _SeqGate] = {}
        # Reentrant: a result recorded at once calls back into the table from `submit`.
        self._lock = threading.RLock()

    def submit(
        self,
        *,
        owner: str,
        kind: str,
        lane: str | None,
        work: Callable[[], Any] | Batchable,
        encode: Callable[[Any], Encoded] = encode_json,
        model_id: str | None = None,
        seq_id: int | None = None,
    ) -> str:
        """Queue `work` (behind the earlier work of `model_id`, which it may share a pass
        with if Batchable); return its request_id (an earlier one for a re-sent seq_id)."""
        with self._lock:
            gate = self._gates.setdefault(model_id, _SeqGate()) if model_id and seq_id else None
            if gate and seq_id in gate.request_ids:
                return gate.request_ids[seq_id]
            unblocks = gate is not None and seq_id == gate.next_seq and bool(gate.waiting)
            if len(self._pending) >= self.max_pending and not unblocks:
                # Refused before it takes a request_id or a seq_id: the client retries as is.
                # (Never the seq_id that queued requests wait for: that would deadlock.)
                raise QueueFullError(
                    f"the server has {len(self._pending)} requests queued; retry shortly"
                )
            request_id = f"req-{uuid.uuid4().hex}"
            self.store.add_future(request_id, owner, model_id, kind)
            self._pending[request_id] = _Pending(owner, Future())

            def start() -> None:
                # lane None: `work` has started already elsewhere and returns its Future
                future = self.scheduler.submit_keyed(lane, model_id, work) if lane else work()
                future.add_done_callback(lambda f: self._record(request_id, f, encode))

            if gate is None or seq_id < gate.next_seq:
                start()
            else:
                gate.request_ids[seq_id] = request_id
                gate.waiting[seq_id] = start
                gate.advance()
            return request_id

    def release(self, model_id: str, seq_id: int | None) -> None:
        """Use up a seq_id whose request was rejected, so later ones are not held back."""
        if not seq_id:
            return
        with self._lock:
            gate = self._gates.setdefault(model_id, _SeqGate())
            if seq_id >= gate.next_seq:
                gate.released.add(seq_id)
                gate.advance()

    def _unstick(self) -> None:
        """Let requests run past a seq_id that has been missing for `gap_timeout`."""
        now = time.monotonic()
        with self._lock:
            for gate in self._gates.values():
                if gate.stalled_since is not None and now - gate.stalled_since > self.gap_timeout:
                    gate.advance(skip_gap=True)

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
        stored = StoredFuture(request_id, pending.owner, None, "", status, content_type, body)
        pending.done.set_result(stored)

    def forget_model(self, model_id: str) -> None:
        with self._lock:
            self._gates.pop(model_id, None)

    async def wait(self, request_id: str, owner: str, timeout: float) -> StoredFuture | None:
        """The finished future, or None if still running after `timeout` seconds.
        Raises KeyError for an unknown id or another owner's."""
        with self._lock:
            pending = self._pending.get(request_id)
        if pending is None:
            stored = self.store.future(request_id)
            if stored is None or stored.owner != owner:
                raise KeyError(request_id)
            return stored
        if pending.owner != owner:
            raise KeyError(request_id)
        self._unstick()
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(pending.done)), timeout
            )
        except asyncio.TimeoutError:
            return None

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._pending)

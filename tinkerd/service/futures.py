"""The service's admission queue: a bound on pending requests and per-run seq_id order.

Every request goes to the scheduler when its turn comes: requests of one run may carry
`seq_id` 1, 2, 3, ... and then run in that order even if they arrive out of order (the
official SDK posts the chunks of one forward_backward in parallel), and a request re-sent
with a seq_id already seen gets the first one's future back (so no work runs twice). A
request rejected before queueing (bad input) still uses up its seq_id (`release`), and a
seq_id that never arrives holds later ones back for at most `gap_timeout` seconds.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from tinkerd.errors import InvalidRequestError, QueueFullError
from tinkerd.service.scheduler import Batchable, Scheduler
from tinkerd.timing import Ran, current

DEDUP_WINDOW = 128
"""seq_ids remembered per run for re-sent requests (a re-send comes within a few
requests). Each holds its result: a forward_backward of 4 rows of 37 tokens is ~27 KiB,
so 1024 (pruned at 2048) let a key's 30 runs hold over a GiB under a flood."""
DEDUP_TOKENS = 1 << 19
"""Padded tokens of the finished results remembered for re-sends, all runs together
(~190 bytes a token as Python lists: ~100 MiB); the oldest go first. The per-run window
alone scaled with the runs a key may hold (up to `max_runs_per_key`, 2048: 128 results
each, ~7 GiB of 4-row results), and with each result's size."""


class _SeqGate:
    """Releases a run's requests in seq_id order, starting at 1."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.next_seq = 1
        self.waiting: dict[int, Callable[[], None]] = {}
        self.futures: dict[int, Future] = {}
        self.released: set[int] = set()  # seq_ids used up without work
        self.stalled_since: float | None = None
        self.tenant: Any = None  # the API key whose run this is

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
        self.stalled_since = self.clock() if self.waiting else None
        if len(self.futures) > DEDUP_WINDOW + DEDUP_WINDOW // 4:  # prune in batches
            for seq in [s for s in self.futures if s < self.next_seq - DEDUP_WINDOW]:
                del self.futures[seq]


class RequestQueue:
    """Admits work to the scheduler: at most `max_pending` requests in flight, each run's
    seq_ids in order. `submit` returns a Future of the work's result at once."""

    def __init__(
        self,
        scheduler: Scheduler,
        gap_timeout: float = 60.0,
        max_pending: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        max_pending_per_tenant: int | None = None,
    ):
        self.scheduler = scheduler
        self.gap_timeout = gap_timeout
        self.max_pending = max_pending
        self.max_pending_per_tenant = max_pending_per_tenant
        self.clock = clock
        self._pending = 0
        self._tenant_pending: dict[Any, int] = {}
        self._gates: dict[str, _SeqGate] = {}
        # tenant -> times of its refused requests that named no run (see release_unnamed)
        self._unnamed: dict[Any, list[float]] = {}
        # Reentrant: work that finishes at once calls back into the queue from `submit`.
        self._lock = threading.RLock()
        self._ran: weakref.WeakKeyDictionary[Future, Ran] = weakref.WeakKeyDictionary()
        # Finished remembered results, oldest first: (model_id, seq_id) -> padded tokens.
        self._remembered: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._remembered_tokens = 0

    def submit(
        self,
        lane: str | None,
        work: Callable[[], Any] | Batchable,
        model_id: str | None = None,
        seq_id: int | None = None,
        tenant: Any = None,
    ) -> Future:
        """Queue `work` in `lane` behind the earlier work of `model_id` (it may share a pass
        with other runs' work if Batchable), taking turns as `tenant`'s (an API key's
        fingerprint; None: local). `lane` None: `work()` starts elsewhere and returns its
        own Future. A re-sent seq_id returns the first request's future. More than
        `max_pending` requests in all, or `max_pending_per_tenant` of one tenant: 429."""
        with self._lock:
            gate = (
                self._gates.setdefault(model_id, _SeqGate(self.clock))
                if model_id and seq_id
                else None
            )
            if gate and seq_id in gate.futures:
                return gate.futures[seq_id]
            unblocks = gate is not None and seq_id == gate.next_seq and bool(gate.waiting)
            if self._pending >= self.max_pending and not unblocks:
                # Refused before it takes a seq_id: the client retries as is. (Never the
                # seq_id that queued requests wait for: that would deadlock.)
                raise QueueFullError(
                    f"the server has {self._pending} requests queued; retry shortly"
                )
            mine = self._tenant_pending.get(tenant, 0)
            limit = self.max_pending_per_tenant
            if tenant is not None and limit is not None and mine >= limit and not unblocks:
                raise QueueFullError(
                    f"this API key has {mine} requests queued (limit --max-queued-per-key "
                    f"{limit}); retry after some finish"
                )
            self._pending += 1
            self._tenant_pending[tenant] = mine + 1
            result: Future = Future()

            def start() -> None:
                future = (
                    self.scheduler.submit_keyed(lane, model_id, work, tenant) if lane else work()
                )
                future.add_done_callback(lambda f: self._finish(f, result, tenant))

            if gate is None or seq_id < gate.next_seq:
                start()
            else:
                gate.futures[seq_id] = result
                tokens = work.tokens if isinstance(work, Batchable) else 1
                result.add_done_callback(lambda _: self._remember(model_id, seq_id, tokens))
                gate.waiting[seq_id] = start
                gate.tenant = tenant
                gate.advance()
                if gate.stalled_since is not None and self._take_unnamed(tenant):
                    gate.advance(skip_gap=True)
            return result

    def _remember(self, model_id: str, seq_id: int, tokens: int) -> None:
        """Count a finished result against `DEDUP_TOKENS`; forget the oldest beyond it (a
        finished request's seq_id is behind its gate, so a forgotten one is never lost
        work, only no longer recognised as a re-send, as past the per-run window)."""
        with self._lock:
            self._remembered[(model_id, seq_id)] = tokens
            self._remembered_tokens += tokens
            while self._remembered_tokens > DEDUP_TOKENS and len(self._remembered) > 1:
                (old_model, old_seq), old_tokens = self._remembered.popitem(last=False)
                self._remembered_tokens -= old_tokens
                gate = self._gates.get(old_model)
                if gate is not None:
                    gate.futures.pop(old_seq, None)

    def ran(self, future: Future) -> Ran | None:
        """How the work of a future `submit` returned ran (its pass, or its sampling),
        once it is done; None for work that ran outside a lane or sampler."""
        with self._lock:
            return self._ran.get(future)

    @property
    def pending(self) -> int:
        """Requests admitted and not yet finished (queued, waiting their seq_id, running)."""
        return self._pending

    def check_room(self, tenant: Any, n: int = 1) -> None:
        """Raise unless `n` more requests of `tenant` fit now: a QueueFullError (429) over
        the server's or the tenant's bound, an InvalidRequestError (400) if `n` is more than
        a bound could ever admit."""
        limit = self.max_pending_per_tenant if tenant is not None else None
        for bound, name in [(self.max_pending, "--max-queue"), (limit, "--max-queued-per-key")]:
            if bound is not None and n > bound:
                raise InvalidRequestError(
                    f"this request holds {n} prompts, more than the {bound} one server "
                    f"admits at once ({name}); split it"
                )
        with self._lock:
            mine = self._tenant_pending.get(tenant, 0)
            if self._pending + n > self.max_pending:
                raise QueueFullError(
                    f"the server has {self._pending} requests queued (limit --max-queue "
                    f"{self.max_pending}) and this one adds {n}; retry shortly"
                )
            if limit is not None and mine + n > limit:
                raise QueueFullError(
                    f"this API key has {mine} requests queued (limit --max-queued-per-key "
                    f"{limit}) and this one adds {n}; retry after some finish"
                )

    def submit_all(self, starts: list[Callable[[], Future]], tenant: Any = None) -> list[Future]:
        """Admit every one of `starts` (each queues its own work elsewhere, e.g. in a
        sampler, and returns its Future) or none: the server's and `tenant`'s bounds are
        checked for the whole list before any starts (429; a list larger than a bound
        could ever admit is a 400). Cancelling a returned future cancels the work's."""
        n = len(starts)
        with self._lock:
            self.check_room(tenant, n)
            self._pending += n
            self._tenant_pending[tenant] = self._tenant_pending.get(tenant, 0) + n
        results: list[Future] = []
        for i, start in enumerate(starts):
            try:
                source = start()
            except BaseException:
                for _ in range(n - i):  # give back the slots of what did not start
                    self._finish(None, None, tenant)
                for result in results:
                    result.cancel()
                raise
            result: Future = Future()
            result.add_done_callback(lambda r, s=source: r.cancelled() and s.cancel())
            source.add_done_callback(lambda f, r=result: self._finish(f, r, tenant))
            results.append(result)
        return results

    def _finish(self, source: Future | None, result: Future | None, tenant: Any = None) -> None:
        ran = current()  # in the lane's (or sampler's) thread, as it resolves `source`
        with self._lock:
            self._pending -= 1
            left = self._tenant_pending.pop(tenant, 1) - 1
            if left:
                self._tenant_pending[tenant] = left
            if ran is not None and result is not None:
                self._ran[result] = ran
        if result is None:  # a slot given back: nothing to hand on
            return
        try:
            value, error = source.result(), None
        except BaseException as e:  # noqa: BLE001 -- a failure (or cancel) goes to the caller
            value, error = None, e
        with contextlib.suppress(InvalidStateError):  # the caller cancelled it meanwhile
            result.set_exception(error) if error is not None else result.set_result(value)

    def release(self, model_id: str, seq_id: int | None) -> None:
        """Use up a seq_id whose request was rejected, so later ones are not held back."""
        if not seq_id:
            return
        with self._lock:
            gate = self._gates.setdefault(model_id, _SeqGate(self.clock))
            if seq_id >= gate.next_seq:
                gate.released.add(seq_id)
                gate.advance()

    def release_unnamed(self, tenant: Any) -> None:
        """A request of `tenant` was refused before it could say its run and seq_id (a
        body too broken to read). The seq_id it used is one of the key's own runs' next
        missing one: the first of them stalled now, or the next to stall within
        `gap_timeout`, skips its gap at once (a skipped request that arrives after all
        still runs, at once) rather than waiting out the timeout."""
        with self._lock:
            for gate in self._gates.values():
                if gate.tenant == tenant and gate.stalled_since is not None:
                    gate.advance(skip_gap=True)
                    return
            times = self._unnamed.setdefault(tenant, [])
            times.append(self.clock())
            del times[:-64]  # a flood of garbage skips no more gaps than 64 at a time

    def _take_unnamed(self, tenant: Any) -> bool:
        """Use up one of `tenant`'s recent unnamed refusals, if it has one."""
        times = self._unnamed.get(tenant)
        if not times:
            return False
        now = self.clock()
        while times and now - times[0] > self.gap_timeout:
            times.pop(0)
        if not times:
            del self._unnamed[tenant]
            return False
        times.pop(0)
        return True

    def unstick(self) -> None:
        """Let requests run past a seq_id that has been missing for `gap_timeout`."""
        now = self.clock()
        with self._lock:
            for gate in self._gates.values():
                if gate.stalled_since is not None and now - gate.stalled_since > self.gap_timeout:
                    gate.advance(skip_gap=True)

    def forget_model(self, model_id: str) -> None:
        with self._lock:
            self._gates.pop(model_id, None)

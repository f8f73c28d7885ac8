"""Request queue in front of the engine: lanes of keyed queues, turn-taking, packing.

A lane is a base model: one worker thread runs its work, since every run on a base
shares one module tree. Different base models run side by side.

Within a lane, work is queued per key (a run's model_id; None for work of no run), and
keys are grouped by tenant (the API key that owns the run; None for the local caller).
Each key's work runs in submission order, so one run's operations never reorder. Turns
go by tenant first, then by key within the tenant, both round-robin: the worker serves
the next tenant in turn, and of that tenant the next key in turn. So a tenant with 30
runs gets one pass per round, like a tenant with one run (fairness per API key, not per
run), and a run that queued a huge batch (or many requests) delays another by at most
one pass per round.

`Batchable` work (a forward_backward) can share its pass: when its key's turn comes, the
heads of the other keys that are Batchable of the same `group` join it, while the pass
stays within `MAX_PASS_TOKENS` (the first always runs, however large). They join in
rounds, each tenant adding one head (its next key's) per round, and a pass gets another
round only while every active tenant (work queued, or queued or finished in the last
`ACTIVE_SECONDS`) still adds one: so a pass holds as many requests of a tenant with 30
runs as of one with a single run, and another tenant's step never rides (nor waits
behind) a pass 30 times its size, while a tenant alone, or many tenants with a run each,
pack as fully as the token limit allows.
Their `run_many` then runs them all in one call: one batched pass over the base model.
Two more rules keep another tenant's step near its time alone under a flood: a
`FollowUp` (an optim_step) queued behind a pass of its key runs right after that pass;
and while another tenant was seen lately but is idle now, a pass holds no more than
`QUANTUM_SECONDS` of work by the lane's recent speed.
The caller gets a `concurrent.futures.Future` at once and never waits on the engine.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from tinkerd.threads import compute
from tinkerd.timing import Ran, resolving

T = TypeVar("T")
log = logging.getLogger("tinkerd.scheduler")
MAX_PASS_TOKENS = 8192  # padded tokens one packed pass may hold (bounds its activations)
ACTIVE_SECONDS = 2.0
"""A tenant with Batchable work queued, or whose Batchable work was queued or finished this
recently, limits how much another packs in one pass (see above): between its requests (its
client reading a result) it is still active. Counted from when its work last *finished*,
not only when it was queued: on a loaded machine a request can wait longer than this, and
its tenant must not lapse meanwhile (the flood then packed fully, the victim's next request
waited behind a pass 30 times its size, which made it wait longer still: 7-16 s steps).
0 turns the shares off: every key's heads pack, as before issue 23 (benchmarks/fair_pass.py
compares the two)."""
RECENT_SECONDS = 60.0
QUANTUM_SECONDS = 0.2
"""While another tenant has queued Batchable work in the last `RECENT_SECONDS` but is not
active now (a researcher sampling between training steps), a pass holds what the lane's
recent passes say takes at most `QUANTUM_SECONDS` (at least one request): the other
tenant's next request then waits behind a short pass, not a full one (issue 23: 12x its
step alone after 3 s idle). A tenant alone packs up to the token limit."""


@dataclass
class Batchable:
    """Work that may run in one call together with other keys' work of the same group."""

    group: Hashable
    """Only work of equal groups packs together; their `run_many` must be interchangeable."""
    tokens: int
    """Padded tokens it adds to a pass."""
    payload: Any
    run_many: Callable[[list[Any]], list[Any]]
    """payloads -> one result per payload, in order; an Exception instance is that
    payload's failure (the others still succeed)."""
    after: Callable[[Any, float], None] | None = None
    """Called in the lane with this payload's result and the pass's seconds, once it
    succeeded and before its future resolves (e.g. to record metrics); its errors are
    logged, never the request's."""


class FollowUp:
    """Quick work that completes its key's previous pass (an optim_step after its
    forward_backward): if it is queued when that pass ends, it runs right after it,
    before other keys' turns, rather than wait behind another tenant's pass. A training
    step is forward_backward + optim_step, and an optimizer step over a run's LoRA
    tensors takes milliseconds."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def __call__(self) -> Any:
        return self.fn()


def loss_work(engine: Any, request: Any, backward: bool) -> Batchable:
    """A validated forward (`backward=False`) or forward_backward request (from
    `engine.prepare`) as work that may share one pass with other runs' requests
    (`engine.run_losses`)."""
    return Batchable(
        group=("loss", id(engine), backward),
        tokens=request.padded_tokens,
        payload=request,
        run_many=lambda requests: engine.run_losses(requests, backward),
    )


_Item = tuple[Callable[[], Any] | Batchable, Future]
_Queues = OrderedDict[Hashable, deque[_Item]]


class _Lane:
    def __init__(
        self,
        name: str,
        max_pass_tokens: int,
        log: deque,
        on_idle: Callable[[], Any] | None = None,
        on_pass: Callable[[Ran], Any] | None = None,
    ):
        self.name = name
        self.on_idle = on_idle
        self.on_pass = on_pass
        # tenant: {key: queue}, both in turn order; neither holds an empty queue.
        self.tenants: OrderedDict[Hashable, _Queues] = OrderedDict()
        self.cond = threading.Condition()
        self.closed = False
        self.max_pass_tokens = max_pass_tokens
        self.log = log
        self.active: dict[Hashable, float] = {}  # tenant: when it last queued work
        self.recent: dict[Hashable, float] = {}  # the same, kept for RECENT_SECONDS
        self.seconds_per_token: float | None = None  # of recent passes (QUANTUM_SECONDS)
        self.thread = threading.Thread(target=self._loop, name=f"tinkerd-lane-{name}", daemon=True)
        self.thread.start()

    def put(
        self, key: Hashable, work: Callable[[], Any] | Batchable, tenant: Hashable = None
    ) -> Future:
        future: Future = Future()
        with self.cond:
            if self.closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            queues = self.tenants.setdefault(tenant, OrderedDict())
            queues.setdefault(key, deque()).append((work, future))
            if isinstance(work, Batchable):
                self.active[tenant] = self.recent[tenant] = time.monotonic()
            self.cond.notify()
        return future

    def _take(self) -> list[tuple[Hashable, Hashable, _Item]]:
        """The next pass, as (tenant, key, item): the head of the next key of the tenant
        whose turn it is, and packable heads of other keys. Every key served goes to the
        back of its tenant's turn order, every tenant served to the back of the tenants'."""
        tenant, queues = next(iter(self.tenants.items()))
        key, queue = next(iter(queues.items()))
        taken = [(tenant, key, queue.popleft())]
        first = taken[0][2][0]
        if isinstance(first, Batchable):
            taken += self._pack(first, tenant, key)
        for t, k, _ in taken:
            qs = self.tenants[t]
            q = qs.pop(k)
            if q:
                qs[k] = q  # to the back of its tenant's turn order
        for t in dict.fromkeys(t for t, _, _ in taken):
            qs = self.tenants.pop(t)
            if qs:
                self.tenants[t] = qs  # to the back of the tenants' turn order
        return taken

    def _pack(
        self, first: Batchable, tenant: Hashable, key: Hashable
    ) -> list[tuple[Hashable, Hashable, _Item]]:
        """Heads of other keys that join `first`'s pass, in rounds (see above)."""
        now = time.monotonic()
        for t in [t for t, when in self.active.items() if now - when > ACTIVE_SECONDS]:
            if t not in self.tenants or ACTIVE_SECONDS <= 0:  # queued: active however long
                del self.active[t]
        # Each tenant's packable heads, in its keys' turn order; the turn's key is used.
        heads = {
            t: deque(
                (k, q)
                for k, q in qs.items()
                if q
                and (t, k) != (tenant, key)
                and isinstance(q[0][0], Batchable)
                and q[0][0].group == first.group
            )
            for t, qs in self.tenants.items()
        }
        # As many rounds as the active tenant with the fewest heads can fill (one with
        # nothing queued now, but active lately, allows just the first round: its next
        # request must not wait behind a big pass).
        fewest = (len(heads.get(t, ())) + (t == tenant) for t in self.active)
        rounds = max(1, min(fewest, default=len(self.tenants) + sum(map(len, heads.values()))))
        taken, tokens, limit = [], first.tokens, self._limit(tenant, now)
        for round in range(rounds):
            for t, left in heads.items():
                if round == 0 and t == tenant:
                    continue  # its first head is `first`
                while left:  # its next key whose head fits
                    k, q = left.popleft()
                    if tokens + q[0][0].tokens <= limit:
                        taken.append((t, k, q.popleft()))
                        tokens += taken[-1][2][0].tokens
                        break
            if not any(heads.values()):
                break
        return taken

    def _limit(self, tenant: Hashable, now: float) -> int:
        """Tokens a pass started by `tenant` may hold (QUANTUM_SECONDS)."""
        for t in [t for t, when in self.recent.items() if now - when > RECENT_SECONDS]:
            del self.recent[t]
        idle = any(t != tenant and t not in self.active for t in self.recent)
        if not idle or not self.seconds_per_token or ACTIVE_SECONDS <= 0:
            return self.max_pass_tokens
        return min(self.max_pass_tokens, int(QUANTUM_SECONDS / self.seconds_per_token))

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.tenants and not self.closed:
                    self.cond.wait()
                if not self.tenants:
                    return  # closed and drained
                taken = self._take()
            self.log.append(tuple(k for _, k, _ in taken))
            ran = _run([(k, item) for _, k, item in taken], self.name, self.on_pass)
            with self.cond:  # its client now reads the result: still active (see above)
                now = time.monotonic()
                for t in {t for t, _, (work, _) in taken if isinstance(work, Batchable)}:
                    self.active[t] = now
                if ran is not None and ran.tokens:
                    rate = (ran.end - ran.start) / ran.tokens
                    old = self.seconds_per_token
                    self.seconds_per_token = rate if old is None else 0.7 * old + 0.3 * rate
                follow = self._follow_ups(taken)
            for key, item in follow:
                _run([(key, item)], self.name, self.on_pass)
            # After every pass, not only when idle: a lane kept busy by a flood never idles,
            # and its heap then grew with every pass (the hook rate-limits itself).
            if self.on_idle is not None:
                try:
                    self.on_idle()
                except Exception:  # noqa: BLE001 -- housekeeping never stops a lane
                    log.exception("idle hook of a lane failed")

    def _follow_ups(
        self, taken: list[tuple[Hashable, Hashable, _Item]]
    ) -> list[tuple[Hashable, _Item]]:
        """The FollowUp heads of the keys a Batchable pass served, taken off their queues
        to run now (`FollowUp`)."""
        follow = []
        for t, k, (work, _) in taken:
            queue = self.tenants.get(t, {}).get(k)
            if isinstance(work, Batchable) and queue and isinstance(queue[0][0], FollowUp):
                follow.append((k, queue.popleft()))
                if not queue:
                    del self.tenants[t][k]
                    if not self.tenants[t]:
                        del self.tenants[t]
        return follow

    def close(self, cancel: bool) -> None:
        with self.cond:
            self.closed = True
            if cancel:
                for queues in self.tenants.values():
                    for queue in queues.values():
                        for _, future in queue:
                            future.cancel()
                self.tenants.clear()
            self.cond.notify()


def _run(
    taken: list[tuple[Hashable, _Item]], lane: str, on_pass: Callable[[Ran], Any] | None
) -> Ran | None:
    """Run one pass and resolve its futures, telling their callbacks how it ran
    (`tinkerd.timing`) and `on_pass` (metrics) what it was; returns that (None: all
    cancelled)."""
    items = [item for _, item in taken]
    futures = [f for _, f in items if f.set_running_or_notify_cancel()]
    live = [(w, f) for w, f in items if f in futures]
    if not live:
        return None
    start, wall = time.perf_counter(), time.time()
    try:
        with compute():  # intra-op threads sized to the free cores (tinkerd.threads)
            if isinstance(live[0][0], Batchable):
                results = live[0][0].run_many([w.payload for w, _ in live])
            else:
                results = [live[0][0]()]
    except BaseException as e:  # noqa: BLE001 -- every failure reaches its callers
        results = [e] * len(live)
    seconds = time.perf_counter() - start
    keys = tuple(k for k, item in taken if item[1] in futures)
    tokens = sum(w.tokens for w, _ in live if isinstance(w, Batchable))
    ran = Ran(lane, wall, wall + seconds, keys, tokens)
    if on_pass is not None:
        try:
            on_pass(ran)
        except Exception:  # noqa: BLE001 -- metrics must never strand a caller
            log.exception("pass hook failed")
    with resolving(ran):
        for (work, future), result in zip(live, results):
            if isinstance(result, BaseException):
                future.set_exception(result)
                continue
            if isinstance(work, Batchable) and work.after is not None:
                try:
                    work.after(result, seconds)
                except Exception:  # noqa: BLE001 -- bookkeeping must never strand a caller
                    log.exception("after-hook of a finished request failed")
            future.set_result(result)
    return ran


class Scheduler:
    def __init__(
        self,
        max_pass_tokens: int = MAX_PASS_TOKENS,
        on_idle: Callable[[], Any] | None = None,
        on_pass: Callable[[Ran], Any] | None = None,
    ) -> None:
        """`on_idle`: called in a lane's thread after each pass, busy or idle (e.g. to give
        freed memory back: service/memory.py's `trim_heap`, which runs at most every 2 s
        and once more after the last pass). `on_pass`: called in the lane's thread
        after each pass, before its futures resolve (metrics: service/telemetry.py)."""
        self._lanes: dict[str, _Lane] = {}
        self._lock = threading.Lock()
        self.max_pass_tokens = max_pass_tokens
        self.on_idle = on_idle
        self.on_pass = on_pass
        self.passes: deque[tuple[Hashable, ...]] = deque(maxlen=4096)
        """Keys served by each recent pass, all lanes together: how much was packed."""
        # A daemon worker still inside a torch op at interpreter teardown aborts the
        # process: finish queued work and join the workers first.
        atexit.register(self.shutdown)

    def submit_keyed(
        self,
        lane: str,
        key: Hashable,
        work: Callable[[], T] | Batchable,
        tenant: Hashable = None,
    ) -> Future[T]:
        """Queue `work` (a no-argument callable, or a Batchable) behind `key`'s earlier
        work; `key` takes its turns among the other keys of `tenant` (see above)."""
        with self._lock:
            worker = self._lanes.get(lane)
            if worker is None:
                worker = self._lanes[lane] = _Lane(
                    lane, self.max_pass_tokens, self.passes, self.on_idle, self.on_pass
                )
        return worker.put(key, work, tenant)

    def submit(self, lane: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Queue `fn(*args, **kwargs)` as work of no run (key None)."""
        return self.submit_keyed(lane, None, lambda: fn(*args, **kwargs))

    def queued(self) -> dict[str, int]:
        """Requests waiting in each lane (not the pass running now), by lane name."""
        with self._lock:
            lanes = list(self._lanes.items())
        depth = {}
        for name, lane in lanes:
            with lane.cond:  # held only to queue or take work, never during a pass
                depth[name] = sum(len(q) for qs in lane.tenants.values() for q in qs.values())
        return depth

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking work; with `wait`, finish what is queued, else cancel it."""
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.close(cancel=not wait)
        for lane in lanes:
            if wait and lane.thread is not threading.current_thread():
                lane.thread.join()

"""Intra-op threads sized to the cores other processes leave free, so that training and
sampling degrade gracefully on a CPU that other processes share.

PyTorch's CPU build runs its intra-op threads on GNU OpenMP (libgomp). A libgomp thread
that reaches a barrier spins for a while before it sleeps. On a quiet machine that spin is
what makes small ops fast (tinkerd/tiny trains 1.7x faster than with sleeping waits). When
other processes hold the cores it is a disaster: the thread everyone waits for is
descheduled while its peers burn the remaining cores spinning, and a step of 0.3 s takes
4 s (issue 26: 8.3x slower than one thread beside two busy processes).

So the wait policy stays libgomp's, and the number of threads follows the machine:
every compute thread (a scheduler lane's pass, a sampler step) enters `compute()`, which
gives it `threads = floor(free / active + 0.2)` intra-op threads (at least 1, at most what
torch started with), where `free` is the cores of this process's CPU set that other
processes left idle over the last half second (`/proc/stat` less this process's own CPU
time) and `active` the compute threads of this process inside `compute()` now, or out
of it between two units of work that follow at once (a sampler with rows left to
decode says so with `stay`). One thread
has no barrier to spin at; two threads come back once the others go quiet. The 0.2 leans
to fewer threads: a thread too few costs at most half the speed on two cores, a thread too
many can cost ten times. benchmarks/shared_cpu.py measures both cases.

Where `/proc/stat` does not exist (macOS, Windows) the thread count is left alone and
`prefer_passive_wait` asks libgomp for sleeping waits instead (set before torch loads: the
`tinkerd` command and `tinkerd.engine` call it). `TINKERD_FIXED_THREADS=1`, or a wait policy
already in the environment (`OMP_WAIT_POLICY`, `GOMP_SPINCOUNT`), turns both off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

STAT = "/proc/stat"
INTERVAL = 0.5  # seconds between two readings of the machine's CPU use
LEAN = 0.2  # added to free cores per thread before rounding down (see above)


def _user_chose() -> bool:
    return (
        os.environ.get("TINKERD_FIXED_THREADS", "") not in ("", "0")
        or "OMP_WAIT_POLICY" in os.environ
        or "GOMP_SPINCOUNT" in os.environ
    )


def prefer_passive_wait() -> bool:
    """Where threads cannot be sized to the machine (no `/proc/stat`), set
    `OMP_WAIT_POLICY=PASSIVE` for this process and its children, unless the user chose a
    wait policy or torch is already loaded. Returns whether it was set."""
    if os.path.exists(STAT) or "torch" in sys.modules or _user_chose():
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def threads_for(free_cores: float, active: int, most: int) -> int:
    """Intra-op threads for one of `active` compute threads when `free_cores` are idle."""
    return max(1, min(most, int(free_cores / max(1, active) + LEAN)))


def read_busy(cpus: set[int], text: str | None = None) -> tuple[int, int]:
    """(busy, total) clock ticks of `cpus` since boot, from `/proc/stat` (or `text`)."""
    if text is None:
        with open(STAT) as f:
            text = f.read()
    busy = total = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        # user nice system idle iowait irq softirq steal [guest guest_nice: inside user]
        ticks = [int(v) for v in rest.split()[:8]]
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def _cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


class CpuShare:
    """How many cores other processes leave to this one, re-read at most every
    `INTERVAL` seconds, and how many of this process's threads are computing."""

    def __init__(self, most: int, cpus: set[int] | None = None) -> None:
        self.cpus = cpus if cpus is not None else _cpus()
        self.most = max(1, min(most, len(self.cpus)))  # intra-op threads at most
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.lock = threading.Lock()
        self.busy: set[threading.Thread] = set()  # inside `compute()`, or staying
        self.free = float(len(self.cpus))
        self.last = (time.monotonic(), *read_busy(self.cpus), _own_seconds())

    def sample(self, now: float, busy: int, total: int, own: float) -> None:
        """Update `free` from the machine's (`busy`, `total` ticks) and this process's
        (`own` seconds) CPU time since the last reading, if `INTERVAL` has passed."""
        if now - self.last[0] < INTERVAL:
            return
        _, busy0, total0, own0 = self.last
        self.last = (now, busy, total, own)
        if total <= total0:
            return
        cores = len(self.cpus)
        others = (busy - busy0) / self.tick - (own - own0)  # CPU seconds
        window = (total - total0) / self.tick / cores  # wall seconds
        self.free = min(float(cores), max(0.0, cores - others / window))

    @contextlib.contextmanager
    def compute(self, stay: Callable[[], bool] | None = None) -> Iterator[int]:
        """Run the block with this thread's intra-op threads sized to the free cores;
        yields the count. `stay`, asked on the way out: whether this thread's next unit
        of work follows at once (it then still counts as active in between)."""
        import torch

        me = threading.current_thread()
        with self.lock:
            now = time.monotonic()
            self.busy.add(me)
            if now - self.last[0] >= INTERVAL:
                self.sample(now, *read_busy(self.cpus), _own_seconds())
            want = threads_for(self.free, self.active(), self.most)
        try:
            # Per thread: torch gives a new thread the count last set by any thread.
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)
            yield want
        except BaseException:
            with self.lock:
                self.busy.discard(me)
            raise
        with self.lock:
            if stay is None or not stay():
                self.busy.discard(me)

    def active(self) -> int:
        """Compute threads inside `compute()` or staying between two units of work. Not
        a thread that merely computed lately: threads taking turns (an RL loop's
        sampling, then its training pass) each get every core. (Counting any thread out
        for under 0.5 s, a benchmark alternating two lanes ran each switch's first pass
        on one thread: K=16 packed on tinkerd/tiny at 3,554-3,602 tok/s against
        4,193-4,457 with the count fixed.)"""
        self.busy = {t for t in self.busy if t.is_alive()}
        return len(self.busy)


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


_share: CpuShare | None = None
_share_lock = threading.Lock()


def cpu_share() -> CpuShare | None:
    """The process's `CpuShare`, made on first use; None where the machine's CPU use cannot
    be read or the user fixed the threading."""
    global _share
    with _share_lock:
        if _share is None and os.path.exists(STAT) and not _user_chose():
            import torch

            _share = CpuShare(most=torch.get_num_threads())
        return _share


@contextlib.contextmanager
def compute(stay: Callable[[], bool] | None = None) -> Iterator[None]:
    """Enter around a compute thread's unit of work (a pass, a decode step): its intra-op
    threads follow the cores other processes leave free (see above). `stay`: see
    `CpuShare.compute`."""
    share = _share or cpu_share()
    if share is None:
        yield
        return
    with share.compute(stay):
        yield

"""Intra-op threads sized to the cores other processes leave free (tinkerd/threads.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from tinkerd import threads
from tinkerd.service.scheduler import Scheduler
from tinkerd.threads import CpuShare, read_busy, threads_for

STAT = """cpu  900 0 300 4000 100 0 0 0 0 0
cpu0 100 0 50 1000 10 0 0 0 0 0
cpu1 200 5 60 900 20 3 2 1 0 0
cpu2 600 0 190 2100 70 0 0 0 0 0
intr 12345
ctxt 678
"""


def test_busy_ticks_are_read_for_this_process_cpus_only() -> None:
    assert read_busy({0}, STAT) == (150, 1160)
    assert read_busy({0, 1}, STAT) == (150 + 271, 1160 + 1191)
    assert read_busy({1, 2}, STAT) == (271 + 790, 1191 + 2960)


@pytest.mark.parametrize(
    ("free", "active", "most", "want"),
    [
        (2.0, 1, 2, 2),  # quiet
        (1.85, 1, 2, 2),  # a light process beside
        (1.5, 1, 2, 1),  # half a core taken: lean to fewer
        (0.0, 1, 2, 1),  # all taken: never below one
        (2.0, 2, 2, 1),  # a lane and a sampler share the cores
        (16.0, 1, 8, 8),  # never above what torch started with
        (16.0, 3, 16, 5),
    ],
)
def test_threads_follow_free_cores(free: float, active: int, most: int, want: int) -> None:
    assert threads_for(free, active, most) == want


def test_free_cores_are_the_machine_less_this_process() -> None:
    share = CpuShare(most=2, cpus={0, 1})
    tick = share.tick
    now, busy, total, own = share.last
    # 1 s of wall on 2 cores = 2 s of ticks: 1.5 s busy, 1.0 s of it this process.
    share.sample(now + 1.0, busy + int(1.5 * tick), total + 2 * tick, own + 1.0)
    assert share.free == pytest.approx(1.5, abs=0.05)
    # Too soon for another reading: unchanged.
    share.sample(now + 1.1, busy + 10 * tick, total + 10 * tick, own)
    assert share.free == pytest.approx(1.5, abs=0.05)
    # Two other processes spinning, this one idle: nothing free.
    share.sample(now + 2.0, busy + int(3.5 * tick), total + 4 * tick, own + 1.0)
    assert share.free == pytest.approx(0.0, abs=0.05)


def test_busy_processes_take_threads_away_and_quiet_gives_them_back() -> None:
    """Real processes spinning every core of this process's CPU set: within a couple of
    readings a compute thread gets one intra-op thread; then the readings of a quiet
    machine (faked: CI may not be quiet) give back all of them."""
    cpus = set(os.sched_getaffinity(0))
    share = CpuShare(most=len(cpus), cpus=cpus)
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(len(cpus))
    ]
    try:
        deadline = time.monotonic() + 10
        got = None
        while time.monotonic() < deadline and got != 1:
            time.sleep(threads.INTERVAL)
            with share.compute() as got:
                pass
        assert got == 1
        assert torch.get_num_threads() == 1
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    now, busy, total, own = share.last
    share.sample(now + 1.0, busy, total + len(cpus) * share.tick, own)
    with share.compute() as got:
        assert got == len(cpus) == torch.get_num_threads()


def test_a_lane_pass_runs_with_the_threads_the_share_gives(monkeypatch) -> None:
    share = CpuShare(most=4, cpus={0, 1, 2, 3})
    share.free = 1.0
    share.last = (time.monotonic() + 3600, *share.last[1:])  # no reading during the test
    monkeypatch.setattr(threads, "_share", share)
    scheduler = Scheduler()
    try:
        seen = scheduler.submit("lane", torch.get_num_threads).result(timeout=30)
        assert seen == 1
        share.free = 4.0
        assert scheduler.submit("lane", torch.get_num_threads).result(timeout=30) == 4

        # A second compute thread busy at the same time: the cores are split.
        inside, release = threading.Event(), threading.Event()

        def other() -> None:
            with share.compute():
                inside.set()
                release.wait(30)

        t = threading.Thread(target=other)
        t.start()
        inside.wait(30)
        assert scheduler.submit("lane", torch.get_num_threads).result(timeout=30) == 2
        release.set()
        t.join()
    finally:
        scheduler.shutdown()


def test_compute_threads_taking_turns_each_get_every_core() -> None:
    """An RL loop samples, then trains: a sampler that has finished its rows no longer
    counts, so the training pass right after gets every free core (it got half while a
    thread counted for 0.5 s after leaving). A sampler with rows left counts between its
    steps; a thread that ended, or failed inside, does not."""
    share = CpuShare(most=2, cpus={0, 1})
    share.last = (time.monotonic() + 3600, *share.last[1:])  # no reading during the test
    rows_left = [True]

    def sampler_step() -> None:
        with share.compute(stay=lambda: rows_left[0]):
            pass

    def run(fn) -> threading.Thread:
        t = threading.Thread(target=fn)
        t.start()
        return t

    gate = threading.Event()
    alive = run(lambda: (sampler_step(), gate.wait(30)))
    while alive.is_alive() and not share.busy:
        time.sleep(0.001)
    with share.compute() as got:  # between two of its decode steps
        assert got == 1
    rows_left[0] = False
    gate.set()
    alive.join()
    with share.compute() as got:  # it ended while counted: gone
        assert got == 2

    gate.clear()
    stepped = threading.Event()
    done = run(lambda: (sampler_step(), stepped.set(), gate.wait(30)))  # last step: no rows
    assert stepped.wait(30)
    with share.compute() as got:
        assert got == 2
    gate.set()
    done.join()

    rows_left[0] = True

    def failing_step() -> None:
        with contextlib.suppress(RuntimeError), share.compute(stay=lambda: rows_left[0]):
            raise RuntimeError("a failed step resets the batch")
        stepped.set()
        gate.wait(30)

    gate.clear()
    stepped.clear()
    failed = run(failing_step)
    assert stepped.wait(30)
    with share.compute() as got:
        assert got == 2
    gate.set()
    failed.join()

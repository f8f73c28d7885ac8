"""OpenMP's wait policy, chosen before torch loads, so that training degrades gracefully
on a CPU that other processes share.

PyTorch's CPU build runs its intra-op threads on GNU OpenMP (libgomp). By default a
libgomp thread that reaches a barrier spins for about 3 ms before it sleeps; when other
processes hold the cores, the thread that everyone waits for is descheduled while its
peers burn the remaining cores spinning, and a step that takes 0.3 s can take 4 s. With
`OMP_WAIT_POLICY=PASSIVE` waiting threads sleep at once: measured on tinkerd/tiny (25
steps, 8 x 64 tokens, 2 cores, load ~14 from other jobs) 68 s with libgomp's default,
6.6 s with `OMP_NUM_THREADS=1` and 3.9 s passive (benchmarks/shared_cpu.py,
docs/benchmarks.md).

libgomp reads the variable once, when it is loaded (`import torch`), so it has to be in
the environment before that: the `tinkerd` command sets it first thing, and so does
`tinkerd.engine` (the embedded `ServiceClient()`) when torch is not yet imported. A
process that imported torch before tinkerd keeps the policy it started with (export
`OMP_WAIT_POLICY=PASSIVE` to choose it there). A value already in the environment, of
either variable libgomp reads for this (`OMP_WAIT_POLICY`, `GOMP_SPINCOUNT`), is kept.
"""

from __future__ import annotations

import os
import sys


def prefer_passive_wait() -> bool:
    """Set `OMP_WAIT_POLICY=PASSIVE` for this process (and its children) unless the user
    chose a wait policy or torch is already loaded. Returns whether it was set."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True

"""How a request ran, told by the thread that resolves its future.

A scheduler lane (one pass of packed requests) or a sampler (one sample request) sets
`current()` while it resolves the futures of what it just ran; done callbacks run in that
thread, so whatever chains on those futures (the service's queue, then telemetry) can
read when the work started and ended, on which lane, and what shared its pass, with no
bookkeeping passed through the work itself. Outside `resolving`, `current()` is None.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

_local = threading.local()


@dataclass(frozen=True)
class Ran:
    """One pass of a lane, or one sample request in a sampler. Times are unix seconds."""

    lane: str
    """The base model it ran on."""
    start: float
    end: float
    packed: tuple[Hashable, ...] = ()
    """Keys (model_ids; None: work of no run) of every request in the pass, in pass order."""
    tokens: int = 0
    """Padded tokens of the whole pass (training passes), or the sample's prompt plus
    sampled tokens."""
    first_token: float | None = None
    """When a sample request's first token was chosen (time to first token)."""
    batch_rows: int = 0
    """Sequences decoded together when a sample request finished."""


def current() -> Ran | None:
    """What the thread is resolving futures of, if it is."""
    return getattr(_local, "ran", None)


@contextlib.contextmanager
def resolving(ran: Ran) -> Iterator[None]:
    """Resolve futures of `ran` inside this block."""
    _local.ran = ran
    try:
        yield
    finally:
        _local.ran = None

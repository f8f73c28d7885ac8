"""The service's limits, in one place (set by `tinkerd serve`'s flags)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tinkerd.service.scheduler import MAX_PASS_TOKENS


@dataclass
class ServiceConfig:
    poll_timeout: float = 25.0
    """Seconds an HTTP long-poll (`retrieve_future`) waits before answering try_again."""
    max_pending: int = 4096
    """Requests queued or running at once; more are refused (HTTP 429)."""
    session_timeout: float = 300.0
    """Seconds without a heartbeat after which a session ends and its runs are freed."""
    expiry_interval: float | None = None
    """Seconds between expiry sweeps (default: min(session_timeout / 4, 5)); 0: no sweep
    thread (call `Sessions.expire` yourself, e.g. in a test with a fake `clock`)."""
    max_pass_tokens: int = MAX_PASS_TOKENS
    """Padded tokens one packed forward_backward pass may hold."""
    gap_timeout: float = 60.0
    """Seconds a missing seq_id holds back a run's later requests."""
    clock: Callable[[], float] = field(default=time.time)
    """Wall-clock seconds (heartbeats, expiry): injectable so tests need not wait."""

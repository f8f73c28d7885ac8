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
    max_body_bytes: int | None = 64 << 20
    """Bytes one HTTP request body may hold (413 beyond); None: no limit."""
    max_pass_tokens: int = MAX_PASS_TOKENS
    """Padded tokens one packed forward_backward pass may hold."""
    gap_timeout: float = 60.0
    """Seconds a missing seq_id holds back a run's later requests."""
    # Per-API-key quotas (the local, embedded caller has none): what one key may hold at
    # once, so one key cannot take the server's memory. None: no limit.
    max_runs_per_key: int | None = 2048
    """Active training runs (an unloaded, finished or expired run no longer counts): more
    are refused with 403 naming the limit. Large: runs beyond the engine's resident set
    are paged out to disk (`engine.paging`), so what a run costs while idle is disk."""
    max_sessions_per_key: int | None = 1024
    """Open sessions (finished or expired ones no longer count): more are refused (403)."""
    max_sampling_sessions_per_key: int | None = 1024
    """Sampling sessions held: beyond it the key's least recently used one is dropped (a
    later sample on it answers 404 saying so), so an RL loop that makes a sampling client
    per step keeps working in bounded memory."""
    max_queued_per_key: int | None = 256
    """Requests of one key queued or running at once (samples included): more are refused
    with 429 and Retry-After, like `max_pending`."""
    max_losses_per_key: int | None = 32
    """Uploaded custom losses held (freed with their session): more are refused (403)."""
    max_loss_bytes_per_key: int | None = 32 << 20
    """Bytes of uploaded custom-loss graphs held (their JSON size): more are refused (403)."""
    future_retention: float = 3600.0
    """Seconds a finished request's result stays retrievable (it is usually fetched within
    a second); after it has been retrieved, `retrieved_grace` seconds."""
    retrieved_grace: float = 300.0
    """Seconds a retrieved result stays retrievable again (re-polls after a reconnect)."""
    max_metric_steps: int = 10_000
    """Steps of metrics kept per run; beyond it, the older half is thinned to every other
    step (repeatedly: old history gets coarser, recent steps stay exact)."""
    telemetry: bool = True
    """Record each request's span (request metrics, traces, logs; `serve --no-telemetry`
    turns it off, e.g. to measure its cost: /metrics keeps only the scrape-time gauges)."""
    json_log: bool = False
    """One JSON line per answered request on the `tinkerd.requests` logger (`serve
    --log-requests`; docs/operations.md)."""
    clock: Callable[[], float] = field(default=time.time)
    """Wall-clock seconds (heartbeats, expiry): injectable so tests need not wait."""

"""Session traces: a session's requests as a Chrome JSON trace (the Trace Event Format,
which ui.perfetto.dev and chrome://tracing open), behind signed, expiring links.

The official SDK's `RestClient.export_session_trace(session_id)` asks
`GET /api/v1/sessions/{id}/trace_export` and gets `{"status": "ready", "url"}`; the URL
needs no API key: its signature binds the session, the key that asked and the expiry, so
it is good for that key's session only, for `TRACE_URL_SECONDS`, and dies with the
server process (a fresh secret per start). The trace is built when downloaded, from the
server's ring of recent requests (`telemetry.MAX_SPANS`): a session older than that ring,
or from before a restart, has fewer spans than it had requests.

In the trace (timestamps in microseconds from the session's first request):
- process "session ...": one thread per training run with a slice per request while it
  ran (`X` events: verb, request_id, tokens, outcome, the runs packed into its pass);
- an async track per request (`b`/`e` events, id = request_id): the request from
  submission to answer, with a nested `queued` slice until its pass started;
- counter tracks (`C`): requests in flight, tokens per second (1 s bins), and each
  request's size in tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import defaultdict

from tinkerd.errors import NotFoundError
from tinkerd.service.telemetry import Span

TRACE_URL_SECONDS = 3600
"""How long a trace link stays valid (Tinker's last about an hour)."""


class TraceLinks:
    """Signs and checks trace download links of this server process."""

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(32)

    def _signature(self, session_id: str, owner: str, expires: int) -> str:
        message = f"trace\n{session_id}\n{owner}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, session_id: str, owner: str) -> tuple[int, str]:
        """(expires as unix seconds, signature) of a link to `owner`'s session trace."""
        expires = int(time.time()) + TRACE_URL_SECONDS
        return expires, self._signature(session_id, owner, expires)

    def check(self, session_id: str, owner: str | None, expires: int, signature: str) -> None:
        """Raise NotFoundError unless the link was signed for `owner`'s session (`owner`:
        the session's owner now) and has not expired."""
        good = owner is not None and hmac.compare_digest(
            self._signature(session_id, owner, expires).encode(), signature.encode()
        )
        if not good or expires < time.time():
            raise NotFoundError("the trace link is invalid or has expired; export it again")


def chrome_trace(session_id: str, spans: list[Span]) -> dict:
    """The Trace Event Format document of a session's `spans` (submission order)."""
    origin = min((s.submitted for s in spans), default=time.time())
    us = lambda t: round((t - origin) * 1e6, 3)  # noqa: E731
    pid = 1
    events: list[dict] = [
        {
            "ph": "M",
            "pid": pid,
            "tid": 0,
            "name": "process_name",
            "args": {"name": f"session {session_id}"},
        },
        {"ph": "M", "pid": pid, "tid": 0, "name": "thread_name", "args": {"name": "requests"}},
    ]
    threads: dict[str, int] = {}
    for span in spans:
        args = {
            "request_id": span.request_id,
            "verb": span.verb,
            "run": span.run,
            "tokens": span.tokens,
            "outcome": span.outcome,
            "queue_ms": round(span.queue_s * 1e3, 3),
            "run_ms": round(span.run_s * 1e3, 3),
        }
        if span.lane is not None:
            args["lane"] = span.lane
        if span.packed:
            args["packed_with"] = [str(k) for k in span.packed if k != span.run]
            args["pass_tokens"] = span.pass_tokens
        if span.first_token is not None:
            args["ttft_ms"] = round((span.first_token - span.submitted) * 1e3, 3)
        if span.error:
            args["error"] = span.error
        common = {"pid": pid, "tid": 0, "cat": "request", "id": span.request_id}
        events.append(
            {**common, "ph": "b", "name": span.verb, "ts": us(span.submitted), "args": args}
        )
        if span.queue_s > 0:
            events.append({**common, "ph": "b", "name": "queued", "ts": us(span.submitted)})
            events.append({**common, "ph": "e", "name": "queued", "ts": us(span.started)})
        events.append({**common, "ph": "e", "name": span.verb, "ts": us(span.finished)})
        if span.run is not None and span.verb != "sample" and span.lane is not None:
            # A run's requests run one at a time, so its slices never overlap.
            tid = threads.setdefault(span.run, len(threads) + 1)
            events.append(
                {
                    "ph": "X",
                    "pid": pid,
                    "tid": tid,
                    "cat": "run",
                    "name": span.verb,
                    "ts": us(span.started),
                    "dur": round(span.run_s * 1e6, 3),
                    "args": args,
                }
            )
    for run, tid in threads.items():
        events.append(
            {
                "ph": "M",
                "pid": pid,
                "tid": tid,
                "name": "thread_name",
                "args": {"name": f"run {run}"},
            }
        )
    events += _counters(spans, pid, origin)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"session_id": session_id, "origin_unix_s": origin, "requests": len(spans)},
    }


def _counters(spans: list[Span], pid: int, origin: float) -> list[dict]:
    """Counter tracks: requests in flight, tokens/s in 1 s bins, request sizes."""
    us = lambda t: round((t - origin) * 1e6, 3)  # noqa: E731
    events = []
    changes = sorted([(s.submitted, 1) for s in spans] + [(s.finished, -1) for s in spans])
    level = 0
    for t, step in changes:
        level += step
        events.append(
            {
                "ph": "C",
                "pid": pid,
                "tid": 0,
                "name": "in flight",
                "ts": us(t),
                "args": {"requests": level},
            }
        )
    bins: dict[int, int] = defaultdict(int)
    for s in spans:
        bins[int(s.finished - origin)] += s.tokens
    for second in sorted(bins):
        events.append(
            {
                "ph": "C",
                "pid": pid,
                "tid": 0,
                "name": "tokens/s",
                "ts": second * 1e6,
                "args": {"tokens": bins[second]},
            }
        )
    for s in spans:
        events.append(
            {
                "ph": "C",
                "pid": pid,
                "tid": 0,
                "name": "request tokens",
                "ts": us(s.submitted),
                "args": {"tokens": s.tokens},
            }
        )
    return events

"""Telemetry's parts without a server (docs/operations.md): how a packed pass is told to
its futures, per-server registries, the dashboard's server-view rates and percentiles,
trace link expiry. The end-to-end tests are tests/e2e/test_operations.py."""

import threading
import time

import pytest
from helpers import TINY

from tinkerd.service.futures import RequestQueue
from tinkerd.service.scheduler import Batchable, Scheduler
from tinkerd.service.telemetry import Span, Telemetry
from tinkerd.service.traces import TraceLinks
from tinkerd.timing import current


def test_registries_are_per_server():
    a, b = Telemetry(engine=None), Telemetry(engine=None)  # no clash in one process
    a.requests.labels("forward", "ok").inc()
    assert b'tinkerd_requests_total{outcome="ok",verb="forward"} 1.0' in a.exposition()
    assert b"tinkerd_requests_total{" not in b.exposition()


def test_an_expired_trace_link_is_refused(monkeypatch):
    links = TraceLinks()
    expires, signature = links.sign("session-x", "key-a")
    links.check("session-x", "key-a", expires, signature)
    with pytest.raises(Exception, match="invalid or has expired"):
        links.check("session-x", "key-b", expires, signature)  # another owner's session
    monkeypatch.setattr(time, "time", lambda: expires + 1)
    with pytest.raises(Exception, match="invalid or has expired"):
        links.check("session-x", "key-a", expires, signature)


def test_dashboard_server_view_rates_and_percentiles():
    telemetry = Telemetry(engine=None)
    telemetry.snapshot()
    t0 = telemetry.history[-1]["time"]
    time.sleep(0.01)
    now = time.time()  # four requests answered within the interval
    for i, latency in enumerate([0.1, 0.2, 0.3, 0.4]):
        span = Span(f"req-{i}", "forward_backward", "key-a", "alice", "s", "s:train:0",
                    now - latency, now - latency, now, "ok", tokens=10)  # fmt: skip
        telemetry.record(span)
    telemetry.pass_tokens.labels(TINY).inc(400)
    telemetry.busy_seconds.labels(TINY).inc(0.5)
    time.sleep(0.01)
    telemetry.snapshot()
    point = telemetry.series()[-1]
    dt = telemetry.history[-1]["time"] - t0
    assert point["train_tokens_per_s"] == pytest.approx(400 / dt)
    assert point["utilisation"] == pytest.approx(0.5 / dt)
    assert point["requests_per_s"] == pytest.approx(4 / dt)
    assert point["train_latency_p50_s"] == pytest.approx(0.3)
    assert point["train_latency_p99_s"] == pytest.approx(0.4)
    assert point["sample_latency_p50_s"] is None


def test_futures_of_a_packed_pass_learn_how_it_ran():
    """The scheduler tells each future's callbacks (and `on_pass`) which pass ran it: its
    lane, times, every key packed into it and its padded tokens; the queue keeps it."""
    passes = []
    scheduler = Scheduler(on_pass=passes.append)
    queue = RequestQueue(scheduler)
    gate = threading.Event()
    queue.submit("lane-a", gate.wait, "blocker")  # holds the lane while three queue up

    def work(key: str) -> Batchable:
        return Batchable(("loss",), 10, key, lambda keys: [k.upper() for k in keys])

    seen = {}
    futures = {key: queue.submit("lane-a", work(key), key, tenant=key) for key in "xyz"}
    for key, future in futures.items():
        future.add_done_callback(lambda f, key=key: seen.setdefault(key, current()))
    gate.set()
    assert [f.result() for f in futures.values()] == ["X", "Y", "Z"]
    ran = passes[-1]
    assert (ran.lane, ran.packed, ran.tokens) == ("lane-a", ("x", "y", "z"), 30)
    assert ran.start <= ran.end and passes[0].packed == ("blocker",)
    assert seen == {"x": ran, "y": ran, "z": ran}  # the callbacks saw the pass
    assert all(queue.ran(f) == ran for f in futures.values())
    assert current() is None  # only while a pass resolves
    scheduler.shutdown()

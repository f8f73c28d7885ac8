"""Operating a server: per-request spans, Prometheus metrics, JSON request logs and the
dashboard's server view (docs/operations.md).

Every request with a request_id passes `Telemetry.request` once (today the server's
`RequestTable.track`; the one call moves to the service's dispatcher when there is one).
When its future resolves, the span is complete: when it was submitted, when its pass (or
sampling) started and ended (`tinkerd.timing`, told by the thread that ran it), what shared
the pass, tokens, outcome. It then goes to the request counters and histograms, to a ring
of recent spans (session traces: service/traces.py), and, with `json_log`, to one JSON line
on stderr (written directly: the logging module would cost a request more than the rest
of its telemetry together). Passes of the scheduler's lanes come in through
`passed`; queue depths, sampler totals and memory are read when scraped.

Each Telemetry has its own `CollectorRegistry`, so several servers in one process (tests)
never share a metric. Label values are bounded: verbs and outcomes are fixed sets, lanes
are served base models, and `key` (on `tinkerd_key_requests_total` only, which only the
operator's metrics key sees) is the label or fingerprint of a configured API key, so its
cardinality is the number of keys.
"""

from __future__ import annotations

import bisect
import json
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TextIO

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tinkerd.errors import TinkerdError
from tinkerd.timing import Ran, current

disable_created_metrics()  # no `_created` twin of every counter: half the scrape, no use here

MAX_SPANS = 50_000
"""Recent requests kept (all sessions together) for traces and the dashboard."""
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RUNS = (1, 2, 4, 8, 16, 32, 64, 128)
TRAINING = {"forward", "forward_backward", "optim_step"}


@dataclass(slots=True)
class Span:
    """One request, from submission to its answer. Times are unix seconds."""

    request_id: str
    verb: str
    owner: str
    key: str
    """The owner's key label (`--api-key KEY=LABEL`), else its fingerprint."""
    session: str | None
    run: str | None
    """The training run (model_id) or sampling session it acted on."""
    submitted: float
    started: float
    finished: float
    outcome: str
    """ok, user_error (4xx), server_error or cancelled."""
    tokens: int = 0
    """Input tokens (forward, forward_backward), prompt plus sampled tokens (sample)."""
    lane: str | None = None
    packed: tuple = ()
    """Every run whose requests shared this request's pass, itself included."""
    pass_tokens: int = 0
    first_token: float | None = None
    batch_rows: int = 0
    error: str | None = None

    @property
    def queue_s(self) -> float:
        return max(0.0, self.started - self.submitted)

    @property
    def run_s(self) -> float:
        return max(0.0, self.finished - self.started)

    def log_line(self) -> str:
        """The JSON log line of this request."""
        line = {
            "ts": round(self.finished, 6),
            "request_id": self.request_id,
            "key": self.key,
            "session": self.session,
            "run": self.run,
            "verb": self.verb,
            "tokens": self.tokens,
            "queue_s": round(self.queue_s, 6),
            "run_s": round(self.run_s, 6),
            "outcome": self.outcome,
        }
        if len(self.packed) > 1:
            line["packed_runs"] = len(self.packed)
        if self.first_token is not None:
            line["ttft_s"] = round(self.first_token - self.submitted, 6)
        if self.error:
            line["error"] = self.error
        return json.dumps(line)


def session_of(run: str | None) -> str | None:
    """The session of a model_id (`SESSION:train:N`) or sampling session (`SESSION:sample:N`)."""
    if not run:
        return None
    for sep in (":train:", ":sample:"):
        if sep in run:
            return run.split(sep)[0]
    return None


def _outcome(future: Future) -> tuple[str, Any, str | None]:
    """(outcome, result or None, error message or None) of a resolved future."""
    if future.cancelled():
        return "cancelled", None, "cancelled"
    error = future.exception()
    if error is None:
        return "ok", future.result(), None
    user = isinstance(error, TinkerdError) and error.category == "user"
    return ("user_error" if user else "server_error"), None, str(error)[:300]


def _tokens(verb: str, result: Any, ran: Ran | None) -> int:
    if verb == "sample":
        return ran.tokens if ran is not None else 0
    outputs = getattr(result, "loss_fn_outputs", None)
    if outputs:
        return sum(len(o["logprobs"].data) for o in outputs if "logprobs" in o)
    return 0


class Telemetry:
    def __init__(
        self,
        engine: Any,
        json_log: bool = False,
        max_spans: int = MAX_SPANS,
        log_stream: TextIO | None = None,
    ):
        """`engine`: read when scraped (loaded runs, samplers, memory budget). `json_log`:
        a JSON line per request on `log_stream` (default stderr)."""
        self.engine = getattr(engine, "local", engine)  # a DistributedEngine's own rank
        self.json_log = json_log
        self.log_stream = log_stream
        self._log_lock = threading.Lock()
        self.label: Callable[[str], str] = lambda owner: owner
        """What a key is called in labels and logs (the server sets its key labels)."""
        self.scheduler: Any = None
        self.queue: Any = None
        self.spans: deque[Span] = deque(maxlen=max_spans)
        self._lock = threading.Lock()
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.per_key = CollectorRegistry(auto_describe=True)  # the operator's eyes only

        def metric(kind: type, name: str, what: str, labels: str, **kw: Any) -> Any:
            return kind(f"tinkerd_{name}", what, labels.split(), registry=r, **kw)

        # Times in seconds; `lane` is a base model. Meanings: docs/operations.md.
        self.requests = metric(Counter, "requests", "Requests answered", "verb outcome")
        self.key_requests = Counter(
            "tinkerd_key_requests",
            "Requests answered, per key",
            ["key", "verb"],
            registry=self.per_key,
        )
        self.queue_seconds = metric(
            Histogram, "request_queue_seconds", "Wait for its pass", "verb", buckets=SECONDS
        )
        self.run_seconds = metric(
            Histogram, "request_run_seconds", "Its pass (or sampling)", "verb", buckets=SECONDS
        )
        self.latency = metric(
            Histogram, "request_latency_seconds", "Submission to answer", "verb", buckets=SECONDS
        )
        self.request_tokens = metric(
            Counter, "request_tokens", "Input (or prompt + sampled) tokens", "verb"
        )
        self.pass_seconds = metric(
            Histogram, "pass_seconds", "Scheduler passes", "lane", buckets=SECONDS
        )
        self.pass_tokens = metric(
            Counter, "pass_tokens", "Padded tokens of training passes", "lane"
        )
        self.pass_runs = metric(
            Histogram, "pass_runs", "Runs packed into a pass", "lane", buckets=RUNS
        )
        self.busy_seconds = metric(Counter, "lane_busy_seconds", "Time running passes", "lane")
        self.ttft = metric(
            Histogram,
            "time_to_first_token_seconds",
            "Sample: to 1st token",
            "lane",
            buckets=SECONDS,
        )
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, fds
        r.register(_LiveCollector(self))
        self._sampler: threading.Thread | None = None
        self.interval = 5.0
        self._stop = threading.Event()
        self.history: deque[dict] = deque(maxlen=720)
        """Snapshots for the dashboard's server view (`start_history`)."""

    def attach(self, scheduler: Any, queue: Any) -> None:
        """The scheduler and admission queue whose depths a scrape reads."""
        self.scheduler, self.queue = scheduler, queue

    # ---------------------------------------------------------------- requests

    def request(
        self,
        request_id: str,
        owner: str,
        verb: str,
        future: Future,
        run: str | None = None,
    ) -> None:
        """A request just submitted as `future` (of the service's queue): recorded once it
        resolves. `run`: its model_id or sampling session, if it has one."""
        submitted = time.time()
        future.add_done_callback(
            lambda f: self._finished(request_id, owner, verb, f, run, submitted)
        )

    def _finished(
        self,
        request_id: str,
        owner: str,
        verb: str,
        future: Future,
        run: str | None,
        submitted: float,
    ) -> None:
        try:
            now = time.time()
            outcome, result, error = _outcome(future)
            # In the thread that ran it (this callback chains on its future), else as the
            # queue noted it (the future was done before it was tracked).
            ran = current() or (self.queue.ran(future) if self.queue is not None else None)
            if run is None and verb in ("create_model", "load_weights"):
                run = getattr(result, "model_id", None)  # the new run
            span = Span(
                request_id,
                verb,
                owner,
                self.label(owner),
                session_of(run),
                run,
                submitted,
                max(submitted, ran.start) if ran else now,
                now,
                outcome,
                _tokens(verb, result, ran),
                error=error,
            )
            if ran is not None:
                span.lane, span.pass_tokens = ran.lane, ran.tokens
                span.packed = tuple(k for k in ran.packed if k is not None)
                span.first_token, span.batch_rows = ran.first_token, ran.batch_rows
            self.record(span)
        except Exception:  # noqa: BLE001 -- telemetry never fails a request
            logging.getLogger("tinkerd.server").exception("could not record request %s", request_id)

    def record(self, span: Span) -> None:
        """Count a finished request, keep it for traces, and log it."""
        verb = span.verb
        self.requests.labels(verb, span.outcome).inc()
        self.key_requests.labels(span.key, verb).inc()
        self.queue_seconds.labels(verb).observe(span.queue_s)
        self.run_seconds.labels(verb).observe(span.run_s)
        self.latency.labels(verb).observe(span.finished - span.submitted)
        if span.tokens:
            self.request_tokens.labels(verb).inc(span.tokens)
        if span.first_token is not None and span.lane is not None:
            self.ttft.labels(span.lane).observe(span.first_token - span.submitted)
        with self._lock:
            self.spans.append(span)
        if self.json_log:
            self.log(span.log_line())

    def log(self, line: str) -> None:
        """One line of the JSON request log (whole, however many threads write)."""
        with self._log_lock:
            (self.log_stream or sys.stderr).write(line + "\n")

    def passed(self, ran: Ran) -> None:
        """One pass of a scheduler lane (the scheduler's `on_pass`)."""
        seconds = ran.end - ran.start
        self.pass_seconds.labels(ran.lane).observe(seconds)
        self.busy_seconds.labels(ran.lane).inc(seconds)
        self.pass_runs.labels(ran.lane).observe(len(ran.packed))
        if ran.tokens:
            self.pass_tokens.labels(ran.lane).inc(ran.tokens)

    def session_spans(self, session: str, owner: str) -> list[Span]:
        """The kept spans of `owner`'s session, in submission order."""
        with self._lock:
            spans = [s for s in self.spans if s.session == session and s.owner == owner]
        return sorted(spans, key=lambda s: s.submitted)

    # ---------------------------------------------------------------- scraping

    def exposition(self, per_key: bool = True) -> bytes:
        """Every metric in Prometheus' text format; `per_key`: with the per-key series."""
        text = generate_latest(self.registry)
        return text + generate_latest(self.per_key) if per_key else text

    def live(self) -> dict[str, Any]:
        """What a scrape reads now: queue depths, sampler totals, memory."""
        engine = self.engine
        samplers = dict(getattr(getattr(engine, "samplers", None), "samplers", {}) or {})
        sampler = {
            name: {
                "queued": len(getattr(s, "_pending", ())),
                "rows": len(getattr(s, "_rows", ())),
                "prefill_tokens": getattr(s, "prefill_tokens", 0),
                "decode_tokens": getattr(s, "decode_tokens", 0),
                "decode_steps": getattr(s, "decode_steps", 0),
            }
            for name, s in samplers.items()
        }
        limits = getattr(engine, "limits", None)
        model_ids = getattr(engine, "model_ids", None)
        return {
            "queued": self.scheduler.queued() if self.scheduler is not None else {},
            "in_flight": self.queue.pending if self.queue is not None else 0,
            "samplers": sampler,
            "runs_loaded": len(model_ids()) if model_ids else 0,
            "memory_budget": getattr(limits, "memory_budget_bytes", None),
            "gpu": _gpu_memory(),
        }

    # ---------------------------------------------------------------- history

    def start_history(self, interval: float = 5.0) -> None:
        """Snapshot the totals every `interval` seconds for the dashboard (`series`)."""
        if self._sampler is not None:
            return
        self.interval = interval
        self.snapshot()
        self._sampler = threading.Thread(
            target=self._snapshots, name="tinkerd-telemetry", daemon=True
        )
        self._sampler.start()

    def stop(self) -> None:
        self._stop.set()

    def _snapshots(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.snapshot()
            except Exception:  # noqa: BLE001 -- a failed snapshot leaves a gap, no more
                logging.getLogger("tinkerd.server").exception("telemetry snapshot failed")

    def snapshot(self) -> dict:
        """The running totals now (appended to `history`)."""
        live = self.live()
        point = {
            "time": time.time(),
            "queued": sum(live["queued"].values())
            + sum(s["queued"] for s in live["samplers"].values()),
            "in_flight": live["in_flight"],
            "pass_tokens": _total(self.pass_tokens),
            "busy_seconds": _total(self.busy_seconds),
            "lanes": max(1, len(live["queued"])),
            "decode_tokens": sum(s["decode_tokens"] for s in live["samplers"].values()),
            "prefill_tokens": sum(s["prefill_tokens"] for s in live["samplers"].values()),
            "requests": _total(self.requests),
        }
        with self._lock:
            self.history.append(point)
        return point

    def series(self) -> list[dict]:
        """The dashboard's server view: one point per snapshot interval, rates over it
        and latency percentiles of the requests answered in it."""
        with self._lock:
            history = list(self.history)
            spans = list(self.spans)
        finished = [s.finished for s in spans]  # in finishing order: the ring's order
        points = []
        for before, after in zip(history, history[1:]):
            dt = max(after["time"] - before["time"], 1e-9)
            rate = lambda name: (after[name] - before[name]) / dt  # noqa: B023, E731
            lo = bisect.bisect_right(finished, before["time"])
            hi = bisect.bisect_right(finished, after["time"])
            point = {
                "time": after["time"],
                "train_tokens_per_s": rate("pass_tokens"),
                "utilisation": rate("busy_seconds") / after["lanes"],
                "decode_tokens_per_s": rate("decode_tokens"),
                "prefill_tokens_per_s": rate("prefill_tokens"),
                "requests_per_s": rate("requests"),
                "queued": after["queued"],
                "in_flight": after["in_flight"],
            }
            for group, verbs in (("train", TRAINING), ("sample", {"sample"})):
                latencies = sorted(
                    s.finished - s.submitted for s in spans[lo:hi] if s.verb in verbs
                )
                for q in (50, 90, 99):
                    point[f"{group}_latency_p{q}_s"] = _percentile(latencies, q)
            points.append(point)
        return points


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(len(values) * q / 100))]


def _total(metric: Any) -> float:
    """The sum of a labelled counter over its label values."""
    return sum(s.value for m in metric.collect() for s in m.samples if s.name.endswith("_total"))


def _gpu_memory() -> dict[str, tuple[int, int, int]]:
    """{device: (allocated, reserved, total) bytes} of each CUDA device, if torch has one."""
    torch = sys.modules.get("torch")  # never imported for this
    if torch is None or not torch.cuda.is_available():
        return {}
    return {
        f"cuda:{i}": (
            torch.cuda.memory_allocated(i),
            torch.cuda.memory_reserved(i),
            torch.cuda.get_device_properties(i).total_memory,
        )
        for i in range(torch.cuda.device_count())
    }


class _LiveCollector(Collector):
    """Gauges and totals read from the scheduler, samplers and engine at scrape time."""

    def __init__(self, telemetry: Telemetry):
        self.telemetry = telemetry

    def describe(self) -> Iterable:
        return []  # names come from collect() (not known before the first sampler)

    def collect(self) -> Iterator:
        live = self.telemetry.live()
        queued = GaugeMetricFamily(
            "tinkerd_queue_depth",
            "Requests waiting in a lane (training) or sampler",
            labels=["lane", "kind"],
        )
        for lane, n in live["queued"].items():
            queued.add_metric([lane, "train"], n)
        for lane, s in live["samplers"].items():
            queued.add_metric([lane, "sample"], s["queued"])
        yield queued
        yield GaugeMetricFamily(
            "tinkerd_requests_in_flight",
            "Requests admitted and not answered yet",
            value=live["in_flight"],
        )
        yield GaugeMetricFamily(
            "tinkerd_runs_loaded", "Training runs held in memory", value=live["runs_loaded"]
        )
        rows = GaugeMetricFamily(
            "tinkerd_sampler_batch_rows",
            "Sequences in the sampler's running batch",
            labels=["lane"],
        )
        totals = {
            name: CounterMetricFamily(f"tinkerd_sampler_{name}", what, labels=["lane"])
            for name, what in (
                ("prefill_tokens", "Prompt tokens prefilled"),
                ("decode_tokens", "Tokens chosen by decode steps"),
                ("decode_steps", "Decode steps (decode_tokens / decode_steps: mean batch rows)"),
            )
        }
        for lane, s in live["samplers"].items():
            rows.add_metric([lane], s["rows"])
            for name, family in totals.items():
                family.add_metric([lane], s[name])
        yield rows
        yield from totals.values()
        if live["memory_budget"] is not None:
            yield GaugeMetricFamily(
                "tinkerd_activation_memory_budget_bytes",
                "Activation bytes one training pass may use (--memory-budget)",
                value=live["memory_budget"],
            )
        if live["gpu"]:
            names = ("allocated", "reserved", "total")
            families = [
                GaugeMetricFamily(
                    f"tinkerd_gpu_memory_{n}_bytes", f"CUDA memory {n}", labels=["device"]
                )
                for n in names
            ]
            for device, values in live["gpu"].items():
                for family, value in zip(families, values):
                    family.add_metric([device], value)
            yield from families

"""Training metrics per run and optimizer step, recorded as the server executes each
forward_backward and optim_step; the dashboard and `tinkerd runs show --metrics` read them.

Recorded (one store row per metric per operation):
- forward_backward, built-in losses and server-side custom losses (`create_custom_loss`):
  `loss` (summed over tokens: the result's `loss:sum`), `tokens` (input tokens of the
  batch), `step_time_s` (seconds the engine spent on it; when several runs' requests
  share one packed pass, that pass's seconds), and every other metric of the
  result under its SDK name; for a custom loss that is its breakdown: `base_loss:sum`,
  `<regularizer>/value:sum`, `<regularizer>/contribution:sum`, `<regularizer>/grad_norm:mean`
  (with track_grad_norms), `regularizer_total:sum`, `total_grad_norm:mean`, ...
- optim_step: `grad_norm` (global L2 norm of the parameter gradient, before clipping),
  `learning_rate`, `step_time_s`.

A forward_backward belongs to the step its gradient goes into (the run's steps so far + 1),
an optim_step to the step it takes. Forward-only calls are not recorded.

Paging (`paging`): per base model, the engine's resident set (engine/paging.py): runs
resident, in host memory and on disk, page-ins in total and in the last minute, and the
seconds page-ins and page-outs took; the dashboard's `/api/v1/dashboard/paging` serves them.

Over HTTP, a custom loss computed by the client (forward_backward_custom with a Python
function, the official SDK's way) reaches the server as a forward and then a cross_entropy
forward_backward whose weights are -d(loss)/d(logprobs): the server never sees the loss,
so the `loss` recorded for it is that surrogate's (the same gradient, not the same value),
and per-regularizer terms stay on the client. Upload the loss (`create_custom_loss`) to get
them recorded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from tinkerd.service.store import Store

log = logging.getLogger("tinkerd.server")

LAST = {"grad_norm", "learning_rate"}  # one per step: a step's value is its optim_step's


def record(
    store: Store,
    engine: Any,
    model_id: str,
    kind: str,
    result: Any,
    seconds: float,
    tokens: int = 0,
) -> None:
    """Store the metrics of a finished forward_backward or optim_step (run in its lane, so
    the run's step count is the one its gradient goes into). Never raises: a metrics
    hiccup must not fail training."""
    try:
        if kind == "optim_step":
            metrics = result.metrics or {}
            values = {k: metrics.get(k) for k in ("grad_norm", "learning_rate")}
            step = int(metrics["optim/step"])
        else:
            values = {k: v for k, v in result.metrics.items() if k != "loss:sum"}
            values |= {"loss": result.metrics.get("loss:sum"), "tokens": tokens}
            step = engine.run(model_id).step + 1
        values["step_time_s"] = seconds
        finite = {k: float(v) for k, v in values.items() if _finite(v)}
        store.add_metrics(model_id, step, kind, finite)
    except Exception:  # noqa: BLE001
        log.exception("could not record the metrics of %s on %s", kind, model_id)


def timed(
    store: Store, engine: Any, model_id: str, kind: str, work: Callable[[], Any], tokens: int = 0
) -> Callable[[], Any]:
    """`work` (a forward_backward or optim_step, run in its lane) made to record its metrics
    when it succeeds."""

    def run() -> Any:
        start = time.perf_counter()
        result = work()
        record(store, engine, model_id, kind, result, time.perf_counter() - start, tokens)
        return result

    return run


PAGING_FIELDS = (
    "resident_runs",
    "host_runs",
    "disk_runs",
    "resident_bytes",
    "resident_budget_bytes",
    "max_resident_runs",
    "page_ins",
    "page_ins_last_minute",
    "page_in_seconds",
    "mean_page_in_seconds",
    "page_outs",
    "page_out_seconds",
    "disk_writes",
)
"""What `paging` reports per base model (`ResidentSet.snapshot`)."""


def paging(engine: Any) -> dict[str, dict[str, float | None]]:
    """Per base model with runs, its resident set's counters (`PAGING_FIELDS`)."""
    stats = engine.paging_stats()
    return {base: {k: values.get(k) for k in PAGING_FIELDS} for base, values in stats.items()}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def per_step(rows: list[tuple]) -> list[dict[str, float]]:
    """Fold `Store.metric_rows` into one dict per step, in step order: `step`, `time` (unix
    seconds of its last operation) and each metric. Over a step's operations (gradient
    accumulation: several forward_backwards per optim_step) `:mean` metrics average,
    `grad_norm` and `learning_rate` are the optim_step's, and the rest (loss, tokens,
    step_time_s, `:sum` metrics) add up."""
    steps: dict[int, dict[str, float]] = {}
    counts: dict[tuple[int, str], int] = {}
    for step, _kind, when, name, value in rows:
        point = steps.setdefault(step, {"step": step, "time": when})
        point["time"] = max(point["time"], when)
        if name in LAST:
            point[name] = value
        elif name.endswith(":mean"):
            n = counts[step, name] = counts.get((step, name), 0) + 1
            point[name] = point.get(name, 0.0) + (value - point.get(name, 0.0)) / n
        else:
            point[name] = point.get(name, 0.0) + value
    return [steps[s] for s in sorted(steps)]

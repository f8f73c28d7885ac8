"""forward_backward_custom: a base loss plus weighted regularizers on per-token logprobs.

    total = base_loss + sum_i weight_i * regularizer_i

`evaluate` runs the user's functions on the batch's logprobs (one `[seq_len]` tensor per
datum, as leaves that require grad) and returns d(total)/d(logprobs) per datum. The
transports then push that gradient into the model: the embedded engine with one backward
through the live graph of its single forward; over HTTP as the second phase of Tinker's
protocol, a `cross_entropy` forward_backward with weights = -d(total)/d(logprobs).

A loss function, like the SDK's, is `fn(data, logprobs_list) -> loss` or
`-> (loss, metrics)`, sync or async (detected with `inspect.iscoroutinefunction`, also on
a callable object's `__call__`). The spec is docs/custom-losses.md.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tinkerd.errors import InvalidRequestError
from tinkerd.types import BaseLossReport, CustomLossOutput, Datum, ForwardBackwardOutput
from tinkerd.types import RegularizerReport as Report

if TYPE_CHECKING:  # torch is imported when a loss runs, not with `import tinkerd`
    from torch import Tensor

LossFn = Callable[[list[Datum], list["Tensor"]], Any]


@dataclass(frozen=True)
class RegularizerSpec:
    """One weighted term of the total loss. `fn` has the signature of a loss_fn and returns a
    scalar tensor or `(tensor, metrics)`. `is_async` overrides async detection."""

    fn: LossFn
    weight: float
    name: str
    is_async: bool | None = None


class CustomLossError(InvalidRequestError):
    """A loss function or regularizer failed; the model received no gradient."""


def is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 -- a callable object's async __call__
    )


def check_regularizers(
    loss_fn: LossFn | None, regularizers: Sequence[RegularizerSpec] | None
) -> list[RegularizerSpec]:
    """Fail before any work on bad names, weights or a call with nothing to compute."""
    specs = list(regularizers or [])
    if loss_fn is None and not specs:
        raise InvalidRequestError("forward_backward_custom needs a loss_fn or regularizers")
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, RegularizerSpec):
            raise InvalidRequestError(f"regularizers must be RegularizerSpec, got {spec!r}")
        if not spec.name or spec.name == "base_loss":
            raise InvalidRequestError(f"regularizer name {spec.name!r} is empty or reserved")
        if spec.name in seen:
            raise InvalidRequestError(f"duplicate regularizer name {spec.name!r}")
        if not math.isfinite(spec.weight):
            raise InvalidRequestError(f"regularizer {spec.name!r} has weight {spec.weight}")
        if not callable(spec.fn):
            raise InvalidRequestError(f"regularizer {spec.name!r}: fn is not callable")
        seen.add(spec.name)
    return specs


@dataclass
class Evaluation:
    grads: list[Tensor]
    """d(total)/d(logprobs), one tensor per datum, shaped like its logprobs."""
    loss_total: float
    base_loss: BaseLossReport | None
    regularizers: dict[str, Report]
    total_grad_norm: float | None
    user_metrics: dict[str, float]

    def output(self, forward: ForwardBackwardOutput) -> CustomLossOutput:
        """The call's result: the forward's per-datum outputs plus this breakdown."""
        metrics = {k: v for k, v in forward.metrics.items() if k != "loss:sum"}
        if "loss:sum" in forward.metrics and forward.loss_fn_output_type != "custom":
            metrics["surrogate_loss:sum"] = forward.metrics["loss:sum"]  # as the SDK reports
        metrics.update(self.user_metrics)
        metrics["loss:sum"] = self.loss_total
        if self.base_loss is not None:
            metrics["base_loss:sum"] = self.base_loss.value
            if self.base_loss.grad_norm is not None:
                metrics["base_loss/grad_norm:mean"] = self.base_loss.grad_norm
        for name, r in self.regularizers.items():
            metrics[f"{name}/value:sum"] = r.value
            metrics[f"{name}/weight:mean"] = r.weight
            metrics[f"{name}/contribution:sum"] = r.contribution
            if r.grad_norm is not None:
                metrics[f"{name}/grad_norm:mean"] = r.grad_norm
                metrics[f"{name}/grad_norm_weighted:mean"] = r.grad_norm_weighted
            metrics.update({f"{name}/{k}": v for k, v in r.custom.items()})
        regularizer_total = sum(r.contribution for r in self.regularizers.values())
        if self.regularizers:
            metrics["regularizer_total:sum"] = regularizer_total
        if self.total_grad_norm is not None:
            metrics["total_grad_norm:mean"] = self.total_grad_norm
        return CustomLossOutput(
            loss_fn_output_type="custom",
            loss_fn_outputs=[{"logprobs": o["logprobs"]} for o in forward.loss_fn_outputs],
            metrics=metrics,
            loss_total=self.loss_total,
            base_loss=self.base_loss,
            regularizers=self.regularizers,
            regularizer_total=regularizer_total,
            total_grad_norm=self.total_grad_norm,
        )


def evaluate(
    data: list[Datum],
    logprobs: list[Tensor],
    loss_fn: LossFn | None,
    regularizers: Sequence[RegularizerSpec] | None = None,
    track_grad_norms: bool = False,
    run_sync_in_executor: bool = False,
) -> Evaluation:
    """Run the base loss and regularizers on `logprobs`; the gradient of their total.

    Raises CustomLossError naming the term that raised or returned a non-scalar or
    non-finite value. Must not be called from a thread that runs an event loop."""
    import torch

    specs = check_regularizers(loss_fn, regularizers)
    leaves = [lp.detach().float().requires_grad_(True) for lp in logprobs]
    terms = [("base_loss", loss_fn, 1.0, None)] if loss_fn is not None else []
    terms += [(s.name, s.fn, float(s.weight), s.is_async) for s in specs]
    results = asyncio.run(_run_all(data, leaves, terms, run_sync_in_executor))

    values: dict[str, Tensor] = {}
    customs: dict[str, dict[str, float]] = {}
    for (name, *_), result in zip(terms, results):
        values[name], customs[name] = _check_result(name, result)
    weights = {name: weight for name, _, weight, _ in terms}
    grads: dict[str, list[Tensor]] = {}
    if track_grad_norms:  # one small autograd pass per term, on logprobs only
        for name, value in values.items():
            grads[name] = _grad(value, leaves, retain_graph=True)
        total_grads = [
            sum(weights[name] * grads[name][i] for name in values) for i in range(len(leaves))
        ]
    else:
        total = sum(weights[name] * value for name, value in values.items())
        total_grads = _grad(total, leaves, retain_graph=False)
    if not all(torch.isfinite(g).all() for g in total_grads):
        raise CustomLossError("the gradient of the total loss is not finite; nothing applied")
    norm = _norm if track_grad_norms else (lambda _: None)

    base = None
    if loss_fn is not None:
        base_norm = norm(grads.get("base_loss"))
        base = BaseLossReport(
            value=values["base_loss"].item(), grad_norm=base_norm, custom=customs["base_loss"]
        )
    reports = {}
    for spec in specs:
        value, grad_norm = values[spec.name].item(), norm(grads.get(spec.name))
        reports[spec.name] = Report(
            value=value,
            weight=spec.weight,
            contribution=spec.weight * value,
            grad_norm=grad_norm,
            grad_norm_weighted=None if grad_norm is None else abs(spec.weight) * grad_norm,
            custom=customs[spec.name],
        )
    loss_total = (base.value if base else 0.0) + sum(r.contribution for r in reports.values())
    return Evaluation(
        grads=[g.detach() for g in total_grads],
        loss_total=loss_total,
        base_loss=base,
        regularizers=reports,
        total_grad_norm=norm(total_grads),
        user_metrics=customs.get("base_loss", {}),
    )


GradientFn = Callable[[list["Tensor"]], tuple[list["Tensor"], Evaluation]]
"""per-datum logprobs -> (d total / d logprobs, the Evaluation that breaks it down)."""


def gradient_fn(
    data: list[Datum],
    loss_fn: LossFn | None,
    regularizers: Sequence[RegularizerSpec] | None = None,
    track_grad_norms: bool = False,
    run_sync_in_executor: bool = False,
) -> GradientFn:
    """The gradient a forward_backward_custom backpropagates: embedded and on the server
    (inside the engine's one forward/backward) and in the HTTP client (between Tinker's
    two phases). If a term fails it raises, and no gradient is applied."""

    def fn(logprobs: list[Tensor]) -> tuple[list[Tensor], Evaluation]:
        result = evaluate(
            data, logprobs, loss_fn, regularizers, track_grad_norms, run_sync_in_executor
        )
        return result.grads, result

    return fn


async def _run_all(
    data: list[Datum], leaves: list[Tensor], terms: list[tuple], in_executor: bool
) -> list[Any]:
    """Async terms run concurrently; sync ones in a thread pool if asked, else inline."""
    loop = asyncio.get_running_loop()
    pending: dict[int, Any] = {}
    inline: list[int] = []
    with ThreadPoolExecutor(max_workers=max(1, len(terms))) as pool:
        for i, (name, fn, _, forced_async) in enumerate(terms):
            if forced_async if forced_async is not None else is_async(fn):
                pending[i] = asyncio.ensure_future(_guard(name, fn(data, leaves)))
            elif in_executor:
                pending[i] = asyncio.ensure_future(
                    _guard(name, loop.run_in_executor(pool, fn, data, leaves))
                )
            else:
                inline.append(i)
        results: dict[int, Any] = {}
        for i in inline:  # executor and async terms make progress meanwhile
            name, fn = terms[i][:2]
            try:
                results[i] = fn(data, leaves)
            except Exception as e:
                _cancel(pending)
                raise _failure(name, e) from e
        try:
            done = await asyncio.gather(*pending.values())
        except Exception:
            _cancel(pending)
            raise
    results.update(zip(pending, done))
    return [results[i] for i in range(len(terms))]


async def _guard(name: str, awaitable: Any) -> Any:
    try:
        return await awaitable
    except CustomLossError:
        raise
    except Exception as e:
        raise _failure(name, e) from e


def _cancel(pending: dict[int, Any]) -> None:
    for task in pending.values():
        task.cancel()


def _failure(name: str, error: Exception) -> CustomLossError:
    return CustomLossError(f"{_label(name)} raised {type(error).__name__}: {error}")


def _label(name: str) -> str:
    return "loss_fn" if name == "base_loss" else f"regularizer {name!r}"


def _check_result(name: str, result: Any) -> tuple[Tensor, dict[str, float]]:
    import torch

    value, custom = result if isinstance(result, tuple) and len(result) == 2 else (result, {})
    if not isinstance(value, torch.Tensor):
        raise CustomLossError(f"{_label(name)} returned {type(value).__name__}, not a tensor")
    if value.numel() != 1:
        raise CustomLossError(
            f"{_label(name)} returned a tensor of shape {list(value.shape)}, not a scalar"
        )
    if not torch.isfinite(value.detach()).all():
        raise CustomLossError(f"{_label(name)} returned {value.item()}")
    try:
        metrics = {str(k): float(v) for k, v in dict(custom or {}).items()}
    except (TypeError, ValueError) as e:
        raise CustomLossError(f"{_label(name)} returned metrics that are not numbers") from e
    return value.reshape(()), metrics


def _grad(value: Tensor, leaves: list[Tensor], retain_graph: bool) -> list[Tensor]:
    import torch

    if not value.requires_grad:  # a constant term: zero gradient
        return [torch.zeros_like(leaf) for leaf in leaves]
    grads = torch.autograd.grad(value, leaves, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def _norm(grads: list[Tensor] | None) -> float | None:
    if grads is None:
        return None
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))


# ---------------------------------------------------------------- traced (server-side) losses


def graph_loss_fn(compiled: Any) -> LossFn:
    """A loss_fn that runs a compiled per-datum graph (`tinkerd.fx_loss.CompiledLoss`) on
    each datum and sums the losses; `:sum` metrics add up over data, `:mean` ones average."""

    def loss_fn(data: list[Datum], logprobs_list: list[Tensor]) -> tuple[Tensor, dict]:
        total: Tensor | float = 0.0
        metrics: dict[str, float] = {}
        for datum, logprobs in zip(data, logprobs_list):
            inputs = {
                name: datum.loss_fn_inputs[name]
                .to_torch()
                .to(logprobs)
                .reshape([] if rank == 0 else [-1] if rank == 1 else [logprobs.shape[0], -1])
                for name, rank in compiled.inputs[1:]
            }
            loss, datum_metrics = compiled(logprobs, inputs)
            total = total + loss
            for key, value in datum_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + float(value)
        for key in metrics:
            if key.endswith(":mean"):
                metrics[key] /= len(data)
        return total, metrics

    loss_fn.__name__ = compiled.name
    return loss_fn


def check_graph_inputs(compiled: Any, data: list[Datum]) -> None:
    """Every datum carries each input the graph declares, at the declared rank."""
    for i, datum in enumerate(data):
        target = datum.loss_fn_inputs.get("target_tokens")
        target_rank = len(target.shape) if target is not None and target.shape else 1
        for name, rank in compiled.inputs:
            if name == "logprobs":
                if rank != target_rank:
                    raise InvalidRequestError(
                        f"data[{i}]: loss {compiled.name!r} takes logprobs of rank {rank}, "
                        f"target_tokens has rank {target_rank}"
                    )
                continue
            value = datum.loss_fn_inputs.get(name)
            if value is None:
                raise InvalidRequestError(
                    f"data[{i}]: loss {compiled.name!r} needs loss_fn_inputs[{name!r}]"
                )
            shape = value.shape if value.shape is not None else [len(value.data)]
            if len(shape) != rank and not (rank == 0 and shape in ([], [1])):
                raise InvalidRequestError(
                    f"data[{i}]: loss_fn_inputs[{name!r}] has rank {len(shape)}, "
                    f"loss {compiled.name!r} declares {rank}"
                )


def output_from_metrics(out: ForwardBackwardOutput, names: list[str]) -> CustomLossOutput:
    """Rebuild the breakdown of a forward_backward_custom that ran on the server from the
    flat metrics it returned (the inverse of `Evaluation.output`)."""
    m = out.metrics
    regs = {
        name: Report(
            value=m[f"{name}/value:sum"],
            weight=m[f"{name}/weight:mean"],
            contribution=m[f"{name}/contribution:sum"],
            grad_norm=m.get(f"{name}/grad_norm:mean"),
            grad_norm_weighted=m.get(f"{name}/grad_norm_weighted:mean"),
            custom={
                k.split("/", 1)[1]: v
                for k, v in m.items()
                if k.startswith(f"{name}/") and k.split("/", 1)[1] not in _REPORT_KEYS
            },
        )
        for name in names
    }
    structured = {
        "loss:sum",
        "surrogate_loss:sum",
        "base_loss:sum",
        "base_loss/grad_norm:mean",
        "regularizer_total:sum",
        "total_grad_norm:mean",
    }
    user = {
        k: v
        for k, v in m.items()
        if k not in structured and not any(k.startswith(f"{n}/") for n in names)
    }
    base = (
        BaseLossReport(
            value=m["base_loss:sum"], grad_norm=m.get("base_loss/grad_norm:mean"), custom=user
        )
        if "base_loss:sum" in m
        else None
    )
    return CustomLossOutput(
        loss_fn_output_type=out.loss_fn_output_type,
        loss_fn_outputs=out.loss_fn_outputs,
        metrics=m,
        loss_total=m["loss:sum"],
        base_loss=base,
        regularizers=regs,
        regularizer_total=m.get("regularizer_total:sum", 0.0),
        total_grad_norm=m.get("total_grad_norm:mean"),
    )


_REPORT_KEYS = {
    "value:sum",
    "weight:mean",
    "contribution:sum",
    "grad_norm:mean",
    "grad_norm_weighted:mean",
}

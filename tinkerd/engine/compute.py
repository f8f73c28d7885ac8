"""The one compute path: forward (and backward) of a pass over one or several requests.

`loss_pass` serves every training computation of the engine: forward and
forward_backward of one run, requests of several runs packed into one pass (each run's
rows through its own adapter, `multi_lora`), and forward_backward_custom (a custom
`gradient_fn` instead of a built-in loss), on one process or on the ranks of a
torch.distributed group (`parallel`): each rank computes the rows it holds, the ranks
agree on which losses are finite, and rank 0 gets the merged outputs.

A custom loss is a built-in one in disguise: once `gradient_fn` has turned the logprobs
into their gradient g (on rank 0, which sees every rank's logprobs), the pass
backpropagates the surrogate `sum(logprobs * g)`, whose gradient in the logprobs is g.

Memory: a pass is a loop over micro-batches of rows (`micro_batches`; today one), and
logprobs come from `target_logprobs` on the real positions only, so a later change can
bound the rows per micro-batch and chunk the logits over the sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from tinkerd import losses
from tinkerd.engine.adapters import Run
from tinkerd.engine.batch import Batch
from tinkerd.engine.models import BaseModel
from tinkerd.engine.multi_lora import Segment, packed_logits, pad_cat, trainable
from tinkerd.engine.parallel import SingleProcess
from tinkerd.errors import InvalidRequestError
from tinkerd.types import Datum, ForwardBackwardOutput, TensorData

GradientFn = Callable[[list[Tensor]], list[Tensor]]
"""A custom loss: per-datum logprobs -> the gradient of the loss in each."""


@dataclass
class LossRequest:
    """A validated forward / forward_backward request, ready to run."""

    model_id: str
    loss_fn: str
    spec: losses.LossSpec | None
    """None for a custom loss (its gradient comes from a `GradientFn`)."""
    config: dict[str, float]
    batch: Batch
    data: list[Datum] = field(repr=False, default_factory=list)
    """The request's data, kept so that data-parallel ranks can take their share of it."""

    @property
    def padded_tokens(self) -> int:
        return self.batch.input_ids.numel()


@dataclass
class Member:
    """One request's rows (all of them, or this rank's share) in a pass."""

    index: int
    """The request's position in the pass."""
    run: Run
    request: LossRequest
    scale: float = 1.0
    """0 for rows that only keep an idle FSDP rank in step: they add nothing."""


@dataclass
class _Result:
    """A member's per-datum logprobs and elementwise losses (CPU), and its summed loss."""

    logprobs: list[Tensor]
    elementwise: list[Tensor] | None
    loss: float


def loss_pass(
    requests: list[LossRequest],
    members: list[Member],
    backward: bool,
    parallel: SingleProcess,
    gradient_fn: GradientFn | None = None,
) -> list[ForwardBackwardOutput | Exception] | None:
    """Forward (and backward, if `backward`) of `members`, this rank's rows of `requests`
    (all on one base model). The gradient of each request's summed loss is added to its
    run's, unless that loss is not finite on some rank: then that request fails with
    InvalidRequestError and changes nothing. With `gradient_fn` (one request, a custom
    loss) its gradient is backpropagated instead, and if it raises, the request fails
    with its error and changes nothing. Returns, on rank 0, one output per request or
    the Exception it failed with; None on the other ranks. Every rank calls this with the
    same `requests` (there are collectives), even one holding no member."""
    finite = [True] * len(requests)
    computed: list[tuple[Member, Tensor, Tensor | None, Tensor]] = []
    base = members[0].run.base if members else None
    with base.lock if base else contextlib.nullcontext(), torch.set_grad_enabled(backward):
        logprobs = _logprobs(base, members, backward) if members else []
        error, weights = None, []
        if gradient_fn is not None:
            error, weights = _custom_gradients(members, logprobs, parallel, gradient_fn)
        for member, lp in zip(members, logprobs):
            request = member.request
            if gradient_fn is None:
                inputs = {k: v.to(lp.device) for k, v in request.batch.inputs.items()}
                elementwise = request.spec.fn(lp, inputs, request.config) * member.scale
                loss = elementwise.sum()
                finite[member.index] &= bool(torch.isfinite(loss))
                computed.append((member, lp, elementwise, loss))
            elif weights is not None:  # the surrogate whose gradient in lp is gradient_fn's
                computed.append((member, lp, None, (lp * weights.pop(0)).sum()))
        agreed = parallel.all_finite(finite)
        done = [c for c in computed if agreed[c[0].index]]
        if backward and done:
            # Only into the runs whose loss is finite: the others' adapters are in the
            # graph too, and would otherwise accumulate a (zero) gradient.
            params = list({id(p): p for m, *_ in done for p in m.run.params}.values())
            torch.stack([loss for *_, loss in done]).sum().backward(inputs=params)
    local = [(m.index, _result(m, lp, el, loss)) for m, lp, el, loss in computed if m.scale]
    everywhere = parallel.gather(local)
    if everywhere is None:
        return None
    if error is not None:
        return [error] * len(requests)
    results: list[list[_Result]] = [[] for _ in requests]
    for index, result in (r for rank in everywhere for r in rank):
        results[index].append(result)
    return [
        _output(parts, custom=gradient_fn is not None)
        if agreed[i]
        else _non_finite(requests[i], sum(p.loss for p in parts))
        for i, parts in enumerate(results)
    ]


def micro_batches(members: list[Member]) -> list[list[Member]]:
    """The pass's rows in groups computed one after another (today: one group; a token
    budget would cut here, with a backward per group accumulating the gradient)."""
    return [members]


def _logprobs(base: BaseModel, members: list[Member], backward: bool) -> list[Tensor]:
    """Each member's target logprobs, `[n_tokens]` (or `[n_tokens, k]`), float32."""
    out: list[Tensor] = []
    for group in micro_batches(members):
        batches = [m.request.batch for m in group]
        if len(group) == 1:  # the run's own adapter, as PEFT routes it
            group[0].run.activate()
            logits = base.peft_model(input_ids=batches[0].input_ids.to(base.device)).logits
        else:
            width = max(b.input_ids.shape[1] for b in batches)
            segments, start = [], 0
            for m, b in zip(group, batches):
                segments.append(Segment(m.run.model_id, start, start + b.input_ids.shape[0]))
                start += b.input_ids.shape[0]
                if backward:
                    trainable(m.run.params)
            input_ids = pad_cat([b.input_ids for b in batches], width).to(base.device)
            logits = packed_logits(base.peft_model, input_ids, segments)
        for seg_start, b in zip(_starts(batches), batches):
            rows = logits[seg_start : seg_start + b.input_ids.shape[0], : b.mask.shape[1]]
            out.append(target_logprobs(rows, b.mask.to(base.device), b.targets.to(base.device)))
    return out


def _starts(batches: list[Batch]) -> list[int]:
    starts, row = [], 0
    for b in batches:
        starts.append(row)
        row += b.input_ids.shape[0]
    return starts


def target_logprobs(logits: Tensor, mask: Tensor, targets: Tensor) -> Tensor:
    """Log-probability of `targets` (`[n_tokens]` or `[n_tokens, k]`) under `logits`
    (`[rows, seq, vocab]`) at the real positions (`mask`, `[rows, seq]`): float32.
    Only the real positions are upcast, one `[n_tokens, vocab]` block."""
    real = logits[mask].float()
    if targets.ndim == 1:
        return -F.cross_entropy(real, targets, reduction="none")
    return real.log_softmax(-1).gather(-1, targets)


def _custom_gradients(
    members: list[Member], logprobs: list[Tensor], parallel: SingleProcess, gradient_fn: GradientFn
) -> tuple[Exception | None, list[Tensor] | None]:
    """Every rank's logprobs meet on rank 0, which alone runs `gradient_fn`; each member
    gets back the gradient of its own logprobs (None on every rank if `gradient_fn`
    raised: rank 0 returns its error, to hand back after the collectives)."""
    mine = [
        list(lp.detach().cpu().split(m.request.batch.lengths)) if m.scale else []
        for m, lp in zip(members, logprobs)
    ]
    gathered = parallel.gather([lp for parts in mine for lp in parts])
    shares, error = None, None
    if gathered is not None:
        everything = [lp for rank in gathered for lp in rank]
        try:
            grads = gradient_fn(everything)
            grads = [g.reshape(p.shape) for g, p in zip(grads, everything, strict=True)]
        except Exception as e:  # noqa: BLE001 -- the request's result, after the collectives
            grads, error = None, e
        shares, start = [], 0
        for rank in gathered:
            shares.append(None if grads is None else grads[start : start + len(rank)])
            start += len(rank)
    share = parallel.scatter(shares)
    if share is None:
        return error, None
    out = []
    for lp, parts in zip(logprobs, mine):
        n = len(parts)
        out.append(torch.cat(share[:n]).to(lp.device, lp.dtype) if n else torch.zeros_like(lp))
        share = share[n:]
    return error, out


def _result(member: Member, logprobs: Tensor, elementwise: Tensor | None, loss: Tensor) -> _Result:
    lengths = member.request.batch.lengths
    return _Result(
        list(logprobs.detach().cpu().split(lengths)),
        None if elementwise is None else list(elementwise.detach().cpu().split(lengths)),
        loss.item(),
    )


def _output(parts: list[_Result], custom: bool) -> ForwardBackwardOutput:
    """Per datum `logprobs` (and `elementwise_loss` for built-in losses), in rank order."""
    outputs = [{"logprobs": TensorData.from_torch(lp)} for p in parts for lp in p.logprobs]
    if custom:
        return ForwardBackwardOutput(loss_fn_output_type="custom", loss_fn_outputs=outputs)
    elementwise = [el for p in parts for el in p.elementwise]
    for out, el in zip(outputs, elementwise):
        out["elementwise_loss"] = TensorData.from_torch(el)
    return ForwardBackwardOutput(
        loss_fn_output_type="TorchLossReturn",
        loss_fn_outputs=outputs,
        metrics={"loss:sum": sum(p.loss for p in parts)},
    )


def _non_finite(request: LossRequest, loss: float) -> InvalidRequestError:
    return InvalidRequestError(
        f"{request.loss_fn} loss is {loss}; no gradient was applied "
        "(check advantages and sampling logprobs)"
    )

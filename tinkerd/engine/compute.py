"""The one compute path: forward (and backward) of a pass over one or several requests.

`loss_pass` serves every training computation of the engine: forward and
forward_backward of one run, requests of several runs packed into one pass (each run's
rows through its own adapter, `lora`), and forward_backward_custom (a custom
`gradient_fn` instead of a built-in loss), on one process or on the ranks of a
torch.distributed group (`parallel`): each rank computes the rows it holds, the ranks
agree on which losses are finite, and rank 0 gets the merged outputs.

A custom loss is a built-in one in disguise: once `gradient_fn` has turned the logprobs
into their gradient g (on rank 0, which sees every rank's logprobs), the pass
backpropagates the surrogate `sum(logprobs * g)`, whose gradient in the logprobs is g.

Memory (`Limits`): a pass is a loop over micro-batches of rows (`micro_batches`: one, or
as many as a token budget needs, the gradient accumulating over them), and
`target_logprobs` upcasts the logits of a bounded number of positions at a time. With a
byte budget (`Limits.memory_budget_bytes`) each pass derives both sizes, and whether its
decoder layers recompute their activations in the backward, from it (`memory.plan`).
A micro-batched pass of built-in losses runs one forward and backward per micro-batch and
checks the losses after; should one not be finite, the runs' gradients are put back as
they were and only the finite requests' micro-batches are run again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tinkerd import losses
from tinkerd.engine import memory
from tinkerd.engine.adapters import Run
from tinkerd.engine.batch import Batch
from tinkerd.engine.lora import Segment, pad_cat, route_rows, trainable
from tinkerd.engine.models import BaseModel
from tinkerd.engine.output_layer import output_layer, target_logprobs
from tinkerd.engine.parallel import SingleProcess
from tinkerd.engine.vision import forward_inputs
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


@dataclass(frozen=True)
class Limits:
    """How much of a pass is computed at once (`EngineConfig`); None: no limit."""

    micro_batch_tokens: int | None = None
    """Most padded tokens (rows x longest row) per micro-batch. Over it, a pass runs a
    forward (and backward) per micro-batch, accumulating the gradient."""
    logits_chunk_tokens: int | None = None
    """Most positions whose logits are upcast to float32 at once (`target_logprobs`)."""
    memory_budget_bytes: int | None = None
    """Activation bytes a pass may use: each pass derives the two sizes above (where not
    set) and whether to checkpoint its decoder layers from it (`memory.plan`)."""
    checkpoint: bool = False
    """Recompute each decoder layer's activations in the backward (`memory`)."""
    micro_batch_rows: int | None = None
    """Most rows per micro-batch (`memory.Plan.micro_batch_rows`). None: no limit."""

    def for_pass(self, base: BaseModel | None, members: list[Member], backward: bool) -> Limits:
        """These limits with the budget turned into sizes for this pass's rows."""
        if self.memory_budget_bytes is None or base is None:
            return self
        longest = max((n for m in members for n in m.request.batch.lengths), default=1)
        shape = memory.ModelShape.of(base.model)
        cpu = base.device.type == "cpu"
        p = memory.plan(shape, self.memory_budget_bytes, longest, backward, cpu)
        return Limits(
            self.micro_batch_tokens or p.micro_batch_tokens,
            self.logits_chunk_tokens or p.logits_chunk_tokens,
            None,
            p.checkpoint and backward,
            p.micro_batch_rows,
        )


@dataclass
class _Piece:
    """Rows of one member in one micro-batch."""

    member: int
    """Its position in the pass's `members`."""
    batch: Batch
    first_token: int
    """Where its tokens start in the member's logprobs."""


def loss_pass(
    requests: list[LossRequest],
    members: list[Member],
    backward: bool,
    parallel: SingleProcess,
    gradient_fn: GradientFn | None = None,
    limits: Limits = Limits(),
) -> list[ForwardBackwardOutput | Exception] | None:
    """Forward (and backward, if `backward`) of `members`, this rank's rows of `requests`
    (all on one base model). The gradient of each request's summed loss is added to its
    run's, unless that loss is not finite on some rank: then that request fails with
    InvalidRequestError and changes nothing. With `gradient_fn` (one request, a custom
    loss) its gradient is backpropagated instead, and if it raises, the request fails
    with its error and changes nothing. Returns, on rank 0, one output per request or
    the Exception it failed with; None on the other ranks. Every rank calls this with the
    same `requests` (there are collectives), even one holding no member.

    Losses must be elementwise (one value per token, as every built-in is): a request's
    loss is then the sum of its micro-batches' losses."""
    finite = [True] * len(requests)
    computed: list[tuple[Member, Tensor, Tensor | None, Tensor]] = []
    base = members[0].run.base if members else None
    limits = limits.for_pass(base, members, backward)
    if parallel.fsdp:  # every rank joins the same forwards (and recomputations)
        limits = Limits(None, limits.logits_chunk_tokens)
    groups = micro_batches(members, limits.micro_batch_tokens, limits.micro_batch_rows)
    one_pass = len(groups) <= 1  # then the forward's graph serves the backward
    # Micro-batches of a built-in loss: forward and backward each at once, the losses
    # checked after (the gradients from before are kept aside, and put back if some
    # loss was not finite). A custom loss needs every logprob before any backward.
    fused = backward and not one_pass and gradient_fn is None
    saved = _save_gradients(members) if fused else []
    with (
        base.lock if base else contextlib.nullcontext(),
        torch.set_grad_enabled(backward and (one_pass or fused)),
        contextlib.ExitStack() as stack,
    ):
        if limits.checkpoint:
            stack.enter_context(memory.checkpointed_layers(base.model))
        if fused:
            logprobs = _fused_passes(base, members, groups, limits)
        else:
            logprobs = _logprobs(base, members, groups, limits, backward and one_pass, stack)
        error, weights = None, []
        if gradient_fn is not None:
            error, weights = _custom_gradients(members, logprobs, parallel, gradient_fn)
        for k, (member, lp) in enumerate(zip(members, logprobs)):
            if gradient_fn is None:
                with torch.no_grad() if fused else contextlib.nullcontext():
                    elementwise = _elementwise(member, lp, member.request.batch)
                loss = elementwise.sum()
                finite[member.index] &= bool(torch.isfinite(loss))
                computed.append((member, lp, elementwise, loss))
            elif weights is not None:  # the surrogate whose gradient in lp is gradient_fn's
                computed.append((member, lp, None, (lp * weights[k]).sum()))
        agreed = parallel.all_finite(finite)
        done = [c for c in computed if agreed[c[0].index]]
        if fused and len(done) < len(computed):
            _restore_gradients(saved)
        if backward and done and one_pass:
            _backward([m for m, *_ in done], [loss for *_, loss in done])
        elif backward and done and not (fused and len(done) == len(computed)):
            keep = {id(m) for m, *_ in done}
            with torch.enable_grad():
                for group in groups:
                    pieces = [p for p in group if id(members[p.member]) in keep]
                    if pieces:
                        custom = weights if gradient_fn else None
                        _backward_pieces(base, members, pieces, limits, custom)
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


def _elementwise(member: Member, logprobs: Tensor, batch: Batch) -> Tensor:
    """The member's built-in loss of each token of `batch` (its rows, or some of them)."""
    request = member.request
    inputs = {k: v.to(logprobs.device) for k, v in batch.inputs.items()}
    return request.spec.fn(logprobs, inputs, request.config) * member.scale


def _backward(members: list[Member], losses: list[Tensor]) -> None:
    # Only into these runs: other runs' adapters may be in the graph too (a packed pass
    # with a non-finite loss), and would otherwise accumulate a (zero) gradient.
    params = list({id(p): p for m in members for p in m.run.params}.values())
    torch.stack(losses).sum().backward(inputs=params)


def _backward_pieces(
    base: BaseModel,
    members: list[Member],
    pieces: list[_Piece],
    limits: Limits,
    weights: list[Tensor] | None,
) -> list[Tensor]:
    """Forward and backward of one micro-batch: the gradient of its pieces' losses (or,
    with `weights`, of the custom surrogate) accumulates into their runs'. Returns the
    pieces' logprobs (detached)."""
    losses = []
    with contextlib.ExitStack() as stack:  # row routing stays on for recomputed layers
        logprobs = _forward(base, members, pieces, limits, True, stack)
        for piece, lp in zip(pieces, logprobs):
            member = members[piece.member]
            if weights is None:
                losses.append(_elementwise(member, lp, piece.batch).sum())
            else:
                w = weights[piece.member][piece.first_token : piece.first_token + lp.shape[0]]
                losses.append((lp * w).sum())
        _backward([members[p.member] for p in pieces], losses)
    return [lp.detach() for lp in logprobs]


def _fused_passes(
    base: BaseModel, members: list[Member], groups: list[list[_Piece]], limits: Limits
) -> list[Tensor]:
    """Forward and backward of each micro-batch in turn; each member's logprobs."""
    parts: list[list[Tensor]] = [[] for _ in members]
    for group in groups:
        for piece, lp in zip(group, _backward_pieces(base, members, group, limits, None)):
            parts[piece.member].append(lp)
    return [p[0] if len(p) == 1 else torch.cat(p) for p in parts]


def _save_gradients(members: list[Member]) -> list[tuple[Tensor, Tensor | None]]:
    """The pass's runs' gradients as they are (LoRA-sized copies)."""
    params = {id(p): p for m in members for p in m.run.params}.values()
    return [(p, None if p.grad is None else p.grad.clone()) for p in params]


def _restore_gradients(saved: list[tuple[Tensor, Tensor | None]]) -> None:
    for p, grad in saved:
        p.grad = grad


def micro_batches(
    members: list[Member], max_tokens: int | None, max_rows: int | None = None
) -> list[list[_Piece]]:
    """The pass's rows, in order, cut into groups of at most `max_tokens` padded tokens
    (rows x longest row; a longer row is a group alone) and `max_rows` rows; None: no
    such limit (both None: one group of everything)."""
    if max_tokens is None and max_rows is None:
        return [[_Piece(k, m.request.batch, 0) for k, m in enumerate(members)]] if members else []
    groups: list[list[_Piece]] = []
    rows: list[tuple[int, int]] = []  # (member, datum) of the group being filled
    width = 0
    for k, member in enumerate(members):
        for i, n in enumerate(member.request.batch.lengths):
            too_wide = max_tokens is not None and (len(rows) + 1) * max(width, n) > max_tokens
            if rows and (too_wide or (max_rows is not None and len(rows) >= max_rows)):
                groups.append(_pieces(members, rows))
                rows, width = [], 0
            rows.append((k, i))
            width = max(width, n)
    if rows:
        groups.append(_pieces(members, rows))
    return groups


def _pieces(members: list[Member], rows: list[tuple[int, int]]) -> list[_Piece]:
    """Contiguous rows of each member, as pieces."""
    pieces = []
    for k in dict.fromkeys(k for k, _ in rows):
        data = [i for m, i in rows if m == k]
        batch = members[k].request.batch
        first_token = sum(batch.lengths[: data[0]])
        pieces.append(_Piece(k, batch.rows(data[0], data[-1] + 1), first_token))
    return pieces


def _logprobs(
    base: BaseModel | None,
    members: list[Member],
    groups: list[list[_Piece]],
    limits: Limits,
    train: bool,
    stack: contextlib.ExitStack,
) -> list[Tensor]:
    """Each member's target logprobs, `[n_tokens]` (or `[n_tokens, k]`), float32: the
    micro-batches one after another."""
    parts: list[list[Tensor]] = [[] for _ in members]
    for group in groups:
        # Only a pass with its backward still to come (one group) keeps rows routed.
        with contextlib.nullcontext(stack) if train else contextlib.ExitStack() as routing:
            for piece, lp in zip(group, _forward(base, members, group, limits, train, routing)):
                parts[piece.member].append(lp)
    return [p[0] if len(p) == 1 else torch.cat(p) for p in parts]


def _forward(
    base: BaseModel,
    members: list[Member],
    pieces: list[_Piece],
    limits: Limits,
    train: bool,
    stack: contextlib.ExitStack,
) -> list[Tensor]:
    """Target logprobs of each piece of one micro-batch (one forward of the base). Rows of
    several runs are routed through their adapters until `stack` closes (a checkpointed
    layer recomputes in the backward, and must route them the same way)."""
    batches = [p.batch for p in pieces]
    images = [row for b in batches for row in b.images]
    model = base.peft_model.base_model.model  # the LoRA-injected tree
    layer = output_layer(model)  # (checked once per model, before any routing)
    if len(pieces) == 1:  # the run's own adapter, as PEFT routes it
        members[pieces[0].member].run.activate()
        input_ids = batches[0].input_ids.to(base.device)
    else:
        width = max(b.input_ids.shape[1] for b in batches)
        segments, start = [], 0
        for piece, b in zip(pieces, batches):
            run = members[piece.member].run
            segments.append(Segment(run.model_id, start, start + b.input_ids.shape[0]))
            start += b.input_ids.shape[0]
            if train:
                trainable(run.params)
        input_ids = pad_cat([b.input_ids for b in batches], width).to(base.device)
        stack.enter_context(route_rows(base.peft_model, segments))  # routed by rows
    extra, _ = forward_inputs(base.vision, input_ids, images)
    if layer is None:  # whole logits, the model's own forward
        states, head = model(input_ids=input_ids, use_cache=False, **extra).logits, None
    else:  # the last hidden states; the output layer runs in chunks (`output_layer`)
        states = layer.decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        head = layer.head
    device = base.device
    seq = max(b.mask.shape[1] for b in batches)
    mask = pad_cat([b.mask for b in batches], seq).to(device)
    targets = torch.cat([b.targets for b in batches]).to(device)
    logprobs = target_logprobs(states[:, :seq], mask, targets, limits.logits_chunk_tokens, head)
    return list(logprobs.split([int(b.mask.sum()) for b in batches]))


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

"""Data-parallel training over torch.distributed: one engine per rank, driven by rank 0.

Rank 0 runs the server with a `DistributedEngine`. Every operation that changes a run
(create, forward/backward, optim_step, load, unload) is broadcast to all ranks, which
apply it to their own `Engine` in the same order. A batch is cut into contiguous shards,
one per rank (a rank with no datum does no compute), each rank backpropagates its shard's
**summed** loss, and `optim_step` all-reduces (sums) the LoRA gradients before every rank
takes the same AdamW step: the weights stay identical on every rank, and equal (to float
rounding) to a single process's. Sampling and saving run on rank 0 alone, since it
holds the same weights. With `fsdp=True` each rank's base model is sharded with FSDP2
(`fully_shard` per decoder layer; the frozen base is all-gathered layer by layer, the
LoRA weights stay whole and replicated), so every rank joins every forward: a rank with
no datum of its own runs a zero-weight one.
"""

from __future__ import annotations

import logging
import secrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from tinkerd.engine.adapters import adam_step, validate_adam_params
from tinkerd.engine.batch import collate
from tinkerd.engine.trainer import Engine, _output, token_logprobs
from tinkerd.errors import InvalidRequestError
from tinkerd.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LoraConfig,
    OptimStepResponse,
    TensorData,
)

log = logging.getLogger("tinkerd.distributed")


def shard(data: list, rank: int, world: int) -> list:
    """Rank `rank`'s contiguous share of `data` (shards in rank order = input order)."""
    n = len(data)
    return data[n * rank // world : n * (rank + 1) // world]


def _placeholder(data: list[Datum]) -> list[Datum]:
    """One datum that adds nothing: its gradient is multiplied by zero (FSDP idle ranks)."""
    return data[:1]


# ---------------------------------------------------------------- operations, on every rank


def _op_create(engine: Engine, base_model: str, lora: LoraConfig, model_id: str) -> str:
    return engine.create_model(base_model, lora, model_id)


def _op_create_from_state(engine: Engine, path: str, with_optimizer: bool, model_id: str) -> str:
    return engine.create_model_from_state(path, with_optimizer, model_id)


def _op_load(engine: Engine, model_id: str, path: str, with_optimizer: bool) -> None:
    engine.load_state(model_id, path, with_optimizer)


def _op_unload(engine: Engine, model_id: str) -> Any:
    return engine.unload_model(model_id)


def _op_loss(
    engine: Engine,
    model_id: str,
    data: list[Datum],
    loss_fn: str,
    config: dict | None,
    backward: bool,
    fsdp: bool,
) -> ForwardBackwardOutput | None:
    """Forward (and backward) of this rank's shard; rank 0 gets the merged output."""
    rank, world = dist.get_rank(), dist.get_world_size()
    part = shard(data, rank, world)
    scale = 1.0
    if not part and fsdp:
        part, scale = _placeholder(data), 0.0
    run = engine.run(model_id)
    base = run.base
    out = None
    with base.lock, torch.set_grad_enabled(backward):
        if part:
            request = engine.prepare(model_id, part, loss_fn, config)
            run.activate()
            logprobs = token_logprobs(base.peft_model, request.batch, base.device)
            inputs = {k: v.to(logprobs.device) for k, v in request.batch.inputs.items()}
            elementwise = request.spec.fn(logprobs, inputs, request.config) * scale
            loss = elementwise.sum()
            finite = bool(torch.isfinite(loss))
        else:
            finite = True
        # Every rank backpropagates, or none does: one non-finite shard spoils the batch.
        all_finite = torch.tensor([float(finite)])
        dist.all_reduce(all_finite, op=dist.ReduceOp.MIN)
        if all_finite.item() and backward and part:
            loss.backward()
        if part and scale:
            out = _output(request.batch, logprobs.detach(), elementwise.detach(), loss.item())
    outputs = [None] * world if rank == 0 else None
    dist.gather_object(out, outputs, dst=0)
    if rank != 0:
        return None
    if not all_finite.item():
        raise InvalidRequestError(
            f"{loss_fn} loss is not finite; no gradient was applied "
            "(check advantages and sampling logprobs)"
        )
    return _merge([o for o in outputs if o is not None])


def _merge(outputs: list[ForwardBackwardOutput]) -> ForwardBackwardOutput:
    merged = outputs[0].model_copy(deep=True)
    merged.loss_fn_outputs = [x for o in outputs for x in o.loss_fn_outputs]
    if merged.metrics:
        merged.metrics = {"loss:sum": sum(o.metrics["loss:sum"] for o in outputs)}
    return merged


def _op_custom(
    engine: Engine,
    model_id: str,
    data: list[Datum],
    fsdp: bool,
    gradient_fn: Callable | None = None,
) -> tuple[ForwardBackwardOutput, Any] | None:
    """forward_backward_custom: logprobs of every shard meet on rank 0, which alone runs
    `gradient_fn`; each rank then backpropagates its shard's part of the gradient."""
    rank, world = dist.get_rank(), dist.get_world_size()
    part = shard(data, rank, world)
    placeholder = not part and fsdp
    if placeholder:
        part = _placeholder(data)
    run = engine.run(model_id)
    base = run.base
    with base.lock:
        per_datum: list[Tensor] = []
        if part:
            batch = collate(part, None, "custom", base.vocab_size, base.max_context_length)
            run.activate()
            with torch.enable_grad():
                logprobs = token_logprobs(base.peft_model, batch, base.device)
            per_datum = list(logprobs.detach().cpu().split(batch.lengths))
        gathered = [None] * world if rank == 0 else None
        dist.gather_object([] if placeholder else per_datum, gathered, dst=0)
        scattered: list = [None] * world
        extra, error = None, None
        if rank == 0:
            everything = [lp for shard_lps in gathered for lp in shard_lps]
            try:
                grads, extra = gradient_fn(everything)
            except Exception as e:  # noqa: BLE001 -- re-raised below, after the collective
                grads, error = None, e
            sizes = [len(s) for s in gathered]
            starts = [sum(sizes[:r]) for r in range(world)]
            scattered = [None if grads is None else grads[s : s + n] for s, n in zip(starts, sizes)]
        mine: list = [None]
        dist.scatter_object_list(mine, scattered if rank == 0 else None, src=0)
        if part and mine[0] is not None:
            grads_here = mine[0] or [torch.zeros_like(lp) for lp in per_datum]
            logprobs.backward(
                torch.cat([g.reshape(p.shape) for g, p in zip(grads_here, per_datum)]).to(
                    logprobs.device, logprobs.dtype
                )
            )
    if rank != 0:
        return None
    if error is not None:
        raise error
    outputs = [{"logprobs": TensorData.from_torch(lp)} for lp in everything]
    return ForwardBackwardOutput(loss_fn_output_type="custom", loss_fn_outputs=outputs), extra


def _op_optim(engine: Engine, model_id: str, adam: AdamParams) -> Any:
    """Sum the LoRA gradients over ranks, then the same AdamW step everywhere."""
    run = engine.run(model_id)
    with run.base.lock:
        has_grad = torch.tensor([float(p.grad is not None) for p in run.params])
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
        params = [p for p, h in zip(run.params, has_grad.tolist()) if h]
        if params:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads]).float()
            dist.all_reduce(flat)
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad = g.view_as(p).to(p.dtype)
        return adam_step(run, adam)


OPS: dict[str, Callable] = {
    "create": _op_create,
    "create_from_state": _op_create_from_state,
    "load": _op_load,
    "unload": _op_unload,
    "loss": _op_loss,
    "custom": _op_custom,
    "optim": _op_optim,
}


# ---------------------------------------------------------------- rank 0 and the others


@dataclass
class _ShardedRequest:
    """A validated loss request that keeps its data, to be cut into shards."""

    model_id: str
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict | None

    @property
    def padded_tokens(self) -> int:
        return len(self.data) * max(d.model_input.length for d in self.data)


class DistributedEngine:
    """Rank 0's engine: the local `Engine`'s API, with training operations run on every
    rank (everything else, e.g. sampling, checkpoint saves and reads, stays local)."""

    def __init__(self, local: Engine, fsdp: bool = False):
        self.local = local
        self.fsdp = fsdp
        self.world_size = dist.get_world_size()
        self._lock = threading.Lock()  # one operation at a time, in the same order on all ranks

    def __getattr__(self, name: str) -> Any:
        return getattr(self.local, name)

    def _everywhere(self, op: str, *args: Any, local_only: dict | None = None) -> Any:
        with self._lock:
            dist.broadcast_object_list([(op, args)], src=0)
            return OPS[op](self.local, *args, **(local_only or {}))

    def create_model(
        self, base_model: str, lora_config: LoraConfig, model_id: str | None = None
    ) -> str:
        # Same seed and id everywhere, so every rank starts from the same weights.
        seed = lora_config.seed if lora_config.seed is not None else secrets.randbits(63)
        lora = lora_config.model_copy(update={"seed": seed})
        return self._everywhere("create", base_model, lora, model_id or _new_id())

    def create_model_from_state(
        self, path: str, with_optimizer: bool, model_id: str | None = None
    ) -> str:
        self.local.checkpoints.resolve(path)  # not found / malformed: refused on rank 0 alone
        return self._everywhere("create_from_state", path, with_optimizer, model_id or _new_id())

    def load_state(self, model_id: str, path: str, with_optimizer: bool) -> None:
        self.local.checkpoints.verify(self.local.checkpoints.resolve(path))
        self._everywhere("load", model_id, path, with_optimizer)

    def unload_model(self, model_id: str) -> Any:
        self.local.run(model_id)
        return self._everywhere("unload", model_id)

    def prepare(self, model_id, data, loss_fn, loss_fn_config) -> _ShardedRequest:
        self.local.prepare(model_id, data, loss_fn, loss_fn_config)  # validates the whole batch
        return _ShardedRequest(model_id, data, loss_fn, loss_fn_config)

    def run_loss(self, request: _ShardedRequest, backward: bool) -> ForwardBackwardOutput:
        args = (request.data, request.loss_fn, request.loss_fn_config, backward, self.fsdp)
        return self._everywhere("loss", request.model_id, *args)

    def run_losses(self, requests: list[_ShardedRequest], backward: bool) -> list[Any]:
        """One request after another: no packing across runs here (each is already cut
        into per-rank shards, and every rank must see the same operations)."""
        results: list[Any] = []
        for request in requests:
            try:
                results.append(self.run_loss(request, backward))
            except Exception as e:  # noqa: BLE001 -- handed back as that request's result
                results.append(e)
        return results

    def forward(self, model_id, data, loss_fn="cross_entropy", loss_fn_config=None):
        return self.run_loss(self.prepare(model_id, data, loss_fn, loss_fn_config), False)

    def forward_backward(self, model_id, data, loss_fn="cross_entropy", loss_fn_config=None):
        return self.run_loss(self.prepare(model_id, data, loss_fn, loss_fn_config), True)

    def forward_backward_custom(self, model_id: str, data: list[Datum], gradient_fn: Callable):
        self.local.check_custom_data(model_id, data)
        return self._everywhere(
            "custom", model_id, data, self.fsdp, local_only={"gradient_fn": gradient_fn}
        )

    def optim_step(self, model_id: str, adam_params: AdamParams) -> Any:
        validate_adam_params(adam_params)
        self.local.run(model_id)
        return OptimStepResponse(metrics=self._everywhere("optim", model_id, adam_params))

    def sample(self, *args: Any, **kwargs: Any) -> Any:
        if self.fsdp:  # rank 0's forward would wait for the other ranks' all-gathers
            raise InvalidRequestError(
                "sampling is not available on a server started with --fsdp (each rank holds "
                "only part of the base model); serve sampling without --fsdp"
            )
        return self.local.sample(*args, **kwargs)

    def stop_workers(self) -> None:
        with self._lock:
            dist.broadcast_object_list([("stop", ())], src=0)


def _new_id() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


def serve_worker(engine: Engine) -> None:
    """A rank other than 0: apply rank 0's operations until it says stop."""
    while True:
        box: list = [None]
        dist.broadcast_object_list(box, src=0)
        op, args = box[0]
        if op == "stop":
            return
        try:
            OPS[op](engine, *args)
        except Exception:  # noqa: BLE001 -- rank 0 raises the same error to the client
            log.debug("operation %s failed on rank %d", op, dist.get_rank(), exc_info=True)


def shard_base_with_fsdp(engine: Engine, base_model: str) -> None:
    """Shard a base model's decoder layers over the ranks with FSDP2 (before any LoRA)."""
    from torch.distributed.fsdp import fully_shard

    base = engine.base_model(base_model)
    layers = getattr(getattr(base.model, "model", base.model), "layers", None)
    if layers is None:
        raise InvalidRequestError(f"{base_model}: no decoder layers to shard with FSDP")
    for layer in layers:
        fully_shard(layer)
    # FSDP2 leaves the root's parameters gathered after a forward by default; rank 0 alone
    # then reading a state_dict (a checkpoint save) reshards them on rank 0 only, and the
    # next forward's all-gathers no longer match across ranks. Reshard after every forward.
    fully_shard(base.model, reshard_after_forward=True)

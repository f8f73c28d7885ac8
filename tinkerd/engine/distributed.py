"""Data-parallel training over torch.distributed: one engine per rank, driven by rank 0.

Rank 0 runs the server over its `Engine`, whose `parallel` is the torch group
(`TorchDistributed`): every operation that changes a run (create, forward/backward,
optim_step, load, unload: `engine.RANK_OPS`) is announced to the other ranks, which run
`serve_worker` and apply it to their own `Engine` in the same order. The engine's one
compute path (`tinkerd.engine.compute`) takes this rank's contiguous share of every request
(requests of several runs still share a packed pass), the ranks agree on which losses are
finite, and `optim_step` sums the LoRA gradients over ranks before every rank takes the
same optimizer step: the weights stay identical on every rank, and equal (to float
rounding) to a single process's. Everything else (sampling, checkpoint saves and reads, run
lookups) runs on rank 0 alone, which holds the same weights. With FSDP
(`shard_base_with_fsdp`) each rank's base model is sharded with FSDP2 (`fully_shard` per
decoder layer; the frozen base is all-gathered layer by layer, the LoRA weights stay whole
and replicated), so every rank joins every forward.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from tinkerd.engine.engine import Engine
from tinkerd.engine.parallel import TorchDistributed
from tinkerd.errors import InvalidRequestError

log = logging.getLogger("tinkerd.distributed")


def serve_worker(engine: Engine) -> None:
    """A rank other than 0: apply rank 0's operations (`Engine.apply`) until it says stop."""
    if not isinstance(engine.parallel, TorchDistributed):
        engine.parallel = TorchDistributed()
    while True:
        op, args = engine.parallel.receive()
        if op == "stop":
            return
        try:
            engine.apply(op, args)
        except Exception:  # noqa: BLE001 -- rank 0 raises the same error to the client
            log.debug("operation %s failed on rank %d", op, dist.get_rank(), exc_info=True)


def shard_base_with_fsdp(engine: Engine, base_model: str) -> None:
    """Shard a base model's decoder layers over the ranks with FSDP2 (before any LoRA),
    and make the engine's passes keep every rank in step (`parallel.fsdp`)."""
    from torch.distributed.fsdp import fully_shard

    engine.parallel = TorchDistributed(fsdp=True)
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

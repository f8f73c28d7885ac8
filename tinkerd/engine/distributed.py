"""Data-parallel training over torch.distributed: one engine per rank, driven by rank 0.

Rank 0 runs the server with a `DistributedEngine`. Every operation that changes a run
(create, forward/backward, optim_step, load, unload) is broadcast to all ranks, which
apply it to their own `Engine` in the same order. Each engine's `parallel` is the torch
group, so the engine's one compute path (`tinkerd.engine.compute`) takes this rank's
contiguous share of every request (requests of several runs still share a packed pass),
the ranks agree on which losses are finite, and `optim_step` sums the LoRA gradients over
ranks before every rank takes the same optimizer step: the weights stay identical on every
rank, and equal (to float rounding) to a single process's. Everything else (sampling,
checkpoint saves and reads, run lookups) runs on rank 0 alone, which holds the same
weights. With FSDP (`shard_base_with_fsdp`) each rank's base model is sharded with FSDP2
(`fully_shard` per decoder layer; the frozen base is all-gathered layer by layer, the
LoRA weights stay whole and replicated), so every rank joins every forward.
"""

from __future__ import annotations

import logging
import secrets
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tinkerd.engine.adapters import Run
from tinkerd.engine.checkpoints import CheckpointInfo, CheckpointStore
from tinkerd.engine.compute import LossRequest
from tinkerd.engine.engine import Engine, LossCalls
from tinkerd.engine.models import BaseModel, BaseModelRegistry
from tinkerd.engine.parallel import TorchDistributed
from tinkerd.engine.sampler_weights import SamplerWeights
from tinkerd.errors import InvalidRequestError
from tinkerd.types import (
    AdamOptimizerConfig,
    Datum,
    DimuonOptimizerConfig,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoraConfig,
    OptimParams,
    OptimStepResponse,
    SampleResponse,
    UnloadModelResponse,
    WeightsInfoResponse,
)

log = logging.getLogger("tinkerd.distributed")

BROADCAST = (
    "create_model",
    "create_model_from_state",
    "load_state",
    "unload_model",
    "losses",
    "forward_backward_custom",
    "optim_step",
)
"""The Engine operations every rank applies, in rank 0's order."""


def _apply(engine: Engine, op: str, args: tuple, gradient_fn: Callable | None = None) -> Any:
    if op == "losses":  # requests travel as their arguments: each rank prepares its own
        keys, backward = args
        return engine.run_losses([_prepare(engine, *key) for key in keys], backward)
    if op == "forward_backward_custom":
        return engine.forward_backward_custom(*args, gradient_fn)
    return getattr(engine, op)(*args)


def _prepare(engine: Engine, *key: Any) -> LossRequest | Exception:
    try:
        return engine.prepare(*key)
    except Exception as e:  # noqa: BLE001 -- fails the request, on every rank alike
        return e


class DistributedEngine(LossCalls):
    """Rank 0's engine: the `Engine` API, with the operations that change runs applied on
    every rank and the read-only ones on rank 0's own engine (`local`)."""

    def __init__(self, local: Engine, fsdp: bool = False):
        if not isinstance(local.parallel, TorchDistributed):
            local.parallel = TorchDistributed(fsdp)
        self.local = local
        self.fsdp = fsdp
        self.world_size = dist.get_world_size()
        self._lock = threading.Lock()  # one operation at a time, in the same order on all ranks

    def _everywhere(self, op: str, *args: Any, gradient_fn: Callable | None = None) -> Any:
        with self._lock:
            dist.broadcast_object_list([(op, args)], src=0)
            return _apply(self.local, op, args, gradient_fn)

    # ------------------------------------------------------------ on every rank

    def create_model(
        self,
        base_model: str,
        lora_config: LoraConfig,
        model_id: str | None = None,
        optimizer_config: AdamOptimizerConfig | DimuonOptimizerConfig | None = None,
    ) -> str:
        # Same seed and id everywhere, so every rank starts from the same weights.
        self.local.base_model(base_model)  # an unknown model is refused on rank 0 alone
        seed = lora_config.seed if lora_config.seed is not None else secrets.randbits(63)
        lora = lora_config.model_copy(update={"seed": seed})
        return self._everywhere(
            "create_model", base_model, lora, model_id or _new_id(), optimizer_config
        )

    def create_model_from_state(
        self,
        path: str,
        with_optimizer: bool,
        model_id: str | None = None,
        optimizer_config: AdamOptimizerConfig | DimuonOptimizerConfig | None = None,
    ) -> str:
        self.local.checkpoints.resolve(path)  # not found / malformed: refused on rank 0 alone
        return self._everywhere(
            "create_model_from_state", path, with_optimizer, model_id or _new_id(), optimizer_config
        )

    def load_state(self, model_id: str, path: str, with_optimizer: bool) -> None:
        self.local.run(model_id)
        self.local.checkpoints.verify(self.local.checkpoints.resolve(path))
        self._everywhere("load_state", model_id, path, with_optimizer)

    def unload_model(self, model_id: str) -> UnloadModelResponse:
        self.local.run(model_id)
        return self._everywhere("unload_model", model_id)

    def run_losses(
        self, requests: list[LossRequest], backward: bool
    ) -> list[ForwardBackwardOutput | Exception]:
        """`Engine.run_losses` on every rank: runs packed together, each rank its share."""
        keys = [(r.model_id, r.data, r.loss_fn, r.config) for r in requests]
        return self._everywhere("losses", keys, backward)

    def forward_backward_custom(
        self, model_id: str, data: list[Datum], gradient_fn: Callable
    ) -> tuple[ForwardBackwardOutput, Any]:
        self.local.check_custom_data(model_id, data)
        return self._everywhere("forward_backward_custom", model_id, data, gradient_fn=gradient_fn)

    def check_optim_params(self, model_id: str, params: OptimParams) -> None:
        self.local.check_optim_params(model_id, params)

    def optim_step(self, model_id: str, params: OptimParams) -> OptimStepResponse:
        self.local.check_optim_params(model_id, params)  # refused on rank 0 alone
        return self._everywhere("optim_step", model_id, params)

    def stop_workers(self) -> None:
        with self._lock:
            dist.broadcast_object_list([("stop", ())], src=0)

    # ------------------------------------------------------------ on rank 0 alone

    def prepare(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float] | None,
    ) -> LossRequest:
        return self.local.prepare(model_id, data, loss_fn, loss_fn_config)

    def check_custom_data(self, model_id: str, data: list[Datum]) -> None:
        self.local.check_custom_data(model_id, data)

    def sample(self, weights: SamplerWeights, *args: Any, **kwargs: Any) -> Future[SampleResponse]:
        if self.fsdp:  # rank 0's forward would wait for the other ranks' all-gathers
            raise InvalidRequestError(
                "sampling is not available on a server started with --fsdp (each rank holds "
                "only part of the base model); serve sampling without --fsdp"
            )
        return self.local.sample(weights, *args, **kwargs)

    def save_weights_for_sampler(
        self, model_id: str, name: str | None = None, user_metadata: dict[str, str] | None = None
    ) -> SamplerWeights:
        return self.local.save_weights_for_sampler(model_id, name, user_metadata)

    def sampler_for(
        self, base_model: str | None = None, model_path: str | None = None
    ) -> SamplerWeights:
        return self.local.sampler_for(base_model, model_path)

    def get_sampler(self, sampler_id: str) -> SamplerWeights:
        return self.local.get_sampler(sampler_id)

    def sampler_stats(self, base_model: str) -> list[tuple[int, int]]:
        return self.local.sampler_stats(base_model)

    def save_state(
        self,
        model_id: str,
        name: str,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> CheckpointInfo:
        return self.local.save_state(model_id, name, overwrite, user_metadata)

    def weights_info(self, path: str) -> WeightsInfoResponse:
        return self.local.weights_info(path)

    @property
    def checkpoints(self) -> CheckpointStore:
        return self.local.checkpoints

    def get_server_capabilities(self) -> GetServerCapabilitiesResponse:
        return self.local.get_server_capabilities()

    def paging_stats(self) -> dict[str, dict[str, float]]:
        """Rank 0's resident sets (every rank's are the same: `engine.paging`)."""
        return self.local.paging_stats()

    def get_info(self, model_id: str) -> GetInfoResponse:
        return self.local.get_info(model_id)

    def run(self, model_id: str) -> Run:
        return self.local.run(model_id)

    def base_model(self, name: str) -> BaseModel:
        return self.local.base_model(name)

    @property
    def registry(self) -> BaseModelRegistry:
        return self.local.registry

    @property
    def data_dir(self) -> Path:
        return self.local.data_dir

    @property
    def advertised_models(self) -> list[str]:
        return self.local.advertised_models


def _new_id() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


def serve_worker(engine: Engine) -> None:
    """A rank other than 0: apply rank 0's operations until it says stop."""
    if not isinstance(engine.parallel, TorchDistributed):
        engine.parallel = TorchDistributed()
    while True:
        box: list = [None]
        dist.broadcast_object_list(box, src=0)
        op, args = box[0]
        if op == "stop":
            return
        if op not in BROADCAST:
            log.error("rank %d: unknown operation %r", dist.get_rank(), op)
            continue
        try:
            _apply(engine, op, args)
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

"""The engine: training runs (LoRA adapters) on shared base models.

All methods are synchronous and thread-safe; calls on runs of one base model are
serialised by that base's lock, since they share one module tree. Queueing, ordering
and futures live above the engine (`tinkerd.server.scheduler`).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tinkerd import losses
from tinkerd.engine.adapters import Run, adam_step, create_run, delete_run
from tinkerd.engine.batch import Batch, collate
from tinkerd.engine.models import BaseModel, BaseModelRegistry
from tinkerd.engine.tiny import TINY_MODEL_NAME
from tinkerd.errors import InvalidRequestError, ModelUnloadedError, NotFoundError
from tinkerd.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoraConfig,
    ModelData,
    OptimStepResponse,
    SupportedModel,
    TensorData,
    UnloadModelResponse,
)


class Engine:
    def __init__(
        self,
        cache_dir: Path | None = None,
        device: str | None = None,
        extra_models: list[str] | None = None,
    ):
        self.registry = BaseModelRegistry(cache_dir=cache_dir, device=device)
        self.advertised_models = [TINY_MODEL_NAME, *(extra_models or [])]
        self._runs: dict[str, Run] = {}
        self._unloaded: set[str] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------ runs

    def get_server_capabilities(self) -> GetServerCapabilitiesResponse:
        return GetServerCapabilitiesResponse(
            supported_models=[
                SupportedModel(model_name=name, trainable=True, sampleable=False)
                for name in dict.fromkeys(self.advertised_models + self.registry.loaded())
            ]
        )

    def create_model(
        self, base_model: str, lora_config: LoraConfig, model_id: str | None = None
    ) -> str:
        """Create a LoRA training run on `base_model`; returns its model_id."""
        model_id = model_id or f"run-{uuid.uuid4().hex[:12]}"
        base = self._load_base(base_model)
        run = create_run(base, model_id, lora_config)
        with self._lock:
            self._runs[model_id] = run
        return model_id

    def _load_base(self, name: str) -> BaseModel:
        try:
            return self.registry.get(name)
        except (OSError, ValueError) as e:
            raise InvalidRequestError(f"cannot load base model {name!r}: {e}") from None

    def run(self, model_id: str) -> Run:
        with self._lock:
            if model_id in self._runs:
                return self._runs[model_id]
            if model_id in self._unloaded:
                raise ModelUnloadedError(f"model {model_id!r} was unloaded")
        raise NotFoundError(f"no training run {model_id!r}")

    def base_model(self, name: str) -> BaseModel:
        return self._load_base(name)

    def get_info(self, model_id: str) -> GetInfoResponse:
        run = self.run(model_id)
        return GetInfoResponse(
            type="get_info",
            model_id=model_id,
            model_data=ModelData(
                arch=run.base.arch, model_name=run.base.name, tokenizer_id=str(run.base.path)
            ),
            is_lora=True,
            lora_rank=run.lora.rank,
            model_name=run.base.name,
        )

    def unload_model(self, model_id: str) -> UnloadModelResponse:
        """Free the run's adapter and optimizer state; the base stays loaded."""
        run = self.run(model_id)
        with self._lock:
            self._runs.pop(model_id, None)
            self._unloaded.add(model_id)
        delete_run(run)
        return UnloadModelResponse(model_id=model_id, type="unload_model")

    # ------------------------------------------------------------ compute

    def forward(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        """Loss and per-token logprobs, with no gradient."""
        return self.run_loss(self.prepare(model_id, data, loss_fn, loss_fn_config), False)

    def forward_backward(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        """Loss, logprobs, and the loss's gradient added to the run's accumulated one."""
        return self.run_loss(self.prepare(model_id, data, loss_fn, loss_fn_config), True)

    def optim_step(self, model_id: str, adam_params: AdamParams) -> OptimStepResponse:
        run = self.run(model_id)
        with run.base.lock:
            return OptimStepResponse(metrics=adam_step(run, adam_params))

    def check_custom_data(self, model_id: str, data: list[Datum]) -> None:
        """Validate data for forward_backward_custom without computing anything."""
        base = self.run(model_id).base
        collate(data, None, "custom", base.vocab_size, base.max_context_length)

    def forward_backward_custom(
        self,
        model_id: str,
        data: list[Datum],
        gradient_fn: Callable[[list[Tensor]], tuple[list[Tensor], Any]],
    ) -> tuple[ForwardBackwardOutput, Any]:
        """One forward, then one backward from the logprobs with the gradient that
        `gradient_fn(per-datum logprobs)` returns (with anything else it returns)."""
        run = self.run(model_id)
        base = run.base
        batch = collate(data, None, "custom", base.vocab_size, base.max_context_length)
        with base.lock:
            run.activate()
            with torch.enable_grad():
                logprobs = token_logprobs(base.peft_model, batch, base.device)
            per_datum = list(logprobs.detach().cpu().split(batch.lengths))
            grads, extra = gradient_fn(per_datum)  # no gradient reaches the model if it raises
            logprobs.backward(
                torch.cat([g.reshape(p.shape) for g, p in zip(grads, per_datum)]).to(
                    logprobs.device, logprobs.dtype
                )
            )
        out = _output(batch, logprobs.detach(), None, 0.0)
        return out, extra

    def prepare(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float] | None,
    ) -> LossRequest:
        """Validate a loss request completely (no model compute): callers such as the HTTP
        server use this to reject bad input before queueing it."""
        run = self.run(model_id)
        spec = losses.get_loss(loss_fn)
        config = losses.resolve_config(loss_fn, loss_fn_config)
        base = run.base
        batch = collate(data, spec, loss_fn, base.vocab_size, base.max_context_length)
        return LossRequest(model_id, loss_fn, spec, config, batch)

    def run_loss(self, request: LossRequest, backward: bool) -> ForwardBackwardOutput:
        run = self.run(request.model_id)  # may have been unloaded while queued
        base, batch = run.base, request.batch
        with base.lock, torch.set_grad_enabled(backward):
            run.activate()
            logprobs = token_logprobs(base.peft_model, batch, base.device)
            inputs = {k: v.to(logprobs.device) for k, v in batch.inputs.items()}
            elementwise = request.spec.fn(logprobs, inputs, request.config)
            loss = elementwise.sum()
            if not torch.isfinite(loss):
                raise InvalidRequestError(
                    f"{request.loss_fn} loss is {loss.item()}; no gradient was applied "
                    "(check advantages and sampling logprobs)"
                )
            if backward:
                loss.backward()
        return _output(batch, logprobs.detach(), elementwise.detach(), loss.item())


@dataclass
class LossRequest:
    """A validated forward / forward_backward request, ready to run."""

    model_id: str
    loss_fn: str
    spec: losses.LossSpec
    config: dict[str, float]
    batch: Batch


def token_logprobs(model: torch.nn.Module, batch: Batch, device: torch.device) -> Tensor:
    """Log-probability of each target token, `[n_tokens]` (or `[n_tokens, k]`), float32."""
    logits = model(input_ids=batch.input_ids.to(device)).logits
    logits = logits[batch.mask.to(device)].float()  # [n_tokens, vocab]: real positions only
    targets = batch.targets.to(device)
    if targets.ndim == 1:
        return -F.cross_entropy(logits, targets, reduction="none")
    return logits.log_softmax(-1).gather(-1, targets)


def _output(
    batch: Batch, logprobs: Tensor, elementwise: Tensor | None, loss: float
) -> ForwardBackwardOutput:
    """Per datum `logprobs` (and `elementwise_loss` for built-in losses)."""
    split = batch.lengths
    outputs = [{"logprobs": TensorData.from_torch(lp)} for lp in logprobs.cpu().split(split)]
    if elementwise is None:
        return ForwardBackwardOutput(loss_fn_output_type="custom", loss_fn_outputs=outputs)
    for out, el in zip(outputs, elementwise.cpu().split(split)):
        out["elementwise_loss"] = TensorData.from_torch(el)
    return ForwardBackwardOutput(
        loss_fn_output_type="TorchLossReturn", loss_fn_outputs=outputs, metrics={"loss:sum": loss}
    )

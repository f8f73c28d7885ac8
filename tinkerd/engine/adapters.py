"""One training run = one named PEFT LoRA adapter on a shared base + its own Adam state."""

from __future__ import annotations

import copy
import math
import secrets
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from tinkerd.engine.models import BaseModel
from tinkerd.errors import InvalidRequestError
from tinkerd.types import AdamParams, LoraConfig

LORA_ALPHA = 32  # fixed alpha: the update scale is alpha / rank, as in common practice
MAX_LORA_RANK = 512


@dataclass
class Run:
    """A LoRA training run. Its gradients accumulate until `optim_step` consumes them."""

    model_id: str
    base: BaseModel
    lora: LoraConfig
    params: list[nn.Parameter]
    optimizer: torch.optim.AdamW
    step: int = 0

    def activate(self) -> None:
        """Route the shared base through this run's adapter (and make only it trainable)."""
        self.base.peft_model.set_adapter(self.model_id)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """This run's LoRA weights by parameter name (detached views)."""
        tag = f".{self.model_id}."
        return {n: p.detach() for n, p in self.base.peft_model.named_parameters() if tag in n}


def validate_lora_config(lora: LoraConfig) -> None:
    if not 1 <= lora.rank <= MAX_LORA_RANK:
        raise InvalidRequestError(f"lora rank must be in [1, {MAX_LORA_RANK}], got {lora.rank}")
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise InvalidRequestError(
            "at least one of train_attn, train_mlp, train_unembed must be true"
        )


def create_run(base: BaseModel, model_id: str, lora: LoraConfig) -> Run:
    """Add an adapter named `model_id` to `base`, initialised from `lora.seed`."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    validate_lora_config(lora)
    targets = base.lora_target_modules(
        attn=lora.train_attn, mlp=lora.train_mlp, unembed=lora.train_unembed
    )
    if not targets:
        raise InvalidRequestError(f"{base.name} has no Linear modules for these train_* flags")
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        bias="none",
        target_modules=targets,
    )
    seed = lora.seed if lora.seed is not None else secrets.randbits(63)
    cuda_devices = list(range(torch.cuda.device_count()))
    with base.lock, torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)  # A ~ kaiming-uniform from this seed, B = 0
        if base.peft_model is None:
            base.peft_model = get_peft_model(base.model, config, adapter_name=model_id)
            base.peft_model.eval()  # no dropout; and PEFT's mixed-adapter batches need it
        else:
            base.peft_model.add_adapter(model_id, config)
        base.adapters.add(model_id)
        tag = f".{model_id}."
        params = [p for n, p in base.peft_model.named_parameters() if tag in n]
    for p in params:  # float32 master weights even on a bf16 base
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0, foreach=True)
    return Run(model_id=model_id, base=base, lora=lora, params=params, optimizer=optimizer)


def delete_run(run: Run) -> None:
    base = run.base
    with base.lock:
        run.optimizer.state.clear()
        for p in run.params:
            p.grad = None
        base.adapters.discard(run.model_id)
        _delete_adapter(base, run.model_id)


def validate_adam_params(adam: AdamParams) -> None:
    checks = {
        "learning_rate": adam.learning_rate >= 0,
        "beta1": 0 <= adam.beta1 < 1,
        "beta2": 0 <= adam.beta2 < 1,
        "eps": adam.eps >= 0,
        "weight_decay": adam.weight_decay >= 0,
        "grad_clip_norm": adam.grad_clip_norm >= 0,
    }
    for name, ok in checks.items():
        value = getattr(adam, name)
        if not (ok and math.isfinite(value)):
            raise InvalidRequestError(f"AdamParams.{name} out of range: {value}")


STEP_METRIC = "optim/step"
"""optim_step's metric of the run's step count: not `step`, which trainers (e.g.
tinker-cookbook's loops) put in the same log row as these metrics, so it must not collide."""


def adam_step(run: Run, adam: AdamParams) -> dict[str, float]:
    """One AdamW step on the run's accumulated gradients, then clear them.

    Returns the metrics `grad_norm` (global L2 norm before clipping), `learning_rate`
    and `STEP_METRIC` (steps taken so far, this one included).
    """
    validate_adam_params(adam)
    grads = [p.grad for p in run.params if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
    if not math.isfinite(grad_norm):
        run.optimizer.zero_grad(set_to_none=True)
        raise InvalidRequestError(
            f"gradient norm is {grad_norm}; step skipped and gradients cleared"
        )
    if adam.grad_clip_norm > 0 and grad_norm > adam.grad_clip_norm:
        torch.nn.utils.clip_grads_with_norm_(
            run.params, adam.grad_clip_norm, torch.tensor(grad_norm)
        )
    for group in run.optimizer.param_groups:
        group.update(
            lr=adam.learning_rate,
            betas=(adam.beta1, adam.beta2),
            eps=adam.eps,
            weight_decay=adam.weight_decay,
        )
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return {
        "grad_norm": grad_norm,
        "learning_rate": adam.learning_rate,
        STEP_METRIC: float(run.step),
    }


def add_frozen_adapter(
    base: BaseModel, name: str, config, weights: dict[str, torch.Tensor]
) -> None:
    """Add adapter `name` with `weights` (parameter name -> tensor, written with `{name}`
    where the adapter name goes) to the base's PEFT model, for inference only."""
    from peft import get_peft_model

    with base.lock:
        if base.peft_model is None:
            base.peft_model = get_peft_model(base.model, config, adapter_name=name)
            base.peft_model.eval()
        else:
            base.peft_model.add_adapter(name, config)
        params = dict(base.peft_model.named_parameters())
        for key, value in weights.items():
            target = params[key.format(name=name)]
            target.data = value.to(target.device, torch.float32).clone()
            target.requires_grad_(False)


def snapshot_weights(run: Run) -> tuple[object, dict[str, torch.Tensor]]:
    """A copy of the run's LoRA config and weights, keyed for `add_frozen_adapter`."""
    tag = f".{run.model_id}."
    with run.base.lock:
        config = copy.deepcopy(run.base.peft_model.peft_config[run.model_id])
        weights = {
            n.replace(tag, ".{name}."): p.detach().clone()
            for n, p in run.base.peft_model.named_parameters()
            if tag in n
        }
    config.inference_mode = True
    return config, weights


def remove_adapter(base: BaseModel, name: str) -> None:
    with base.lock:
        _delete_adapter(base, name)


def _delete_adapter(base: BaseModel, name: str) -> None:
    with warnings.catch_warnings():  # PEFT warns when the active one goes; we repoint it
        warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
        base.peft_model.delete_adapter(name)
    _repoint_active(base)


def _repoint_active(base: BaseModel) -> None:
    """Keep PEFT's active adapter a live one: a deleted one breaks every later forward."""
    model = base.peft_model
    live = [a for a in base.adapters if a in model.peft_config] or list(model.peft_config)
    stale = model.active_adapter not in (base.adapters or model.peft_config)
    if live and stale:
        model.set_adapter(live[0])

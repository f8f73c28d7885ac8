"""One training run = one named PEFT LoRA adapter on a shared base + its own optimizer
(AdamW or Dimuon, `tinkerd.engine.optimizers`)."""

from __future__ import annotations

import contextlib
import copy
import secrets
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tinkerd.engine.lora import adapter_params
from tinkerd.engine.models import BaseModel
from tinkerd.engine.optimizers import OPTIMIZER_IMPLS, Optimizer, make_optimizer, validate_adam
from tinkerd.errors import InvalidRequestError
from tinkerd.types import (
    OPTIMIZERS,
    AdamOptimizerConfig,
    AdamParams,
    AnyOptimizerConfig,
    LoraConfig,
    OptimParams,
    optimizer_of_params,
)

if TYPE_CHECKING:
    from tinkerd.engine.paging import ResidentSet

LORA_ALPHA = 32  # fixed alpha: the update scale is alpha / rank, as in common practice
MAX_LORA_RANK = 512


@dataclass
class Run:
    """A LoRA training run. Its gradients accumulate until `optim_step` consumes them."""

    model_id: str
    base: BaseModel
    lora: LoraConfig
    params: list[nn.Parameter]
    """The LoRA weights, in a fixed order (the optimizer's state is kept by position)."""
    optimizer: Optimizer
    optimizer_config: AnyOptimizerConfig
    step: int = 0
    pager: ResidentSet | None = None
    """The base's resident set that pages this run in and out (`engine.paging`). While
    the run is paged its adapter is out of the base's PeftModel, and on the disk tier its
    `params` are emptied (their tensors in a file) until it is paged in."""

    def attached(self) -> contextlib.AbstractContextManager:
        """A block in which the run's adapter is attached, for reading it (a paged run is
        borrowed: `ResidentSet.borrowed`)."""
        return contextlib.nullcontext() if self.pager is None else self.pager.borrowed(self)

    def activate(self) -> None:
        """Route the shared base through this run's adapter (and make only it trainable)."""
        self.base.peft_model.set_adapter(self.model_id)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """This run's LoRA weights by parameter name (detached views)."""
        params = adapter_params(self.base.peft_model, self.model_id)
        return {n: p.detach() for n, p in params.items()}

    def reset_optimizer(self) -> None:
        """A fresh optimizer of the run's kind (no state, no pending gradients)."""
        self.clear_grads()
        self.optimizer = make_optimizer(self.optimizer_config.type, self.params, self.lora.rank)

    def clear_grads(self) -> None:
        for p in self.params:
            p.grad = None


def validate_lora_config(lora: LoraConfig) -> None:
    if not 1 <= lora.rank <= MAX_LORA_RANK:
        raise InvalidRequestError(f"lora rank must be in [1, {MAX_LORA_RANK}], got {lora.rank}")
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise InvalidRequestError(
            "at least one of train_attn, train_mlp, train_unembed must be true"
        )


def lora_targets(base: BaseModel, lora: LoraConfig) -> tuple[list[str], list[str]]:
    """(Linear module names, expert parameter names) the run's LoRA adapts. Every train_*
    flag set must adapt something: a flag with nothing to act on is refused, never
    ignored (e.g. train_mlp on a model whose MLP this cannot find)."""
    flags = {"attn": lora.train_attn, "mlp": lora.train_mlp, "unembed": lora.train_unembed}
    for role, wanted in flags.items():
        only = {r: r == role for r in flags}
        found = base.lora_target_modules(**only) + base.lora_target_parameters(**only)
        if wanted and not found:
            raise InvalidRequestError(
                f"train_{role}=True, but {base.name} has no layer of that role that LoRA "
                f"adapts here (no Linear, no fused expert weights); set train_{role}=False"
            )
    targets = base.lora_target_modules(**flags)
    return targets, base.lora_target_parameters(**flags)


def create_run(
    base: BaseModel,
    model_id: str,
    lora: LoraConfig,
    optimizer: AnyOptimizerConfig | None = None,
) -> Run:
    """Add an adapter named `model_id` to `base`, initialised from `lora.seed`, trained
    with `optimizer` (default AdamW)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    validate_lora_config(lora)
    optimizer = optimizer or AdamOptimizerConfig()
    targets, parameters = lora_targets(base, lora)
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        bias="none",
        target_modules=targets,
        target_parameters=parameters or None,
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
        params = list(adapter_params(base.peft_model, model_id).values())
    for p in params:  # float32 master weights even on a bf16 base
        p.data = p.data.float()
    return Run(
        model_id=model_id,
        base=base,
        lora=lora,
        params=params,
        optimizer=make_optimizer(optimizer.type, params, lora.rank),
        optimizer_config=optimizer,
    )


def delete_run(run: Run) -> None:
    base = run.base
    with base.lock:
        if run.pager is not None and not run.pager.remove(run):
            return  # paged: no adapter attached, its paged copy is gone
        run.reset_optimizer()
        base.adapters.discard(run.model_id)
        _delete_adapter(base, run.model_id)


def validate_adam_params(adam: AdamParams) -> None:
    validate_adam(adam)


def step_hyper(run: Run, params: OptimParams) -> Any:
    """`params` checked against the run's optimizer (a 400 naming both if they are of
    another optimizer) and validated: what `optimizer_step` takes."""
    given, kind = optimizer_of_params(params), run.optimizer_config.type
    if given != kind:
        raise InvalidRequestError(
            f"optim_step got {type(params).__name__}, but run {run.model_id!r} was created "
            f"with the {kind!r} optimizer, which takes {OPTIMIZERS[kind].params.__name__}"
        )
    return OPTIMIZER_IMPLS[kind].hyper(params)


STEP_METRIC = "optim/step"
"""optim_step's metric of the run's step count: not `step`, which trainers (e.g.
tinker-cookbook's loops) put in the same log row as these metrics, so it must not collide."""


def optimizer_step(run: Run, params: OptimParams) -> dict[str, float]:
    """One step of the run's optimizer on its accumulated gradients, then clear them.

    Returns the metrics `grad_norm` (global L2 norm before clipping), `learning_rate`
    and `STEP_METRIC` (steps taken so far, this one included). Bad `params` are refused with
    the gradients kept; a non-finite gradient norm skips the step and clears them."""
    hyper = step_hyper(run, params)
    try:
        metrics = run.optimizer.step(run.params, hyper)
    except InvalidRequestError as e:
        run.clear_grads()
        raise InvalidRequestError(f"{e}; gradients cleared") from None
    run.clear_grads()
    run.step += 1
    return {**metrics, STEP_METRIC: float(run.step)}


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
    with run.base.lock, run.attached():
        config = copy.deepcopy(run.base.peft_model.peft_config[run.model_id])
        params = adapter_params(run.base.peft_model, run.model_id)
        weights = {n.replace(tag, ".{name}."): p.detach().clone() for n, p in params.items()}
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

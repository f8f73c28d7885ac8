"""A run's optimizer behind one small interface: AdamW (Tinker's default) and Dimuon.

    optimizer.step(params, hyper) -> metrics   one update from each parameter's `.grad`
    optimizer.state_dict() / load_state_dict   everything a resumed run needs, bit for bit

`step` reads `p.grad` and never clears it (the caller zeroes gradients after a step, or
after a refused one). Both return the metrics `grad_norm` (global L2 norm before
clipping), `learning_rate` and `optim/step` (steps taken, this one included).

Dimuon, for a 2-D parameter W of LoRA rank r (the rank of the pair it belongs to; by
default min(W.shape), which is r for both LoRA A `[r, in]` and B `[out, r]`), with every
`DimuonParams` field (tinker.types.DimuonParams; defaults from the SDK's docstrings):

    G   = grad * min(1, grad_clip_norm / ||all grads||)   (no clipping if grad_clip_norm <= 0)
    M   = beta1 * M + (1 - beta1) * G                    momentum, a running average
    rho = mean_col(M^2) / mean(M^2),  gam = mean_row(M^2) / mean(M^2)   row, column energy
    X   = diag((rho + damping)^-1/4) M diag((gam + damping)^-1/4)      row/column
                                                          preconditioner, smoothed by damping
    O   = msign(X) = U V^T  for X = U S V^T (singular values below the numerical rank
                                              tolerance count as 0)
    D   = sqrt(r) * O / ||O||_F                           a direction of Frobenius norm sqrt(r)
    W  -= learning_rate * (32 / r)^rank_lr_correction_exponent * D

Published by Tinker (DimuonParams docstrings; https://tinker-docs.thinkingmachines.ai/
tinker/optimizers/): the fields and defaults (beta1 0.9, damping 1e-4, exponent 0.175,
grad_clip_norm 0), "learning rate applied to a direction with Frobenius norm sqrt(rank)",
"rank correction relative to rank 32, applied uniformly to all LoRA matrices", "damping
smooths the row and column preconditioner", and that the matrix-sign iteration count and a
normalisation epsilon are internal constants. Not published, so chosen here and documented
in docs/compatibility.md: the exact preconditioner (energies normalised to mean 1, power
-1/4 per side), the exact matrix sign (exact, from the r x r Gram matrix,
instead of an iteration), and the direction of
the rank correction ((32 / r)^e, smaller steps above rank 32). Updates therefore follow the
published definitions but are not bit-identical to Tinker's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from tinkerd.errors import InvalidRequestError

REFERENCE_RANK = 32
"""The rank at which Dimuon's rank correction is 1."""
NORM_EPS = 1e-12
"""Keeps the direction's normalisation finite when the momentum is (numerically) zero."""


class Optimizer(Protocol):
    def step(self, params: Sequence[Tensor], hyper: Any) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _grad_norm(params: Sequence[Tensor]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
    if not math.isfinite(norm):
        raise InvalidRequestError(f"gradient norm is {norm}; step skipped")
    return norm


def _check(name: str, value: float, ok: bool) -> None:
    if not (ok and math.isfinite(value)):
        raise InvalidRequestError(f"{name} out of range: {value}")


# ---------------------------------------------------------------- Dimuon


@dataclass(frozen=True)
class DimuonHyper:
    """One Dimuon step's hyperparameters: `tinker.types.DimuonParams`' fields and defaults.
    SDK 0.38's DimuonParams lacks the last two; `from_params` fills them with defaults."""

    learning_rate: float
    grad_clip_norm: float = 0.0
    beta1: float = 0.9
    damping: float = 1e-4
    rank_lr_correction_exponent: float = 0.175

    @classmethod
    def from_params(cls, params: Any) -> DimuonHyper:
        """From a DimuonParams-like object or mapping (unknown fields ignored)."""
        get = params.get if isinstance(params, Mapping) else lambda k: getattr(params, k, None)
        given = {f.name: get(f.name) for f in fields(cls)}
        if given["learning_rate"] is None:
            raise InvalidRequestError("DimuonParams.learning_rate is required")
        return cls(**{k: float(v) for k, v in given.items() if v is not None})

    def validate(self) -> None:
        _check("DimuonParams.learning_rate", self.learning_rate, self.learning_rate >= 0)
        _check("DimuonParams.grad_clip_norm", self.grad_clip_norm, True)
        _check("DimuonParams.beta1", self.beta1, 0 <= self.beta1 < 1)
        _check("DimuonParams.damping", self.damping, self.damping > 0)
        _check("DimuonParams.rank_lr_correction_exponent", self.rank_lr_correction_exponent, True)


def rank_correction(rank: int, exponent: float) -> float:
    """The learning-rate factor (32 / rank)^exponent: 1 at rank 32 or exponent 0."""
    return (REFERENCE_RANK / rank) ** exponent


def precondition(momentum: Tensor, damping: float) -> Tensor:
    """diag((rho + damping)^-1/4) M diag((gam + damping)^-1/4), rho and gam the row and column
    mean squares of M divided by M's mean square (so they average 1)."""
    square = momentum.square()
    scale = square.mean().clamp_min(NORM_EPS)
    rows = (square.mean(dim=1) / scale + damping) ** -0.25
    cols = (square.mean(dim=0) / scale + damping) ** -0.25
    return rows[:, None] * momentum * cols[None, :]


def matrix_sign(x: Tensor) -> Tensor:
    """U V^T of the thin SVD x = U S V^T, singular values under the numerical rank tolerance
    (max(S) * max(shape) * x's machine epsilon, NumPy's matrix_rank rule) counting as zero.

    Computed exactly from the small side's Gram matrix (r x r for a LoRA factor), in
    float64: x = U S V^T gives x x^T = U S^2 U^T, so U V^T = U S^-1 U^T x. That is a few
    small matmuls instead of an SVD of the long side."""
    wide = x.shape[0] <= x.shape[1]
    y = (x if wide else x.T).double()
    eigenvalues, u = torch.linalg.eigh(y @ y.T)
    singular = eigenvalues.clamp_min(0).sqrt()
    tol = singular.max() * max(x.shape) * torch.finfo(x.dtype).eps
    inverse = torch.where(singular > tol, 1 / singular, torch.zeros_like(singular))
    sign = (u * inverse[None, :]) @ u.T @ y
    return (sign if wide else sign.T).to(x.dtype)


def dimuon_direction(momentum: Tensor, rank: int, damping: float) -> Tensor:
    """The unit-rate update direction D (Frobenius norm sqrt(rank), or 0 for M = 0)."""
    sign = matrix_sign(precondition(momentum, damping))
    norm = torch.linalg.matrix_norm(sign)
    return sign * (math.sqrt(rank) / (norm + NORM_EPS))


class Dimuon:
    """Dimuon on a list of 2-D parameters; state is one float32 momentum per parameter,
    by position in the list (the list must keep its order across steps and resumes)."""

    def __init__(self, rank: int | None = None):
        self.rank = rank
        """The LoRA rank of every parameter; None: min(shape) of each."""
        self.momentum: dict[int, Tensor] = {}
        self.steps = 0

    def step(self, params: Sequence[Tensor], hyper: Any) -> dict[str, float]:
        h = hyper if isinstance(hyper, DimuonHyper) else DimuonHyper.from_params(hyper)
        h.validate()
        for i, p in enumerate(params):
            if p.ndim != 2:
                raise InvalidRequestError(f"Dimuon needs 2-D parameters; #{i} is {p.ndim}-D")
            held = self.momentum.get(i)
            if held is not None and held.shape != p.shape:
                raise InvalidRequestError(
                    f"Dimuon state #{i} has shape {list(held.shape)}, parameter {list(p.shape)}"
                )
        grad_norm = _grad_norm(params)
        clip = 1.0
        if h.grad_clip_norm > 0 and grad_norm > h.grad_clip_norm:
            clip = h.grad_clip_norm / grad_norm
        with torch.no_grad():
            for i, p in enumerate(params):
                if p.grad is None:
                    continue
                grad = p.grad.detach().float() * clip
                m = self.momentum.get(i)
                m = torch.zeros_like(grad) if m is None else m.to(grad.device)
                m.mul_(h.beta1).add_(grad, alpha=1 - h.beta1)
                self.momentum[i] = m
                rank = self.rank or min(p.shape)
                rate = h.learning_rate * rank_correction(rank, h.rank_lr_correction_exponent)
                p.sub_((rate * dimuon_direction(m, rank, h.damping)).to(p.dtype))
        self.steps += 1
        return {
            "grad_norm": grad_norm,
            "learning_rate": h.learning_rate,
            "optim/step": float(self.steps),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "type": "dimuon",
            "version": 1,
            "rank": self.rank,
            "step": self.steps,
            "momentum": {i: m.detach().clone() for i, m in self.momentum.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("type") != "dimuon" or state.get("version") != 1:
            raise InvalidRequestError(
                f"not a Dimuon v1 optimizer state: type={state.get('type')!r}, "
                f"version={state.get('version')!r}"
            )
        self.rank = state["rank"]
        self.steps = int(state["step"])
        self.momentum = {int(i): m.detach().clone().float() for i, m in state["momentum"].items()}


# ---------------------------------------------------------------- AdamW


def validate_adam(adam: Any) -> None:
    checks = {
        "learning_rate": adam.learning_rate >= 0,
        "beta1": 0 <= adam.beta1 < 1,
        "beta2": 0 <= adam.beta2 < 1,
        "eps": adam.eps >= 0,
        "weight_decay": adam.weight_decay >= 0,
        "grad_clip_norm": adam.grad_clip_norm >= 0,
    }
    for name, ok in checks.items():
        _check(f"AdamParams.{name}", getattr(adam, name), ok)


class AdamW:
    """torch.optim.AdamW (as Tinker's docs say its Adam is) with Tinker's AdamParams per
    step, global-norm clipping first; the same update as `engine.adapters.adam_step`."""

    def __init__(self, params: Sequence[Tensor]):
        self.params = list(params)
        self.torch = torch.optim.AdamW(self.params, lr=0.0, weight_decay=0.0, foreach=True)
        self.steps = 0

    @property
    def state(self) -> Any:
        """torch's per-parameter state (exp_avg, exp_avg_sq, step), keyed by parameter."""
        return self.torch.state

    def step(self, params: Sequence[Tensor], hyper: Any) -> dict[str, float]:
        if [id(p) for p in params] != [id(p) for p in self.params]:
            raise InvalidRequestError("AdamW.step got other parameters than it was made for")
        validate_adam(hyper)
        grad_norm = _grad_norm(params)
        if hyper.grad_clip_norm > 0 and grad_norm > hyper.grad_clip_norm:
            torch.nn.utils.clip_grads_with_norm_(
                self.params, hyper.grad_clip_norm, torch.tensor(grad_norm)
            )
        for group in self.torch.param_groups:
            group.update(
                lr=hyper.learning_rate,
                betas=(hyper.beta1, hyper.beta2),
                eps=hyper.eps,
                weight_decay=hyper.weight_decay,
            )
        self.torch.step()
        self.steps += 1
        return {
            "grad_norm": grad_norm,
            "learning_rate": hyper.learning_rate,
            "optim/step": float(self.steps),
        }

    def state_dict(self) -> dict[str, Any]:
        # torch's state_dict holds the live tensors: a copy, so later steps leave it as is
        return {
            "type": "adamw",
            "step": self.steps,
            "torch": copy.deepcopy(self.torch.state_dict()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("type") != "adamw":
            raise InvalidRequestError(f"not an AdamW optimizer state: {state.get('type')!r}")
        self.torch.load_state_dict(copy.deepcopy(state["torch"]))
        self.steps = int(state["step"])


class OptimizerImpl(NamedTuple):
    """How the engine runs one optimizer of `types.OPTIMIZERS`."""

    make: Callable[[Sequence[Tensor], int | None], Optimizer]
    """(the run's LoRA parameters, its rank) -> a fresh optimizer."""
    hyper: Callable[[Any], Any]
    """The step's params validated (a 400 naming the field) into what `step` takes."""


def _adam_hyper(params: Any) -> Any:
    validate_adam(params)
    return params


def _dimuon_hyper(params: Any) -> DimuonHyper:
    hyper = DimuonHyper.from_params(params)
    hyper.validate()
    return hyper


OPTIMIZER_IMPLS: dict[str, OptimizerImpl] = {
    "adamw": OptimizerImpl(lambda params, rank: AdamW(params), _adam_hyper),
    "dimuon": OptimizerImpl(lambda params, rank: Dimuon(rank), _dimuon_hyper),
}
"""The engine's side of `types.OPTIMIZERS` (same keys); checkpoints hold each one's
`state_dict()`."""


def make_optimizer(kind: str, params: Sequence[Tensor], rank: int | None = None) -> Optimizer:
    """The optimizer a run was created with (its OptimizerConfig.type)."""
    impl = OPTIMIZER_IMPLS.get(kind)
    if impl is None:
        known = ", ".join(repr(k) for k in OPTIMIZER_IMPLS)
        raise InvalidRequestError(f"unknown optimizer type {kind!r}; known: {known}")
    return impl.make(params, rank)

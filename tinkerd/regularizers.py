"""Ready regularizers for `forward_backward_custom`, as plain functions.

Each has the loss_fn signature `fn(data, logprobs_list) -> scalar tensor`, so it goes
straight into `RegularizerSpec(fn=..., weight=..., name=...)`; the factories (lower-case
names followed by `(...)` below) return such a function. Sums run over the *scored* tokens
of every datum: those with a nonzero `weights` entry when the datum has
`loss_fn_inputs["weights"]`, else all of its target tokens. Nothing is averaged unless
the formula says so. With lp_t the logprob of scored token t, n_d the number of scored
tokens of datum d:

    l1_logprobs        sum_t |lp_t|
    l2_logprobs        sum_t lp_t^2                      (squared L2 norm)
    elastic_net(a, b)  a * sum_t |lp_t| + b * sum_t lp_t^2
    entropy_proxy      -sum_t exp(lp_t) * lp_t           (each sampled token's share of
                                                          the entropy; no full softmax)
    kl_to_reference    sum_t exp(r_t - lp_t) - (r_t - lp_t) - 1
                       with r_t = loss_fn_inputs[key]: the k3 estimator of KL(p || ref),
                       >= 0 and 0 exactly where lp == r
    consistency(key)   sum_t (lp_t - v_t)^2   ("squared", default) or sum_t |lp_t - v_t|
                       ("absolute"), v_t = loss_fn_inputs[key]: the same targets' logprobs
                       under another view of the datum (another prompt, an augmentation),
                       from an earlier forward; the gradient moves this view only
    orthogonality      sum_{d < e} (u_d . u_e)^2, u_d = c_d / (|c_d| + 1e-12), c_d datum d's
                       scored logprobs minus their mean, zero-padded to the longest: the
                       squared correlation of the data's per-position logprob profiles,
                       i.e. orthogonality of the rows of the centred [data, position]
                       logprob matrix (0 for a single datum)
    gradient_penalty(loss_fn, target)
                       |g| (target None) or (|g| - target)^2, g = d loss_fn / d logprobs over
                       every datum's tokens, taken with create_graph so the penalty trains
                       (a double backward: loss_fn must be differentiable twice, and sync)
    length_normalized_nll  sum_d (1 / n_d) * sum_{t in d} -lp_t

tinkex's eight built-ins map to these (docs/custom-losses.md has the table). Unlike
there, every one gives a gradient, and a failure raises instead of turning into 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tinkerd.types import Datum


def _scored(datum: Datum, logprobs: Tensor) -> Tensor:
    """The logprobs of the datum's scored tokens, flattened."""
    weights = datum.loss_fn_inputs.get("weights")
    if weights is None:
        return logprobs.reshape(-1)
    mask = weights.to_torch().reshape(logprobs.shape) != 0
    return logprobs[mask.to(logprobs.device)]


def _all_scored(data: list[Datum], logprobs_list: list[Tensor]) -> Tensor:
    return torch.cat([_scored(d, lp) for d, lp in zip(data, logprobs_list)])


def l1_logprobs(data: list[Datum], logprobs_list: list[Tensor]) -> Tensor:
    return _all_scored(data, logprobs_list).abs().sum()


def l2_logprobs(data: list[Datum], logprobs_list: list[Tensor]) -> Tensor:
    return (_all_scored(data, logprobs_list) ** 2).sum()


def entropy_proxy(data: list[Datum], logprobs_list: list[Tensor]) -> Tensor:
    lp = _all_scored(data, logprobs_list)
    return -(lp.exp() * lp).sum()


def kl_to_reference(
    key: str = "reference_logprobs",
) -> Callable[[list[Datum], list[Tensor]], Tensor]:
    """A regularizer pulling the policy to reference logprobs given per datum in
    `loss_fn_inputs[key]` (float, shaped like target_tokens)."""

    def kl(data: list[Datum], logprobs_list: list[Tensor]) -> Tensor:
        total = logprobs_list[0].new_zeros(())
        for datum, lp in zip(data, logprobs_list):
            if key not in datum.loss_fn_inputs:
                raise KeyError(f"kl_to_reference needs loss_fn_inputs[{key!r}] in every datum")
            reference = datum.loss_fn_inputs[key].to_torch().to(lp).reshape(lp.shape)
            weights = datum.loss_fn_inputs.get("weights")
            mask = weights.to_torch().reshape(lp.shape) != 0 if weights is not None else None
            log_ratio = reference - lp
            per_token = log_ratio.exp() - log_ratio - 1
            total = total + (per_token[mask] if mask is not None else per_token).sum()
        return total

    kl.__name__ = f"kl_to_reference[{key}]"
    return kl


def length_normalized_nll(data: list[Datum], logprobs_list: list[Tensor]) -> Tensor:
    scored = [_scored(d, lp) for d, lp in zip(data, logprobs_list)]
    terms = [-lp.mean() for lp in scored if lp.numel()]
    return torch.stack(terms).sum() if terms else logprobs_list[0].new_zeros(())


Regularizer = Callable[[list[Datum], list[Tensor]], Tensor]


def elastic_net(l1: float = 0.5, l2: float = 0.5) -> Regularizer:
    """`l1 * l1_logprobs + l2 * l2_logprobs` (tinkex's l1_ratio r and lambda: l1 = lambda * r,
    l2 = lambda * (1 - r))."""
    if not (math.isfinite(l1) and math.isfinite(l2)):
        raise ValueError(f"elastic_net weights must be finite, got {l1}, {l2}")

    def net(data: list[Datum], logprobs_list: list[Tensor]) -> Tensor:
        lp = _all_scored(data, logprobs_list)
        return l1 * lp.abs().sum() + l2 * (lp**2).sum()

    net.__name__ = f"elastic_net[{l1},{l2}]"
    return net


def _input(datum: Datum, key: str, like: Tensor, who: str) -> Tensor:
    if key not in datum.loss_fn_inputs:
        raise KeyError(f"{who} needs loss_fn_inputs[{key!r}] in every datum")
    value = datum.loss_fn_inputs[key].to_torch().to(like)
    if value.numel() != like.numel():
        raise ValueError(
            f"{who}: loss_fn_inputs[{key!r}] has {value.numel()} values, "
            f"the datum has {like.numel()} target tokens"
        )
    return value.reshape(like.shape)


def _scored_mask(datum: Datum, logprobs: Tensor) -> Tensor:
    weights = datum.loss_fn_inputs.get("weights")
    if weights is None:
        return torch.ones_like(logprobs, dtype=torch.bool)
    return (weights.to_torch().reshape(logprobs.shape) != 0).to(logprobs.device)


def consistency(key: str = "original_logprobs", metric: str = "squared") -> Regularizer:
    """Pulls these logprobs to another view's logprobs of the same targets, given per datum
    in `loss_fn_inputs[key]` (float, shaped like target_tokens)."""
    if metric not in ("squared", "absolute"):
        raise ValueError(f"consistency metric must be 'squared' or 'absolute', got {metric!r}")

    def consistent(data: list[Datum], logprobs_list: list[Tensor]) -> Tensor:
        total = logprobs_list[0].new_zeros(())
        for datum, lp in zip(data, logprobs_list):
            other = _input(datum, key, lp, "consistency")
            gap = (lp - other)[_scored_mask(datum, lp)]
            total = total + (gap**2 if metric == "squared" else gap.abs()).sum()
        return total

    consistent.__name__ = f"consistency[{key},{metric}]"
    return consistent


def orthogonality(data: list[Datum], logprobs_list: list[Tensor]) -> Tensor:
    rows = [_scored(d, lp) for d, lp in zip(data, logprobs_list)]
    width = max((r.numel() for r in rows), default=0)
    if len(rows) < 2 or width == 0:
        return logprobs_list[0].new_zeros(()) * logprobs_list[0].sum()
    centred = []
    for r in rows:
        c = r - r.mean() if r.numel() else r
        c = torch.nn.functional.pad(c, (0, width - c.numel()))
        centred.append(c / (torch.linalg.vector_norm(c) + 1e-12))
    u = torch.stack(centred)
    cosines = u @ u.T
    return torch.triu(cosines, diagonal=1).square().sum()


def gradient_penalty(loss_fn: Callable[..., Any], target_norm: float | None = None) -> Regularizer:
    """The norm of `loss_fn`'s gradient with respect to the logprobs (every token of every
    datum), or its squared distance to `target_norm`. `loss_fn` is a sync loss function of
    the usual signature (a `(loss, metrics)` return is fine); the penalty differentiates
    through its gradient, so it must be twice differentiable."""

    def penalty(data: list[Datum], logprobs_list: list[Tensor]) -> Tensor:
        value = loss_fn(data, logprobs_list)
        value = value[0] if isinstance(value, tuple) else value
        zero = logprobs_list[0].new_zeros(())
        if not value.requires_grad:  # the loss ignores the logprobs: its gradient is 0
            norm = zero
        else:
            grads = torch.autograd.grad(value, logprobs_list, create_graph=True, allow_unused=True)
            square = sum(((g**2).sum() for g in grads if g is not None), zero)
            norm = square.clamp_min(1e-30).sqrt()  # finite gradient at g = 0
        return norm if target_norm is None else (norm - target_norm) ** 2

    penalty.__name__ = f"gradient_penalty[{getattr(loss_fn, '__name__', 'loss_fn')}]"
    return penalty

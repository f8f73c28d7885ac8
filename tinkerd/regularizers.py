"""Ready regularizers for `forward_backward_custom`, as plain functions.

Each has the loss_fn signature `fn(data, logprobs_list) -> scalar tensor`, so it goes
straight into `RegularizerSpec(fn=..., weight=..., name=...)`. Sums run over the *scored*
tokens of every datum: those with a nonzero `weights` entry when the datum has
`loss_fn_inputs["weights"]`, else all of its target tokens. With lp_t the logprob of
scored token t, n_d the number of scored tokens of datum d:

    l1_logprobs        sum_t |lp_t|
    l2_logprobs        sum_t lp_t^2                      (squared L2 norm)
    entropy_proxy      -sum_t exp(lp_t) * lp_t           (each sampled token's share of
                                                          the entropy; no full softmax)
    kl_to_reference    sum_t exp(r_t - lp_t) - (r_t - lp_t) - 1
                       with r_t = loss_fn_inputs[key]: the k3 estimator of KL(p || ref),
                       >= 0 and 0 exactly where lp == r
    length_normalized_nll  sum_d (1 / n_d) * sum_{t in d} -lp_t
"""

from __future__ import annotations

from collections.abc import Callable

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

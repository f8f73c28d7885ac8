"""Built-in losses, as pure torch functions of per-token tensors.

Each loss maps the learner's per-token log-probabilities `logprobs` (`[n_tokens]`, the
tokens of every datum laid end to end) and the datum's `loss_fn_inputs` (same shape) to
a per-token loss `[n_tokens]`. The training objective is its **sum**: tinkerd never
averages over tokens or data, so a token's weight is exactly what the caller gave.

With ratio r = exp(logprobs - sampling_logprobs) and advantages A (per token):

    cross_entropy        -weights * logprobs               (any real weights, <0 allowed)
    importance_sampling  -r * A
    ppo                  -min(r * A, clip(r, low, high) * A)
    cispo                -stopgrad(clip(r, low, high)) * logprobs * A
    dro                  -(logprobs * A - beta/2 * (logprobs - sampling_logprobs)^2)
    gspo                 -min(s_t * A, clip(s_t, low, high) * A)     (GSPO-token)

`low` and `high` are absolute ratio thresholds (`clip_low_threshold`,
`clip_high_threshold` in `loss_fn_config`, default 0.8 and 1.2); a datum may also carry
them per token in `loss_fn_inputs`, which wins over the config.

gspo (Tinker's "GSPO" page: the token-level variant of Zheng et al. 2025) replaces the
token ratio with the datum's *sequence* ratio: with M_d the tokens of datum d whose
`sequence_ratio_mask` is nonzero,

    s_d = exp(mean_{t in M_d} (logprobs_t - sampling_logprobs_t))        (no gradient)
    s_t = s_d * exp(logprobs_t - stopgrad(logprobs_t))

so every token of d carries the value s_d and the gradient of its own logprob
(d s_t / d logprobs_t = s_d). Each datum is one sequence: the mean never crosses data, so
the loss needs the per-token datum ordinal `inputs["datum_index"]`, which the engine adds
(`datum_index`) for a spec with `per_datum=True`. A datum with an empty mask has s_d = 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tinkerd.errors import InvalidRequestError

Inputs = Mapping[str, Tensor]
Config = Mapping[str, float]


def cross_entropy(logprobs: Tensor, inputs: Inputs, config: Config) -> Tensor:
    return -inputs["weights"] * logprobs


def importance_sampling(logprobs: Tensor, inputs: Inputs, config: Config) -> Tensor:
    ratio = torch.exp(logprobs - inputs["logprobs"])
    return -ratio * inputs["advantages"]


def _clip_bounds(inputs: Inputs, config: Config) -> tuple[Tensor | float, Tensor | float]:
    low = inputs.get("clip_low_threshold", config["clip_low_threshold"])
    high = inputs.get("clip_high_threshold", config["clip_high_threshold"])
    return low, high


def ppo(logprobs: Tensor, inputs: Inputs, config: Config) -> Tensor:
    ratio = torch.exp(logprobs - inputs["logprobs"])
    low, high = _clip_bounds(inputs, config)
    advantages = inputs["advantages"]
    clipped = torch.clamp(ratio, low, high)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def cispo(logprobs: Tensor, inputs: Inputs, config: Config) -> Tensor:
    ratio = torch.exp(logprobs - inputs["logprobs"])
    low, high = _clip_bounds(inputs, config)
    coefficient = torch.clamp(ratio, low, high).detach()
    return -coefficient * logprobs * inputs["advantages"]


def dro(logprobs: Tensor, inputs: Inputs, config: Config) -> Tensor:
    penalty = (logprobs - inputs["logprobs"]) ** 2
    return -(logprobs * inputs["advantages"] - 0.5 * config["beta"] * penalty)


def datum_index(lengths: list[int]) -> Tensor:
    """`[sum(lengths)]` float: each token's datum ordinal (0, 0, 0, 1, 1, ...), for the
    losses whose spec has `per_datum=True` (they read it as `inputs["datum_index"]`)."""
    return torch.repeat_interleave(
        torch.arange(len(lengths), dtype=torch.float32), torch.tensor(lengths)
    )


def gspo(logprobs: Tensor, inputs: Inputs, config: Config) -> Tensor:
    if "datum_index" not in inputs:
        raise InvalidRequestError(
            "gspo needs the per-token datum ordinal inputs['datum_index'] "
            "(the engine adds it for a loss with per_datum=True)"
        )
    index = inputs["datum_index"].long()
    n_data = int(index.max().item()) + 1 if index.numel() else 0
    in_ratio = (inputs["sequence_ratio_mask"] != 0).to(logprobs.dtype)
    token_log_ratio = (logprobs.detach() - inputs["logprobs"]) * in_ratio
    sums = logprobs.new_zeros(n_data).index_add_(0, index, token_log_ratio)
    counts = logprobs.new_zeros(n_data).index_add_(0, index, in_ratio)
    sequence_log_ratio = sums / counts.clamp_min(1.0)  # empty mask: log ratio 0, s_d = 1
    ratio = torch.exp(sequence_log_ratio[index] + logprobs - logprobs.detach())
    low, high = _clip_bounds(inputs, config)
    advantages = inputs["advantages"]
    clipped = torch.clamp(ratio, low, high)
    return -torch.minimum(ratio * advantages, clipped * advantages)


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[[Tensor, Inputs, Config], Tensor]
    required: tuple[str, ...]
    """loss_fn_inputs keys the loss needs, besides `target_tokens`."""
    optional: tuple[str, ...] = ()
    config_defaults: dict[str, float] = field(default_factory=dict)
    per_datum: bool = False
    """The loss reads `inputs["datum_index"]` (see `datum_index`) to keep data apart."""


_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
_CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, ("weights",)),
    "importance_sampling": LossSpec(importance_sampling, ("logprobs", "advantages")),
    "ppo": LossSpec(ppo, ("logprobs", "advantages"), _CLIP_INPUTS, dict(_CLIP)),
    "cispo": LossSpec(cispo, ("logprobs", "advantages"), _CLIP_INPUTS, dict(_CLIP)),
    "dro": LossSpec(dro, ("logprobs", "advantages"), (), {"beta": 0.05}),
    "gspo": LossSpec(
        gspo,
        ("logprobs", "advantages", "sequence_ratio_mask"),
        _CLIP_INPUTS,
        dict(_CLIP),
        per_datum=True,
    ),
}


UNPUBLISHED = {
    "stable_reinforce": (
        "Tinker does not publish its objective, and it reads stability records kept on "
        "Tinker's sampling servers; pass loss_fn='importance_sampling', 'ppo', 'cispo' or "
        "'gspo' instead (docs/compatibility.md)"
    ),
}
"""Loss names Tinker accepts whose definition is not public: refused by name, never guessed."""


def get_loss(name: str) -> LossSpec:
    if name in UNPUBLISHED:
        raise InvalidRequestError(f"loss_fn {name!r} is not supported: {UNPUBLISHED[name]}")
    if name not in LOSSES:
        raise InvalidRequestError(f"unknown loss_fn {name!r}; built-in losses are {sorted(LOSSES)}")
    return LOSSES[name]


def resolve_config(name: str, config: Mapping[str, float | str] | None) -> dict[str, float]:
    """The loss's defaults overridden by `config`; unknown keys and non-finite values fail."""
    spec = get_loss(name)
    resolved = dict(spec.config_defaults)
    for key, value in (config or {}).items():
        if key not in spec.config_defaults:
            known = sorted(spec.config_defaults) or "none"
            raise InvalidRequestError(
                f"loss_fn_config key {key!r} is not used by {name!r} (accepted: {known})"
            )
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"loss_fn_config[{key!r}] must be a number") from None
        if not torch.isfinite(torch.tensor(number)):
            raise InvalidRequestError(f"loss_fn_config[{key!r}] must be finite, got {value}")
        resolved[key] = number
    if "clip_low_threshold" in resolved and not (
        0 <= resolved["clip_low_threshold"] <= resolved["clip_high_threshold"]
    ):
        raise InvalidRequestError("need 0 <= clip_low_threshold <= clip_high_threshold")
    return resolved

"""A sample request, validated: what every sampler backend is handed."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from tinkerd.engine.lora import BASE_ADAPTER
from tinkerd.engine.models import BaseModel
from tinkerd.engine.vision import Image, expand
from tinkerd.errors import InvalidRequestError
from tinkerd.types import PromptWithImages, SamplingParams

__all__ = ["BASE_ADAPTER", "SampleSpec", "eos_token_ids", "make_spec"]

MAX_NUM_SAMPLES = 128
MAX_TOPK_LOGPROBS = 64


@dataclass(frozen=True)
class SampleSpec:
    """A validated sample request."""

    prompt: list[int]
    num_samples: int
    max_tokens: int
    temperature: float
    top_k: int  # 0: no limit
    top_p: float
    seed: int | None
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]
    prompt_logprobs: bool
    topk_prompt_logprobs: int
    topk_sample_logprobs: int
    adapter: str = BASE_ADAPTER
    tenant: Hashable = None
    """Whose request (an API key's fingerprint; None: local): the sampler admits
    waiting requests into its batch by turns of tenant."""
    listener: Callable[[int, int], None] | None = field(default=None, compare=False)
    """Called on the sampler's thread with (sample index, token) for every token as it
    is sampled (streaming). Must be quick and must not raise."""
    images: tuple[Image, ...] = ()
    """The prompt's images, in order; `prompt` holds the image token at their positions."""


def make_spec(
    base: BaseModel,
    prompt: list[int],
    num_samples: int,
    params: SamplingParams,
    *,
    adapter: str = BASE_ADAPTER,
    prompt_logprobs: bool = False,
    topk_prompt_logprobs: int = 0,
    topk_sample_logprobs: int = 0,
    tenant: Hashable = None,
    listener: Callable[[int, int], None] | None = None,
) -> SampleSpec:
    """Check a request completely; raises InvalidRequestError with what is wrong."""
    vocab, context = base.vocab_size, base.max_context_length
    images: list[Image] = []
    if isinstance(prompt, PromptWithImages):
        prompt, images = expand(prompt.model_input, base.vision, base.name, "prompt.")
    if not prompt:
        raise InvalidRequestError("prompt is empty: give at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside [0, {vocab})")
    if not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise InvalidRequestError(f"num_samples must be in [1, {MAX_NUM_SAMPLES}]: {num_samples}")
    room = context - len(prompt)
    if room < 1:
        raise InvalidRequestError(f"prompt of {len(prompt)} tokens fills the {context} context")
    max_tokens = room if params.max_tokens is None else params.max_tokens
    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be at least 1, got {max_tokens}")
    if max_tokens > room:
        raise InvalidRequestError(
            f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds the context of {context}"
        )
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise InvalidRequestError(f"temperature must be >= 0, got {params.temperature}")
    if not (0 < params.top_p <= 1):
        raise InvalidRequestError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < -1:
        raise InvalidRequestError(f"top_k must be -1 (no limit) or positive, got {params.top_k}")
    for name, k in [
        ("topk_prompt_logprobs", topk_prompt_logprobs),
        ("topk_sample_logprobs", topk_sample_logprobs),
    ]:
        if not 0 <= k <= MAX_TOPK_LOGPROBS:
            raise InvalidRequestError(f"{name} must be in [0, {MAX_TOPK_LOGPROBS}], got {k}")
    stop_tokens, stop_strings = _stops(base, params.stop, vocab)
    return SampleSpec(
        prompt=list(prompt),
        num_samples=num_samples,
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_k=params.top_k if params.top_k > 0 else 0,
        top_p=params.top_p,
        seed=params.seed,
        stop_tokens=stop_tokens,
        stop_strings=stop_strings,
        prompt_logprobs=prompt_logprobs or topk_prompt_logprobs > 0,
        topk_prompt_logprobs=topk_prompt_logprobs,
        topk_sample_logprobs=topk_sample_logprobs,
        adapter=adapter,
        tenant=tenant,
        listener=listener,
        images=tuple(images),
    )


def _stops(
    base: BaseModel, stop: str | list | None, vocab: int
) -> tuple[frozenset[int], tuple[str, ...]]:
    if stop is None:
        return frozenset(eos_token_ids(base)), ()
    if isinstance(stop, str):
        stop = [stop]
    if all(isinstance(s, str) for s in stop):
        if any(s == "" for s in stop):
            raise InvalidRequestError("stop strings must not be empty")
        return frozenset(), tuple(stop)
    bad = [t for t in stop if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"stop token ids {bad[:5]} are outside [0, {vocab})")
    return frozenset(stop), ()


def eos_token_ids(base: BaseModel) -> set[int]:
    ids = getattr(getattr(base.model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(base.tokenizer, "eos_token_id", None)
    if ids is None:
        return set()
    return {int(i) for i in (ids if isinstance(ids, list) else [ids])}

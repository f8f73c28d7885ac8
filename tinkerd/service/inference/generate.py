"""Sampling for the compatible APIs: a request's model opened, its prompts submitted into
the base model's shared sampler batch (one KV cache, the same logprobs as
`SamplingClient` requests on that base), and each sampled sequence cut into what the
APIs report.

Generation stops at the model's end-of-sequence tokens, and also at stop strings. The
sampler's own stop rule takes either token ids or strings, so with stop strings the EOS
tokens' texts are added as strings too, and the output is cut at the first EOS token
whichever rule fired. Returned text excludes the EOS token and the stop string (OpenAI's
and Anthropic's convention); `usage` counts every generated token.

The sampler returns a request's result when it is complete, so `stream=true` sends the
finished result as a correct event stream (one event per token), not token by token as
it is decoded.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from tinkerd.errors import InvalidRequestError
from tinkerd.service.inference.common import SamplingBackend, split_model
from tinkerd.types import SampleResponse, SamplingParams


@dataclass
class Stops:
    """Where generation ends: the model's EOS ids and the caller's stop strings."""

    eos: set[int]
    strings: list[str]

    def params(self, tokenizer: Any, **kw: Any) -> SamplingParams:
        """SamplingParams whose stop rule covers both (see the module docstring)."""
        if not self.strings:
            return SamplingParams(stop=None, **kw)
        eos_texts = [tokenizer.decode([i]) for i in sorted(self.eos)]
        return SamplingParams(stop=self.strings + [t for t in eos_texts if t], **kw)


def make_stops(eos: set[int], stop: str | list[str] | None) -> Stops:
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if any(s == "" for s in strings):
        raise InvalidRequestError("stop strings must not be empty")
    return Stops(set(eos), strings)


@dataclass
class Generation:
    """One sampled sequence as the compatible APIs report it."""

    tokens: list[int]
    """Generated tokens kept `[n]`: up to the EOS token or the one completing a stop."""
    text: str
    """Their text, without the EOS token or the stop string."""
    logprobs: list[float]
    """`[n]`: each kept token's logprob (temperature 1, before top-k/top-p)."""
    topk: list[Any] | None
    """`[n]` lists of (token, logprob) when top logprobs were asked for."""
    finish_reason: Literal["stop", "length"]
    stop_sequence: str | None = None
    offsets: list[int] = field(default_factory=list)
    """`[n]`: where each token's text starts in `text` (see `token_offsets`)."""


def token_offsets(tokenizer: Any, tokens: list[int], text_len: int) -> list[int]:
    """Start of each token's text in its decoded text `[len(tokens)]`: never decreasing,
    at most `text_len` (a stop string or EOS cut the text there), so consecutive offsets
    split the text into pieces that concatenate to it exactly. O(n^2) decoding: only
    computed when a request needs per-token text (logprobs, stream, stop strings)."""
    offsets, last = [], 0
    for i in range(len(tokens)):
        start = len(tokenizer.decode(tokens[:i], skip_special_tokens=True)) if i else 0
        last = min(max(start, last), text_len)
        offsets.append(last)
    return offsets


def generation(tokenizer: Any, seq: Any, stops: Stops, per_token: bool) -> Generation:
    """A `SampledSequence` cut at its first EOS token or stop string; `per_token` also
    computes each token's text offset."""
    tokens, reason, stop_sequence = list(seq.tokens), seq.stop_reason, None
    cut = next((i for i, t in enumerate(tokens) if t in stops.eos), None)
    if cut is not None:
        tokens, reason = tokens[: cut + 1], "stop"
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    found = [(text.find(s), s) for s in stops.strings if s in text]
    if found:
        at, stop_sequence = min(found)
        end = at + len(stop_sequence)
        # keep the tokens up to the one that completes the stop string
        keep = next(
            (
                i + 1
                for i in range(len(tokens))
                if len(tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)) >= end
            ),
            len(tokens),
        )
        tokens, text, reason = tokens[:keep], text[:at], "stop"
    n = len(tokens)
    return Generation(
        tokens=tokens,
        text=text,
        logprobs=list(seq.logprobs or [])[:n],
        topk=list(seq.topk_logprobs)[:n] if seq.topk_logprobs is not None else None,
        finish_reason="stop" if reason == "stop" else "length",
        stop_sequence=stop_sequence,
        offsets=token_offsets(tokenizer, tokens, len(text)) if per_token else [],
    )


def pieces(gen: Generation) -> list[str]:
    """Each kept token's share of `gen.text`; they concatenate to exactly `gen.text`."""
    ends = gen.offsets[1:] + [len(gen.text)]
    return [gen.text[a:b] for a, b in zip(gen.offsets, ends)]


@dataclass
class Sampled:
    """One prompt's result: its tokens, its generations and (when asked) its logprobs."""

    prompt: list[int]
    generations: list[Generation]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt: list[Any] | None = None


@dataclass
class Model:
    """A request's `model`, resolved: what to sample from and how to read its tokens."""

    backend: SamplingBackend
    weights: Any
    tokenizer: Any
    eos: set[int]


async def open_model(backend: SamplingBackend, owner: str, model: str) -> Model:
    """The request's model, looked up (and loaded if need be) off the event loop."""
    base, path = split_model(model)

    def load() -> Model:
        weights = backend.resolve(owner, base, path)
        return Model(
            backend, weights, backend.tokenizer(weights), set(backend.eos_token_ids(weights))
        )

    return await asyncio.to_thread(load)


@dataclass
class Job:
    """What to sample: prompts, `n` samples each, with one set of parameters."""

    prompts: list[list[int]]
    n: int
    stops: Stops
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int = -1
    seed: int | None = None
    prompt_logprobs: bool = False
    topk_prompt: int = 0
    topk_sample: int = 0
    per_token: bool = False


async def run(model: Model, job: Job) -> list[Sampled]:
    """Submit every prompt into the base model's shared batch, and wait for all."""
    params = job.stops.params(
        model.tokenizer,
        max_tokens=job.max_tokens,
        temperature=job.temperature,
        top_p=job.top_p,
        top_k=job.top_k,
        seed=job.seed,
    )

    def submit(prompt: list[int]) -> Future[SampleResponse]:
        return model.backend.sample(
            model.weights,
            prompt,
            job.n,
            params,
            job.prompt_logprobs,
            job.topk_prompt,
            job.topk_sample,
        )

    futures = [await asyncio.to_thread(submit, p) for p in job.prompts]
    responses = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    per_token = job.per_token or bool(job.stops.strings)

    def finish() -> list[Sampled]:
        return [
            Sampled(
                prompt=p,
                generations=[
                    generation(model.tokenizer, s, job.stops, per_token) for s in r.sequences
                ],
                prompt_logprobs=r.prompt_logprobs,
                topk_prompt=r.topk_prompt_logprobs,
            )
            for p, r in zip(job.prompts, responses)
        ]

    return await asyncio.to_thread(finish)  # decoding long outputs must not stall the loop

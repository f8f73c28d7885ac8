"""Sampling for the compatible APIs: a request's model opened, its prompts submitted into
the base model's shared sampler batch (one KV cache, the same logprobs as
`SamplingClient` requests on that base), and each sampled sequence cut into what the
APIs report.

Generation stops at the model's end-of-sequence tokens, and also at stop strings. The
sampler's own stop rule takes either token ids or strings, so with stop strings the EOS
tokens' texts are added as strings too, and the output is cut at the first EOS token
whichever rule fired. Returned text excludes the EOS token and the stop string (OpenAI's
and Anthropic's convention); `usage` counts every generated token.

`Stream` is `stream=true`: the sampler hands each token over as it samples it, and the
stream turns them into text deltas at once (`Detokenizer`: bytes that are not yet a
whole character, and text that may still turn out to start a stop string, wait for the
next token). Streams that report per-token logprobs or echo the prompt are sent when the
result is complete (`run`), one event per token.

Every job is admitted as a whole for its API key (`SamplingBackend.sample_many`), and a
job whose caller went away (its task cancelled: the client disconnected) cancels its
futures, which stops their decoding.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tinkerd.errors import InvalidRequestError
from tinkerd.service.inference.common import SamplingBackend, split_model
from tinkerd.types import SamplingParams


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
    owner: str | None = None
    """The API key's owner: whose queue quota and sampler turns the samples use."""


async def open_model(backend: SamplingBackend, owner: str, model: str) -> Model:
    """The request's model, looked up (and loaded if need be) off the event loop."""
    base, path = split_model(model)

    def load() -> Model:
        weights = backend.resolve(owner, base, path)
        eos = set(backend.eos_token_ids(weights))
        return Model(backend, weights, backend.tokenizer(weights), eos, owner)

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


async def submit(
    model: Model, job: Job, listeners: list[Callable[[int, int], None]] | None = None
) -> list[asyncio.Future]:
    """Every prompt of `job` admitted for the model's owner and queued in the base's
    shared batch (off the event loop: validation reads every token); 4xx/429 raise here,
    before anything is queued."""
    params = job.stops.params(
        model.tokenizer,
        max_tokens=job.max_tokens,
        temperature=job.temperature,
        top_p=job.top_p,
        top_k=job.top_k,
        seed=job.seed,
    )
    futures = await asyncio.to_thread(
        model.backend.sample_many,
        model.owner,
        model.weights,
        job.prompts,
        job.n,
        params,
        listeners,
        prompt_logprobs=job.prompt_logprobs,
        topk_prompt_logprobs=job.topk_prompt,
        topk_sample_logprobs=job.topk_sample,
    )
    return [asyncio.wrap_future(f) for f in futures]


def sampled(model: Model, job: Job, prompt: list[int], response: Any) -> Sampled:
    per_token = job.per_token or bool(job.stops.strings)
    return Sampled(
        prompt=prompt,
        generations=[
            generation(model.tokenizer, s, job.stops, per_token) for s in response.sequences
        ],
        prompt_logprobs=response.prompt_logprobs,
        topk_prompt=response.topk_prompt_logprobs,
    )


async def run(model: Model, job: Job) -> list[Sampled]:
    """Submit every prompt into the base model's shared batch, and wait for all. If the
    caller goes away (this task is cancelled), the samples are cancelled too."""
    futures = await submit(model, job)
    try:
        responses = await asyncio.gather(*futures)
    finally:
        for f in futures:
            f.cancel()  # a no-op for the finished; stops decoding the others

    def finish() -> list[Sampled]:
        return [sampled(model, job, p, r) for p, r in zip(job.prompts, responses)]

    return await asyncio.to_thread(finish)  # decoding long outputs must not stall the loop


# ---------------------------------------------------------------- streaming


class Detokenizer:
    """One sample's text, token by token: `add(token)` returns the text that may be sent
    now. It holds back bytes that are not a whole character yet, everything from an EOS
    token on, and the last `len(longest stop) - 1` characters (they may start a stop
    string); at a stop string it stops. Incremental (vLLM's prefix/read offsets): each
    token decodes a few tokens, not the whole sequence."""

    def __init__(self, tokenizer: Any, stops: Stops):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.prefix = self.read = 0  # token offsets: decoded context, decoded so far
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` sent
        self.ended = False  # EOS or a stop string seen: nothing more is sent
        self.hold = max((len(x) for x in stops.strings), default=1) - 1

    def add(self, token: int) -> str:
        if self.ended:
            return ""
        if token in self.stops.eos:
            self.ended = True
            return self._release(len(self.text))
        self.tokens.append(token)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.tokens[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.tokens)
        start = max(0, self.sent - self.hold)
        found = [at for at in (self.text.find(x, start) for x in self.stops.strings) if at >= 0]
        if found:
            self.ended = True
            return self._release(min(found))
        return self._release(len(self.text) - self.hold)

    def _release(self, end: int) -> str:
        piece = self.text[self.sent : max(end, self.sent)]
        self.sent += len(piece)
        return piece

    def rest(self, final: str) -> str:
        """What is left to send of the sample's final text (`Generation.text`)."""
        sent = self.text[: self.sent]
        return final[len(sent) :] if final.startswith(sent) else ""


@dataclass
class Delta:
    """New text of choice `choice` (`prompt * n + sample`)."""

    choice: int
    text: str


@dataclass
class Done:
    """Prompt `prompt` finished: its result, and each of its choices' unsent text."""

    prompt: int
    sampled: Sampled
    rest: list[str]


class Stream:
    """A job streamed as its tokens are sampled: `await Stream.open(...)` submits it
    (4xx/429 raise there, before any event), then `async for` yields `Delta`s as the
    sampler makes tokens and one `Done` per prompt when it finishes. Leaving the loop
    early (the client disconnected) cancels what is still decoding."""

    def __init__(self, model: Model, job: Job):
        self.model, self.job = model, job
        self.queue: asyncio.Queue = asyncio.Queue()
        self.texts = [
            Detokenizer(model.tokenizer, job.stops) for _ in range(len(job.prompts) * job.n)
        ]
        self.futures: list[asyncio.Future] = []

    @classmethod
    async def open(cls, model: Model, job: Job) -> Stream:
        stream = cls(model, job)
        loop, put = asyncio.get_running_loop(), stream.queue.put_nowait

        def listener(p: int) -> Callable[[int, int], None]:
            return lambda i, token: loop.call_soon_threadsafe(put, (p * job.n + i, token))

        listeners = [listener(p) for p in range(len(job.prompts))]
        stream.futures = await submit(model, job, listeners)
        for p, future in enumerate(stream.futures):
            future.add_done_callback(lambda f, p=p: put((None, p)))
        return stream

    async def __aiter__(self) -> AsyncIterator[Delta | Done]:
        left = len(self.futures)
        try:
            while left:
                choice, value = await self.queue.get()
                if choice is not None:
                    text = self.texts[choice].add(value)
                    if text:
                        yield Delta(choice, text)
                    continue
                left -= 1
                response = self.futures[value].result()  # a failure ends the stream
                done = sampled(self.model, self.job, self.job.prompts[value], response)
                n = self.job.n
                texts = self.texts[value * n : (value + 1) * n]
                yield Done(value, done, [t.rest(g.text) for t, g in zip(texts, done.generations)])
        finally:
            for f in self.futures:
                f.cancel()

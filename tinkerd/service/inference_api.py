"""OpenAI- and Anthropic-compatible inference, mapped onto tinkerd's sampler.

The one place that turns a Completions, Chat Completions or Messages request into
sampling requests (prompt tokens + `SamplingParams`) and a `SampleResponse` back into
that API's response or server-sent events. The routes (server/routes/openai.py,
anthropic.py) only authenticate, decode and encode; everything they need from the server
goes through `SamplingBackend`, so these requests join the same sampler batches (one KV
cache, the same logprobs) as `SamplingClient` requests on that base model.

Semantics shared by both APIs:
- `model` is a served base model name, a `tinker://.../sampler_weights/...` path the key
  may read, or `<base model>;<path>` (the base must be the one the path was trained on).
- Generation stops at the model's end-of-sequence tokens, and also at stop strings. The
  sampler's own stop rule takes either token ids or strings, so with stop strings the
  EOS tokens' texts are added as strings too, and the output is cut at the first EOS
  token whichever rule fired. Returned text excludes the EOS token and the stop string
  (OpenAI's and Anthropic's convention); `usage` counts every generated token.
- Logprobs are the sampler's: the log-probability of each token under the model at
  temperature 1, before top-k/top-p, i.e. what `compute_logprobs` and a training forward
  compute.
- The sampler returns a request's result when it is complete, so `stream=true` sends the
  finished result as a correct event stream (one event per token), not token by token
  as it is decoded.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tinkerd.errors import InvalidRequestError
from tinkerd.types import SampleResponse, SamplingParams, Seed

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs (and legacy logprobs)


class SamplingBackend(Protocol):
    """What the compatible APIs need from the service, per API key owner."""

    def authenticate(self, api_key: str) -> str:
        """The owner behind `api_key` (AuthenticationError, 401, if unknown)."""
        ...

    def resolve(self, owner: str, base_model: str | None, model_path: str | None) -> Any:
        """Weights to sample from: a served base model (InvalidRequestError, 400, if not
        served) or a sampler checkpoint `owner` may read (NotFoundError, 404, if not)."""
        ...

    def tokenizer(self, weights: Any) -> Any:
        """The Hugging Face tokenizer of the weights' base model."""
        ...

    def eos_token_ids(self, weights: Any) -> set[int]:
        """The token ids that end a generation on the weights' base model (the sampler's
        default stop rule)."""
        ...

    def sample(
        self,
        weights: Any,
        prompt: list[int],
        num_samples: int,
        params: SamplingParams,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        topk_sample_logprobs: int,
    ) -> Future[SampleResponse]:
        """Validate now (InvalidRequestError), then decode in the base's shared batch."""
        ...

    def models(self, owner: str) -> list[str]:
        """Model names `owner` may use: served base models, then its sampler checkpoints."""
        ...


# ---------------------------------------------------------------- request models


class Body(BaseModel):
    """Unknown fields (newer clients, options tinkerd has no use for) are ignored."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(Body):
    include_usage: bool = False


class CompletionRequest(Body):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = -1
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None


class ContentPart(Body):
    type: str
    text: str = ""


class ChatMessage(Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(Body):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = -1
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Any] | None = None


class AnthropicMessage(Body):
    role: Literal["user", "assistant"]
    content: str | list[ContentPart]


class MessagesRequest(Body):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[ContentPart] | None = None
    temperature: float = Field(default=1.0, ge=0, le=1)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = -1
    stop_sequences: list[str] | None = None
    stream: bool = False
    tools: list[Any] | None = None


class CountTokensRequest(Body):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[ContentPart] | None = None


def parse(model: type[Body], body: Any) -> Any:
    """`body` validated as `model`; a bad body is a 400 naming the fields."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise InvalidRequestError("; ".join(lines)) from None


# ---------------------------------------------------------------- models and prompts


def split_model(model: str) -> tuple[str | None, str | None]:
    """`model` as (base_model, model_path): a base name, a tinker:// path, or both as
    `<base>;<path>`."""
    base, _, path = model.partition(";")
    if path:
        return base.strip(), path.strip()
    if model.startswith("tinker://"):
        return None, model
    return model, None


def text_of(content: str | list[ContentPart] | None) -> str:
    """A message's text: a string, or its text parts joined (other parts refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    bad = [p.type for p in content if p.type != "text"]
    if bad:
        raise InvalidRequestError(f"only text content is supported, got {bad[0]!r} parts")
    return "".join(p.text for p in content)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Prompt tokens of `messages` in the model's own chat template, opening the
    assistant's turn; a final assistant message is continued (a prefill)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "this model has no chat template: use /completions with a prompt instead"
        )
    prefill = messages[-1]["role"] == "assistant"
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not prefill,
            continue_final_message=prefill,
        )
    except Exception as e:  # the template itself refuses (roles out of order, ...)
        raise InvalidRequestError(f"the chat template refused these messages: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)


def refuse_tools(tools: list[Any] | None) -> None:
    if tools:
        raise InvalidRequestError("tools are not supported by tinkerd's compatible APIs")


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    refuse_tools(req.tools)
    return [{"role": m.role, "content": text_of(m.content)} for m in req.messages]


def anthropic_messages(req: MessagesRequest | CountTokensRequest) -> list[dict[str, str]]:
    refuse_tools(getattr(req, "tools", None))
    system = text_of(req.system)
    first = [{"role": "system", "content": system}] if system else []
    return first + [{"role": m.role, "content": text_of(m.content)} for m in req.messages]


def completion_prompts(tokenizer: Any, prompt: Any) -> list[list[int]]:
    """The prompts of a Completions request as token lists: a string or token list is
    one prompt, a list of them several."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    if not prompts or any(not p for p in prompts):
        raise InvalidRequestError("prompt is empty")
    return prompts


# ---------------------------------------------------------------- sampling and stops


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


# ---------------------------------------------------------------- logprob formats


def token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-character map, inverted (byte-level BPE vocabularies use it)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer: Any, token: int) -> list[int]:
    """The token's own UTF-8 bytes: exact for byte-level BPE tokenizers (whose tokens may
    hold part of a character), else the bytes of its decoded text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel":
        piece = tokenizer.convert_ids_to_tokens(token)
        decoder = _byte_decoder()
        special = token in tokenizer.all_special_ids
        if piece is not None and not special and all(c in decoder for c in piece):
            return [decoder[c] for c in piece]
    return list(token_text(tokenizer, token).encode())


def chat_logprobs(tokenizer: Any, gen: Generation) -> dict:
    """OpenAI Chat's `choice.logprobs`: one entry per generated token."""

    def entry(token: int, logprob: float) -> dict:
        return {
            "token": token_text(tokenizer, token),
            "logprob": logprob,
            "bytes": token_bytes(tokenizer, token),
        }

    content = []
    for i, (token, logprob) in enumerate(zip(gen.tokens, gen.logprobs)):
        top = gen.topk[i] if gen.topk and gen.topk[i] else []
        content.append({**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]})
    return {"content": content, "refusal": None}


def completion_logprobs(
    tokenizer: Any,
    tokens: list[int],
    logprobs: list[float | None],
    topk: list | None,
    offsets: list[int],
) -> dict:
    """Legacy Completions `choice.logprobs`: tokens, token_logprobs, top_logprobs (a
    {token text: logprob} dict per position, None where there is none), text_offset.
    Tokens with the same text share a key, which keeps the larger logprob: harnesses
    read `max(top.values())` to tell whether a token was the greedy one."""
    top: list[dict[str, float] | None] = []
    for i in range(len(tokens)):
        entries = topk[i] if topk and i < len(topk) and topk[i] else None
        if entries is None:
            top.append(None)
            continue
        merged: dict[str, float] = {}
        for t, lp in entries:
            key = token_text(tokenizer, t)
            merged[key] = max(lp, merged.get(key, -math.inf))
        top.append(merged)
    return {
        "tokens": [token_text(tokenizer, t) for t in tokens],
        "token_logprobs": list(logprobs),
        "top_logprobs": top,
        "text_offset": offsets,
    }


# ---------------------------------------------------------------- OpenAI Completions


def _id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _usage(results: list[Sampled], completion: bool = True) -> dict:
    prompt = sum(len(r.prompt) for r in results)
    generated = sum(len(g.tokens) for r in results for g in r.generations) if completion else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
    }


@dataclass
class Reply:
    """A response body, and (stream=true) its server-sent events instead."""

    body: dict
    events: Iterator[str] | None = None


async def completion(backend: SamplingBackend, owner: str, req: CompletionRequest) -> Reply:
    model = await open_model(backend, owner, req.model)
    # max_tokens=0 with echo scores the prompt only (an evaluation harness's
    # loglikelihood): one token is sampled and dropped.
    score_only = req.max_tokens == 0
    if score_only and not req.echo:
        raise InvalidRequestError("max_tokens=0 needs echo=true (it scores the prompt only)")
    k = req.logprobs or 0
    job = Job(
        prompts=completion_prompts(model.tokenizer, req.prompt),
        n=req.n,
        stops=make_stops(model.eos, req.stop),
        max_tokens=1 if score_only else req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        prompt_logprobs=req.echo and req.logprobs is not None,
        topk_prompt=k if req.echo else 0,
        topk_sample=k,
        per_token=req.logprobs is not None or req.stream,
    )
    results = await run(model, job)
    choices, gens = [], []
    for p, result in enumerate(results):
        for j, gen in enumerate(result.generations):
            if score_only:
                gen = Generation([], "", [], [] if gen.topk is not None else None, "length")
            choices.append(_completion_choice(model.tokenizer, req, p * req.n + j, gen, result))
            gens.append(gen)
    body = {
        "id": _id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": _usage(results, completion=not score_only),
    }
    return Reply(body, _completion_events(req, body, gens) if req.stream else None)


def _completion_choice(
    tokenizer: Any, req: CompletionRequest, index: int, gen: Generation, result: Sampled
) -> dict:
    # special tokens (a BOS the tokenizer added) are left out of the echo, as of the
    # completion, so `text_offset` indexes the text the caller sent
    prompt_text = tokenizer.decode(result.prompt, skip_special_tokens=True) if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        shift = len(prompt_text)
        offsets = [shift + o for o in gen.offsets]
        logprobs = completion_logprobs(tokenizer, gen.tokens, gen.logprobs, gen.topk, offsets)
        if req.echo:
            prompt_lps = result.prompt_logprobs or [None] * len(result.prompt)
            head = completion_logprobs(
                tokenizer,
                result.prompt,
                prompt_lps,
                result.topk_prompt,
                token_offsets(tokenizer, result.prompt, shift),
            )
            logprobs = {key: head[key] + logprobs[key] for key in logprobs}
    return {
        "index": index,
        "text": prompt_text + gen.text,
        "logprobs": logprobs,
        "finish_reason": gen.finish_reason,
    }


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event: `data` as JSON (or as is, for OpenAI's `[DONE]`)."""
    head = f"event: {event}\n" if event else ""
    return head + f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _completion_events(req: CompletionRequest, body: dict, gens: list[Generation]) -> Iterator[str]:
    """Completions as SSE: per choice, the echoed prompt (if any), one event per token,
    then its finish_reason; usage last when asked; then [DONE]."""
    head = {k: body[k] for k in ("id", "object", "created", "model")}

    def event(choice: dict, text: str, logprobs: dict | None, finish: str | None) -> str:
        part = {"index": choice["index"], "text": text, "logprobs": logprobs}
        return sse({**head, "choices": [{**part, "finish_reason": finish}]})

    def cut(lp: dict | None, a: int, b: int) -> dict | None:
        return None if lp is None else {key: value[a:b] for key, value in lp.items()}

    for choice, gen in zip(body["choices"], gens):
        lp = choice["logprobs"]
        echoed = len(choice["text"]) - len(gen.text)
        n_prompt = len(lp["tokens"]) - len(gen.tokens) if lp is not None else 0
        if echoed or n_prompt:
            yield event(choice, choice["text"][:echoed], cut(lp, 0, n_prompt), None)
        for i, text in enumerate(pieces(gen)):
            yield event(choice, text, cut(lp, n_prompt + i, n_prompt + i + 1), None)
        yield event(choice, "", None, choice["finish_reason"])
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": body["usage"]})
    yield sse("[DONE]")


# ---------------------------------------------------------------- OpenAI Chat Completions


async def chat_completion(
    backend: SamplingBackend, owner: str, req: ChatCompletionRequest
) -> Reply:
    model = await open_model(backend, owner, req.model)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs=true")
    job = Job(
        prompts=[render_chat(model.tokenizer, chat_messages(req))],
        n=req.n,
        stops=make_stops(model.eos, req.stop),
        max_tokens=req.max_completion_tokens or req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        topk_sample=(req.top_logprobs or 0) if req.logprobs else 0,
        per_token=req.stream,
    )
    (result,) = await run(model, job)
    choices = [
        {
            "index": j,
            "message": {"role": "assistant", "content": gen.text},
            "logprobs": chat_logprobs(model.tokenizer, gen) if req.logprobs else None,
            "finish_reason": gen.finish_reason,
        }
        for j, gen in enumerate(result.generations)
    ]
    body = {
        "id": _id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": _usage([result]),
    }
    return Reply(body, _chat_events(req, body, result.generations) if req.stream else None)


def _chat_events(req: ChatCompletionRequest, body: dict, gens: list[Generation]) -> Iterator[str]:
    """Chat Completions as SSE: per choice, the role, one delta per token (with its
    logprobs), the finish_reason; usage last when asked; then [DONE]."""
    head = {k: body[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict, logprobs: Any, finish: str | None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**head, "choices": [choice]})

    for choice, gen in zip(body["choices"], gens):
        index, lp = choice["index"], choice["logprobs"]
        yield chunk(index, {"role": "assistant", "content": ""}, None, None)
        for i, text in enumerate(pieces(gen)):
            part = {"content": lp["content"][i : i + 1], "refusal": None} if lp else None
            yield chunk(index, {"content": text}, part, None)
        yield chunk(index, {}, None, choice["finish_reason"])
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": body["usage"]})
    yield sse("[DONE]")


async def openai_models(backend: SamplingBackend, owner: str) -> dict:
    names = await asyncio.to_thread(backend.models, owner)
    created = int(time.time())
    data = [{"id": m, "object": "model", "created": created, "owned_by": "tinkerd"} for m in names]
    return {"object": "list", "data": data}


# ---------------------------------------------------------------- Anthropic Messages


async def messages(backend: SamplingBackend, owner: str, req: MessagesRequest) -> Reply:
    model = await open_model(backend, owner, req.model)
    job = Job(
        prompts=[render_chat(model.tokenizer, anthropic_messages(req))],
        n=1,
        stops=make_stops(model.eos, req.stop_sequences),
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        per_token=req.stream,
    )
    (result,) = await run(model, job)
    gen = result.generations[0]
    if gen.finish_reason == "length":
        stop_reason = "max_tokens"
    else:
        stop_reason = "end_turn" if gen.stop_sequence is None else "stop_sequence"
    body = {
        "id": _id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [{"type": "text", "text": gen.text}],
        "stop_reason": stop_reason,
        "stop_sequence": gen.stop_sequence,
        "usage": {"input_tokens": len(result.prompt), "output_tokens": len(gen.tokens)},
    }
    return Reply(body, _message_events(body, gen) if req.stream else None)


def _message_events(message: dict, gen: Generation) -> Iterator[str]:
    """The Messages event stream: message_start, one text block (start, a delta per
    token, stop), message_delta with the stop reason and usage, message_stop."""
    usage = message["usage"]
    start = message | {
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0},
    }
    yield sse({"type": "message_start", "message": start}, "message_start")
    block = {"type": "text", "text": ""}
    yield sse(
        {"type": "content_block_start", "index": 0, "content_block": block}, "content_block_start"
    )
    yield sse({"type": "ping"}, "ping")
    for text in pieces(gen):
        delta = {"type": "text_delta", "text": text}
        yield sse(
            {"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"
        )
    yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    stop = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
    end = {
        "type": "message_delta",
        "delta": stop,
        "usage": {"output_tokens": usage["output_tokens"]},
    }
    yield sse(end, "message_delta")
    yield sse({"type": "message_stop"}, "message_stop")


async def count_tokens(backend: SamplingBackend, owner: str, req: CountTokensRequest) -> dict:
    model = await open_model(backend, owner, req.model)
    return {"input_tokens": len(render_chat(model.tokenizer, anthropic_messages(req)))}


async def anthropic_models(backend: SamplingBackend, owner: str) -> dict:
    names = await asyncio.to_thread(backend.models, owner)
    data = [
        {"type": "model", "id": m, "display_name": m, "created_at": "1970-01-01T00:00:00Z"}
        for m in names
    ]
    first, last = (names[0], names[-1]) if names else (None, None)
    return {"data": data, "has_more": False, "first_id": first, "last_id": last}

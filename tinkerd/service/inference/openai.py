"""OpenAI's Completions and Chat Completions (and its model list) on tinkerd's sampler:
request models, response bodies and server-sent events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from pydantic import Field

from tinkerd.errors import InvalidRequestError
from tinkerd.service.inference.common import (
    Body,
    ContentPart,
    Reply,
    SamplingBackend,
    new_id,
    refuse_tools,
    render_chat,
    sse,
    text_of,
)
from tinkerd.service.inference.generate import (
    Delta,
    Generation,
    Job,
    Sampled,
    Stream,
    make_stops,
    open_model,
    pieces,
    run,
    token_offsets,
)
from tinkerd.service.inference.images import content_parts
from tinkerd.service.inference.logprobs import chat_logprobs, completion_logprobs
from tinkerd.types import Seed

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs (and legacy logprobs)


# ---------------------------------------------------------------- request models


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


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    refuse_tools(req.tools)
    # OpenAI's "developer" role is its newer name for "system" (chat templates know "system")
    roles = {"developer": "system"}
    return [
        {
            "role": roles.get(m.role, m.role),
            "content": content_parts(m.content, text_of, f"messages[{i}]"),
        }
        for i, m in enumerate(req.messages)
    ]


def completion_prompts(tokenizer: Any, prompt: Any) -> list[list[int]]:
    """The prompts of a Completions request as token lists: a string or token list is
    one prompt, a list of them several."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    if not prompts or any(not p for p in prompts):
        raise InvalidRequestError("prompt is empty")
    return prompts


# ---------------------------------------------------------------- Completions


def _usage(results: list[Sampled], completion: bool = True) -> dict:
    prompt = sum(len(r.prompt) for r in results)
    generated = sum(len(g.tokens) for r in results for g in r.generations) if completion else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
    }


async def completion(backend: SamplingBackend, owner: str, req: CompletionRequest) -> Reply:
    model = await open_model(backend, owner, req.model)
    # max_tokens=0 with echo scores the prompt only (an evaluation harness's
    # loglikelihood): one token is sampled and dropped.
    score_only = req.max_tokens == 0
    if score_only and not req.echo:
        raise InvalidRequestError("max_tokens=0 needs echo=true (it scores the prompt only)")
    k = req.logprobs or 0
    prompts = await asyncio.to_thread(completion_prompts, model.tokenizer, req.prompt)
    job = Job(
        prompts=prompts,
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
    if req.stream and req.logprobs is None and not req.echo:
        job.per_token = False
        return Reply(None, _completion_live(req, await Stream.open(model, job)))
    results = await run(model, job)
    # echoed prompts' texts and logprobs decode long token lists: off the event loop
    return await asyncio.to_thread(_completion_reply, model.tokenizer, req, results)


def _completion_reply(tokenizer: Any, req: CompletionRequest, results: list[Sampled]) -> Reply:
    score_only = req.max_tokens == 0
    choices, gens = [], []
    for p, result in enumerate(results):
        for j, gen in enumerate(result.generations):
            if score_only:
                gen = Generation([], "", [], [] if gen.topk is not None else None, "length")
            choices.append(_completion_choice(tokenizer, req, p * req.n + j, gen, result))
            gens.append(gen)
    body = {
        "id": new_id("cmpl-"),
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


def _head(req: CompletionRequest | ChatCompletionRequest, prefix: str, kind: str) -> dict:
    """The fields every chunk of one stream repeats."""
    return {"id": new_id(prefix), "object": kind, "created": int(time.time()), "model": req.model}


def _text_chunk(head: dict, index: int, text: str, logprobs: dict | None, finish: str | None):
    part = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return sse({**head, "choices": [part]})


async def _completion_live(req: CompletionRequest, stream: Stream) -> AsyncIterator[str]:
    """Completions streamed as sampled: a chunk per piece of text, each choice's
    finish_reason when its prompt is done; usage last when asked; then [DONE]."""
    head, results = _head(req, "cmpl-", "text_completion"), []
    async for item in stream:
        if isinstance(item, Delta):
            yield _text_chunk(head, item.choice, item.text, None, None)
            continue
        results.append(item.sampled)
        for j, (gen, rest) in enumerate(zip(item.sampled.generations, item.rest)):
            index = item.prompt * req.n + j
            if rest:
                yield _text_chunk(head, index, rest, None, None)
            yield _text_chunk(head, index, "", None, gen.finish_reason)
    for chunk in _stream_end(req, head, {"usage": _usage(results)}):
        yield chunk


def _completion_events(req: CompletionRequest, body: dict, gens: list[Generation]) -> Iterator[str]:
    """Completions as SSE: per choice, the echoed prompt (if any), one event per token,
    then its finish_reason; usage last when asked; then [DONE]."""
    head = {k: body[k] for k in ("id", "object", "created", "model")}

    def event(choice: dict, text: str, logprobs: dict | None, finish: str | None) -> str:
        return _text_chunk(head, choice["index"], text, logprobs, finish)

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
    yield from _stream_end(req, head, body)


# ---------------------------------------------------------------- Chat Completions


async def chat_completion(
    backend: SamplingBackend, owner: str, req: ChatCompletionRequest
) -> Reply:
    model = await open_model(backend, owner, req.model)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs=true")
    prompt = await asyncio.to_thread(render_chat, model.tokenizer, chat_messages(req))
    job = Job(
        prompts=[prompt],
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
    if req.stream and not req.logprobs:
        job.per_token = False
        return Reply(None, _chat_live(req, await Stream.open(model, job)))
    (result,) = await run(model, job)
    return await asyncio.to_thread(_chat_reply, model.tokenizer, req, result)


def _chat_reply(tokenizer: Any, req: ChatCompletionRequest, result: Sampled) -> Reply:
    choices = [
        {
            "index": j,
            "message": {"role": "assistant", "content": gen.text},
            "logprobs": chat_logprobs(tokenizer, gen) if req.logprobs else None,
            "finish_reason": gen.finish_reason,
        }
        for j, gen in enumerate(result.generations)
    ]
    body = {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": _usage([result]),
    }
    return Reply(body, _chat_events(req, body, result.generations) if req.stream else None)


def _chat_chunk(head: dict, index: int, delta: dict, logprobs: Any, finish: str | None) -> str:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return sse({**head, "choices": [choice]})


async def _chat_live(req: ChatCompletionRequest, stream: Stream) -> AsyncIterator[str]:
    """Chat Completions streamed as sampled: each choice's role, then a delta per piece
    of text, each choice's finish_reason when done; usage last when asked; [DONE]."""
    head, results = _head(req, "chatcmpl-", "chat.completion.chunk"), []
    for j in range(req.n):
        yield _chat_chunk(head, j, {"role": "assistant", "content": ""}, None, None)
    async for item in stream:
        if isinstance(item, Delta):
            yield _chat_chunk(head, item.choice, {"content": item.text}, None, None)
            continue
        results.append(item.sampled)
        for j, (gen, rest) in enumerate(zip(item.sampled.generations, item.rest)):
            if rest:
                yield _chat_chunk(head, j, {"content": rest}, None, None)
            yield _chat_chunk(head, j, {}, None, gen.finish_reason)
    for chunk in _stream_end(req, head, {"usage": _usage(results)}):
        yield chunk


def _chat_events(req: ChatCompletionRequest, body: dict, gens: list[Generation]) -> Iterator[str]:
    """Chat Completions as SSE: per choice, the role, one delta per token (with its
    logprobs), the finish_reason; usage last when asked; then [DONE]."""
    head = {k: body[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict, logprobs: Any, finish: str | None) -> str:
        return _chat_chunk(head, index, delta, logprobs, finish)

    for choice, gen in zip(body["choices"], gens):
        index, lp = choice["index"], choice["logprobs"]
        yield chunk(index, {"role": "assistant", "content": ""}, None, None)
        for i, text in enumerate(pieces(gen)):
            part = {"content": lp["content"][i : i + 1], "refusal": None} if lp else None
            yield chunk(index, {"content": text}, part, None)
        yield chunk(index, {}, None, choice["finish_reason"])
    yield from _stream_end(req, head, body)


def _stream_end(
    req: CompletionRequest | ChatCompletionRequest, head: dict, body: dict
) -> Iterator[str]:
    """How both OpenAI streams end: a usage chunk when asked, then [DONE]."""
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": body["usage"]})
    yield sse("[DONE]")


async def openai_models(backend: SamplingBackend, owner: str) -> dict:
    names = await asyncio.to_thread(backend.models, owner)
    created = int(time.time())
    data = [{"id": m, "object": "model", "created": created, "owned_by": "tinkerd"} for m in names]
    return {"object": "list", "data": data}

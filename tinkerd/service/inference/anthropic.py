"""Anthropic's Messages (with count_tokens, and its model list) on tinkerd's sampler:
request models, response bodies and server-sent events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field

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
    Stream,
    make_stops,
    open_model,
    run,
)
from tinkerd.service.inference.images import content_parts

# ---------------------------------------------------------------- request models


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


def anthropic_messages(req: MessagesRequest | CountTokensRequest) -> list[dict[str, str]]:
    refuse_tools(getattr(req, "tools", None))
    system = text_of(req.system)
    first = [{"role": "system", "content": system}] if system else []
    return first + [
        {"role": m.role, "content": content_parts(m.content, text_of, f"messages[{i}]")}
        for i, m in enumerate(req.messages)
    ]


# ---------------------------------------------------------------- Messages


async def messages(backend: SamplingBackend, owner: str, req: MessagesRequest) -> Reply:
    model = await open_model(backend, owner, req.model)
    prompt = await asyncio.to_thread(render_chat, model.tokenizer, anthropic_messages(req))
    job = Job(
        prompts=[prompt],
        n=1,
        stops=make_stops(model.eos, req.stop_sequences),
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        per_token=req.stream,
    )
    if req.stream:
        return Reply(None, _message_live(req, prompt, await Stream.open(model, job)))
    (result,) = await run(model, job)
    body = _message(req, len(prompt), result.generations[0])
    return Reply(body)


def _message(req: MessagesRequest, input_tokens: int, gen: Generation | None) -> dict:
    """The Messages response body (`gen` None: as it starts, empty)."""
    stop_reason = None
    if gen is not None and gen.finish_reason == "length":
        stop_reason = "max_tokens"
    elif gen is not None:
        stop_reason = "end_turn" if gen.stop_sequence is None else "stop_sequence"
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [{"type": "text", "text": gen.text}] if gen is not None else [],
        "stop_reason": stop_reason,
        "stop_sequence": gen.stop_sequence if gen is not None else None,
        "usage": {"input_tokens": input_tokens, "output_tokens": len(gen.tokens) if gen else 0},
    }


def _event(data: dict) -> str:
    """An event named after its payload's `type`."""
    return sse(data, data["type"])


def _text_delta(text: str) -> str:
    return _event(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    )


async def _message_live(
    req: MessagesRequest, prompt: list[int], stream: Stream
) -> AsyncIterator[str]:
    """The Messages event stream, text deltas as the sampler makes the tokens:
    message_start, one text block (start, deltas, stop), message_delta with the stop
    reason and usage, message_stop."""
    yield _event({"type": "message_start", "message": _message(req, len(prompt), None)})
    block = {"type": "text", "text": ""}
    yield _event({"type": "content_block_start", "index": 0, "content_block": block})
    yield _event({"type": "ping"})
    async for item in stream:
        if isinstance(item, Delta):
            yield _text_delta(item.text)
            continue
        if item.rest[0]:
            yield _text_delta(item.rest[0])
        final = _message(req, len(prompt), item.sampled.generations[0])
    yield _event({"type": "content_block_stop", "index": 0})
    stop = {"stop_reason": final["stop_reason"], "stop_sequence": final["stop_sequence"]}
    usage = {"output_tokens": final["usage"]["output_tokens"]}
    yield _event({"type": "message_delta", "delta": stop, "usage": usage})
    yield _event({"type": "message_stop"})


async def count_tokens(backend: SamplingBackend, owner: str, req: CountTokensRequest) -> dict:
    model = await open_model(backend, owner, req.model)
    prompt = await asyncio.to_thread(render_chat, model.tokenizer, anthropic_messages(req))
    return {"input_tokens": len(prompt)}


async def anthropic_models(backend: SamplingBackend, owner: str) -> dict:
    names = await asyncio.to_thread(backend.models, owner)
    data = [
        {"type": "model", "id": m, "display_name": m, "created_at": "1970-01-01T00:00:00Z"}
        for m in names
    ]
    first, last = (names[0], names[-1]) if names else (None, None)
    return {"data": data, "has_more": False, "first_id": first, "last_id": last}

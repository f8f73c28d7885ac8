"""Anthropic's Messages (with count_tokens, and its model list) on tinkerd's sampler:
request models, response bodies and server-sent events."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
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
from tinkerd.service.inference.generate import Generation, Job, make_stops, open_model, pieces, run
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
        "id": new_id("msg_"),
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
    token, stop), message_delta with the stop reason and usage, message_stop. Each
    event is named after its payload's `type`."""

    def event(data: dict) -> str:
        return sse(data, data["type"])

    usage = message["usage"]
    start = message | {
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0},
    }
    yield event({"type": "message_start", "message": start})
    block = {"type": "text", "text": ""}
    yield event({"type": "content_block_start", "index": 0, "content_block": block})
    yield event({"type": "ping"})
    for text in pieces(gen):
        delta = {"type": "text_delta", "text": text}
        yield event({"type": "content_block_delta", "index": 0, "delta": delta})
    yield event({"type": "content_block_stop", "index": 0})
    stop = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
    end = {
        "type": "message_delta",
        "delta": stop,
        "usage": {"output_tokens": usage["output_tokens"]},
    }
    yield event(end)
    yield event({"type": "message_stop"})


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

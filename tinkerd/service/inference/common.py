"""What both compatible APIs share before and after sampling: the `SamplingBackend`
protocol (all they need from the server), the request-body base and its 400s, the
`model` field, chat prompts rendered in the model's own template, and replies.

`model` is a served base model name, a `tinker://.../sampler_weights/...` path the key
may read, or `<base model>;<path>` (the base must be the one the path was trained on).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from tinkerd.errors import InvalidRequestError
from tinkerd.service.inference.images import images_of, with_images
from tinkerd.types import SampleResponse, SamplingParams


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

    def sample_many(
        self,
        owner: str | None,
        weights: Any,
        prompts: list[list[int]],
        num_samples: int,
        params: SamplingParams,
        listeners: list[Callable[[int, int], None]] | None = None,
        **options: Any,
    ) -> list[Future[SampleResponse]]:
        """Validate every prompt now (InvalidRequestError), admit them all for `owner` or
        none (QueueFullError, 429), then decode in the base's shared batch, taking turns
        as `owner`'s. `listeners[i]((sample, token))` hears prompt i's tokens as sampled;
        `options`: prompt_logprobs, topk_prompt_logprobs, topk_sample_logprobs."""
        ...

    def models(self, owner: str) -> list[str]:
        """Model names `owner` may use: served base models, then its sampler checkpoints."""
        ...


# ---------------------------------------------------------------- request bodies


class Body(BaseModel):
    """Unknown fields (newer clients, options tinkerd has no use for) are ignored."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ContentPart(Body):
    type: str
    text: str = ""
    image_url: Any = None
    """OpenAI's image part: {"url": "data:image/png;base64,..."} (`inference.images`)."""
    source: Any = None
    """Anthropic's image block: {"type": "base64", "media_type": ..., "data": ...}."""


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


def render_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Prompt tokens of `messages` in the model's own chat template, opening the
    assistant's turn; a final assistant message is continued (a prefill). With images
    (content as parts, `inference.images`), a PromptWithImages."""
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
    images = images_of(messages)
    if images:
        return with_images(tokenizer, text, images)
    return tokenizer.encode(text, add_special_tokens=False)


def refuse_tools(tools: list[Any] | None) -> None:
    if tools:
        raise InvalidRequestError("tools are not supported by tinkerd's compatible APIs")


# ---------------------------------------------------------------- replies


@dataclass
class Reply:
    """A response body, and (stream=true) its server-sent events instead."""

    body: dict | None
    events: Iterator[str] | AsyncIterator[str] | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event: `data` as JSON (or as is, for OpenAI's `[DONE]`)."""
    head = f"event: {event}\n" if event else ""
    return head + f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

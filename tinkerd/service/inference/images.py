"""Images in the compatible APIs: OpenAI `image_url` parts with a `data:` URL and
Anthropic `image` blocks with a base64 source, mapped to the ImageChunks a
vision-language model reads (never a network fetch: other URLs are refused).

A message with images keeps its content as a list of parts, `{"type": "text", ...}` and
`{"type": "image", "image": ImageChunk}`, for the model's chat template, which writes
its image placeholder (`<|image_pad|>` for Qwen-VL) once per image; the rendered text is
cut there and each image's chunk put in its place (the sampler expands it to the image's
token count).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from tinkerd.errors import InvalidRequestError
from tinkerd.types import EncodedTextChunk, ImageChunk, ModelInput, PromptWithImages

_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg"}


def content_parts(content: Any, text_of: Any, where: str) -> str | list[dict]:
    """A message's content for the chat template: its text when it has no image, else
    its parts in order (text, and images as ImageChunks). `where` names the message."""
    if content is None or isinstance(content, str) or all(p.type == "text" for p in content):
        return text_of(content)
    parts: list[dict] = []
    for i, part in enumerate(content):
        if part.type == "text":
            parts.append({"type": "text", "text": part.text})
        elif part.type in ("image_url", "image"):
            parts.append({"type": "image", "image": _image(part, f"{where}.content[{i}]")})
        else:
            raise InvalidRequestError(
                f"{where}.content[{i}]: {part.type!r} parts are not supported (text, images)"
            )
    return parts


def _image(part: Any, where: str) -> ImageChunk:
    if part.type == "image_url":  # OpenAI: {"image_url": {"url": "data:image/png;base64,..."}}
        url = (part.image_url or {}).get("url", "") if isinstance(part.image_url, dict) else ""
        if not url.startswith("data:"):
            raise InvalidRequestError(
                f"{where}.image_url.url: only data: URLs are taken (tinkerd fetches nothing)"
            )
        head, _, data = url[5:].partition(",")
        media_type, _, encoding = head.partition(";")
        if encoding != "base64":
            raise InvalidRequestError(f"{where}.image_url.url: the data: URL must be base64")
        field = f"{where}.image_url.url"
    else:  # Anthropic: {"source": {"type": "base64", "media_type": "image/png", "data": ...}}
        source = part.source if isinstance(part.source, dict) else {}
        if source.get("type") != "base64":
            raise InvalidRequestError(
                f"{where}.source.type: only base64 images are taken (tinkerd fetches nothing)"
            )
        media_type, data, field = (
            source.get("media_type", ""),
            source.get("data", ""),
            f"{where}.source",
        )
    if media_type not in _FORMATS:
        raise InvalidRequestError(
            f"{field}: media type {media_type!r}: give image/png or image/jpeg"
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{field}: data is not valid base64") from None
    return ImageChunk(data=raw, format=_FORMATS[media_type])


def images_of(messages: list[dict]) -> list[ImageChunk]:
    """The messages' images, in order."""
    return [
        p["image"]
        for m in messages
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] == "image"
    ]


def with_images(tokenizer: Any, text: str, images: list[ImageChunk]) -> PromptWithImages:
    """The rendered chat `text` cut at its image placeholders, each image in its place."""
    marker = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
    pieces = text.split(marker)
    if len(pieces) - 1 != len(images):
        raise InvalidRequestError(
            f"this model's chat template wrote {len(pieces) - 1} image placeholders "
            f"({marker}) for {len(images)} images: does the model take images?"
        )
    chunks: list[Any] = []
    for i, piece in enumerate(pieces):
        if piece:
            chunks.append(
                EncodedTextChunk(tokens=tokenizer.encode(piece, add_special_tokens=False))
            )
        if i < len(images):
            chunks.append(images[i])
    return PromptWithImages(ModelInput(chunks=chunks))

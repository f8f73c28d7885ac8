"""Request bodies parsed as JSON, with the failures a JSON parser lets through refused
as 400s naming the field: nesting past the parser's recursion limit (a RecursionError,
not a ValueError) and lone UTF-16 surrogates (`"\\ud800"` is valid JSON, but no UTF-8
encoder, tokenizer or database takes the string it gives)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinkerd.errors import InvalidRequestError

_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # an escaped surrogate, paired or not


def parse_json(raw: bytes) -> Any:
    """The JSON value of `raw`; InvalidRequestError if it is not JSON, is nested too
    deeply, or holds a string that is not valid Unicode."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise InvalidRequestError("the body is nested too deeply to parse") from None
    except ValueError as e:  # UnicodeDecodeError is one
        raise InvalidRequestError(f"the body is not valid JSON: {e}") from None
    if _SURROGATE.search(raw):  # only then can a string hold a lone surrogate
        check_text(value)
    return value


def check_text(value: Any) -> None:
    """Raise InvalidRequestError naming the first string (key or value) of a JSON value
    that is not valid Unicode. Iterative: the value may be as deep as the parser allows."""
    stack: list[tuple[str, Any]] = [("body", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                _check_string(f"{where} key", key)
                stack.append((f"{where}.{key}" if where != "body" else key, inner))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", inner) for i, inner in enumerate(item))
        elif isinstance(item, str):
            _check_string(where, item)


def _check_string(where: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{where}: not valid Unicode (a lone surrogate {text[e.start]!r} at {e.start})"
        ) from None


class RefuseBadText:
    """ASGI middleware: a JSON request body holding a string that is not valid Unicode
    is a 400 naming the field before any route sees it (stored in a session's tags or
    a run's metadata, such a string made every later listing of the key a 500).
    `skip`: path prefixes whose routes parse with `parse_json` and answer in their own
    error shape. `refused(scope, value)`: told of each refusal (e.g. to use up the
    seq_id the body names)."""

    def __init__(
        self,
        app: ASGIApp,
        skip: tuple[str, ...] = (),
        refused: Callable[[Scope, Any], None] | None = None,
    ) -> None:
        self.app, self.skip, self.refused = app, skip, refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        if b"json" not in headers.get(b"content-type", b"").lower() or scope["path"].startswith(
            self.skip
        ):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay(b"", message, receive), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        if _SURROGATE.search(raw):
            try:
                value = json.loads(raw)
                check_text(value)
            except InvalidRequestError as e:
                if self.refused is not None:
                    self.refused(scope, value)
                return await JSONResponse({"detail": str(e)}, 400)(scope, receive, send)
            except (ValueError, RecursionError):
                pass  # not JSON: the route says so
        await self.app(scope, _replay(raw, None, receive), send)


def _replay(body: bytes, then: Message | None, receive: Receive) -> Receive:
    """A `receive` that gives the body already read once, then `then` (if any), then
    what `receive` gives."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    if then is not None:
        pending = [then]

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed

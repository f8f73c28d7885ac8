"""OpenAI-compatible inference under `/oai/api/v1`: `/completions`, `/chat/completions`
and `/models`, where Tinker mounts them (a client changes only the host).

Thin: authenticate, decode, call `tinkerd.service.inference`, encode. The key comes
as OpenAI clients send it (`Authorization: Bearer <key>`) or as `X-API-Key`; errors have
OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tinkerd.errors import TinkerdError
from tinkerd.server.json_body import parse_json
from tinkerd.service import inference as api
from tinkerd.service.inference import SamplingBackend

log = logging.getLogger(__name__)
PREFIX = "/oai/api/v1"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def api_key(request: Request) -> str:
    """The key from `Authorization: Bearer <key>`, else from `X-API-Key`."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or ""


def error(status: int, message: str) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status)


def reply(result: api.Reply) -> Response:
    if result.events is None:
        return JSONResponse(result.body)
    return StreamingResponse(result.events, media_type="text/event-stream")


ErrorBody = Callable[[int, str], JSONResponse]


async def answer(
    request: Request,
    backend: SamplingBackend,
    handle: Callable[..., Awaitable],
    error: ErrorBody = error,
):
    """`handle(owner, json body)`'s answer; every failure as an error body of the API's
    shape (`error`: OpenAI's by default)."""
    try:
        owner = backend.authenticate(api_key(request))
        body: Any = parse_json(await request.body()) if request.method == "POST" else None
        return await handle(owner, body)
    except TinkerdError as e:
        return error(e.status_code, str(e))
    except Exception:  # a bug: the traceback goes to the log, never to the caller
        log.exception("%s failed", request.url.path)
        return error(500, "internal server error (logged on the server)")


def openai_router(backend: SamplingBackend) -> APIRouter:
    router = APIRouter(prefix=PREFIX)

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        async def handle(owner: str, body: Any) -> Response:
            req = api.parse(api.CompletionRequest, body)
            return reply(await api.completion(backend, owner, req))

        return await answer(request, backend, handle)

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        async def handle(owner: str, body: Any) -> Response:
            req = api.parse(api.ChatCompletionRequest, body)
            return reply(await api.chat_completion(backend, owner, req))

        return await answer(request, backend, handle)

    @router.get("/models")
    async def models(request: Request) -> Response:
        async def handle(owner: str, _: Any) -> Response:
            return JSONResponse(await api.openai_models(backend, owner))

        return await answer(request, backend, handle)

    return router

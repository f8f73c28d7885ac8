"""Anthropic-compatible inference under `/anthropic/api`, where Tinker mounts it: the
client appends `/v1/messages` and `/v1/messages/count_tokens` to that base URL.

Thin: authenticate (`x-api-key`, as Anthropic clients send it), decode, call
`tinkerd.service.inference`, encode. Errors have Anthropic's shape
(`{"type": "error", "error": {"type", "message"}}`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tinkerd.errors import TinkerdError
from tinkerd.server.routes.openai import api_key, reply
from tinkerd.service import inference as api
from tinkerd.service.inference import SamplingBackend

log = logging.getLogger(__name__)
PREFIX = "/anthropic/api"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def error(status: int, message: str) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "api_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return JSONResponse(body, status_code=status)


async def answer(request: Request, backend: SamplingBackend, handle: Callable[..., Awaitable]):
    """`handle(owner, json body)`'s answer; every failure as an Anthropic error body."""
    try:
        owner = backend.authenticate(api_key(request))
        body: Any = await request.json() if request.method == "POST" else None
        return await handle(owner, body)
    except TinkerdError as e:
        return error(e.status_code, str(e))
    except ValueError as e:  # a body that is not JSON
        return error(400, f"the body is not valid JSON: {e}")
    except Exception as e:  # a failure inside the sampler: say what, as a 500
        log.exception("%s failed", request.url.path)
        return error(500, f"{type(e).__name__}: {e}")


def anthropic_router(backend: SamplingBackend) -> APIRouter:
    router = APIRouter(prefix=PREFIX)

    @router.post("/v1/messages")
    async def messages(request: Request) -> Response:
        async def handle(owner: str, body: Any) -> Response:
            req = api.parse(api.MessagesRequest, body)
            return reply(await api.messages(backend, owner, req))

        return await answer(request, backend, handle)

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        async def handle(owner: str, body: Any) -> Response:
            req = api.parse(api.CountTokensRequest, body)
            return JSONResponse(await api.count_tokens(backend, owner, req))

        return await answer(request, backend, handle)

    @router.get("/v1/models")
    async def models(request: Request) -> Response:
        async def handle(owner: str, _: Any) -> Response:
            return JSONResponse(await api.anthropic_models(backend, owner))

        return await answer(request, backend, handle)

    return router

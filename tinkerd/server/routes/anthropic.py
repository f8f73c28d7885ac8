"""Anthropic-compatible inference under `/anthropic/api`, where Tinker mounts it: the
client appends `/v1/messages` and `/v1/messages/count_tokens` to that base URL.

Thin: authenticate (`x-api-key`, as Anthropic clients send it), decode, call
`tinkerd.service.inference`, encode. Errors have Anthropic's shape
(`{"type": "error", "error": {"type", "message"}}`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tinkerd.server.routes import openai
from tinkerd.server.routes.openai import answer, reply, unsupported
from tinkerd.service import inference as api
from tinkerd.service.inference import SamplingBackend

PREFIX = "/anthropic/api"
ERROR_TYPES = openai.ERROR_TYPES  # Anthropic names these statuses the same way


def error(status: int, message: str) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "api_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return JSONResponse(body, status_code=status)


def anthropic_router(backend: SamplingBackend) -> APIRouter:
    router = APIRouter(prefix=PREFIX)

    @router.post("/v1/messages")
    async def messages(request: Request) -> Response:
        async def handle(owner: str, body: Any) -> Response:
            req = api.parse(api.MessagesRequest, body)
            return reply(await api.messages(backend, owner, req))

        return await answer(request, backend, handle, error)

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        async def handle(owner: str, body: Any) -> Response:
            req = api.parse(api.CountTokensRequest, body)
            return JSONResponse(await api.count_tokens(backend, owner, req))

        return await answer(request, backend, handle, error)

    @router.get("/v1/models")
    async def models(request: Request) -> Response:
        async def handle(owner: str, _: Any) -> Response:
            return JSONResponse(await api.anthropic_models(backend, owner))

        return await answer(request, backend, handle, error)

    unsupported(
        router,
        error,
        "Anthropic-compatible (it serves /v1/messages, /v1/messages/count_tokens and /v1/models)",
    )
    return router

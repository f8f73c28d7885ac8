"""OpenAI-compatible inference under `/oai/api/v1`: `/completions`, `/chat/completions`
and `/models`, where Tinker mounts them (a client changes only the host).

Thin: authenticate, decode, call `tinkerd.service.inference`, encode. The key comes
as OpenAI clients send it (`Authorization: Bearer <key>`) or as `X-API-Key`; errors have
OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tinkerd.errors import TinkerdError
from tinkerd.service import inference as api
from tinkerd.service.inference import SamplingBackend

log = logging.getLogger(__name__)
PREFIX = "/oai/api/v1"
SMALL_BODY = 64 << 10  # bytes of JSON decoded on the event loop; larger bodies on a thread
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
        body: Any = None
        if request.method == "POST":
            raw = await request.body()
            body = (
                json.loads(raw)
                if len(raw) < SMALL_BODY
                else await asyncio.to_thread(json.loads, raw)
            )
        return await until_disconnected(request, handle(owner, body))
    except TinkerdError as e:
        answer = error(e.status_code, str(e))
        if e.status_code == 429:  # the clients wait this long before they retry
            answer.headers["Retry-After"] = str(math.ceil(e.retry_after))
        return answer
    except ValueError as e:  # a body that is not JSON
        return error(400, f"the body is not valid JSON: {e}")
    except Exception as e:  # a failure inside the sampler: say what, as a 500
        log.exception("%s failed", request.url.path)
        return error(500, f"{type(e).__name__}: {e}")


async def until_disconnected(request: Request, work: Awaitable) -> Any:
    """`work`'s result; if the client disconnects first, `work` is cancelled (its samples
    stop decoding) and the answer is a 499 no one reads. (A streamed answer is cancelled
    by Starlette itself when its client goes.)"""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        return Response(status_code=499)
    return task.result()


def unsupported(router: APIRouter, error: ErrorBody, api: str) -> None:
    """Every other path under the router's prefix: a 404 in the API's error shape (not
    the framework's), naming what is served."""

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def not_served(path: str) -> Response:
        return error(404, f"/{path} is not part of tinkerd's {api} API")


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

    unsupported(
        router, error, "OpenAI-compatible (it serves /completions, /chat/completions and /models)"
    )
    return router

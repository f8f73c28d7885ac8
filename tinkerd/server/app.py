"""The HTTP server: Tinker's wire protocol (see docs/wire-protocol.md) over a Service.

Routes (server/routes/) only decode a request, call the Service (tinkerd/service) with
the caller's identity, and encode its answer. Mutating calls answer `{"request_id"}` at
once; `retrieve_future` long-polls for the result (HTTP 408 `try_again` while it runs).
forward/forward_backward travel as protobuf, everything else as JSON. Every request
needs an API key (`X-API-Key`), and a key sees only the sessions, runs and futures it
created.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinkerd.engine import Engine
from tinkerd.errors import AuthenticationError, InvalidRequestError, TinkerdError
from tinkerd.requests import Request as VerbRequest
from tinkerd.server.dashboard import add_dashboard, split_key_label
from tinkerd.server.operations import RequestIds, add_operations, post_verbs
from tinkerd.server.requests import RequestTable, encode_json, encode_protobuf, jsonable
from tinkerd.server.rest import rest_router
from tinkerd.server.routes import sessions, verbs
from tinkerd.server.routes.inference import inference_router
from tinkerd.service import KeyCaller, Service, ServiceConfig

log = logging.getLogger("tinkerd.server")


def fingerprint(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Server:
    """What the routes share: the service, the API keys, the request-id table."""

    def __init__(
        self,
        engine: Engine,
        data_dir: Path,
        api_keys: list[str],
        served_models: list[str],
        poll_timeout: float = 25.0,
        max_pending: int = 4096,
        session_timeout: float = 300.0,
        config: ServiceConfig | None = None,
        metrics_keys: list[str] | None = None,
    ):
        """`metrics_keys`: the only keys `/metrics` takes (None: any of `api_keys`)."""
        config = config or ServiceConfig(
            poll_timeout=poll_timeout, max_pending=max_pending, session_timeout=session_timeout
        )
        self.service = Service(engine, data_dir, served_models, config)
        telemetry = self.service.telemetry if config.telemetry else None
        self.requests = RequestTable(self.service.store, telemetry)
        labelled = [split_key_label(k) for k in api_keys]  # `KEY=LABEL` names a key's owner
        self.api_keys = [k.encode() for k, _ in labelled]
        self.key_labels = {fingerprint(k): label for k, label in labelled if label}
        self.metrics_keys = metrics_keys
        self.service.telemetry.label = self.owner_label
        if telemetry is not None:
            telemetry.start_history()
        self.verbs: set[str] = set()  # POST routes under /api/v1 (create_app fills it)

    def owner(self, request: Request) -> str:
        """The caller's identity: a fingerprint of its API key (keys are never stored)."""
        return self._owner_of(request.headers.get("x-api-key") or "")

    def _owner_of(self, key: str) -> str:
        if self.api_keys:
            # Compare against every key in constant time: no early exit that leaks which.
            matches = [hmac.compare_digest(key.encode(), k) for k in self.api_keys]
            if not key or not any(matches):
                raise AuthenticationError("missing or unknown API key (send it as X-API-Key)")
        return fingerprint(key) if key else "anonymous"

    def owner_label(self, owner: str) -> str:
        """What the dashboard shows for an owner: its key's label, else the fingerprint."""
        return self.key_labels.get(owner, owner)

    def caller(self, request: Request) -> KeyCaller:
        """The caller of an HTTP request: its API key, with the key's policy."""
        return KeyCaller(self.owner(request))

    def caller_for_key(self, api_key: str) -> KeyCaller:
        """The caller of a key sent elsewhere than X-API-Key (OpenAI/Anthropic headers)."""
        return KeyCaller(self._owner_of(api_key))

    def answer(self, caller: KeyCaller, request: VerbRequest) -> dict:
        """The wire's answer to `request`: the result, for a verb answered at once; else
        the request_id of its future, to long-poll with retrieve_future."""
        future = self.service.submit(caller, request)
        if not request.queued:
            return jsonable(future.result())
        encode = encode_json if request.answer == "json" else encode_protobuf
        saves = None
        with contextlib.suppress(InvalidRequestError):  # a bad name: the future says so
            expected = request.expected_answer()
            saves = None if expected is None else (expected[0], encode_json(expected[1]))
        model_id = request.run_id()
        sampler = getattr(request, "sampling_session_id", None)  # what a sample reads
        request_id = self.requests.track(
            caller.owner, request.label(), future, encode, model_id, saves, sampler
        )
        return {"request_id": request_id, "model_id": model_id}

    def release_rejected(self, owner: str, model_id: Any, seq_id: Any) -> None:
        """Use up the seq_id of a request refused before its handler ran (a body that
        fails validation or decoding)."""
        self.service.release_rejected(KeyCaller(owner), model_id, seq_id)


class CatchAll:
    """Any exception a route lets escape becomes a JSON 500 with a generic message (the
    traceback goes to the log), and the connection stays open for the next request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:  # half an answer went out: nothing to do but close
                raise
            body = {"detail": "internal server error (logged on the server)"}
            await JSONResponse(body, status_code=500)(scope, receive, send)


class BodyLimit:
    """Request bodies larger than `max_bytes` get a 413 before they are read (by their
    Content-Length) or as soon as they pass it (chunked): none is buffered whole."""

    def __init__(self, app: ASGIApp, max_bytes: int | None) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_bytes
        if scope["type"] != "http" or limit is None:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        with contextlib.suppress(ValueError):
            if int(headers.get(b"content-length", b"0")) > limit:
                return await self._refuse(scope, receive, send)
        seen, refused = 0, False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if message["type"] == "http.request" and seen > limit and not refused:
                refused = True
                await self._refuse(scope, receive, send)
            return {"type": "http.disconnect"} if refused else message

        async def guarded(message: Message) -> None:
            if not refused:  # after the 413, whatever the app answers is dropped
                await send(message)

        await self.app(scope, counted, guarded)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = (
            f"the request body is larger than {self.max_bytes} bytes, this server's limit "
            "(tinkerd serve --max-body-bytes)"
        )
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="tinkerd", version="0.1.0", docs_url="/docs")
    app.state.server = server
    add_dashboard(app, server)  # the web dashboard at / and its JSON API

    @app.exception_handler(TinkerdError)
    async def tinkerd_error(_: Request, e: TinkerdError) -> JSONResponse:
        headers = {"Retry-After": str(math.ceil(e.retry_after))} if e.status_code == 429 else None
        return JSONResponse({"detail": str(e)}, status_code=e.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        body = e.body
        if isinstance(body, bytes | str):
            with contextlib.suppress(ValueError):
                body = json.loads(body)
        if isinstance(body, dict):
            with contextlib.suppress(AuthenticationError):
                owner = server.owner(request)
                server.release_rejected(owner, body.get("model_id"), body.get("seq_id"))
        return JSONResponse({"detail": _describe(e.errors())}, status_code=422)

    @app.exception_handler(ValidationError)
    async def value_error(_: Request, e: ValidationError) -> JSONResponse:
        """A value a route validates itself (e.g. sampling_params) is bad input too."""
        return JSONResponse({"detail": _describe(e.errors())}, status_code=400)

    for routes in (sessions, verbs):
        app.include_router(routes.router(server))
    app.include_router(rest_router(server))
    app.include_router(inference_router(server))  # OpenAI- and Anthropic-compatible
    add_operations(app, server, server.metrics_keys)  # /metrics, session traces
    server.verbs = post_verbs(app.routes)
    app.add_middleware(BodyLimit, max_bytes=server.service.config.max_body_bytes)
    app.add_middleware(CatchAll)
    app.add_middleware(RequestIds, server=server)  # outermost: a 500 carries its id too
    return app


def _describe(errors: Any) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in errors)

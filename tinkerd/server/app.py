"""The HTTP server: Tinker's wire protocol (see docs/wire-protocol.md) over a Service.

Routes (server/routes/) only decode a request, call the Service (tinkerd/service) with
the caller's identity, and encode its answer. Mutating calls answer `{"request_id"}` at
once; `retrieve_future` long-polls for the result (HTTP 408 `try_again` while it runs).
forward/forward_backward travel as protobuf, everything else as JSON. Every request
needs an API key (`X-API-Key`), and a key sees only the sessions, runs and futures it
created.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from tinkerd.engine import Engine
from tinkerd.errors import AuthenticationError, TinkerdError
from tinkerd.server.dashboard import add_dashboard, split_key_label
from tinkerd.server.requests import Encoded, RequestTable, encode_json
from tinkerd.server.rest import rest_router
from tinkerd.server.routes import sampling, sessions, training
from tinkerd.server.routes.inference import inference_router
from tinkerd.service import Service, ServiceConfig


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
    ):
        config = config or ServiceConfig(
            poll_timeout=poll_timeout, max_pending=max_pending, session_timeout=session_timeout
        )
        self.service = Service(engine, data_dir, served_models, config)
        self.engine = engine
        self.store = self.service.store
        self.catalog = self.service.catalog
        self.checkpoints = self.service.checkpoints
        self.requests = RequestTable(self.store)
        labelled = [split_key_label(k) for k in api_keys]  # `KEY=LABEL` names a key's owner
        self.api_keys = [k.encode() for k, _ in labelled]
        self.key_labels = {fingerprint(k): label for k, label in labelled if label}

    def owner(self, request: Request) -> str:
        """The caller's identity: a fingerprint of its API key (keys are never stored)."""
        key = request.headers.get("x-api-key") or ""
        if self.api_keys:
            # Compare against every key in constant time: no early exit that leaks which.
            matches = [hmac.compare_digest(key.encode(), k) for k in self.api_keys]
            if not key or not any(matches):
                raise AuthenticationError("missing or unknown API key (send it as X-API-Key)")
        return fingerprint(key) if key else "anonymous"

    def owner_label(self, owner: str) -> str:
        """What the dashboard shows for an owner: its key's label, else the fingerprint."""
        return self.key_labels.get(owner, owner)

    def track(
        self,
        owner: str,
        kind: str,
        future: Future,
        encode: Callable[[Any], Encoded] = encode_json,
        model_id: str | None = None,
        saves: tuple[str, Encoded] | None = None,
    ) -> dict:
        """The answer to a mutating request: the request_id of the service's future.
        `saves`: see RequestTable.track."""
        request_id = self.requests.track(owner, kind, future, encode, model_id, saves)
        return {"request_id": request_id, "model_id": model_id}


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="tinkerd", version="0.1.0", docs_url="/docs")
    app.state.server = server
    add_dashboard(app, server)  # the web dashboard at / and its JSON API

    @app.exception_handler(TinkerdError)
    async def tinkerd_error(_: Request, e: TinkerdError) -> JSONResponse:
        headers = {"Retry-After": str(math.ceil(e.retry_after))} if e.status_code == 429 else None
        return JSONResponse({"detail": str(e)}, status_code=e.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"detail": "; ".join(lines)}, status_code=422)

    for routes in (sessions, training, sampling):
        app.include_router(routes.router(server))
    app.include_router(rest_router(server))
    app.include_router(inference_router(server))  # OpenAI- and Anthropic-compatible
    return app

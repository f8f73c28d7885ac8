"""Routes and middleware for operating the server (docs/operations.md): `/metrics` for
Prometheus, session trace export (`RestClient.export_session_trace`), the dashboard's
server view, and the `X-Request-ID` header (plus a log line for refused requests).
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinkerd.errors import AuthenticationError
from tinkerd.server.requests import ANSWERED
from tinkerd.service.traces import TraceLinks, chrome_trace

if TYPE_CHECKING:
    from tinkerd.server.app import Server

API = "/api/v1"
NOT_VERBS = {"retrieve_future", "session_heartbeat", "telemetry"}
"""POST routes that submit nothing (polls, heartbeats): their 4xx are not refused work."""
VERB_OF = {"asample": "sample"}
"""Routes whose requests the metrics and logs name otherwise."""


def add_operations(app: FastAPI, server: Server, metrics_keys: list[str] | None = None) -> None:
    """`metrics_keys`: the only keys `/metrics` accepts (`--metrics-key`), which also see
    the per-key series; None: any API key of the server, without per-key series."""
    telemetry = server.service.telemetry
    links = TraceLinks()
    Owner = Depends(server.owner)
    allowed = [k.encode() for k in metrics_keys or []]

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        """Prometheus' text format. The key goes as `Authorization: Bearer KEY` (what a
        scrape config's `authorization` sends) or `X-API-Key`."""
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        key = key or request.headers.get("x-api-key", "")
        operator = any([hmac.compare_digest(key.encode(), k) for k in allowed])
        if allowed and not operator:
            raise AuthenticationError("/metrics needs the metrics key (--metrics-key)")
        if not operator:
            server.caller_for_key(key)  # any API key: a 401 otherwise
        # Per-key series only for the operator (or a keyless loopback server): one
        # tenant's key must not see who else uses the server, nor how much.
        per_key = operator or not server.api_keys
        return Response(telemetry.exposition(per_key), media_type=CONTENT_TYPE_LATEST)

    @app.get(f"{API}/sessions/{{session_id}}/trace_export")
    def trace_export(session_id: str, request: Request, who: str = Owner) -> dict:
        """A signed link to the session's trace (Chrome JSON trace format), ready at once."""
        server.service.sessions.check_owner(session_id, who)
        expires, signature = links.sign(session_id, who)
        url = str(request.url_for("download_session_trace", session_id=session_id))
        return {"status": "ready", "url": f"{url}?expires={expires}&signature={signature}"}

    @app.get(f"{API}/session_traces/{{session_id}}")
    def download_session_trace(session_id: str, expires: int = 0, signature: str = "") -> Response:
        """Signed, so it needs no API key: the link itself is the permission."""
        owner = server.service.store.session_owner(session_id)
        links.check(session_id, owner, expires, signature)
        trace = chrome_trace(session_id, telemetry.session_spans(session_id, owner))
        filename = f"{session_id}.json".replace(":", "_")
        return Response(
            json.dumps(trace),
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    @app.get(f"{API}/dashboard/server")
    def server_view(_: str = Owner) -> dict:
        """The server's load over time, every key's requests together (no per-key data):
        one point per snapshot interval (5 s), the last hour."""
        return {"interval_s": telemetry.interval, "points": telemetry.series()}


class RequestIds:
    """Every HTTP answer carries `X-Request-ID`: the request_id of the request it
    submitted (what the JSON request log and the SDK's futures show), else a fresh id.
    A verb refused before it was submitted (4xx) gets a JSON log line of its own."""

    def __init__(self, app: ASGIApp, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        answered: list[str] = []
        token = ANSWERED.set(answered)
        start = time.time()

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                request_id = answered[0] if answered else f"req-{uuid.uuid4().hex}"
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
                if not answered and message["status"] >= 400:
                    self._refused(scope, request_id, message["status"], start)
            await send(message)

        try:
            await self.app(scope, receive, with_id)
        finally:
            ANSWERED.reset(token)

    def _refused(self, scope: Scope, request_id: str, status: int, start: float) -> None:
        """Count (and log) a POST under /api/v1 refused before it was queued."""
        path = scope.get("path", "")
        route = path.removeprefix(f"{API}/")
        if scope.get("method") != "POST" or route not in self.server.verbs:
            return  # not a verb (bounded labels: only the app's own routes count)
        verb = VERB_OF.get(route, route)
        if self.server.requests.telemetry is None:
            return  # --no-telemetry
        telemetry = self.server.service.telemetry
        telemetry.requests.labels(verb, "rejected").inc()
        if telemetry.json_log:
            headers = dict(scope.get("headers") or [])
            key = headers.get(b"x-api-key", b"").decode(errors="replace")
            try:
                owner = self.server.owner_label(self.server.caller_for_key(key).owner)
            except AuthenticationError:
                owner = None  # refused for its key
            line = {
                "ts": round(time.time(), 6),
                "request_id": request_id,
                "key": owner,
                "verb": verb,
                "outcome": "rejected",
                "status": status,
                "run_s": round(time.time() - start, 6),
            }
            telemetry.log(json.dumps(line))


def post_verbs(routes: list) -> set[str]:
    """Names of the POST routes directly under /api/v1 (the verbs a refusal may be counted
    under), those of included routers too."""
    verbs = set()
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's wrapper of an included router
            verbs |= post_verbs(route.original_router.routes)
            continue
        path = getattr(route, "path", "")
        name = path.removeprefix(f"{API}/")
        if path != name and "/" not in name and "POST" in getattr(route, "methods", ()):
            verbs.add(name)
    return verbs - NOT_VERBS

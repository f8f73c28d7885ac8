"""Client config, capabilities, sessions and their heartbeats, and the long-poll."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from tinkerd.errors import NotFoundError
from tinkerd.server.encodings import for_caller
from tinkerd.server.routes import API, Limit, Offset
from tinkerd.server.schemas import (
    CreateSessionRequest,
    FinishSessionRequest,
    RetrieveFutureRequest,
    SessionRequest,
)
from tinkerd.service.session_search import SessionSearch, search_sessions

if TYPE_CHECKING:
    from tinkerd.server.app import Server

# What the official SDK reads from client/config: stay on plain HTTP/JSON where it can.
CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": False,
    "parallel_fwdbwd_chunks": False,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": True,
    "sample_join_sampling_session": False,
}


def router(server: Server) -> APIRouter:
    routes = APIRouter(prefix=API)
    service = server.service
    Owner = Depends(server.owner)

    @routes.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @routes.post("/client/config")
    def client_config(_: str = Owner) -> dict:
        return CLIENT_CONFIG

    @routes.post("/client/dynamic_config")
    def dynamic_config(_: str = Owner) -> dict:
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @routes.post("/create_session")
    def create_session(body: CreateSessionRequest, who: str = Owner) -> dict:
        session_id = service.sessions.create(who, body.tags, body.user_metadata, body.display_name)
        return {"session_id": session_id, "type": "create_session"}

    @routes.post("/session_heartbeat")
    def heartbeat(body: SessionRequest, who: str = Owner) -> Response:
        if not service.sessions.heartbeat(body.session_id, who):
            return JSONResponse({"detail": "session finished"}, status_code=410)
        return JSONResponse({"type": "session_heartbeat"})

    @routes.post("/sessions/{session_id}/finish")
    def finish_session(
        session_id: str, body: FinishSessionRequest | None = None, who: str = Owner
    ) -> dict:
        reason = None
        if body is not None and body.reason is not None:
            reason = {"type": body.reason.get("type"), "detail": body.detail}
        service.sessions.finish(session_id, who, reason)
        return {}

    @routes.get("/sessions")
    def list_sessions(
        limit: Limit = 20, offset: Offset = 0, access_scope: str = "owned", who: str = Owner
    ) -> dict:
        # "accessible" adds nothing: a key shares no sessions, only published checkpoints.
        return {"sessions": service.sessions.list(who, limit, offset)}

    @routes.post("/sessions/search")
    def search(body: SessionSearch, who: str = Owner) -> dict:
        return search_sessions(service.store, service.checkpoints, who, body)

    @routes.get("/sessions/{session_id}")
    def get_session(session_id: str, access_scope: str = "owned", who: str = Owner) -> dict:
        return service.sessions.describe(session_id, who)

    @routes.post("/telemetry")
    def telemetry(_: str = Owner) -> dict:
        return {"status": "accepted"}  # accepted and dropped: tinkerd collects nothing

    @routes.post("/retrieve_future")
    async def retrieve_future(
        body: RetrieveFutureRequest, request: Request, who: str = Owner
    ) -> Response:
        service.unstick()
        try:
            stored = await server.requests.wait(body.request_id, who, service.config.poll_timeout)
        except KeyError:
            raise NotFoundError(f"no request {body.request_id!r}") from None
        if stored is None:
            return JSONResponse(
                {"type": "try_again", "request_id": body.request_id, "queue_state": "active"},
                status_code=408,
            )
        accept = request.headers.get("accept")
        media_type, answer = for_caller(stored.kind, stored.content_type, stored.body, accept)
        return Response(answer, media_type=media_type)

    return routes

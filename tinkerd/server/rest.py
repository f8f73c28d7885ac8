"""The REST routes of the official SDK's RestClient: training runs, checkpoints
(list, delete, publish/unpublish) and checkpoint archive downloads.

Checkpoint ids are "weights/<name>" or "sampler_weights/<name>" (the SDK puts them in
the URL as they are, slash included). What a key may see is decided by `Catalog`.
The archive route answers as Tinker does: a 302 redirect to a short-lived signed URL
(with an `Expires` header; the JSON body says the same) that streams the checkpoint
directory as a tar and needs no API key.
"""

from __future__ import annotations

import datetime
import email.utils
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from tinkerd.server.routes import Limit, Offset
from tinkerd.service.access import checkpoint_path, tar_stream

API = "/api/v1"
Scope = Literal["owned", "accessible"]


class TtlRequest(BaseModel):
    ttl_seconds: int | None = None
    """Seconds from now until the checkpoint is deleted; null: never."""


def rest_router(server) -> APIRouter:
    """Routes over `server.service.catalog`, keyed by `server.owner(request)`."""
    router = APIRouter()
    catalog = server.service.catalog
    Owner = Depends(server.owner)
    CHECKPOINT = f"{API}/training_runs/{{model_id}}/checkpoints/{{kind}}/{{name}}"

    @router.get(f"{API}/training_runs")
    def list_training_runs(
        limit: Limit = 20, offset: Offset = 0, access_scope: Scope = "owned", who: str = Owner
    ) -> dict:
        runs, cursor = catalog.list_runs(who, limit, offset, access_scope == "accessible")
        return {
            "training_runs": [r.model_dump(mode="json") for r in runs],
            "cursor": cursor.model_dump(),
        }

    @router.get(f"{API}/training_runs/{{model_id}}")
    def get_training_run(model_id: str, access_scope: Scope = "owned", who: str = Owner) -> dict:
        run = catalog.get_run(model_id, who, access_scope == "accessible")
        return run.model_dump(mode="json")

    @router.get(f"{API}/training_runs/{{model_id}}/checkpoints")
    @router.get(f"{API}/models/{{model_id}}/checkpoints")  # what SDK 0.3 calls
    def list_checkpoints(model_id: str, who: str = Owner) -> dict:
        return catalog.list_checkpoints(model_id, who).model_dump(mode="json")

    @router.get(f"{API}/checkpoints")
    def list_user_checkpoints(limit: Limit = 100, offset: Offset = 0, who: str = Owner) -> dict:
        return catalog.list_user_checkpoints(who, limit, offset).model_dump(mode="json")

    @router.delete(CHECKPOINT)
    def delete_checkpoint(model_id: str, kind: str, name: str, who: str = Owner) -> Response:
        catalog.delete(checkpoint_path(model_id, f"{kind}/{name}"), who)
        return Response(status_code=204)

    @router.post(f"{CHECKPOINT}/publish")
    def publish(model_id: str, kind: str, name: str, who: str = Owner) -> Response:
        catalog.set_public(checkpoint_path(model_id, f"{kind}/{name}"), who, True)
        return Response(status_code=204)

    @router.delete(f"{CHECKPOINT}/publish")
    def unpublish(model_id: str, kind: str, name: str, who: str = Owner) -> Response:
        catalog.set_public(checkpoint_path(model_id, f"{kind}/{name}"), who, False)
        return Response(status_code=204)

    @router.put(f"{CHECKPOINT}/ttl")
    def set_ttl(
        model_id: str, kind: str, name: str, body: TtlRequest, who: str = Owner
    ) -> Response:
        catalog.set_ttl(checkpoint_path(model_id, f"{kind}/{name}"), who, body.ttl_seconds)
        return Response(status_code=204)

    @router.get(f"{CHECKPOINT}/archive")
    def archive_url(
        model_id: str, kind: str, name: str, request: Request, who: str = Owner
    ) -> Response:
        path = checkpoint_path(model_id, f"{kind}/{name}")
        catalog.readable(path, who)
        expires, signature = catalog.sign(path)
        url = (
            str(request.url_for("download_archive", model_id=model_id, kind=kind, name=name))
            + f"?expires={expires}&signature={signature}"
        )
        http_date = email.utils.formatdate(expires, usegmt=True)
        return JSONResponse(
            {"url": url, "expires": _utc(expires).isoformat()},
            status_code=302,
            headers={"Location": url, "Expires": http_date},
        )

    @router.get(f"{CHECKPOINT}/external_weights_urls")
    def external_weights_urls(
        model_id: str, kind: str, name: str, request: Request, who: str = Owner
    ) -> dict:
        """A signed URL per file of the PEFT adapter (RestClient.get_external_weights_urls)."""
        path = checkpoint_path(model_id, f"{kind}/{name}")
        expires, signatures = catalog.sign_external(path, who)
        urls = {
            filename: str(
                request.url_for(
                    "download_external_file", model_id=model_id, name=name, filename=filename
                )
            )
            + f"?expires={expires}&signature={signature}"
            for filename, signature in signatures.items()
        }
        return {"urls": urls, "expires": _utc(expires).isoformat()}

    @router.get(f"{API}/external_weights_files/{{model_id}}/{{name}}/{{filename}}")
    def download_external_file(
        model_id: str, name: str, filename: str, expires: int = 0, signature: str = ""
    ) -> Response:
        """Signed, so it needs no API key: the link itself is the permission."""
        path = checkpoint_path(model_id, f"external_weights/{name}")
        body = catalog.external_file(path, filename, expires, signature)
        return Response(body, media_type="application/octet-stream")

    @router.get(f"{API}/checkpoint_archives/{{model_id}}/{{kind}}/{{name}}")
    def download_archive(
        model_id: str, kind: str, name: str, expires: int = 0, signature: str = ""
    ) -> Response:
        """Signed, so it needs no API key: the link itself is the permission."""
        path = checkpoint_path(model_id, f"{kind}/{name}")
        info = catalog.check_signature(path, expires, signature)
        filename = f"{model_id}-{kind}-{name}.tar".replace(":", "_")
        return StreamingResponse(
            tar_stream(info),
            media_type="application/x-tar",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    return router


def _utc(timestamp: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)

"""Training runs: create (fresh or from a checkpoint), forward/backward, custom losses,
optimizer steps, checkpoints."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request

from tinkerd import wire_proto
from tinkerd.engine.checkpoints import tinker_path
from tinkerd.errors import InvalidRequestError
from tinkerd.server.encodings import BodyError, decode_loss_body
from tinkerd.server.requests import PROTOBUF, done, encode_json
from tinkerd.server.routes import API
from tinkerd.server.schemas import (
    CreateModelRequest,
    LoadWeightsRequest,
    ModelRequest,
    OptimStepRequest,
    SaveWeightsExternalRequest,
    SaveWeightsRequest,
    WeightsInfoRequest,
)
from tinkerd.types import optimizer_config_from

if TYPE_CHECKING:
    from tinkerd.server.app import Server


def encode_output(out: Any) -> tuple[str, bytes]:
    return PROTOBUF, wire_proto.encode_forward_backward_output(out)


def router(server: Server) -> APIRouter:
    routes = APIRouter(prefix=API)
    service = server.service
    Owner = Depends(server.owner)

    @routes.post("/create_model")
    def create_model(body: CreateModelRequest, who: str = Owner) -> dict:
        future = service.create_model(
            who,
            body.base_model,
            body.lora_config,
            body.session_id,
            body.model_seq_id,
            body.user_metadata,
            body.optimizer_config,
        )
        answer = lambda model_id: {"model_id": model_id, "type": "create_model"}  # noqa: E731
        return server.track(who, "create_model", future, lambda m: encode_json(answer(m)))

    @routes.post("/get_info")
    def get_info(body: ModelRequest, who: str = Owner) -> dict:
        info = service.get_info(who, body.model_id)
        return info.model_dump(mode="json", exclude_none=True)

    @routes.post("/forward_backward")
    async def forward_backward(request: Request, who: str = Owner) -> dict:
        return await submit_loss(request, who, forward_only=False)

    @routes.post("/forward")
    async def forward(request: Request, who: str = Owner) -> dict:
        """JSON forward of SDKs that do not send forward_only in a forward_backward."""
        return await submit_loss(request, who, forward_only=True)

    async def submit_loss(request: Request, who: str, forward_only: bool) -> dict:
        raw, headers = await request.body(), request.headers
        content_type = headers.get("content-type")
        if forward_only and "json" not in (content_type or ""):
            raise InvalidRequestError("/forward takes JSON; send protobuf to forward_backward")

        def submit() -> dict:
            encoding = headers.get("content-encoding")
            try:
                req = decode_loss_body(
                    raw, encoding, content_type, forward_only, server.max_batch_tokens
                )
            except (BodyError, wire_proto.ProtoDecodeError) as e:
                server.release_refused_body(who, e.model_id, e.seq_id)
                raise
            return submit_forward_backward(req, who)

        return await asyncio.to_thread(submit)

    def submit_forward_backward(req: dict, who: str) -> dict:
        model_id, seq_id, data = req["model_id"], req["seq_id"], req["data"]
        if req["loss_fn"] == "custom":
            if req["forward_only"]:
                service.check_run(model_id, who)
                service.queue.release(model_id, seq_id)
                raise InvalidRequestError("a custom loss runs in forward_backward, not forward")
            config = req["loss_fn_config"] or {}
            future = service.forward_backward_uploaded(who, model_id, data, config, seq_id)
        else:
            call = service.forward if req["forward_only"] else service.forward_backward
            future = call(who, model_id, data, req["loss_fn"], req["loss_fn_config"], seq_id)
        kind = "forward" if req["forward_only"] else "forward_backward"
        return server.track(who, kind, future, encode_output, model_id)

    @routes.post("/create_custom_loss")
    def create_custom_loss(body: dict[str, Any], who: str = Owner) -> dict:
        loss_id = service.create_custom_loss(who, str(body.get("session_id")), body)
        answer = {"loss_id": loss_id, "type": "create_custom_loss"}
        return server.track(who, "create_custom_loss", done(answer))

    @routes.post("/optim_step")
    def optim_step(body: OptimStepRequest, who: str = Owner) -> dict:
        if body.adam_params is not None and body.optimizer_params is not None:
            service.check_run(body.model_id, who)
            service.queue.release(body.model_id, body.seq_id)
            raise InvalidRequestError("give adam_params or optimizer_params, not both")
        params = body.adam_params or body.optimizer_params or {}
        future = service.optim_step(who, body.model_id, params, body.seq_id)
        return server.track(who, "optim_step", future, model_id=body.model_id)

    @routes.post("/unload_model")
    def unload_model(body: ModelRequest, who: str = Owner) -> dict:
        future = service.unload_model(who, body.model_id)
        return server.track(who, "unload_model", future, model_id=body.model_id)

    @routes.post("/save_weights")
    def save_weights(body: SaveWeightsRequest, who: str = Owner) -> dict:
        future = service.save_state(
            who,
            body.model_id,
            body.path,
            body.overwrite,
            body.seq_id,
            body.ttl_seconds,
            body.user_metadata,
        )
        encode = lambda path: encode_json({"path": path, "type": "save_weights"})  # noqa: E731
        path = tinker_path(body.model_id, "weights", body.path)
        return server.track(
            who, "save_weights", future, encode, body.model_id, (path, encode(path))
        )

    @routes.post("/save_weights_external")
    def save_weights_external(body: SaveWeightsExternalRequest, who: str = Owner) -> dict:
        future = service.save_weights_external(
            who,
            body.model_id,
            body.path,
            body.ttl_seconds,
            body.age_encryption_recipients,
            body.seq_id,
        )
        encode = lambda info: encode_json(  # noqa: E731
            {
                "path": info.tinker_path,
                "size_bytes": info.size_bytes,
                "type": "save_weights_external",
            }
        )
        # If the server dies once the adapter is on disk, before this answer is recorded,
        # the restart answers it (without size_bytes, which the SDK does not need).
        path = tinker_path(body.model_id, "external_weights", body.path)
        saved = encode_json({"path": path, "type": "save_weights_external"})
        return server.track(
            who, "save_weights_external", future, encode, body.model_id, (path, saved)
        )

    @routes.post("/load_weights")
    def load_weights(body: LoadWeightsRequest, who: str = Owner) -> dict:
        if body.session_id is not None and body.model_seq_id is not None:
            future = service.create_model_from_state(
                who,
                body.path,
                body.optimizer,
                body.session_id,
                body.model_seq_id,
                body.base_model,
                body.user_metadata,
                body.optimizer_config,
            )
            encode = lambda r: encode_json(  # noqa: E731
                {"path": body.path, "model_id": r[0], "type": "load_weights"}
            )
            return server.track(who, "load_weights", future, encode)
        if body.model_id is None:
            raise InvalidRequestError("give model_id (and seq_id), or session_id and model_seq_id")
        if body.optimizer_config is not None:  # an existing run keeps its optimizer
            has = service.get_info(who, body.model_id).optimizer_config
            try:
                wanted = optimizer_config_from(body.optimizer_config)
                if wanted != has:
                    raise InvalidRequestError(
                        f"model {body.model_id!r} uses the {has.type!r} optimizer; "
                        f"optimizer_config {wanted.type!r} cannot change an existing model's"
                    )
            except InvalidRequestError:
                service.queue.release(body.model_id, body.seq_id)  # its seq_id is used up
                raise
        future = service.load_state(who, body.model_id, body.path, body.optimizer, body.seq_id)
        answer = {"path": body.path, "model_id": body.model_id, "type": "load_weights"}
        return server.track(
            who, "load_weights", future, lambda _: encode_json(answer), body.model_id
        )

    @routes.post("/weights_info")
    def weights_info(body: WeightsInfoRequest, who: str = Owner) -> dict:
        info = service.catalog.readable(body.tinker_path, who)
        return info.weights_info().model_dump(mode="json")

    return routes

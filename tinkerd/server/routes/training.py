"""Training runs: create (fresh or from a checkpoint), forward/backward, custom losses,
optimizer steps, checkpoints."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request

from tinkerd import wire_proto
from tinkerd.engine.checkpoints import tinker_path
from tinkerd.errors import InvalidRequestError
from tinkerd.server.requests import PROTOBUF, done, encode_json
from tinkerd.server.routes import API
from tinkerd.server.schemas import (
    CreateModelRequest,
    LoadWeightsRequest,
    ModelRequest,
    OptimStepRequest,
    SaveWeightsRequest,
    WeightsInfoRequest,
)
from tinkerd.types import AdamParams

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
        )
        answer = lambda model_id: {"model_id": model_id, "type": "create_model"}  # noqa: E731
        return server.track(who, "create_model", future, lambda m: encode_json(answer(m)))

    @routes.post("/get_info")
    def get_info(body: ModelRequest, who: str = Owner) -> dict:
        info = service.get_info(who, body.model_id)
        return info.model_dump(mode="json", exclude_none=True)

    @routes.post("/forward_backward")
    async def forward_backward(request: Request, who: str = Owner) -> dict:
        raw = await request.body()
        return await asyncio.to_thread(submit_forward_backward, raw, who)

    def submit_forward_backward(raw: bytes, who: str) -> dict:
        req = wire_proto.decode_forward_backward_request(raw)
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
        adam = body.adam_params or body.optimizer_params or AdamParams()
        future = service.optim_step(who, body.model_id, adam, body.seq_id)
        return server.track(who, "optim_step", future, model_id=body.model_id)

    @routes.post("/unload_model")
    def unload_model(body: ModelRequest, who: str = Owner) -> dict:
        future = service.unload_model(who, body.model_id)
        return server.track(who, "unload_model", future, model_id=body.model_id)

    @routes.post("/save_weights")
    def save_weights(body: SaveWeightsRequest, who: str = Owner) -> dict:
        future = service.save_state(who, body.model_id, body.path, body.overwrite, body.seq_id)
        encode = lambda path: encode_json({"path": path, "type": "save_weights"})  # noqa: E731
        path = tinker_path(body.model_id, "weights", body.path)
        return server.track(
            who, "save_weights", future, encode, body.model_id, (path, encode(path))
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
            )
            encode = lambda r: encode_json(  # noqa: E731
                {"path": body.path, "model_id": r[0], "type": "load_weights"}
            )
            return server.track(who, "load_weights", future, encode)
        if body.model_id is None:
            raise InvalidRequestError("give model_id (and seq_id), or session_id and model_seq_id")
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

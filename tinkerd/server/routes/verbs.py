"""The verbs' routes: one generated per plain JSON request of `tinkerd.requests`, and the
few the wire makes special.

A generated route parses the body into its request type and hands it to
`Server.answer`: the service's answer at once, or a request_id to long-poll. Written out
by hand: forward_backward (protobuf, or the JSON of old SDKs, maybe compressed) and
/forward, /load_weights (a new run from a checkpoint, or an existing run's load),
/create_custom_loss (the graph is the body), /asample (sample_sequence_ids) and the
reads of capabilities and samplers.
"""

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request

from tinkerd import wire_proto
from tinkerd.errors import InvalidRequestError
from tinkerd.requests import (
    REQUESTS,
    CreateCustomLossRequest,
    CreateModelFromStateRequest,
    ForwardBackwardRequest,
    GetServerCapabilitiesRequest,
    LoadWeightsRequest,
    SampleRequest,
)
from tinkerd.server.encodings import decode_loss_request, decompress, run_and_seq
from tinkerd.server.routes import API
from tinkerd.server.schemas import LoadWeightsBody
from tinkerd.service import KeyCaller

SPECIAL = {
    ForwardBackwardRequest,
    CreateModelFromStateRequest,
    LoadWeightsRequest,
    CreateCustomLossRequest,
    SampleRequest,
    GetServerCapabilitiesRequest,
}
"""Requests whose routes are written out below; every other one with a route is generated."""


def _generated(server: Any, request_type: type) -> Any:
    def route(body, caller) -> dict:  # noqa: ANN001 -- typed below, for FastAPI
        return server.answer(caller, body)

    route.__annotations__ = {"body": request_type, "caller": KeyCaller, "return": dict}
    route.__defaults__ = (Depends(server.caller),)
    route.__name__ = request_type.verb
    return route


def router(server: Any) -> APIRouter:
    routes = APIRouter(prefix=API)
    service = server.service
    Caller = Depends(server.caller)

    for request_type in REQUESTS:
        if request_type.route and request_type not in SPECIAL:
            routes.post(request_type.route, name=request_type.verb)(
                _generated(server, request_type)
            )

    @routes.get("/get_server_capabilities")
    def capabilities(caller: KeyCaller = Caller) -> dict:
        return server.answer(caller, GetServerCapabilitiesRequest())

    @routes.post("/forward_backward")
    async def forward_backward(request: Request, caller: KeyCaller = Caller) -> dict:
        return await submit_loss(request, caller, forward_only=False)

    @routes.post("/forward")
    async def forward(request: Request, caller: KeyCaller = Caller) -> dict:
        """JSON forward of SDKs that do not send forward_only in a forward_backward."""
        return await submit_loss(request, caller, forward_only=True)

    async def submit_loss(request: Request, caller: KeyCaller, forward_only: bool) -> dict:
        raw, headers = await request.body(), request.headers
        content_type = headers.get("content-type")
        if forward_only and "json" not in (content_type or ""):
            raise InvalidRequestError("/forward takes JSON; send protobuf to forward_backward")

        def submit() -> dict:
            body = decompress(raw, headers.get("content-encoding"))
            try:
                decoded = decode_loss_request(body, content_type, forward_only)
            except wire_proto.ProtoDecodeError as e:
                service.release_rejected(caller, e.model_id, e.seq_id)
                raise
            except InvalidRequestError:
                named = run_and_seq(body) if "json" in (content_type or "") else None
                if named is not None:
                    service.release_rejected(caller, *named)
                raise
            return server.answer(caller, ForwardBackwardRequest(**decoded))

        return await asyncio.to_thread(submit)

    @routes.post("/create_custom_loss")
    def create_custom_loss(body: dict[str, Any], caller: KeyCaller = Caller) -> dict:
        return server.answer(caller, CreateCustomLossRequest.from_wire(body))

    @routes.post("/load_weights")
    def load_weights(body: LoadWeightsBody, caller: KeyCaller = Caller) -> dict:
        """A new run from the checkpoint (session_id + model_seq_id), or a load into an
        existing run (model_id + seq_id, the older addressing)."""
        return server.answer(caller, body.request())

    @routes.post("/asample")
    def asample(body: SampleRequest, caller: KeyCaller = Caller) -> dict:
        answer = server.answer(caller, body)
        ids = [f"{answer['request_id']}:{i}" for i in range(body.num_samples)]
        return {"request_id": answer["request_id"], "sample_sequence_ids": ids}

    @routes.get("/samplers/{sampler_id}")
    def get_sampler(sampler_id: str, caller: KeyCaller = Caller) -> dict:
        weights = service.sessions.sampler(sampler_id, caller.owner)
        return {
            "sampler_id": sampler_id,
            "base_model": weights.base_model,
            "model_path": weights.model_path,
        }

    return routes

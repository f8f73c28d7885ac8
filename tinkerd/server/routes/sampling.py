"""Sampling: sampler weights from a run, sampling sessions, and `asample`."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends

from tinkerd import wire_proto
from tinkerd.engine.checkpoints import tinker_path
from tinkerd.errors import InvalidRequestError
from tinkerd.server.requests import PROTOBUF, encode_json
from tinkerd.server.routes import API
from tinkerd.server.schemas import (
    CreateSamplingSessionRequest,
    SampleRequest,
    SaveWeightsForSamplerRequest,
)
from tinkerd.types import SampleResponse, SamplingParams

if TYPE_CHECKING:
    from tinkerd.server.app import Server


def router(server: Server) -> APIRouter:
    routes = APIRouter(prefix=API)
    service = server.service
    Owner = Depends(server.owner)

    @routes.post("/save_weights_for_sampler")
    def save_weights_for_sampler(body: SaveWeightsForSamplerRequest, who: str = Owner) -> dict:
        future = service.save_weights_for_sampler(
            who,
            body.model_id,
            body.path,
            body.sampling_session_seq_id,
            body.seq_id,
            body.ttl_seconds,
            body.user_metadata,
        )

        def encode(saved: tuple) -> tuple[str, bytes]:
            weights, sampling_id = saved
            if body.path is not None:
                return encode_json({"path": weights.model_path, "type": "save_weights_for_sampler"})
            answer = {"sampling_session_id": sampling_id, "type": "save_weights_for_sampler"}
            return encode_json(answer)

        saves = None
        with contextlib.suppress(InvalidRequestError):  # a bad name: the future says so
            path = tinker_path(body.model_id, "sampler_weights", body.path or "")
            saves = (path, encode_json({"path": path, "type": "save_weights_for_sampler"}))
        return server.track(who, "save_weights_for_sampler", future, encode, body.model_id, saves)

    @routes.post("/create_sampling_session")
    def create_sampling_session(body: CreateSamplingSessionRequest, who: str = Owner) -> dict:
        sampling_id = service.sampling.open_session(
            who, body.session_id, body.sampling_session_seq_id, body.base_model, body.model_path
        )
        return {"sampling_session_id": sampling_id, "type": "create_sampling_session"}

    @routes.get("/samplers/{sampler_id}")
    def get_sampler(sampler_id: str, who: str = Owner) -> dict:
        weights = service.sessions.sampler(sampler_id, who)
        return {
            "sampler_id": sampler_id,
            "base_model": weights.base_model,
            "model_path": weights.model_path,
        }

    @routes.post("/asample")
    def asample(body: SampleRequest, who: str = Owner) -> dict:
        if body.sampling_session_id is not None:
            weights = service.sessions.sampler(body.sampling_session_id, who)
        else:
            weights = service.sampling.weights(who, body.base_model, body.model_path)
        if body.prompt_alt_tokens_k or body.target_prompt_logprobs is not None:
            raise InvalidRequestError(
                "prompt_alt_tokens_k and target_prompt_logprobs are not supported by tinkerd"
            )
        params = SamplingParams.model_validate(body.sampling_params.model_dump())
        last_n = body.prompt_logprobs_last_n
        prompt = body.prompt.to_ints()
        if last_n is not None and not 1 <= last_n < len(prompt):
            raise InvalidRequestError(
                f"prompt_logprobs_last_n must be in [1, {len(prompt) - 1}], got {last_n}"
            )
        future = service.sampling.sample(
            weights,
            prompt,
            body.num_samples,
            params,
            body.prompt_logprobs,
            body.topk_prompt_logprobs,
            body.topk_sample_logprobs,
            owner=who,
        )
        encode = lambda r: (PROTOBUF, wire_proto.encode_sample_response(only_last(r, last_n)))  # noqa: E731
        request_id = server.requests.track(
            who, "sample", future, encode, sampler=body.sampling_session_id
        )
        return {
            "request_id": request_id,
            "sample_sequence_ids": [f"{request_id}:{i}" for i in range(body.num_samples)],
        }

    return routes


def only_last(response: SampleResponse, last_n: int | None) -> SampleResponse:
    """Blank every prompt logprob but the last `last_n` (prompt_logprobs_last_n)."""
    if last_n is None:
        return response
    blank = len(response.prompt_logprobs or []) - last_n
    if response.prompt_logprobs is not None:
        response.prompt_logprobs = [None] * blank + response.prompt_logprobs[blank:]
    if response.topk_prompt_logprobs is not None:
        response.topk_prompt_logprobs = [None] * blank + response.topk_prompt_logprobs[blank:]
    return response

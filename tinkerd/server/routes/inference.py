"""The one adapter between the compatible inference APIs and the service layer.

`ServerBackend` implements `tinkerd.service.inference.SamplingBackend` over the
server's `Service` (its access policy, served models and sampling, so these requests join
the same sampler batches as SamplingClient's) and the server's key check.
`inference_router(server)` is what `create_app` includes.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from fastapi import APIRouter

from tinkerd.engine import SamplerWeights
from tinkerd.engine.sampling.spec import eos_token_ids
from tinkerd.errors import InvalidRequestError
from tinkerd.server.routes.anthropic import anthropic_router
from tinkerd.server.routes.openai import openai_router
from tinkerd.types import SampleResponse

MAX_LISTED_CHECKPOINTS = 1000


class ServerBackend:
    """`SamplingBackend` over a `tinkerd.server.app.Server` and its `Service`."""

    def __init__(self, server: Any):
        self.server = server
        self.service = server.service

    def authenticate(self, api_key: str) -> str:
        return self.server.caller_for_key(api_key).owner

    def resolve(self, owner: str, base_model: str | None, model_path: str | None) -> SamplerWeights:
        served = self.service.served_models or []
        if model_path is not None:
            info = self.service.catalog.readable(model_path, owner)  # another key's: 404
            if base_model is not None and base_model != info.base_model:
                raise InvalidRequestError(
                    f"{model_path} was trained on {info.base_model!r}, not {base_model!r}"
                )
            return self.service.sampling.weights(owner, None, model_path)
        if base_model not in served:
            raise InvalidRequestError(
                f"model {base_model!r} is not served here: give one of {served} "
                "or a tinker://.../sampler_weights/... path"
            )
        return self.service.sampling.weights(owner, base_model, None)

    def tokenizer(self, weights: SamplerWeights) -> Any:
        return self.service.base_model(weights.base_model).tokenizer

    def eos_token_ids(self, weights: SamplerWeights) -> set[int]:
        return eos_token_ids(self.service.base_model(weights.base_model))

    def sample_many(self, *args: Any, **options: Any) -> list[Future[SampleResponse]]:
        """The service's one admission path for every sample (`Sampling.sample_many`)."""
        return self.service.sampling.sample_many(*args, **options)

    def models(self, owner: str) -> list[str]:
        listed = self.service.catalog.list_user_checkpoints(owner, MAX_LISTED_CHECKPOINTS)
        paths = [c.tinker_path for c in listed.checkpoints if c.checkpoint_type == "sampler"]
        return [*(self.service.served_models or []), *paths]


def inference_router(server: Any) -> APIRouter:
    """The OpenAI (`/oai/api/v1`) and Anthropic (`/anthropic/api`) routes over `server`."""
    backend = ServerBackend(server)
    router = APIRouter()
    router.include_router(openai_router(backend))
    router.include_router(anthropic_router(backend))
    return router

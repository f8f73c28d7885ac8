"""Sampling: weights to sample from (a base model, or a checkpoint the caller may read),
sampling sessions on them, and sample requests.

Samples do not go through the scheduler's lanes: the engine's sampler batches
concurrent requests itself. They still count against the service's `max_pending`.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from tinkerd.types import SampleResponse, SamplingParams

if TYPE_CHECKING:
    from tinkerd.service.service import Service


class Sampling:
    def __init__(self, service: Service):
        self.service = service  # its store, catalog and sessions open only when needed
        self.engine = service.engine

    def weights(self, owner: str | None, base_model: str | None, model_path: str | None) -> Any:
        """The engine's SamplerWeights of a base model or of a sampler checkpoint."""
        if model_path is not None:
            if owner is not None:  # its own, or published; the local caller reads any
                self.service.catalog.readable(model_path, owner)
        elif base_model is not None:
            self.service.check_base(base_model)
        return self.engine.sampler_for(base_model=base_model, model_path=model_path)

    def sample(
        self,
        weights: Any,
        prompt: list[int],
        num_samples: int,
        params: SamplingParams,
        prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        owner: str | None = None,
    ) -> Future[SampleResponse]:
        """Validates now (bad input raises, never a failed future), then samples; counts
        against `owner`'s queued requests (429 over its limit)."""
        self.service.queue.check_room(owner)
        future = self.engine.sample(
            weights,
            prompt,
            num_samples,
            params,
            prompt_logprobs,
            topk_prompt_logprobs,
            topk_sample_logprobs,
        )
        return self.service.queue.submit(None, lambda: future, tenant=owner)

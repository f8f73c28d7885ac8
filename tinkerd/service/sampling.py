"""Sampling: weights to sample from (a base model, or a checkpoint the caller may read),
sampling sessions on them, and sample requests.

Samples do not go through the scheduler's lanes: the engine's sampler batches
concurrent requests itself, taking turns by API key. Every sample, whatever the route
(SamplingClient, compute_logprobs, the OpenAI and Anthropic APIs), is admitted here by
`sample_many`: validated, then counted against the server's `max_pending` and the key's
`max_queued_per_key` as a whole before any of it reaches the sampler (429 beyond), and
handed to the sampler with its key.
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
        options = dict(
            prompt_logprobs=prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
            topk_sample_logprobs=topk_sample_logprobs,
        )
        (future,) = self.sample_many(owner, weights, [prompt], num_samples, params, **options)
        return future

    def sample_many(
        self,
        owner: str | None,
        weights: Any,
        prompts: list[list[int]],
        num_samples: int,
        params: SamplingParams,
        listeners: list[Any] | None = None,
        **options: Any,
    ) -> list[Future[SampleResponse]]:
        """One future per prompt: every prompt validated first (InvalidRequestError), then
        all admitted or none (429: the server's or `owner`'s queue bound), then queued in
        the sampler as `owner`'s. `listeners[i]` hears prompt i's tokens as they are
        sampled (`SampleSpec.listener`); `options`: prompt/top-k logprobs. Cancelling a
        future stops its decoding."""
        listeners = listeners or [None] * len(prompts)
        self.service.queue.check_room(owner, len(prompts))  # refuse before validating
        starts = [
            self.engine.prepare_sample(
                weights, prompt, num_samples, params, tenant=owner, listener=listener, **options
            )
            for prompt, listener in zip(prompts, listeners)
        ]
        return self.service.queue.submit_all(starts, tenant=owner)

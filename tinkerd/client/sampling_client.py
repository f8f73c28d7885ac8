"""SamplingClient: generate from a base model or from saved sampler weights."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

from tinkerd.client.futures import APIFuture, failed
from tinkerd.client.transport import SamplerRef, Transport
from tinkerd.errors import InvalidRequestError
from tinkerd.requests import CreateSamplingSessionRequest, SampleRequest, WeightsInfoRequest
from tinkerd.types import ModelInput, SampleResponse, SamplingParams, chunk_from


def coerce_prompt(prompt: Any) -> ModelInput:
    """Our ModelInput, a list of token ids, or any ModelInput-like object (the SDK's)."""
    if isinstance(prompt, ModelInput):
        return prompt
    if isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)):
        return ModelInput.from_ints([int(t) for t in prompt])
    if hasattr(prompt, "chunks"):
        return ModelInput(chunks=[chunk_from(c) for c in prompt.chunks])
    raise InvalidRequestError(f"prompt must be a ModelInput, got {type(prompt).__name__}")


class SamplingClient:
    """Samples from one fixed weight version. Requests from every client on the same base
    model are decoded together in one batch, each with its own adapter."""

    def __init__(self, transport: Transport, sampler: SamplerRef | APIFuture[SamplerRef]):
        self._transport = transport
        self._sampler = sampler
        self._lock = threading.Lock()
        self._tokenizer = None

    def _ref(self) -> SamplerRef:
        with self._lock:
            if isinstance(self._sampler, APIFuture):
                self._sampler = self._sampler.result()
            ref = self._sampler
            if not ref.sampler_id and ref.model_path:  # saved by name over HTTP: open a session
                opened = open_sampler(self._transport, None, ref.model_path).result()
                self._sampler = dataclasses.replace(opened, base_model=ref.base_model)
            return self._sampler

    def result(self, timeout: float | None = None) -> SamplingClient:
        """This client (newer SDKs return a future of it; code may call `.result()`)."""
        return self

    @property
    def model_path(self) -> str | None:
        return self._ref().model_path

    def get_base_model(self) -> str:
        return self._ref().base_model

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
    ) -> APIFuture[SampleResponse]:
        """`num_samples` completions of `prompt`. Each sequence has its tokens, the logprob
        of each (under the model at temperature 1) and a stop_reason; `prompt_logprobs`
        `[prompt_len]` (None at position 0) when asked."""
        try:
            params = (
                sampling_params
                if isinstance(sampling_params, SamplingParams)
                else SamplingParams.model_validate(_as_dict(sampling_params))
            )
            request = SampleRequest(
                sampling_session_id=self._ref().sampler_id,
                prompt=coerce_prompt(prompt),
                num_samples=num_samples,
                sampling_params=params.model_dump(),
                prompt_logprobs=include_prompt_logprobs,
                topk_prompt_logprobs=topk_prompt_logprobs,
                topk_sample_logprobs=topk_sample_logprobs,
            )
        except (InvalidRequestError, ValueError) as e:
            return failed(e if isinstance(e, InvalidRequestError) else InvalidRequestError(str(e)))
        return APIFuture(self._transport.submit(request))

    async def sample_async(self, *args: Any, **kwargs: Any) -> SampleResponse:
        return await self.sample(*args, **kwargs)

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """Logprob of each prompt token given the ones before it `[prompt_len]`; None at 0."""
        future = self.sample(
            prompt, 1, SamplingParams(max_tokens=1, stop=[]), include_prompt_logprobs=True
        )
        return future.then(lambda response: response.prompt_logprobs)

    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        return await self.compute_logprobs(prompt)

    def get_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                ref = self._sampler if isinstance(self._sampler, SamplerRef) else None
                base = ref.base_model if ref else None
            else:
                return self._tokenizer
        base = base or self.get_base_model()
        tokenizer = self._transport.get_tokenizer(None, base)
        with self._lock:
            self._tokenizer = tokenizer
        return tokenizer


def open_sampler(
    transport: Transport, base_model: str | None, model_path: str | None
) -> APIFuture[SamplerRef]:
    """A sampling session on a base model as it is, or on saved sampler weights."""
    request = CreateSamplingSessionRequest(base_model=base_model, model_path=model_path)

    def ref(opened: Any) -> SamplerRef:
        base = opened.base_model or base_model
        if base is None:  # a server that does not say: the checkpoint does
            info = WeightsInfoRequest(tinker_path=model_path)
            base = transport.submit(info).result().base_model
        return SamplerRef(opened.sampling_session_id, base, model_path)

    return APIFuture(transport.submit(request)).then(ref)


def _as_dict(params: Any) -> dict:
    if isinstance(params, dict):
        return params
    if hasattr(params, "model_dump"):
        return params.model_dump(exclude_none=True)
    raise InvalidRequestError(f"sampling_params must be SamplingParams, got {type(params)}")

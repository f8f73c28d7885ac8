"""TrainingClient: the Tinker training API on one LoRA run.

Every request method returns an `APIFuture` at once and requests run in submission
order, so a loop can queue `forward_backward` and `optim_step` before waiting on either.
The `_async` twins do the same from async code (they return once the request is queued).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from tinkerd.client.futures import APIFuture, failed
from tinkerd.client.sampling_client import SamplingClient, open_sampler
from tinkerd.client.transport import SamplerRef, Transport
from tinkerd.custom_loss import LossFn, RegularizerSpec, check_regularizers
from tinkerd.errors import InvalidRequestError, ModelUnloadedError
from tinkerd.requests import (
    ForwardBackwardCustomRequest,
    ForwardBackwardRequest,
    GetInfoRequest,
    LoadWeightsRequest,
    OptimStepRequest,
    Request,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    UnloadModelRequest,
)
from tinkerd.types import (
    OPTIMIZERS,
    AdamParams,
    CustomLossOutput,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    LoraConfig,
    ModelInput,
    OptimParams,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    TensorData,
    UnloadModelResponse,
    chunk_from,
    optim_params_from,
    optimizer_of_params,
)


def coerce_datum(item: Any) -> Datum:
    """Accept our Datum, a dict, or any Datum-like object (e.g. the official SDK's)."""
    if isinstance(item, Datum):
        return item
    if isinstance(item, Mapping):
        return Datum.model_validate(item)
    model_input = getattr(item, "model_input", None)
    inputs = getattr(item, "loss_fn_inputs", None)
    if model_input is None or inputs is None:
        raise InvalidRequestError(f"expected a Datum, got {type(item).__name__}")
    chunks = [chunk_from(c) for c in model_input.chunks]
    converted = {
        k: v if isinstance(v, TensorData) else (v.to_numpy() if hasattr(v, "to_numpy") else v)
        for k, v in inputs.items()
    }
    return Datum(model_input=ModelInput(chunks=chunks), loss_fn_inputs=converted)


def coerce_data(data: Sequence[Any]) -> list[Datum]:
    if isinstance(data, (Datum, str, bytes)) or not isinstance(data, Sequence):
        raise InvalidRequestError("data must be a list of Datum")
    return [coerce_datum(d) for d in data]


class TrainingClient:
    def __init__(self, transport: Transport, model_id: str, base_model: str, lora: LoraConfig):
        self._transport = transport
        self.model_id = model_id
        self.base_model = base_model
        self.lora_config = lora
        self._unloaded = False
        self._tokenizer = None
        self._tokenizer_lock = threading.Lock()

    def _submit(self, request_type: type[Request], **fields: Any) -> APIFuture[Any]:
        """Build the request on this run and hand it to the transport; bad arguments give
        a failed future, never an exception."""
        if self._unloaded:
            return failed(ModelUnloadedError(f"model {self.model_id!r} was unloaded"))
        try:
            request = request_type(model_id=self.model_id, **fields)
        except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
            return failed(InvalidRequestError(str(e)))
        return APIFuture(self._transport.submit(request))

    def _submit_loss(
        self,
        data: Sequence[Any],
        loss_fn: str,
        loss_fn_config: Mapping[str, float] | None,
        forward_only: bool,
    ) -> APIFuture[ForwardBackwardOutput]:
        try:
            data = coerce_data(data)
        except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
            return failed(InvalidRequestError(str(e)))
        config = None if loss_fn_config is None else dict(loss_fn_config)
        return self._submit(
            ForwardBackwardRequest,
            data=data,
            loss_fn=loss_fn,
            loss_fn_config=config,
            forward_only=forward_only,
        )

    # ---------------------------------------------------------------- training

    def forward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Per-token `logprobs` `[seq_len]` and the loss (`loss:sum`), with no gradient."""
        return self._submit_loss(data, loss_fn, loss_fn_config, forward_only=True)

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Like `forward`, and adds the gradient of the summed loss to the run's gradient
        (gradients accumulate across calls until `optim_step`)."""
        return self._submit_loss(data, loss_fn, loss_fn_config, forward_only=False)

    def forward_backward_custom(
        self,
        data: Sequence[Datum],
        loss_fn: LossFn | None,
        *,
        regularizers: Sequence[RegularizerSpec] | None = None,
        track_grad_norms: bool = False,
        run_sync_in_executor: bool = False,
    ) -> APIFuture[CustomLossOutput]:
        """Train on `loss_fn(data, logprobs_list) -> (loss, metrics)` plus
        `sum(weight * regularizer)`, computed on the per-token logprobs of `data`.

        Embedded, and over HTTP with uploaded losses (`create_custom_loss` handles): one
        forward and one backward through the live graph. Over HTTP with plain functions:
        Tinker's two phases (forward; then cross_entropy with weights =
        -d(total)/d(logprobs)).
        The result breaks the total down per term (values, contributions and, with
        `track_grad_norms`, the L2 norm of each term's gradient w.r.t. the logprobs).
        Async functions are awaited concurrently; with `run_sync_in_executor`, plain
        ones run in parallel threads. If any term fails, no gradient is applied."""
        try:
            data = coerce_data(data)
            check_regularizers(loss_fn, regularizers)
        except (ValueError, TypeError) as e:
            return failed(e if isinstance(e, InvalidRequestError) else InvalidRequestError(str(e)))
        return self._submit(
            ForwardBackwardCustomRequest,
            data=data,
            loss_fn=loss_fn,
            regularizers=list(regularizers or []),
            track_grad_norms=track_grad_norms,
            run_sync_in_executor=run_sync_in_executor,
        )

    async def forward_backward_custom_async(
        self, *args: Any, **kwargs: Any
    ) -> APIFuture[CustomLossOutput]:
        return self.forward_backward_custom(*args, **kwargs)

    def optim_step(
        self, optim_params: OptimParams | None = None, *, adam_params: AdamParams | None = None
    ) -> APIFuture[OptimStepResponse]:
        """One step of the run's optimizer on the accumulated gradient: AdamParams for a
        run created with AdamW (the default), DimuonParams for one created with
        DimuonOptimizerConfig (ours or the official SDK's). Metrics carry the pre-clip
        `grad_norm`."""
        if optim_params is not None and adam_params is not None:
            return failed(InvalidRequestError("pass optim_params or adam_params, not both"))
        try:
            params = optim_params_from(optim_params or adam_params or AdamParams())
        except InvalidRequestError as e:
            return failed(e)
        wire_field = OPTIMIZERS[optimizer_of_params(params)].wire_field
        return self._submit(OptimStepRequest, **{wire_field: params})

    def unload_model(self) -> APIFuture[UnloadModelResponse]:
        """Free this run's adapter and optimizer state on the engine; later calls fail."""
        future = self._submit(UnloadModelRequest)
        self._unloaded = True
        return future

    async def forward_async(self, *args: Any, **kwargs: Any) -> APIFuture[ForwardBackwardOutput]:
        return self.forward(*args, **kwargs)

    async def forward_backward_async(
        self, *args: Any, **kwargs: Any
    ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward(*args, **kwargs)

    async def optim_step_async(self, *args: Any, **kwargs: Any) -> APIFuture[OptimStepResponse]:
        return self.optim_step(*args, **kwargs)

    async def unload_model_async(self) -> APIFuture[UnloadModelResponse]:
        return self.unload_model()

    # ---------------------------------------------------------------- checkpoints

    def save_state(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[SaveWeightsResponse]:
        """Save weights and optimizer state, as they are after every request made so far,
        durably at `tinker://<model_id>/weights/<name>` (a PEFT adapter directory);
        deleted `ttl_seconds` after the save if given."""
        return self._submit(SaveWeightsRequest, path=name, ttl_seconds=ttl_seconds)

    def load_state(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Replace the weights with a checkpoint's; the optimizer state starts afresh."""
        return self._submit(LoadWeightsRequest, path=path, optimizer=False)

    def load_state_with_optimizer(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Replace weights and optimizer state with a checkpoint's (saved by a run with the
        same optimizer): training resumes exactly."""
        return self._submit(LoadWeightsRequest, path=path, optimizer=True)

    async def save_state_async(self, *args: Any, **kwargs: Any) -> APIFuture[SaveWeightsResponse]:
        return self.save_state(*args, **kwargs)

    async def load_state_async(self, path: str) -> APIFuture[LoadWeightsResponse]:
        return self.load_state(path)

    async def load_state_with_optimizer_async(self, path: str) -> APIFuture[LoadWeightsResponse]:
        return self.load_state_with_optimizer(path)

    # ---------------------------------------------------------------- sampling

    def save_weights_for_sampler(self, name: str) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Freeze the weights as they are after every request made so far, for sampling
        at `tinker://<model_id>/sampler_weights/<name>`."""
        return self._submit(SaveWeightsForSamplerRequest, path=name).then(
            lambda saved: SaveWeightsForSamplerResponse(
                path=saved.path, type="save_weights_for_sampler"
            )
        )

    async def save_weights_for_sampler_async(
        self, name: str
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        return self.save_weights_for_sampler(name)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """A SamplingClient on the weights as they are after every request made so far.
        Without a name the weights are ephemeral: kept while recently used, never on disk."""
        future = self._submit(SaveWeightsForSamplerRequest, path=name)
        ref = lambda saved: SamplerRef(  # noqa: E731
            saved.sampling_session_id or "", self.base_model, saved.path
        )
        return SamplingClient(self._transport, future.then(ref))

    async def save_weights_and_get_sampling_client_async(
        self, name: str | None = None
    ) -> SamplingClient:
        client = self.save_weights_and_get_sampling_client(name)
        await client._sampler  # type: ignore[misc]  # the save itself
        return client

    def create_sampling_client(self, model_path: str) -> SamplingClient:
        return SamplingClient(self._transport, open_sampler(self._transport, None, model_path))

    # ---------------------------------------------------------------- info

    def result(self, timeout: float | None = None) -> TrainingClient:
        """This client. Code written for the official SDK, whose
        `create_lora_training_client` returns a future, can call `.result()` unchanged."""
        return self

    def get_info(self) -> GetInfoResponse:
        return self._submit(GetInfoRequest).result()

    async def get_info_async(self) -> GetInfoResponse:
        return await self._submit(GetInfoRequest)

    def get_tokenizer(self) -> Any:
        """The base model's Hugging Face tokenizer (loaded once per client)."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = self._transport.get_tokenizer(self.model_id, self.base_model)
            return self._tokenizer

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.get_tokenizer().encode(text, add_special_tokens=add_special_tokens)

    def decode(self, tokens: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.get_tokenizer().decode(list(tokens), skip_special_tokens=skip_special_tokens)

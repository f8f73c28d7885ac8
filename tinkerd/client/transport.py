"""Transports: how a client's requests reach an engine.

Every request method returns a `concurrent.futures.Future` at once; the clients wrap it
in an `APIFuture`. `InProcessTransport` hands requests to the service (tinkerd/service)
on an engine in this process; the HTTP transport speaks Tinker's wire protocol to a
`tinkerd serve` (or any Tinker) server, which hands them to its own service.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tinkerd.types import (
    CustomLossOutput,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoraConfig,
    ModelInput,
    OptimizerConfig,
    OptimParams,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    UnloadModelResponse,
    prompt_tokens,
)

if TYPE_CHECKING:
    from tinkerd.client.rest_client import RestBackend


@dataclass(frozen=True)
class SamplerRef:
    """Weights a SamplingClient samples from, as the transport names them."""

    sampler_id: str
    """In-process: the engine's sampler id; HTTP: the sampling session id."""
    base_model: str
    model_path: str | None = None


@dataclass(frozen=True)
class SampleOptions:
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0


class Transport(Protocol):
    def get_server_capabilities(self) -> Future[GetServerCapabilitiesResponse]: ...

    def create_model(
        self, base_model: str, lora_config: LoraConfig, optimizer_config: OptimizerConfig | None
    ) -> Future[str]:
        """A new run, trained with `optimizer_config` (None: AdamW)."""
        ...

    def get_info(self, model_id: str) -> Future[GetInfoResponse]: ...

    def forward(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float] | None,
    ) -> Future[ForwardBackwardOutput]: ...

    def forward_backward(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float] | None,
    ) -> Future[ForwardBackwardOutput]: ...

    def forward_backward_custom(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: Any,
        regularizers: list[Any],
        track_grad_norms: bool,
        run_sync_in_executor: bool,
    ) -> Future[CustomLossOutput]:
        """Train on `loss_fn` plus weighted `regularizers` (RegularizerSpec) evaluated on
        the per-token logprobs of `data` (custom_loss.gradient_fn). Uploaded losses
        (LossHandle) may run on the server; if any term fails, no gradient is applied."""
        ...

    def create_custom_loss(self, handle: Any) -> Future[Any]:
        """Make a traced loss (a LossHandle) usable: upload it, or keep it local."""
        ...

    def optim_step(self, model_id: str, params: OptimParams) -> Future[OptimStepResponse]: ...

    def unload_model(self, model_id: str) -> Future[UnloadModelResponse]: ...

    def save_state(self, model_id: str, name: str) -> Future[str]:
        """Save weights and optimizer state (after every earlier request of the run);
        the future gives the checkpoint's tinker path."""
        ...

    def load_state(self, model_id: str, path: str, with_optimizer: bool) -> Future[None]: ...

    def create_model_from_state(
        self, path: str, with_optimizer: bool, optimizer_config: OptimizerConfig | None
    ) -> Future[tuple[str, str, LoraConfig]]:
        """A new run loaded from a checkpoint: (model_id, base_model, lora_config); its
        optimizer the checkpoint's if `with_optimizer`, else `optimizer_config`."""
        ...

    def save_weights_for_sampler(self, model_id: str, name: str | None) -> Future[SamplerRef]:
        """Freeze the run's weights (after every earlier request of the run) for sampling."""
        ...

    def create_sampler(
        self, base_model: str | None, model_path: str | None
    ) -> Future[SamplerRef]: ...

    def sample(
        self,
        sampler: SamplerRef,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        options: SampleOptions,
    ) -> Future[SampleResponse]: ...

    def get_tokenizer(self, model_id: str | None, base_model: str) -> Any: ...

    def rest_backend(self) -> RestBackend:
        """Where a RestClient of this transport goes: the same server, or data dir."""
        ...

    def close(self) -> None: ...


def failed_future(error: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future


def _ref(weights: Any) -> SamplerRef:
    """The client's view of the engine's SamplerWeights."""
    return SamplerRef(weights.sampler_id, weights.base_model, weights.model_path)


def _call(fn: Callable[..., Any], *args: Any) -> Future:
    """`fn(*args)`'s Future (or its result, as a done one); what it raises, as a failed one."""
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 -- a client sees every failure in its future
        return failed_future(e)
    if isinstance(result, Future):
        return result
    done: Future = Future()
    done.set_result(result)
    return done


def chained(future: Future, fn: Callable[[Any], Any]) -> Future:
    """A future of `fn(future's result)`; errors pass through."""
    out: Future = Future()

    def relay(source: Future) -> None:
        try:
            out.set_result(fn(source.result()))
        except BaseException as e:  # noqa: BLE001 -- delivered to whoever waits
            out.set_exception(e)

    future.add_done_callback(relay)
    return out


class InProcessTransport:
    """A thin adapter over the process's embedded Service on an engine (one per engine:
    `Service.for_engine`), so the runs of every embedded client on it are scheduled
    together: a run's requests run in order, runs take turns, and concurrent
    forward_backward calls of several runs share a pass. The caller is the local owner:
    no API key, no session."""

    def __init__(self, engine: Any = None, cache_dir: Path | None = None, service: Any = None):
        """`service`: a Service of its own (e.g. with another ServiceConfig) instead of
        the engine's shared one."""
        from tinkerd.service import Service, default_engine  # lazy: client imports no engine

        if service is not None:
            engine = service.engine
        elif engine is None:
            engine = default_engine() if cache_dir is None else _engine(cache_dir)
        self.engine = engine
        self.service = service or Service.for_engine(engine)

    def get_server_capabilities(self) -> Future[GetServerCapabilitiesResponse]:
        return _call(self.service.get_server_capabilities)

    def create_model(
        self, base_model: str, lora_config: LoraConfig, optimizer_config: OptimizerConfig | None
    ) -> Future[str]:
        create = self.service.create_model
        return _call(
            lambda: create(None, base_model, lora_config, optimizer_config=optimizer_config)
        )

    def get_info(self, model_id: str) -> Future[GetInfoResponse]:
        return _call(self.service.get_info, None, model_id)

    def forward(self, model_id, data, loss_fn, loss_fn_config) -> Future[ForwardBackwardOutput]:
        return _call(self.service.forward, None, model_id, data, loss_fn, loss_fn_config)

    def forward_backward(
        self, model_id, data, loss_fn, loss_fn_config
    ) -> Future[ForwardBackwardOutput]:
        return _call(self.service.forward_backward, None, model_id, data, loss_fn, loss_fn_config)

    def forward_backward_custom(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: Any,
        regularizers: list[Any],
        track_grad_norms: bool,
        run_sync_in_executor: bool,
    ) -> Future[CustomLossOutput]:
        # One forward and one backward on the live graph, in the run's turn.
        return _call(
            self.service.forward_backward_custom,
            None,
            model_id,
            data,
            loss_fn,
            regularizers,
            track_grad_norms,
            run_sync_in_executor,
        )

    def create_custom_loss(self, handle: Any) -> Future[Any]:
        # Already checked and compiled by the tracer; it runs inside this process's engine.
        handle.loss_id = f"local:{handle.name}"
        return _call(lambda: handle)

    def optim_step(self, model_id: str, params: OptimParams) -> Future[OptimStepResponse]:
        return _call(self.service.optim_step, None, model_id, params)

    def unload_model(self, model_id: str) -> Future[UnloadModelResponse]:
        return _call(self.service.unload_model, None, model_id)

    def save_state(self, model_id: str, name: str) -> Future[str]:
        return _call(self.service.save_state, None, model_id, name)

    def load_state(self, model_id: str, path: str, with_optimizer: bool) -> Future[None]:
        return _call(self.service.load_state, None, model_id, path, with_optimizer)

    def create_model_from_state(
        self, path: str, with_optimizer: bool, optimizer_config: OptimizerConfig | None
    ) -> Future[tuple[str, str, LoraConfig]]:
        create = self.service.create_model_from_state
        return _call(lambda: create(None, path, with_optimizer, optimizer_config=optimizer_config))

    def save_weights_for_sampler(self, model_id: str, name: str | None) -> Future[SamplerRef]:
        future = _call(self.service.save_weights_for_sampler, None, model_id, name)
        return chained(future, lambda saved: _ref(saved[0]))

    def create_sampler(self, base_model: str | None, model_path: str | None) -> Future[SamplerRef]:
        return _call(lambda: _ref(self.service.sampling.weights(None, base_model, model_path)))

    def sample(
        self,
        sampler: SamplerRef,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        options: SampleOptions,
    ) -> Future[SampleResponse]:
        def start() -> Future[SampleResponse]:
            return self.service.sampling.sample(
                self.engine.get_sampler(sampler.sampler_id),
                prompt_tokens(prompt),
                num_samples,
                sampling_params,
                options.include_prompt_logprobs,
                options.topk_prompt_logprobs,
                options.topk_sample_logprobs,
            )

        return _call(start)

    def get_tokenizer(self, model_id: str | None, base_model: str) -> Any:
        return self.engine.base_model(base_model).tokenizer

    def rest_backend(self) -> RestBackend:
        """The data directory's runs and checkpoints, plus the live embedded runs."""
        from tinkerd.service.local_rest import LocalRest

        return LocalRest(self.service.catalog)

    def close(self) -> None:
        """Nothing to free: the service is shared by every embedded client of the engine."""


def _engine(cache_dir: Path) -> Any:
    from tinkerd.engine import Engine

    return Engine(cache_dir=cache_dir)

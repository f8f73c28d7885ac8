"""Transports: how a client's requests reach an engine.

Every request method returns a `concurrent.futures.Future` at once; the clients wrap it
in an `APIFuture`. `InProcessTransport` queues work on an engine in this process; the
HTTP transport speaks Tinker's wire protocol to a `tinkerd serve` (or any Tinker) server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from tinkerd.server.scheduler import Scheduler, loss_work
from tinkerd.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoraConfig,
    ModelInput,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    UnloadModelResponse,
)

GradientFn = Callable[[list[Tensor]], tuple[list[Tensor], Any]]


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

    def create_model(self, base_model: str, lora_config: LoraConfig) -> Future[str]: ...

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
        self, model_id: str, data: list[Datum], gradient_fn: GradientFn
    ) -> Future[tuple[ForwardBackwardOutput, Any]]:
        """Forward `data`, call `gradient_fn(per-datum logprobs) -> (d loss/d logprobs,
        extra)`, and backpropagate that gradient into the run; returns (output, extra).
        If gradient_fn raises, the run receives no gradient."""
        ...

    def optim_step(self, model_id: str, adam_params: AdamParams) -> Future[OptimStepResponse]: ...

    def unload_model(self, model_id: str) -> Future[UnloadModelResponse]: ...

    def save_state(self, model_id: str, name: str) -> Future[str]:
        """Save weights and optimizer state (after every earlier request of the run);
        the future gives the checkpoint's tinker path."""
        ...

    def load_state(self, model_id: str, path: str, with_optimizer: bool) -> Future[None]: ...

    def create_model_from_state(
        self, path: str, with_optimizer: bool
    ) -> Future[tuple[str, str, LoraConfig]]:
        """A new run loaded from a checkpoint: (model_id, base_model, lora_config)."""
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

    def close(self) -> None: ...


def failed_future(error: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future


def _ref(weights: Any) -> SamplerRef:
    """The client's view of the engine's SamplerWeights."""
    return SamplerRef(weights.sampler_id, weights.base_model, weights.model_path)


_default_engine = None
_default_lock = threading.Lock()


def default_engine():
    """The process-wide embedded engine: every in-process client shares its base models."""
    global _default_engine
    with _default_lock:
        if _default_engine is None:
            from tinkerd.engine import Engine

            _default_engine = Engine()
        return _default_engine


class InProcessTransport:
    """Runs requests on an engine in this process, through the same scheduler the server
    uses: one lane per base model, keyed by run, so a run's requests run in order, runs
    take turns, and concurrent forward_backward calls of several runs share a pass."""

    def __init__(self, engine=None, cache_dir: Path | None = None):
        from tinkerd.engine import Engine

        self.engine = engine or (Engine(cache_dir=cache_dir) if cache_dir else default_engine())
        self.scheduler = Scheduler()
        self._lanes: dict[str, str] = {}

    def _lane(self, model_id: str) -> str:
        return self._lanes.get(model_id, "default")

    def _submit(self, model_id: str, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue `fn(*args)` behind the run's earlier requests (never unkeyed: every
        request of a run must take the run's turns)."""
        return self.scheduler.submit_keyed(self._lane(model_id), model_id, lambda: fn(*args))

    def _loss(self, model_id, data, loss_fn, loss_fn_config, backward: bool) -> Future:
        try:  # bad input fails now, before it queues
            request = self.engine.prepare(model_id, data, loss_fn, loss_fn_config)
        except Exception as e:
            return failed_future(e)
        work = loss_work(self.engine, request, backward)
        return self.scheduler.submit_keyed(self._lane(model_id), model_id, work)

    def get_server_capabilities(self) -> Future[GetServerCapabilitiesResponse]:
        return self.scheduler.submit("control", self.engine.get_server_capabilities)

    def create_model(self, base_model: str, lora_config: LoraConfig) -> Future[str]:
        def create() -> str:
            model_id = self.engine.create_model(base_model, lora_config)
            self._lanes[model_id] = base_model  # before the caller can see the id
            return model_id

        return self.scheduler.submit(base_model, create)

    def get_info(self, model_id: str) -> Future[GetInfoResponse]:
        return self._submit(model_id, self.engine.get_info, model_id)

    def forward(self, model_id, data, loss_fn, loss_fn_config) -> Future[ForwardBackwardOutput]:
        return self._loss(model_id, data, loss_fn, loss_fn_config, backward=False)

    def forward_backward(
        self, model_id, data, loss_fn, loss_fn_config
    ) -> Future[ForwardBackwardOutput]:
        return self._loss(model_id, data, loss_fn, loss_fn_config, backward=True)

    def forward_backward_custom(
        self, model_id: str, data: list[Datum], gradient_fn: GradientFn
    ) -> Future[tuple[ForwardBackwardOutput, Any]]:
        # One forward and one backward on the live graph, run in the run's lane.
        return self._submit(
            model_id, self.engine.forward_backward_custom, model_id, data, gradient_fn
        )

    def optim_step(self, model_id: str, adam_params: AdamParams) -> Future[OptimStepResponse]:
        return self._submit(model_id, self.engine.optim_step, model_id, adam_params)

    def unload_model(self, model_id: str) -> Future[UnloadModelResponse]:
        return self._submit(model_id, self.engine.unload_model, model_id)

    def save_state(self, model_id: str, name: str) -> Future[str]:
        return self._submit(model_id, lambda: self.engine.save_state(model_id, name).tinker_path)

    def load_state(self, model_id: str, path: str, with_optimizer: bool) -> Future[None]:
        return self._submit(model_id, self.engine.load_state, model_id, path, with_optimizer)

    def create_model_from_state(
        self, path: str, with_optimizer: bool
    ) -> Future[tuple[str, str, LoraConfig]]:
        try:
            base_model = self.engine.weights_info(path).base_model
        except Exception as e:
            return failed_future(e)

        def create() -> tuple[str, str, LoraConfig]:
            model_id = self.engine.create_model_from_state(path, with_optimizer)
            self._lanes[model_id] = base_model
            return model_id, base_model, self.engine.run(model_id).lora

        return self.scheduler.submit(base_model, create)

    def save_weights_for_sampler(self, model_id: str, name: str | None) -> Future[SamplerRef]:
        def save() -> SamplerRef:
            return _ref(self.engine.save_weights_for_sampler(model_id, name))

        return self._submit(model_id, save)

    def create_sampler(self, base_model: str | None, model_path: str | None) -> Future[SamplerRef]:
        def create() -> SamplerRef:
            return _ref(self.engine.sampler_for(base_model=base_model, model_path=model_path))

        return self.scheduler.submit("control", create)

    def sample(
        self,
        sampler: SamplerRef,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        options: SampleOptions,
    ) -> Future[SampleResponse]:
        # Not through the lanes: the engine's sampler batches concurrent requests itself.
        try:
            weights = self.engine.get_sampler(sampler.sampler_id)
            return self.engine.sample(
                weights,
                prompt.to_ints(),
                num_samples,
                sampling_params,
                options.include_prompt_logprobs,
                options.topk_prompt_logprobs,
                options.topk_sample_logprobs,
            )
        except Exception as e:
            return failed_future(e)

    def get_tokenizer(self, model_id: str | None, base_model: str) -> Any:
        return self.engine.base_model(base_model).tokenizer

    def create_custom_loss(self, handle: Any) -> Future[Any]:
        # Already checked and compiled by the tracer; it runs inside this process's engine.
        future: Future[Any] = Future()
        handle.loss_id = f"local:{handle.name}"
        future.set_result(handle)
        return future

    def close(self) -> None:
        self.scheduler.shutdown(wait=True)

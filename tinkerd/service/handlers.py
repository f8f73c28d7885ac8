"""One handler per request type: what the service does with each verb.

`Service.submit(caller, request)` looks the request's type up in `HANDLERS` and calls its
handler with the service and the caller (`caller.py`: its policy). A handler validates
completely (raising refuses the request, which then uses up its seq_id), then queues the
work in the run's lane (`service.run_work`) or answers at once. What a handler returns, or
its future gives, is the request's `response` type.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from tinkerd.custom_loss import check_regularizers, gradient_fn
from tinkerd.engine.engine import optimizer_for_state
from tinkerd.errors import InvalidRequestError
from tinkerd.futures import chained
from tinkerd.paths import tinker_path
from tinkerd.requests import (
    CreateCustomLossRequest,
    CreateModelFromStateRequest,
    CreateModelRequest,
    CreateSamplingSessionRequest,
    ForwardBackwardCustomRequest,
    ForwardBackwardRequest,
    GetInfoRequest,
    GetServerCapabilitiesRequest,
    LoadWeightsRequest,
    OptimStepRequest,
    Request,
    SampleRequest,
    SaveWeightsExternalRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    UnloadModelRequest,
    WeightsInfoRequest,
)
from tinkerd.service.access import check_age_recipients, check_ttl
from tinkerd.service.caller import LocalCaller
from tinkerd.service.scheduler import FollowUp, loss_work
from tinkerd.types import (
    CreateModelResponse,
    CreateSamplingSessionResponse,
    CustomLossOutput,
    LoadWeightsResponse,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerResponseInternal,
    SaveWeightsResponse,
    optim_params_from,
    optimizer_config_from,
    prompt_tokens,
)

if TYPE_CHECKING:
    from tinkerd.service.service import Service

Handler = Callable[["Service", LocalCaller, Any], Any]
HANDLERS: dict[type[Request], Handler] = {}


def handles(request_type: type[Request]) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        HANDLERS[request_type] = handler
        return handler

    return register


def _optimizer(config: Any) -> Any:
    return None if config is None else optimizer_config_from(config)


# ---------------------------------------------------------------- runs


@handles(GetServerCapabilitiesRequest)
def get_server_capabilities(service: Service, caller: LocalCaller, _: Any) -> Any:
    caps = service.engine.get_server_capabilities()
    if service.served_models is not None:
        for model in caps.supported_models:
            model.trainable = model.model_name in service.served_models
        caps.supported_models = [m for m in caps.supported_models if m.trainable]
    return caps


@handles(CreateModelRequest)
def create_model(service: Service, caller: LocalCaller, req: CreateModelRequest) -> Future:
    optimizer = _optimizer(req.optimizer_config)
    caller.check_base(service, req.base_model, req.lora_config)
    model_id = caller.new_run(service, req, req.base_model, req.lora_config.model_dump())
    create = lambda: service.engine.create_model(  # noqa: E731
        req.base_model, req.lora_config, model_id, optimizer
    )
    made = service.create(caller, req, model_id, req.base_model, create)
    return chained(made, lambda m: CreateModelResponse(model_id=m, type="create_model"))


@handles(CreateModelFromStateRequest)
def create_model_from_state(
    service: Service, caller: LocalCaller, req: CreateModelFromStateRequest
) -> Future:
    """A new run made from the checkpoint at `path`; its optimizer is the checkpoint's
    with `optimizer`, else `optimizer_config` (AdamW)."""
    info = caller.readable(service, req.path)
    if req.base_model not in (None, info.base_model):
        raise InvalidRequestError(
            f"{req.path} was trained on {info.base_model!r}, not {req.base_model!r}"
        )
    if req.optimizer and not info.has_optimizer:
        raise InvalidRequestError(f"{req.path} has no optimizer state")
    optimizer = optimizer_for_state(info, req.optimizer, _optimizer(req.optimizer_config))
    flags = {"train_mlp", "train_attn", "train_unembed"}
    lora = info.weights_info().model_dump(include=flags) | {"rank": info.lora_rank}
    model_id = caller.new_run(service, req, info.base_model, lora)
    create = lambda: service.engine.create_model_from_state(  # noqa: E731
        req.path, req.optimizer, model_id, optimizer
    )
    made = service.create(caller, req, model_id, info.base_model, create)
    return chained(
        made, lambda m: LoadWeightsResponse(path=req.path, model_id=m, type="load_weights")
    )


@handles(GetInfoRequest)
def get_info(service: Service, caller: LocalCaller, req: GetInfoRequest) -> Any:
    return service.engine.get_info(req.model_id)


@handles(UnloadModelRequest)
def unload_model(service: Service, caller: LocalCaller, req: UnloadModelRequest) -> Future:
    def work() -> Any:
        result = service.engine.unload_model(req.model_id)
        caller.run_unloaded(service, req.model_id)
        service.queue.forget_model(req.model_id)
        return result

    return service.run_work(caller, req, work)


@handles(WeightsInfoRequest)
def weights_info(service: Service, caller: LocalCaller, req: WeightsInfoRequest) -> Any:
    return caller.readable(service, req.tinker_path).weights_info()


# ---------------------------------------------------------------- training


def _tokens(data: list) -> int:
    return sum(d.model_input.positions for d in data)


@handles(ForwardBackwardRequest)
def forward_backward(service: Service, caller: LocalCaller, req: ForwardBackwardRequest) -> Future:
    """A built-in loss (may share a pass with other runs' requests), or `custom`: the
    losses the caller uploaded, named by `loss_fn_config`."""
    if req.loss_fn == "custom":
        if req.forward_only:
            raise InvalidRequestError("a custom loss runs in forward_backward, not forward")
        loss_fn, regularizers, track = service.losses.terms(
            caller.owner, req.loss_fn_config or {}, req.data
        )
        custom = ForwardBackwardCustomRequest(
            model_id=req.model_id,
            seq_id=req.seq_id,
            data=req.data,
            loss_fn=loss_fn,
            regularizers=regularizers,
            track_grad_norms=track,
        )
        return forward_backward_custom(service, caller, custom)
    engine = service.engine
    prepared = engine.prepare(req.model_id, req.data, req.loss_fn, req.loss_fn_config)
    work = loss_work(engine, prepared, backward=not req.forward_only)
    if not req.forward_only:
        work = caller.recorded(service, req.model_id, "forward_backward", work, _tokens(req.data))
    return service.run_work(caller, req, work)


@handles(ForwardBackwardCustomRequest)
def forward_backward_custom(
    service: Service, caller: LocalCaller, req: ForwardBackwardCustomRequest
) -> Future:
    """One forward and one backward of `loss_fn` plus weighted `regularizers`, evaluated
    on the live per-token logprobs (see custom_loss.py)."""
    check_regularizers(req.loss_fn, req.regularizers)
    service.engine.check_custom_data(req.model_id, req.data)
    grads = gradient_fn(
        req.data, req.loss_fn, req.regularizers, req.track_grad_norms, req.run_sync_in_executor
    )

    def work() -> CustomLossOutput:
        out, evaluation = service.engine.forward_backward_custom(req.model_id, req.data, grads)
        return evaluation.output(out)

    tokens = _tokens(req.data)
    return service.run_work(
        caller, req, caller.recorded(service, req.model_id, "forward_backward", work, tokens)
    )


@handles(CreateCustomLossRequest)
def create_custom_loss(service: Service, caller: LocalCaller, req: CreateCustomLossRequest) -> Any:
    """Compile an uploaded loss graph for the caller's session; its loss_id."""
    return {"loss_id": caller.add_loss(service, req.session_id, req.graph)}


@handles(OptimStepRequest)
def optim_step(service: Service, caller: LocalCaller, req: OptimStepRequest) -> Future:
    """One step of the run's optimizer: AdamParams or DimuonParams (ours, the SDK's or
    JSON), of the optimizer the run was created with, else a 400."""
    if req.adam_params is not None and req.optimizer_params is not None:
        raise InvalidRequestError("give adam_params or optimizer_params, not both")
    params = optim_params_from(req.adam_params or req.optimizer_params or {})
    service.engine.check_optim_params(req.model_id, params)

    def work() -> OptimStepResponse:
        return service.engine.optim_step(req.model_id, params)

    recorded = caller.recorded(service, req.model_id, "optim_step", work)
    return service.run_work(caller, req, FollowUp(recorded))  # right after its pass


# ---------------------------------------------------------------- checkpoints


@handles(SaveWeightsRequest)
def save_weights(service: Service, caller: LocalCaller, req: SaveWeightsRequest) -> Future:
    """Weights and optimizer state at tinker://<model_id>/weights/<path>; `ttl_seconds`:
    deleted that long after (None: kept); `user_metadata` listed with it."""
    path = tinker_path(req.model_id, "weights", req.path)  # a bad name fails now
    check_ttl(req.ttl_seconds)

    def work() -> SaveWeightsResponse:
        service.engine.save_state(req.model_id, req.path, req.overwrite, req.user_metadata)
        caller.expire_after(service, path, req.ttl_seconds)
        return SaveWeightsResponse(path=path, type="save_weights")

    return service.run_work(caller, req, work)


@handles(SaveWeightsExternalRequest)
def save_weights_external(
    service: Service, caller: LocalCaller, req: SaveWeightsExternalRequest
) -> Future:
    """The run's adapter in PEFT format (adapter_model.safetensors + adapter_config.json,
    no optimizer); with `age_encryption_recipients` (needs `pyrage`), every file is
    age-encrypted to them when downloaded."""
    path = tinker_path(req.model_id, "external_weights", req.path)
    recipients = req.age_encryption_recipients or []
    check_age_recipients(recipients)
    check_ttl(req.ttl_seconds)

    def work() -> SaveWeightsExternalResponse:
        run = service.engine.run(req.model_id)
        # Recipients first: a crash right after the save must not leave the adapter
        # downloadable unencrypted.
        if caller.owner is not None or recipients:  # (an embedded caller's store stays unopened)
            service.store.set_age_recipients(path, recipients)
        info = service.checkpoints.save(run, "external_weights", req.path, with_optimizer=False)
        caller.expire_after(service, path, req.ttl_seconds)
        return SaveWeightsExternalResponse(
            path=info.tinker_path, size_bytes=info.size_bytes, type="save_weights_external"
        )

    return service.run_work(caller, req, work)


@handles(LoadWeightsRequest)
def load_weights(service: Service, caller: LocalCaller, req: LoadWeightsRequest) -> Future:
    """Replace an existing run's weights (and optimizer state, with `optimizer`)."""
    if req.optimizer_config is not None:  # an existing run keeps its optimizer
        has = service.engine.get_info(req.model_id).optimizer_config
        wanted = optimizer_config_from(req.optimizer_config)
        if wanted != has:
            raise InvalidRequestError(
                f"model {req.model_id!r} uses the {has.type!r} optimizer; optimizer_config "
                f"{wanted.type!r} cannot change an existing model's"
            )
    caller.readable(service, req.path)

    def work() -> LoadWeightsResponse:
        service.engine.load_state(req.model_id, req.path, req.optimizer)
        return LoadWeightsResponse(path=req.path, model_id=req.model_id, type="load_weights")

    return service.run_work(caller, req, work)


# ---------------------------------------------------------------- sampling


@handles(SaveWeightsForSamplerRequest)
def save_weights_for_sampler(
    service: Service, caller: LocalCaller, req: SaveWeightsForSamplerRequest
) -> Future:
    """Freeze the run's weights (after its earlier requests) for sampling: kept as
    `path`, or ephemeral; with a `sampling_session_seq_id`, in a new sampling session."""
    name, seq = req.path, req.sampling_session_seq_id
    if name is None and (req.ttl_seconds is not None or req.user_metadata):
        raise InvalidRequestError(
            "ttl_seconds and user_metadata need a path (a name): ephemeral sampler weights "
            "are not a checkpoint"
        )
    if req.kind == "inflight" and (name is not None or seq is None):
        raise InvalidRequestError(
            "kind: inflight weights are unnamed: give a sampling_session_seq_id and no path "
            "(a path is always a snapshot)"
        )
    sampling_id = None if seq is None else f"{req.model_id}:sample:{seq}"
    caller.check_new_sampler(service, name, sampling_id)
    check_ttl(req.ttl_seconds)

    def work() -> SaveWeightsForSamplerResponseInternal:
        if req.kind == "inflight":  # the run's one mutable target, updated (sampling.md)
            weights = service.engine.save_weights_inflight(req.model_id)
        else:
            weights = service.engine.save_weights_for_sampler(req.model_id, name, req.user_metadata)
        if weights.model_path is not None:
            caller.expire_after(service, weights.model_path, req.ttl_seconds)
        session = caller.add_sampler(service, sampling_id, weights)
        return SaveWeightsForSamplerResponseInternal(
            path=weights.model_path, sampling_session_id=session, type="save_weights_for_sampler"
        )

    return service.run_work(caller, req, work)


@handles(CreateSamplingSessionRequest)
def create_sampling_session(
    service: Service, caller: LocalCaller, req: CreateSamplingSessionRequest
) -> Any:
    caller.check_session(service, req.session_id)
    weights = service.sampling.weights(caller.owner, req.base_model, req.model_path)
    sampling_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
    session = caller.add_sampler(service, sampling_id, weights)
    return CreateSamplingSessionResponse(
        sampling_session_id=session, base_model=weights.base_model, type="create_sampling_session"
    )


@handles(SampleRequest)
def sample(service: Service, caller: LocalCaller, req: SampleRequest) -> Future:
    if req.sampling_session_id is not None:
        weights = caller.sampler(service, req.sampling_session_id)
    else:
        weights = service.sampling.weights(caller.owner, req.base_model, req.model_path)
    if req.prompt_alt_tokens_k or req.target_prompt_logprobs is not None:
        raise InvalidRequestError(
            "prompt_alt_tokens_k and target_prompt_logprobs are not supported by tinkerd"
        )
    params = SamplingParams.model_validate(req.sampling_params.model_dump())
    prompt, last_n = prompt_tokens(req.prompt), req.prompt_logprobs_last_n
    if last_n is not None and not 1 <= last_n < len(prompt):
        raise InvalidRequestError(
            f"prompt_logprobs_last_n must be in [1, {len(prompt) - 1}], got {last_n}"
        )
    future = service.sampling.sample(
        weights,
        prompt,
        req.num_samples,
        params,
        bool(req.prompt_logprobs),
        req.topk_prompt_logprobs,
        req.topk_sample_logprobs,
        owner=caller.owner,
    )
    if req.sampling_session_id is not None:  # cancelled if its session ends first
        service.sessions.track_sample(req.sampling_session_id, future)
    return future if last_n is None else chained(future, lambda r: only_last(r, last_n))


def only_last(response: SampleResponse, last_n: int) -> SampleResponse:
    """Blank every prompt logprob but the last `last_n` (prompt_logprobs_last_n)."""
    blank = len(response.prompt_logprobs or []) - last_n
    if response.prompt_logprobs is not None:
        response.prompt_logprobs = [None] * blank + response.prompt_logprobs[blank:]
    if response.topk_prompt_logprobs is not None:
        response.topk_prompt_logprobs = [None] * blank + response.topk_prompt_logprobs[blank:]
    return response

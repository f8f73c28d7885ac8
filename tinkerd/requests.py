"""The request vocabulary: one typed, frozen request per verb, shared by every layer.

A client builds a request, a transport carries it (in-process: as is; HTTP: encoded to
its wire path), and the service hands it to the one handler of its type
(`tinkerd.service.handlers`). Fields are named as on Tinker's wire (these models are the
server's JSON request bodies), so the HTTP transport posts `model_dump()` and the server
parses the body straight into the request. What each verb needs to travel is declared on
its class:

- `route`: its POST path under /api/v1 ("" for a request that never travels as itself);
- `body`: "json", "protobuf" (forward_backward) or "local" (holds Python callables);
- `answer`: how its result travels, "json" or "protobuf";
- `queued`: answered with a request_id to long-poll (`retrieve_future`), else at once;
- `ordered`: carries the run's `seq_id`, so the run's requests run in the order made;
- `response`: the result's type.

Wire quirks of older SDKs (JSON forward_backward bodies, /load_weights doing two jobs)
are decoded at the server's edge into these requests. This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator

from tinkerd.paths import tinker_path
from tinkerd.types import (
    CreateModelResponse,
    CreateSamplingSessionResponse,
    CustomLossOutput,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoadWeightsResponse,
    LoraConfig,
    ModelInput,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsForSamplerResponseInternal,
    SaveWeightsResponse,
    UnloadModelResponse,
    WeightsInfoResponse,
)

Settings = dict[str, Any] | SerializeAsAny[BaseModel] | None
"""An optimizer's config or params: ours, the official SDK's, or their JSON object (a
non-object is a 422 naming the field); parsed by the handler, so an unknown `type` is a
400 that names it."""


def refuse_unless(value: Any, allowed: Any, why: str) -> Any:
    """`value` if it is `allowed`, else a ValueError (a 422 naming the field) saying why."""
    if value != allowed:
        raise ValueError(f"{why} (got {str(value)[:80]})")
    return value


class Request(BaseModel):
    """A verb's arguments. Unknown fields (SDKs newer than 0.38) are ignored."""

    model_config = ConfigDict(
        extra="ignore", frozen=True, protected_namespaces=(), arbitrary_types_allowed=True
    )

    verb: ClassVar[str]
    route: ClassVar[str] = ""
    body: ClassVar[Literal["json", "protobuf", "local"]] = "json"
    answer: ClassVar[Literal["json", "protobuf"]] = "json"
    queued: ClassVar[bool] = True
    ordered: ClassVar[bool] = False
    response: ClassVar[type]

    def label(self) -> str:
        """The verb a stored future records (forward and forward_backward share a type)."""
        return self.verb

    def run_id(self) -> str | None:
        """The training run the request is about, if any."""
        return getattr(self, "model_id", None)

    def expected_answer(self) -> tuple[str, BaseModel] | None:
        """(checkpoint path, answer) of a save: its answer if the server dies after the
        checkpoint is complete but before the answer is recorded."""
        return None

    def wire(self) -> dict[str, Any]:
        """The JSON body, as the official SDK sends it."""
        return self.model_dump(mode="json", exclude_none=True) | {"type": self.verb}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Request:
        return cls.model_validate(body)


class RunRequest(Request):
    """A request on one training run, in the run's order (`seq_id`, 1, 2, ... per run)."""

    ordered: ClassVar[bool] = True
    model_id: str
    seq_id: int | None = None


# ---------------------------------------------------------------- runs


class GetServerCapabilitiesRequest(Request):
    verb: ClassVar[str] = "get_server_capabilities"
    queued: ClassVar[bool] = False
    response: ClassVar[type] = GetServerCapabilitiesResponse


class CreateModelRequest(Request):
    """A new LoRA run; over HTTP it belongs to a session (`session_id`, `model_seq_id`)."""

    verb: ClassVar[str] = "create_model"
    route: ClassVar[str] = "/create_model"
    response: ClassVar[type] = CreateModelResponse

    base_model: str
    lora_config: LoraConfig
    session_id: str | None = None
    model_seq_id: int | None = Field(default=None, ge=0)
    user_metadata: dict[str, Any] | None = None
    optimizer_config: Settings = None
    """AdamOptimizerConfig (default), DimuonOptimizerConfig, or its JSON ({"type": ...});
    parsed by the handler (`types.optimizer_config_from`): an unknown type is a 400."""


class CreateModelFromStateRequest(Request):
    """A new run made from a checkpoint (the wire's /load_weights with a session)."""

    verb: ClassVar[str] = "load_weights"
    route: ClassVar[str] = "/load_weights"
    response: ClassVar[type] = LoadWeightsResponse

    path: str
    optimizer: bool = False
    """Restore the checkpoint's optimizer state (and optimizer) too."""
    session_id: str | None = None
    model_seq_id: int | None = Field(default=None, ge=0)
    base_model: str | None = None
    """Optional: must be the checkpoint's base model."""
    user_metadata: dict[str, Any] | None = None
    optimizer_config: Settings = None
    """Without `optimizer`: the new run's optimizer (default AdamW)."""


class GetInfoRequest(Request):
    verb: ClassVar[str] = "get_info"
    route: ClassVar[str] = "/get_info"
    queued: ClassVar[bool] = False
    response: ClassVar[type] = GetInfoResponse
    model_id: str


class UnloadModelRequest(Request):
    verb: ClassVar[str] = "unload_model"
    route: ClassVar[str] = "/unload_model"
    response: ClassVar[type] = UnloadModelResponse
    model_id: str


# ---------------------------------------------------------------- training


class ForwardBackwardRequest(RunRequest):
    """forward (`forward_only`) or forward_backward with a built-in loss, or with
    `loss_fn="custom"`: losses uploaded with create_custom_loss (`loss_fn_config` names
    them)."""

    verb: ClassVar[str] = "forward_backward"
    route: ClassVar[str] = "/forward_backward"
    body: ClassVar[str] = "protobuf"
    answer: ClassVar[str] = "protobuf"
    response: ClassVar[type] = ForwardBackwardOutput

    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, Any] | None = None
    forward_only: bool = False

    def label(self) -> str:
        return "forward" if self.forward_only else "forward_backward"


class ForwardBackwardCustomRequest(RunRequest):
    """forward_backward_custom with Python functions: in-process it runs as one pass; over
    HTTP the client runs Tinker's two phases (`client/two_phase.py`)."""

    verb: ClassVar[str] = "forward_backward"
    body: ClassVar[str] = "local"
    response: ClassVar[type] = CustomLossOutput

    data: list[Datum]
    loss_fn: Any
    """`(data, logprobs_list) -> (loss, metrics)`, or a traced LossHandle."""
    regularizers: Sequence[Any] = ()
    """RegularizerSpec terms added with their weights."""
    track_grad_norms: bool = False
    run_sync_in_executor: bool = False


class CreateCustomLossRequest(Request):
    """Upload a traced loss graph (`fx_loss`) for the session's runs."""

    verb: ClassVar[str] = "create_custom_loss"
    route: ClassVar[str] = "/create_custom_loss"
    response: ClassVar[type] = dict  # {"loss_id"}
    session_id: str | None = None
    custom_loss_seq_id: int | None = None
    graph: dict[str, Any]
    """The tracer's request (`LossHandle.request()`): read by `fx_loss.compile_loss`."""

    def wire(self) -> dict[str, Any]:
        """The graph's own fields, with the session's numbering beside them."""
        numbering = {"session_id": self.session_id, "custom_loss_seq_id": self.custom_loss_seq_id}
        return {**self.graph, **numbering, "type": self.verb}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Request:
        return cls(session_id=str(body.get("session_id")), graph=body)


class OptimStepRequest(RunRequest):
    """One optimizer step. The SDK sends AdamParams as `adam_params` and DimuonParams as
    `optimizer_params`; either is parsed by the handler (`types.optim_params_from`)."""

    verb: ClassVar[str] = "optim_step"
    route: ClassVar[str] = "/optim_step"
    response: ClassVar[type] = OptimStepResponse
    adam_params: Settings = None
    optimizer_params: Settings = None


# ---------------------------------------------------------------- checkpoints


class SaveWeightsRequest(RunRequest):
    """save_state: weights and optimizer state at tinker://<model_id>/weights/<path>."""

    verb: ClassVar[str] = "save_weights"
    route: ClassVar[str] = "/save_weights"
    response: ClassVar[type] = SaveWeightsResponse
    path: str
    """A name, not a path."""
    overwrite: bool = False
    """Replace a checkpoint of this name (its TTL and user_metadata too)."""
    ttl_seconds: int | None = None
    """Delete the checkpoint this long after the save (None: keep it)."""
    user_metadata: dict[str, str] | None = None

    def expected_answer(self) -> tuple[str, BaseModel] | None:
        path = tinker_path(self.model_id, "weights", self.path)
        return path, SaveWeightsResponse(path=path, type="save_weights")


class LoadWeightsRequest(RunRequest):
    """load_state: replace an existing run's weights (and optimizer state)."""

    verb: ClassVar[str] = "load_weights"
    route: ClassVar[str] = "/load_weights"
    response: ClassVar[type] = LoadWeightsResponse
    path: str
    optimizer: bool = False
    optimizer_config: Settings = None
    """May only repeat the run's optimizer (it keeps its own)."""


class SaveWeightsForSamplerRequest(RunRequest):
    """Freeze the run's weights for sampling: named (`path`), kept as a checkpoint;
    unnamed, ephemeral, in a new sampling session (`sampling_session_seq_id`)."""

    verb: ClassVar[str] = "save_weights_for_sampler"
    route: ClassVar[str] = "/save_weights_for_sampler"
    response: ClassVar[type] = SaveWeightsForSamplerResponseInternal
    path: str | None = None
    """A name: kept at tinker://<model_id>/sampler_weights/<name>."""
    sampling_session_seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    """snapshot: fixed weights; inflight (unnamed only): the run's one mutable target,
    which each later inflight save updates (docs/sampling.md)."""

    def expected_answer(self) -> tuple[str, BaseModel] | None:
        if self.path is None:
            return None
        path = tinker_path(self.model_id, "sampler_weights", self.path)
        return path, SaveWeightsForSamplerResponse(path=path, type="save_weights_for_sampler")


class SaveWeightsExternalRequest(RunRequest):
    """The run's adapter in PEFT format at tinker://<model_id>/external_weights/<path>."""

    verb: ClassVar[str] = "save_weights_external"
    route: ClassVar[str] = "/save_weights_external"
    response: ClassVar[type] = SaveWeightsExternalResponse
    path: str
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = None
    """age1... or SSH public keys: every file is encrypted to them when downloaded."""


class WeightsInfoRequest(Request):
    verb: ClassVar[str] = "weights_info"
    route: ClassVar[str] = "/weights_info"
    queued: ClassVar[bool] = False
    response: ClassVar[type] = WeightsInfoResponse
    tinker_path: str


# ---------------------------------------------------------------- sampling


class CreateSamplingSessionRequest(Request):
    """Weights to sample (a base model, or sampler weights by path) as a sampling session."""

    verb: ClassVar[str] = "create_sampling_session"
    route: ClassVar[str] = "/create_sampling_session"
    queued: ClassVar[bool] = False
    response: ClassVar[type] = CreateSamplingSessionResponse
    session_id: str | None = None
    sampling_session_seq_id: int | None = None
    base_model: str | None = None
    model_path: str | None = None


class SamplingParamsBody(SamplingParams):
    """SamplingParams as a request carries them: keys of newer SDKs are ignored (every
    key of SDK 0.38's SamplingParams is a field here)."""

    model_config = ConfigDict(extra="ignore")


class SampleRequest(Request):
    """`num_samples` completions of `prompt` from a sampling session's weights (or a base
    model / sampler weights named directly)."""

    verb: ClassVar[str] = "sample"
    route: ClassVar[str] = "/asample"
    answer: ClassVar[str] = "protobuf"
    response: ClassVar[type] = SampleResponse
    sampling_session_id: str | None = None
    seq_id: int | None = None
    base_model: str | None = None
    model_path: str | None = None
    num_samples: int = 1
    prompt: ModelInput
    sampling_params: SamplingParamsBody = Field(default_factory=SamplingParamsBody)
    prompt_logprobs: bool | None = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_logprobs_last_n: int | None = None
    prompt_alt_tokens_k: int = 0
    target_prompt_logprobs: Any = None
    record_stability_info: bool | None = None

    @field_validator("record_stability_info")
    @classmethod
    def _no_stability_info(cls, v: bool | None) -> bool | None:
        return v if not v else refuse_unless(v, False, "tinkerd records no stability info")


# ---------------------------------------------------------------- the table

REQUESTS: tuple[type[Request], ...] = (
    GetServerCapabilitiesRequest,
    CreateModelRequest,
    CreateModelFromStateRequest,
    GetInfoRequest,
    UnloadModelRequest,
    ForwardBackwardRequest,
    ForwardBackwardCustomRequest,
    CreateCustomLossRequest,
    OptimStepRequest,
    SaveWeightsRequest,
    LoadWeightsRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsExternalRequest,
    WeightsInfoRequest,
    CreateSamplingSessionRequest,
    SampleRequest,
)
"""Every verb. The server generates a route for each plain JSON one (`server/routes`)."""

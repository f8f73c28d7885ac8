"""Request bodies of the wire protocol's JSON routes (see docs/wire-protocol.md)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tinkerd.types import Datum, LoraConfig, ModelInput


class Body(BaseModel):
    """Request bodies: unknown fields (newer SDKs) are ignored."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class CreateSessionRequest(Body):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] = Field(default_factory=dict)
    display_name: str | None = None


class FinishSessionRequest(Body):
    reason: dict[str, Any] | None = None
    """What the client reports: {"type": "success" | "errored" | "interrupted"}."""
    detail: str | None = None


class SessionRequest(Body):
    session_id: str


class CreateModelRequest(Body):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    lora_config: LoraConfig
    user_metadata: dict[str, Any] | None = None
    optimizer_config: dict[str, Any] | None = None
    """{"type": "adamw"} (the default) or {"type": "dimuon", "version": 1}; parsed by the
    service (`types.optimizer_config_from`), so an unknown type is a 400 naming it."""


class ModelRequest(Body):
    model_id: str


class OptimStepRequest(Body):
    model_id: str
    seq_id: int | None = None
    adam_params: dict[str, Any] | None = None
    optimizer_params: dict[str, Any] | None = None
    """The SDK sends AdamParams as `adam_params`, DimuonParams (`type` "dimuon") as
    `optimizer_params`; parsed by the service (`types.optim_params_from`)."""


class SaveWeightsForSamplerRequest(Body):
    model_id: str
    seq_id: int | None = None
    path: str | None = None
    """A name: the weights are kept at tinker://<model_id>/sampler_weights/<name>."""
    sampling_session_seq_id: int | None = None
    """Without a name: open a sampling session on the (ephemeral) weights."""


class SaveWeightsRequest(Body):
    model_id: str
    path: str
    """A name: the state is saved as tinker://<model_id>/weights/<name>."""
    seq_id: int | None = None
    overwrite: bool = False


class LoadWeightsRequest(Body):
    """Either legacy addressing (model_id + seq_id: load into an existing run) or
    create-via-load (session_id + model_seq_id: a new run made from the checkpoint)."""

    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = Field(default=None, ge=0)
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    optimizer_config: dict[str, Any] | None = None
    """The optimizer of a run created weights-only (default AdamW); with `optimizer` the
    run takes the checkpoint's, which this may only repeat."""


class WeightsInfoRequest(Body):
    tinker_path: str


class CreateSamplingSessionRequest(Body):
    session_id: str
    sampling_session_seq_id: int = 0
    base_model: str | None = None
    model_path: str | None = None


class SampleRequest(Body):
    sampling_session_id: str | None = None
    seq_id: int | None = None
    base_model: str | None = None
    model_path: str | None = None
    num_samples: int = 1
    prompt: ModelInput
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_logprobs_last_n: int | None = None
    prompt_alt_tokens_k: int = 0
    target_prompt_logprobs: Any = None


class RetrieveFutureRequest(Body):
    request_id: str


class LossInput(Body):
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float | str] | None = None


class ForwardBackwardJson(Body):
    """forward_backward (and /forward) as SDKs before 0.26 send it when they are told not
    to use protobuf (and those before 0.18 always do)."""

    model_id: str
    seq_id: int | None = None
    forward_backward_input: LossInput | None = None
    forward_input: LossInput | None = None


class SaveWeightsExternalRequest(Body):
    model_id: str
    path: str
    """A name: the adapter is saved as tinker://<model_id>/external_weights/<name>."""
    seq_id: int | None = None
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = None

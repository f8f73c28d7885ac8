"""Request bodies of the wire protocol's JSON routes (see docs/wire-protocol.md).

Every field the official SDK (0.38) can send is declared here, and either honoured or,
for a value the server cannot honour, refused with a 422 that names the field
(`refuse_unless`) -- never dropped without a word. tests/test_audit.py walks the SDK's
request types to keep it so.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tinkerd.service.session_search import SessionSearch  # noqa: F401  sessions/search body
from tinkerd.types import Datum, LoraConfig, ModelInput, SamplingParams

TtlSeconds = int | None
UserMetadata = dict[str, str] | None


class Body(BaseModel):
    """Request bodies: unknown fields (SDKs newer than 0.38) are ignored."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


def refuse_unless(value: Any, allowed: Any, why: str) -> Any:
    """`value` if it is `allowed`, else a ValueError (a 422 naming the field) saying why."""
    if value != allowed:
        raise ValueError(f"{why} (got {str(value)[:80]})")
    return value


class CreateSessionRequest(Body):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] = Field(default_factory=dict)
    sdk_version: str | None = None
    """Informational (asks nothing of the server)."""
    display_name: str | None = None
    """A label for the session, kept and shown by the session REST routes."""
    project_id: str | None = None

    @field_validator("project_id")
    @classmethod
    def _no_projects(cls, v: str | None) -> None:
        return refuse_unless(v, None, "tinkerd has no projects: a key's runs are its own")


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
    ttl_seconds: TtlSeconds = None
    """Delete the saved weights this long after the save (None: keep them)."""
    user_metadata: UserMetadata = None
    """Listed with the checkpoint."""
    kind: Literal["snapshot", "inflight"] = "snapshot"
    """snapshot: fixed weights; inflight (unnamed only): the run's one mutable target,
    which each later inflight save updates (docs/sampling.md)."""


class SaveWeightsRequest(Body):
    model_id: str
    path: str
    """A name: the state is saved as tinker://<model_id>/weights/<name>."""
    seq_id: int | None = None
    overwrite: bool = False
    """Replace a checkpoint of this name (its TTL and user_metadata too)."""
    ttl_seconds: TtlSeconds = None
    """Delete the checkpoint this long after the save (None: keep it)."""
    user_metadata: UserMetadata = None
    """Listed with the checkpoint."""


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
    weights_access_token: str | None = None

    @field_validator("weights_access_token")
    @classmethod
    def _no_token(cls, v: str | None) -> None:
        return refuse_unless(v, None, "tinkerd loads only checkpoints of its own data directory")


class WeightsInfoRequest(Body):
    tinker_path: str


class CreateSamplingSessionRequest(Body):
    session_id: str
    sampling_session_seq_id: int = 0
    base_model: str | None = None
    model_path: str | None = None


class SamplingParamsBody(SamplingParams):
    """SamplingParams as a request carries them: keys of newer SDKs are ignored (every
    key of SDK 0.38's SamplingParams is a field here)."""

    model_config = ConfigDict(extra="ignore")


class SampleRequest(Body):
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


class RetrieveFutureRequest(Body):
    request_id: str
    allow_metadata_only: bool = False
    """A permission, not a demand: tinkerd always answers with the whole result."""


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

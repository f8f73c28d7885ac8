"""Request bodies of the wire protocol's JSON routes that are not a verb's request
(sessions, retrieve_future), and the wire's own shapes of some verbs (/load_weights's two
jobs, the JSON forward_backward of old SDKs). The verbs' bodies are their requests
(`tinkerd.requests`).

Every field the official SDK (0.38) can send is declared here, and either honoured or,
for a value the server cannot honour, refused with a 422 that names the field
(`refuse_unless`) -- never dropped without a word. tests/e2e/test_audit.py walks the SDK's
request types to keep it so.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tinkerd.errors import InvalidRequestError
from tinkerd.requests import CreateModelFromStateRequest, LoadWeightsRequest, refuse_unless
from tinkerd.service.session_search import SessionSearch  # noqa: F401  sessions/search body
from tinkerd.types import Datum


class Body(BaseModel):
    """Request bodies: unknown fields (SDKs newer than 0.38) are ignored."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


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


class LoadWeightsBody(Body):
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

    def request(self) -> CreateModelFromStateRequest | LoadWeightsRequest:
        """The verb the body asks for."""
        common = self.model_dump(include={"path", "optimizer", "optimizer_config"})
        if self.session_id is not None and self.model_seq_id is not None:
            new_run = {"session_id", "model_seq_id", "base_model", "user_metadata"}
            return CreateModelFromStateRequest(**common, **self.model_dump(include=new_run))
        if self.model_id is None:
            raise InvalidRequestError("give model_id (and seq_id), or session_id and model_seq_id")
        return LoadWeightsRequest(**common, model_id=self.model_id, seq_id=self.seq_id)


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

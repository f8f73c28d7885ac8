"""The HTTP server: Tinker's wire protocol (see docs/wire-protocol.md) over the engine.

Mutating calls answer `{"request_id"}` at once; `retrieve_future` long-polls for the
result (HTTP 408 `try_again` while it runs). forward/forward_backward travel as
protobuf, everything else as JSON. Every request needs an API key (`X-API-Key`), and a
key sees only the sessions, runs and futures it created.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from tinkerd import wire_proto
from tinkerd.custom_loss import (
    RegularizerSpec,
    check_graph_inputs,
    check_regularizers,
    evaluate,
    graph_loss_fn,
)
from tinkerd.engine.adapters import validate_adam_params, validate_lora_config
from tinkerd.engine.checkpoints import tinker_path
from tinkerd.engine.trainer import Engine, SamplerWeights
from tinkerd.errors import AuthenticationError, InvalidRequestError, NotFoundError, TinkerdError
from tinkerd.fx_loss import CompiledLoss, compile_loss
from tinkerd.server.catalog import Catalog
from tinkerd.server.dashboard import add_dashboard, split_key_label
from tinkerd.server.futures import PROTOBUF, FutureTable
from tinkerd.server.metrics import record, timed
from tinkerd.server.rest import rest_router
from tinkerd.server.routes.inference import inference_router
from tinkerd.server.scheduler import Scheduler, loss_work
from tinkerd.server.store import Store
from tinkerd.types import AdamParams, LoraConfig, ModelInput, SampleResponse, SamplingParams

API = "/api/v1"

# What the official SDK reads from client/config: stay on plain HTTP/JSON where it can.
CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": False,
    "parallel_fwdbwd_chunks": False,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": True,
    "sample_join_sampling_session": False,
}


class Body(BaseModel):
    """Request bodies: unknown fields (newer SDKs) are ignored."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class CreateSessionRequest(Body):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] = Field(default_factory=dict)


class SessionRequest(Body):
    session_id: str


class CreateModelRequest(Body):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    lora_config: LoraConfig
    user_metadata: dict[str, Any] | None = None


class ModelRequest(Body):
    model_id: str


class OptimStepRequest(Body):
    model_id: str
    seq_id: int | None = None
    adam_params: AdamParams | None = None
    optimizer_params: AdamParams | None = None


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


def fingerprint(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Server:
    """State behind the routes: engine, scheduler, futures, store, keys."""

    def __init__(
        self,
        engine: Engine,
        data_dir: Path,
        api_keys: list[str],
        served_models: list[str],
        poll_timeout: float = 25.0,
        max_pending: int = 4096,
        session_timeout: float = 300.0,
    ):
        self.engine = engine
        self.checkpoints = engine.checkpoints  # opening it finishes what a crash cut off
        self.store = Store(data_dir)
        self.catalog = Catalog(self.store, self.checkpoints)
        self.store.fail_unfinished("the server restarted before this request finished")
        self.scheduler = Scheduler()
        self.futures = FutureTable(self.store, self.scheduler, max_pending=max_pending)
        labelled = [split_key_label(k) for k in api_keys]  # `KEY=LABEL` names a key's owner
        self.api_keys = [k.encode() for k, _ in labelled]
        self.key_labels = {fingerprint(k): label for k, label in labelled if label}
        self.served_models = served_models
        self.poll_timeout = poll_timeout
        self.traced_losses: dict[tuple[str, str], CompiledLoss] = {}  # (owner, loss_id)
        self.sampling_sessions: dict[str, tuple[str, SamplerWeights]] = {}  # id: (owner, w)
        self.session_timeout = session_timeout
        threading.Thread(target=self._expire_sessions_forever, daemon=True).start()

    def _expire_sessions_forever(self) -> None:
        while True:
            time.sleep(min(self.session_timeout / 4, 5.0))
            with contextlib.suppress(Exception):  # never let the reaper die
                self.expire_sessions()

    def expire_sessions(self) -> list[str]:
        """Finish sessions that missed heartbeats for `session_timeout` seconds and free
        their runs' adapters and their samplers (checkpoints stay)."""
        expired = self.store.expire_sessions(time.time() - self.session_timeout)
        for session_id in expired:
            self.release_session(session_id, "expired")
        return expired

    def release_session(self, session_id: str, status: str) -> None:
        """Free an ended session's runs (adapter and optimizer state; checkpoints stay) and
        its samplers, so memory stays bounded however many sessions come and go."""
        for model_id in self.store.active_runs(session_id):
            with contextlib.suppress(TinkerdError):
                self.engine.unload_model(model_id)
            self.store.touch_run(model_id, status=status)
            self.futures.forget_model(model_id)
        prefix = f"{session_id}:"  # its own sampling sessions and its runs' ones
        for sampling_id in [s for s in self.sampling_sessions if s.startswith(prefix)]:
            self.sampling_sessions.pop(sampling_id, None)

    def check_session_alive(self, session_id: str, model_id: str) -> None:
        """After a run was created: if its session ended meanwhile (expired while the base
        model loaded), free the run now, since the session's release could not see it.
        The release marks the session finished before it unloads, so one of the two
        always frees the run."""
        if self.store.session_finished(session_id):
            with contextlib.suppress(TinkerdError):
                self.engine.unload_model(model_id)
            raise InvalidRequestError(f"session {session_id} ended while {model_id} was created")

    def compiled_loss(self, loss_id: Any, owner: str) -> CompiledLoss:
        compiled = self.traced_losses.get((owner, str(loss_id)))
        if compiled is None:
            raise InvalidRequestError(f"no custom loss {loss_id!r}: create it in this session")
        return compiled

    def owner(self, request: Request) -> str:
        """The caller's identity: a fingerprint of its API key (keys are never stored)."""
        key = request.headers.get("x-api-key") or ""
        if self.api_keys:
            # Compare against every key in constant time: no early exit that leaks which.
            matches = [hmac.compare_digest(key.encode(), k) for k in self.api_keys]
            if not key or not any(matches):
                raise AuthenticationError("missing or unknown API key (send it as X-API-Key)")
        return fingerprint(key) if key else "anonymous"

    def owner_label(self, owner: str) -> str:
        """What the dashboard shows for an owner: its key's label, else the fingerprint."""
        return self.key_labels.get(owner, owner)

    def recorded(self, model_id: str, kind: str, work: Callable[[], Any], tokens: int = 0):
        """`work` recording its metrics for the dashboard when it succeeds (metrics.py)."""
        return timed(self.store, self.engine, model_id, kind, work, tokens)

    def check_run(self, model_id: str, owner: str) -> None:
        if self.store.run_owner(model_id) != owner:  # another key's run looks absent
            raise NotFoundError(f"no training run {model_id!r}")

    @contextlib.contextmanager
    def releasing_seq_on_error(self, model_id: str, seq_id: int | None) -> Iterator[None]:
        """A request rejected at the door still uses up its seq_id."""
        try:
            yield
        except TinkerdError:
            self.futures.release(model_id, seq_id)
            raise

    def submit(self, owner: str, kind: str, work: Callable[[], Any], **kw: Any) -> dict:
        model_id = kw.get("model_id")
        lane = self.engine.run(model_id).base.name if model_id else kw.pop("lane")
        return {
            "request_id": self.futures.submit(owner=owner, kind=kind, lane=lane, work=work, **kw),
            "model_id": model_id,
        }


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="tinkerd", version="0.1.0", docs_url="/docs")
    app.state.server = server
    add_dashboard(app, server)  # the web dashboard at / and its JSON API

    @app.exception_handler(TinkerdError)
    async def tinkerd_error(_: Request, e: TinkerdError) -> JSONResponse:
        headers = {"Retry-After": str(math.ceil(e.retry_after))} if e.status_code == 429 else None
        return JSONResponse({"detail": str(e)}, status_code=e.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"detail": "; ".join(lines)}, status_code=422)

    def owner(request: Request) -> str:
        return server.owner(request)

    Owner = Depends(owner)

    @app.get(f"{API}/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post(f"{API}/client/config")
    def client_config(_: str = Owner) -> dict:
        return CLIENT_CONFIG

    @app.post(f"{API}/client/dynamic_config")
    def dynamic_config(_: str = Owner) -> dict:
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @app.get(f"{API}/get_server_capabilities")
    def capabilities(_: str = Owner) -> dict:
        caps = server.engine.get_server_capabilities()
        for model in caps.supported_models:
            model.trainable = model.model_name in server.served_models
        caps.supported_models = [m for m in caps.supported_models if m.trainable]
        return caps.model_dump(exclude_none=True)

    # ------------------------------------------------------------ sessions

    @app.post(f"{API}/create_session")
    def create_session(body: CreateSessionRequest, who: str = Owner) -> dict:
        session_id = f"session-{uuid.uuid4().hex[:16]}"
        server.store.add_session(session_id, who, body.tags, body.user_metadata)
        return {"session_id": session_id, "type": "create_session"}

    def own_session(session_id: str, who: str) -> None:
        if server.store.session_owner(session_id) != who:
            raise NotFoundError(f"no session {session_id!r}")

    @app.post(f"{API}/session_heartbeat")
    def heartbeat(body: SessionRequest, who: str = Owner) -> Response:
        own_session(body.session_id, who)
        if server.store.session_finished(body.session_id):
            return JSONResponse({"detail": "session finished"}, status_code=410)
        server.store.heartbeat(body.session_id)
        return JSONResponse({"type": "session_heartbeat"})

    @app.post(f"{API}/sessions/{{session_id}}/finish")
    def finish_session(session_id: str, who: str = Owner) -> dict:
        own_session(session_id, who)
        server.store.finish_session(session_id)
        server.release_session(session_id, "finished")
        return {}

    @app.post(f"{API}/telemetry")
    def telemetry(_: str = Owner) -> dict:
        return {"status": "accepted"}  # accepted and dropped: tinkerd collects nothing

    # ------------------------------------------------------------ training

    @app.post(f"{API}/create_model")
    def create_model(body: CreateModelRequest, who: str = Owner) -> dict:
        own_session(body.session_id, who)
        if body.base_model not in server.served_models:
            raise InvalidRequestError(
                f"base model {body.base_model!r} is not served here; "
                f"available: {server.served_models}"
            )
        validate_lora_config(body.lora_config)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        if server.store.run_owner(model_id) is not None:
            raise InvalidRequestError(f"model {model_id!r} already exists")
        server.store.add_run(
            model_id,
            who,
            body.session_id,
            body.base_model,
            body.lora_config.model_dump(),
            body.user_metadata or {},
        )

        def work() -> dict:
            try:
                server.engine.create_model(body.base_model, body.lora_config, model_id)
            except Exception:
                server.store.touch_run(model_id, status="failed")
                raise
            server.check_session_alive(body.session_id, model_id)
            return {"model_id": model_id, "type": "create_model"}

        return server.submit(who, "create_model", work, lane=body.base_model)

    @app.post(f"{API}/get_info")
    def get_info(body: ModelRequest, who: str = Owner) -> dict:
        server.check_run(body.model_id, who)
        info = server.engine.get_info(body.model_id)
        # A directory path with a trailing slash: the SDK hands it to AutoTokenizer as is.
        info.model_data.tokenizer_id = info.model_data.tokenizer_id.rstrip("/") + "/"
        return info.model_dump(mode="json", exclude_none=True)

    @app.post(f"{API}/forward_backward")
    async def forward_backward(request: Request, who: str = Owner) -> dict:
        raw = await request.body()
        return await asyncio.to_thread(submit_forward_backward, raw, who)

    def submit_forward_backward(raw: bytes, who: str) -> dict:
        req = wire_proto.decode_forward_backward_request(raw)
        server.check_run(req["model_id"], who)
        if req["loss_fn"] == "custom":
            return submit_traced_loss(req, who)
        with server.releasing_seq_on_error(req["model_id"], req["seq_id"]):
            prepared = server.engine.prepare(
                req["model_id"], req["data"], req["loss_fn"], req["loss_fn_config"]
            )
        backward = not req["forward_only"]
        work = loss_work(server.engine, prepared, backward)
        if backward:
            tokens = sum(d.model_input.length for d in req["data"])
            work.after = lambda result, seconds: record(
                server.store,
                server.engine,
                req["model_id"],
                "forward_backward",
                result,
                seconds,
                tokens,
            )
        return server.submit(
            who,
            "forward" if req["forward_only"] else "forward_backward",
            work,
            encode=lambda out: (PROTOBUF, wire_proto.encode_forward_backward_output(out)),
            model_id=req["model_id"],
            seq_id=req["seq_id"],
        )

    def submit_traced_loss(req: dict, who: str) -> dict:
        """loss_fn="custom": uploaded graphs (base loss and, from tinkerd's client,
        regularizers) run in one forward/backward on the server."""
        model_id, data, config = req["model_id"], req["data"], req["loss_fn_config"] or {}
        with server.releasing_seq_on_error(model_id, req["seq_id"]):
            if req["forward_only"]:
                raise InvalidRequestError("a custom loss runs in forward_backward, not forward")
            compiled = server.compiled_loss(config.get("loss_id"), who)
            try:
                reg_specs = [
                    (str(r["name"]), float(r["weight"]), server.compiled_loss(r["loss_id"], who))
                    for r in json.loads(str(config.get("regularizers") or "[]"))
                ]
            except InvalidRequestError:
                raise
            except (ValueError, TypeError, KeyError) as e:
                raise InvalidRequestError(
                    f"loss_fn_config['regularizers'] malformed: {e}"
                ) from None
            base = graph_loss_fn(compiled)
            regs = [RegularizerSpec(fn=graph_loss_fn(c), weight=w, name=n) for n, w, c in reg_specs]
            check_regularizers(base, regs)
            for graph in [compiled, *(c for _, _, c in reg_specs)]:
                check_graph_inputs(graph, data)
            server.engine.check_custom_data(model_id, data)
        track = bool(config.get("track_grad_norms", 0))

        def gradient_fn(logprobs: list) -> tuple:
            result = evaluate(data, logprobs, base, regs, track)
            return result.grads, result

        def work() -> Any:
            out, evaluation = server.engine.forward_backward_custom(model_id, data, gradient_fn)
            return evaluation.output(out)

        tokens = sum(d.model_input.length for d in data)
        return server.submit(
            who,
            "forward_backward",
            server.recorded(model_id, "forward_backward", work, tokens),
            encode=lambda out: (PROTOBUF, wire_proto.encode_forward_backward_output(out)),
            model_id=model_id,
            seq_id=req["seq_id"],
        )

    @app.post(f"{API}/create_custom_loss")
    def create_custom_loss(body: dict[str, Any], who: str = Owner) -> dict:
        session_id = str(body.get("session_id"))
        own_session(session_id, who)
        compiled = compile_loss(body)  # refuses any graph outside the allowlist
        loss_id = f"{session_id}:loss:{int(body.get('custom_loss_seq_id', 0))}"
        server.traced_losses[(who, loss_id)] = compiled
        result = {"loss_id": loss_id, "type": "create_custom_loss"}
        return server.submit(who, "create_custom_loss", lambda: result, lane="control")

    @app.post(f"{API}/optim_step")
    def optim_step(body: OptimStepRequest, who: str = Owner) -> dict:
        server.check_run(body.model_id, who)
        adam = body.adam_params or body.optimizer_params or AdamParams()
        with server.releasing_seq_on_error(body.model_id, body.seq_id):
            validate_adam_params(adam)
        return server.submit(
            who,
            "optim_step",
            server.recorded(
                body.model_id, "optim_step", lambda: server.engine.optim_step(body.model_id, adam)
            ),
            model_id=body.model_id,
            seq_id=body.seq_id,
        )

    @app.post(f"{API}/unload_model")
    def unload_model(body: ModelRequest, who: str = Owner) -> dict:
        server.check_run(body.model_id, who)

        def work() -> Any:
            result = server.engine.unload_model(body.model_id)
            server.store.touch_run(body.model_id, status="unloaded")
            server.futures.forget_model(body.model_id)
            return result

        return server.submit(who, "unload_model", work, model_id=body.model_id)

    # ------------------------------------------------------------ checkpoints

    @app.post(f"{API}/save_weights")
    def save_weights(body: SaveWeightsRequest, who: str = Owner) -> dict:
        server.check_run(body.model_id, who)
        with server.releasing_seq_on_error(body.model_id, body.seq_id):
            tinker_path(body.model_id, "weights", body.path)  # a bad name is a 400 now

        def work() -> dict:
            info = server.engine.save_state(body.model_id, body.path, body.overwrite)
            return {"path": info.tinker_path, "type": "save_weights"}

        return server.submit(who, "save_weights", work, model_id=body.model_id, seq_id=body.seq_id)

    @app.post(f"{API}/load_weights")
    def load_weights(body: LoadWeightsRequest, who: str = Owner) -> dict:
        if body.session_id is not None and body.model_seq_id is not None:
            return create_model_from_state(body, who)
        if body.model_id is None:
            raise InvalidRequestError("give model_id (and seq_id), or session_id and model_seq_id")
        server.check_run(body.model_id, who)
        with server.releasing_seq_on_error(body.model_id, body.seq_id):
            server.catalog.readable(body.path, who)

        def work() -> dict:
            server.engine.load_state(body.model_id, body.path, body.optimizer)
            return {"path": body.path, "model_id": body.model_id, "type": "load_weights"}

        return server.submit(who, "load_weights", work, model_id=body.model_id, seq_id=body.seq_id)

    def create_model_from_state(body: LoadWeightsRequest, who: str) -> dict:
        own_session(body.session_id, who)
        info = server.catalog.readable(body.path, who)
        if body.base_model not in (None, info.base_model):
            raise InvalidRequestError(
                f"{body.path} was trained on {info.base_model!r}, not {body.base_model!r}"
            )
        if body.optimizer and not info.has_optimizer:
            raise InvalidRequestError(f"{body.path} has no optimizer state")
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        if server.store.run_owner(model_id) is not None:
            raise InvalidRequestError(f"model {model_id!r} already exists")
        lora = info.weights_info().model_dump(include={"train_mlp", "train_attn", "train_unembed"})
        lora["rank"] = info.lora_rank
        server.store.add_run(
            model_id, who, body.session_id, info.base_model, lora, body.user_metadata or {}
        )

        def work() -> dict:
            try:
                server.engine.create_model_from_state(body.path, body.optimizer, model_id)
            except Exception:
                server.store.touch_run(model_id, status="failed")
                raise
            server.check_session_alive(body.session_id, model_id)
            return {"path": body.path, "model_id": model_id, "type": "load_weights"}

        return server.submit(who, "load_weights", work, lane=info.base_model)

    @app.post(f"{API}/weights_info")
    def weights_info(body: WeightsInfoRequest, who: str = Owner) -> dict:
        info = server.catalog.readable(body.tinker_path, who)
        return info.weights_info().model_dump(mode="json")

    # ------------------------------------------------------------ sampling

    @app.post(f"{API}/save_weights_for_sampler")
    def save_weights_for_sampler(body: SaveWeightsForSamplerRequest, who: str = Owner) -> dict:
        server.check_run(body.model_id, who)
        with server.releasing_seq_on_error(body.model_id, body.seq_id):
            if body.path is None and body.sampling_session_seq_id is None:
                raise InvalidRequestError("give a path (a name) or a sampling_session_seq_id")

        def work() -> dict:
            weights = server.engine.save_weights_for_sampler(body.model_id, body.path)
            if body.path is not None:
                return {"path": weights.model_path, "type": "save_weights_for_sampler"}
            sampling_id = f"{body.model_id}:sample:{body.sampling_session_seq_id}"
            server.sampling_sessions[sampling_id] = (who, weights)
            return {"sampling_session_id": sampling_id, "type": "save_weights_for_sampler"}

        return server.submit(
            who, "save_weights_for_sampler", work, model_id=body.model_id, seq_id=body.seq_id
        )

    def sampler_weights(base_model: str | None, model_path: str | None, who: str):
        if model_path is not None:
            server.catalog.readable(model_path, who)  # its own, or published
        elif base_model is not None and base_model not in server.served_models:
            raise InvalidRequestError(
                f"base model {base_model!r} is not served here; available: {server.served_models}"
            )
        return server.engine.sampler_for(base_model=base_model, model_path=model_path)

    @app.post(f"{API}/create_sampling_session")
    def create_sampling_session(body: CreateSamplingSessionRequest, who: str = Owner) -> dict:
        own_session(body.session_id, who)
        weights = sampler_weights(body.base_model, body.model_path, who)
        sampling_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
        server.sampling_sessions[sampling_id] = (who, weights)
        return {"sampling_session_id": sampling_id, "type": "create_sampling_session"}

    def sampling_session(sampling_id: str, who: str) -> SamplerWeights:
        owner_and_weights = server.sampling_sessions.get(sampling_id)
        if owner_and_weights is None or owner_and_weights[0] != who:
            raise NotFoundError(f"no sampling session {sampling_id!r}")
        return owner_and_weights[1]

    @app.get(f"{API}/samplers/{{sampler_id}}")
    def get_sampler(sampler_id: str, who: str = Owner) -> dict:
        weights = sampling_session(sampler_id, who)
        return {
            "sampler_id": sampler_id,
            "base_model": weights.base_model,
            "model_path": weights.model_path,
        }

    @app.post(f"{API}/asample")
    def asample(body: SampleRequest, who: str = Owner) -> dict:
        if body.sampling_session_id is not None:
            weights = sampling_session(body.sampling_session_id, who)
        else:
            weights = sampler_weights(body.base_model, body.model_path, who)
        if body.prompt_alt_tokens_k or body.target_prompt_logprobs is not None:
            raise InvalidRequestError(
                "prompt_alt_tokens_k and target_prompt_logprobs are not supported by tinkerd"
            )
        known = SamplingParams.model_fields
        params = SamplingParams.model_validate(
            {k: v for k, v in body.sampling_params.items() if k in known}
        )
        last_n = body.prompt_logprobs_last_n
        prompt = body.prompt.to_ints()
        if last_n is not None and not 1 <= last_n < len(prompt):
            raise InvalidRequestError(
                f"prompt_logprobs_last_n must be in [1, {len(prompt) - 1}], got {last_n}"
            )
        future = server.engine.sample(  # validates now: bad input is a 400, not a failed future
            weights,
            prompt,
            body.num_samples,
            params,
            body.prompt_logprobs,
            body.topk_prompt_logprobs,
            body.topk_sample_logprobs,
        )
        encode = lambda r: (PROTOBUF, wire_proto.encode_sample_response(only_last(r, last_n)))
        request_id = server.futures.submit(
            owner=who, kind="sample", lane=None, work=lambda: future, encode=encode
        )
        return {
            "request_id": request_id,
            "sample_sequence_ids": [f"{request_id}:{i}" for i in range(body.num_samples)],
        }

    # ------------------------------------------------------------ futures

    @app.post(f"{API}/retrieve_future")
    async def retrieve_future(body: RetrieveFutureRequest, who: str = Owner) -> Response:
        try:
            stored = await server.futures.wait(body.request_id, who, server.poll_timeout)
        except KeyError:
            raise NotFoundError(f"no request {body.request_id!r}") from None
        if stored is None:
            return JSONResponse(
                {"type": "try_again", "request_id": body.request_id, "queue_state": "active"},
                status_code=408,
            )
        return Response(stored.body, media_type=stored.content_type)

    app.include_router(rest_router(server))
    app.include_router(inference_router(server))  # OpenAI- and Anthropic-compatible
    return app


def only_last(response: SampleResponse, last_n: int | None) -> SampleResponse:
    """Blank every prompt logprob but the last `last_n` (prompt_logprobs_last_n)."""
    if last_n is None:
        return response
    blank = len(response.prompt_logprobs or []) - last_n
    if response.prompt_logprobs is not None:
        response.prompt_logprobs = [None] * blank + response.prompt_logprobs[blank:]
    if response.topk_prompt_logprobs is not None:
        response.topk_prompt_logprobs = [None] * blank + response.topk_prompt_logprobs[blank:]
    return response

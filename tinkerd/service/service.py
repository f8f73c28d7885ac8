"""The service: what the HTTP server and the embedded clients share.

A server builds one over its engine; every embedded client on an engine shares that
engine's `Service.for_engine(engine)`. It validates requests, queues them (seq_id
order, a bound on pending work), schedules and packs them over the engine (one lane per
base model; concurrent forward_backward calls of different runs share a pass), records
training metrics, and hands back `concurrent.futures.Future`s of typed results. It also
holds what outlives a request: sessions (and their expiry), sampling sessions, uploaded
custom losses.

Every method takes the caller's identity `owner` (an API key's fingerprint over HTTP).
`owner=None` is the local, embedded caller: it sees every run and checkpoint of this
process and has no session; its runs are not recorded in the store.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tinkerd.custom_loss import (
    RegularizerSpec,
    check_regularizers,
    gradient_fn,
)
from tinkerd.engine import Engine, SamplerWeights
from tinkerd.engine.adapters import validate_lora_config
from tinkerd.engine.checkpoints import CheckpointInfo, tinker_path
from tinkerd.engine.engine import optimizer_for_state
from tinkerd.errors import InvalidRequestError, NotFoundError, QuotaExceededError, TinkerdError
from tinkerd.service.access import Catalog, check_age_recipients, check_ttl
from tinkerd.service.config import ServiceConfig
from tinkerd.service.futures import RequestQueue
from tinkerd.service.memory import trim_heap
from tinkerd.service.metrics import record, timed
from tinkerd.service.sampling import Sampling
from tinkerd.service.scheduler import Scheduler, loss_work
from tinkerd.service.sessions import Sessions
from tinkerd.service.store import Store
from tinkerd.service.uploaded_losses import UploadedLosses
from tinkerd.types import (
    CustomLossOutput,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoraConfig,
    OptimStepResponse,
    UnloadModelResponse,
    optim_params_from,
    optimizer_config_from,
)

Owner = str | None


def _gone(model_id: str, status: str | None) -> str:
    """What a 404 says about a run of the caller that is listed but not loaded."""
    why = {
        "lost": "the server restarted since it was created, and a run's weights and "
        "optimizer state live in memory only",
        "expired": "its session missed heartbeats and expired",
        "finished": "its session was closed",
        "unloaded": "it was unloaded",
        "failed": "it failed to be created",
    }.get(status or "", f"it is {status}")
    return (
        f"no training run {model_id!r} is loaded: {why}. Its checkpoints are kept: make a "
        "new training client from its last one (ServiceClient."
        "create_training_client_from_state_with_optimizer(path), paths from "
        "RestClient.list_checkpoints) and carry on from there"
    )


_services: weakref.WeakKeyDictionary[Engine, Service] = weakref.WeakKeyDictionary()
_services_lock = threading.Lock()


class Service:
    def __init__(
        self,
        engine: Engine,
        data_dir: Path | None = None,
        served_models: list[str] | None = None,
        config: ServiceConfig | None = None,
        recover: bool = True,
    ):
        """`served_models`: the base models that may be trained (None: any the engine
        knows). `recover`: this service owns `data_dir` (a server): requests and runs in
        flight when it last stopped are marked failed, and silent sessions expire."""
        self.engine = engine
        self.config = config or ServiceConfig()
        self.served_models = served_models
        self.checkpoints = engine.checkpoints  # opening it finishes what a crash cut off
        self.data_dir = Path(data_dir or engine.data_dir)
        self.scheduler = Scheduler(self.config.max_pass_tokens, on_idle=trim_heap)
        self.queue = RequestQueue(
            self.scheduler,
            self.config.gap_timeout,
            self.config.max_pending,
            max_pending_per_tenant=self.config.max_queued_per_key,
        )
        self.losses = UploadedLosses(
            self.config.max_losses_per_key, self.config.max_loss_bytes_per_key
        )
        self.local_runs: dict[str, str] = {}  # model_id: base model, of owner None
        if recover:
            self.store.fail_unfinished(
                "the server restarted before this request finished", self._saved_since
            )
            self.sessions.start_expiry()

    @functools.cached_property
    def store(self) -> Store:
        """Opened on first use: an embedded service that never needs it writes nothing."""
        return Store(self.data_dir, self.config.clock, self.config.max_metric_steps)

    @functools.cached_property
    def catalog(self) -> Catalog:
        return Catalog(self.store, self.checkpoints, self._local_runs)

    @functools.cached_property
    def sessions(self) -> Sessions:
        return Sessions(self.store, self.engine, self.queue, self.config, self.losses)

    @functools.cached_property
    def sampling(self) -> Sampling:
        return Sampling(self)

    @classmethod
    def for_engine(cls, engine: Engine) -> Service:
        """The process's embedded service on `engine`: every embedded client on one engine
        shares it, so their runs' requests are packed together."""
        with _services_lock:
            service = _services.get(engine)
            if service is None:
                # No bound on pending work: an embedded caller holds its own futures.
                config = ServiceConfig(max_pending=sys.maxsize)
                service = _services[engine] = cls(engine, config=config, recover=False)
            return service

    def close(self) -> None:
        if "sessions" in vars(self):
            self.sessions.stop()
        self.scheduler.shutdown(wait=True)

    # ---------------------------------------------------------------- helpers

    def _local_runs(self) -> dict[str, tuple[str, int]]:
        """Embedded runs alive in this process (the store does not know them)."""
        runs = {}
        for model_id, base_model in list(self.local_runs.items()):
            with contextlib.suppress(TinkerdError):  # unloaded since
                runs[model_id] = (base_model, self.engine.run(model_id).lora.rank)
        return runs

    def _saved_since(self, path: str, since: float) -> bool:
        """Whether the checkpoint at `path` is complete and was written at or after
        `since` (unix seconds): a save that finished before a crash could report it."""
        try:
            return self.checkpoints.resolve(path).created_at >= since
        except (TinkerdError, ValueError, OSError):
            return False

    def check_run(self, model_id: str, owner: Owner) -> None:
        if owner is None:
            return
        found_owner, status = self.store.run_owner_status(model_id)
        if found_owner != owner:
            raise NotFoundError(f"no training run {model_id!r}")  # another key's looks absent
        if status not in ("active", "unloaded"):  # unloaded: the engine's 409 says so
            try:
                self.engine.run(model_id)
            except NotFoundError:
                raise NotFoundError(_gone(model_id, status)) from None

    def check_base(self, base_model: str) -> None:
        if self.served_models is not None and base_model not in self.served_models:
            raise InvalidRequestError(
                f"base model {base_model!r} is not served here; available: {self.served_models}"
            )

    @contextlib.contextmanager
    def _door(self, model_id: str, owner: Owner, seq_id: int | None) -> Iterator[None]:
        """Checks made before queueing: a request rejected here still uses up its seq_id."""
        self.check_run(model_id, owner)
        try:
            yield
        except TinkerdError:
            self.queue.release(model_id, seq_id)
            raise

    def _run_work(self, owner: Owner, model_id: str, work: Any, seq_id: int | None) -> Future:
        """Queue `work` behind the run's earlier requests, in its base model's lane; it
        takes turns as its owner's (fairness per key, then per run: scheduler.py)."""
        lane = self.engine.run(model_id).base.name
        return self.queue.submit(lane, work, model_id, seq_id, tenant=owner)

    def _recorded(self, owner: Owner, model_id: str, kind: str, work: Any, tokens: int = 0):
        """`work` recording its metrics for the dashboard when it succeeds (runs of a key)."""
        return (
            work if owner is None else timed(self.store, self.engine, model_id, kind, work, tokens)
        )

    # ---------------------------------------------------------------- runs

    def get_server_capabilities(self) -> GetServerCapabilitiesResponse:
        caps = self.engine.get_server_capabilities()
        if self.served_models is not None:
            for model in caps.supported_models:
                model.trainable = model.model_name in self.served_models
            caps.supported_models = [m for m in caps.supported_models if m.trainable]
        return caps

    def _new_run_id(self, owner: Owner, session_id: str | None, model_seq_id: int | None):
        if owner is None:
            return None  # the engine names it
        if session_id is None or model_seq_id is None:
            raise InvalidRequestError("give session_id and model_seq_id")
        self.sessions.check_owner(session_id, owner)
        limit = self.config.max_runs_per_key
        if limit is not None and self.store.count_active_runs(owner) >= limit:
            raise QuotaExceededError(
                f"this API key has {limit} active training runs (limit --max-runs-per-key): "
                "unload one (or end its session) first"
            )
        model_id = f"{session_id}:train:{model_seq_id}"
        if self.store.run_owner(model_id) is not None:
            raise InvalidRequestError(f"model {model_id!r} already exists")
        return model_id

    def _create(self, owner, session_id, model_id, base_model, create, describe=lambda m: m):
        """Queue `create() -> model_id`, registering the run; the future gives
        `describe(model_id)`."""

        def work() -> Any:
            try:
                created = create()
            except Exception:
                if owner is not None:
                    self.store.touch_run(model_id, status="failed")
                raise
            if owner is None:
                self.local_runs[created] = base_model  # before the caller can see the id
            else:
                self.sessions.check_alive(session_id, created)
            return describe(created)

        return self.queue.submit(base_model, work, tenant=owner)

    def create_model(
        self,
        owner: Owner,
        base_model: str,
        lora: LoraConfig,
        session_id: str | None = None,
        model_seq_id: int | None = None,
        user_metadata: dict | None = None,
        optimizer_config: Any = None,
    ) -> Future[str]:
        """A new LoRA run trained with `optimizer_config` (AdamOptimizerConfig, the default,
        or DimuonOptimizerConfig; ours, the SDK's or JSON); the future gives its model_id."""
        optimizer = None if optimizer_config is None else optimizer_config_from(optimizer_config)
        if owner is not None:
            self.check_base(base_model)
            validate_lora_config(lora)
        model_id = self._new_run_id(owner, session_id, model_seq_id)
        if owner is not None:
            self.store.add_run(
                model_id, owner, session_id, base_model, lora.model_dump(), user_metadata or {}
            )
        create = lambda: self.engine.create_model(base_model, lora, model_id, optimizer)  # noqa: E731
        return self._create(owner, session_id, model_id, base_model, create)

    def create_model_from_state(
        self,
        owner: Owner,
        path: str,
        with_optimizer: bool,
        session_id: str | None = None,
        model_seq_id: int | None = None,
        base_model: str | None = None,
        user_metadata: dict | None = None,
        optimizer_config: Any = None,
    ) -> Future[tuple[str, str, LoraConfig]]:
        """A new run made from the checkpoint at `path`: (model_id, base_model, lora). Its
        optimizer is the checkpoint's `with_optimizer`, else `optimizer_config` (AdamW)."""
        optimizer = None if optimizer_config is None else optimizer_config_from(optimizer_config)
        if owner is None:  # local: any checkpoint of the data directory
            info = self.engine.weights_info(path)
            return self._create_from_state(
                owner, path, with_optimizer, None, None, info.base_model, optimizer
            )
        info = self.catalog.readable(path, owner)
        if base_model not in (None, info.base_model):
            raise InvalidRequestError(
                f"{path} was trained on {info.base_model!r}, not {base_model!r}"
            )
        if with_optimizer and not info.has_optimizer:
            raise InvalidRequestError(f"{path} has no optimizer state")
        optimizer = optimizer_for_state(info, with_optimizer, optimizer)
        model_id = self._new_run_id(owner, session_id, model_seq_id)
        flags = {"train_mlp", "train_attn", "train_unembed"}
        lora = info.weights_info().model_dump(include=flags) | {"rank": info.lora_rank}
        self.store.add_run(model_id, owner, session_id, info.base_model, lora, user_metadata or {})
        return self._create_from_state(
            owner, path, with_optimizer, session_id, model_id, info.base_model, optimizer
        )

    def _create_from_state(
        self, owner, path, with_optimizer, session_id, model_id, base_model, optimizer
    ):
        create = lambda: self.engine.create_model_from_state(  # noqa: E731
            path, with_optimizer, model_id, optimizer
        )
        describe = lambda m: (m, base_model, self.engine.run(m).lora)  # noqa: E731
        return self._create(owner, session_id, model_id, base_model, create, describe)

    def get_info(self, owner: Owner, model_id: str) -> GetInfoResponse:
        self.check_run(model_id, owner)
        return self.engine.get_info(model_id)

    def unload_model(self, owner: Owner, model_id: str) -> Future[UnloadModelResponse]:
        self.check_run(model_id, owner)

        def work() -> UnloadModelResponse:
            result = self.engine.unload_model(model_id)
            if owner is not None:
                self.store.touch_run(model_id, status="unloaded")
            self.local_runs.pop(model_id, None)
            self.queue.forget_model(model_id)
            return result

        return self._run_work(owner, model_id, work, None)

    # ---------------------------------------------------------------- training

    def forward(
        self,
        owner: Owner,
        model_id: str,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: Any = None,
        seq_id: int | None = None,
    ) -> Future[ForwardBackwardOutput]:
        """Per-token logprobs and the loss, no gradient (may share a pass)."""
        return self._loss(owner, model_id, data, loss_fn, loss_fn_config, seq_id, backward=False)

    def forward_backward(
        self,
        owner: Owner,
        model_id: str,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: Any = None,
        seq_id: int | None = None,
    ) -> Future[ForwardBackwardOutput]:
        """Like `forward`, and accumulates the loss's gradient into the run."""
        return self._loss(owner, model_id, data, loss_fn, loss_fn_config, seq_id, backward=True)

    def _loss(self, owner, model_id, data, loss_fn, loss_fn_config, seq_id, backward) -> Future:
        with self._door(model_id, owner, seq_id):
            prepared = self.engine.prepare(model_id, data, loss_fn, loss_fn_config)
        work = loss_work(self.engine, prepared, backward)
        if backward and owner is not None:
            tokens = sum(d.model_input.length for d in data)
            work.after = lambda result, seconds: record(
                self.store, self.engine, model_id, "forward_backward", result, seconds, tokens
            )
        return self._run_work(owner, model_id, work, seq_id)

    def forward_backward_custom(
        self,
        owner: Owner,
        model_id: str,
        data: list[Datum],
        loss_fn: Any,
        regularizers: Sequence[RegularizerSpec] = (),
        track_grad_norms: bool = False,
        run_sync_in_executor: bool = False,
        seq_id: int | None = None,
    ) -> Future[CustomLossOutput]:
        """One forward and one backward of `loss_fn` plus weighted `regularizers`,
        evaluated on the live per-token logprobs (see custom_loss.py)."""
        with self._door(model_id, owner, seq_id):
            check_regularizers(loss_fn, regularizers)
            if owner is not None:
                self.engine.check_custom_data(model_id, data)
        grads = gradient_fn(data, loss_fn, regularizers, track_grad_norms, run_sync_in_executor)

        def work() -> CustomLossOutput:
            out, evaluation = self.engine.forward_backward_custom(model_id, data, grads)
            return evaluation.output(out)

        tokens = sum(d.model_input.length for d in data)
        recorded = self._recorded(owner, model_id, "forward_backward", work, tokens)
        return self._run_work(owner, model_id, recorded, seq_id)

    def create_custom_loss(self, owner: str, session_id: str, graph: dict) -> str:
        """Compile an uploaded loss graph for the owner's session; its loss_id."""
        self.sessions.check_owner(session_id, owner)
        return self.losses.add(owner, session_id, graph)

    def forward_backward_uploaded(
        self, owner: str, model_id: str, data: list[Datum], config: dict, seq_id: int | None
    ) -> Future[CustomLossOutput]:
        """loss_fn="custom" over HTTP: forward_backward_custom of uploaded graphs."""
        with self._door(model_id, owner, seq_id):
            loss_fn, regularizers, track = self.losses.terms(owner, config, data)
        return self.forward_backward_custom(
            owner, model_id, data, loss_fn, regularizers, track, seq_id=seq_id
        )

    def optim_step(
        self, owner: Owner, model_id: str, params: Any, seq_id: int | None = None
    ) -> Future[OptimStepResponse]:
        """One step of the run's optimizer: `params` are AdamParams or DimuonParams (ours,
        the SDK's or JSON), of the optimizer the run was created with, else a 400."""
        with self._door(model_id, owner, seq_id):
            params = optim_params_from(params)
            self.engine.check_optim_params(model_id, params)
        work = lambda: self.engine.optim_step(model_id, params)  # noqa: E731
        return self._run_work(
            owner, model_id, self._recorded(owner, model_id, "optim_step", work), seq_id
        )

    # ---------------------------------------------------------------- checkpoints

    def save_state(
        self,
        owner: Owner,
        model_id: str,
        name: str,
        overwrite: bool = False,
        seq_id: int | None = None,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> Future[str]:
        """Weights and optimizer state at tinker://<model_id>/weights/<name>: its path.
        `ttl_seconds`: deleted that long after the save (None: kept); `user_metadata` is
        listed with the checkpoint (an overwrite replaces both)."""
        with self._door(model_id, owner, seq_id):
            tinker_path(model_id, "weights", name)  # a bad name fails now, not in the lane
            check_ttl(ttl_seconds)

        def work() -> str:
            info = self.engine.save_state(model_id, name, overwrite, user_metadata)
            self._expire_after(owner, info.tinker_path, ttl_seconds)
            return info.tinker_path

        return self._run_work(owner, model_id, work, seq_id)

    def save_weights_external(
        self,
        owner: Owner,
        model_id: str,
        name: str,
        ttl_seconds: int | None = None,
        age_recipients: list[str] | None = None,
        seq_id: int | None = None,
    ) -> Future[CheckpointInfo]:
        """The run's adapter in PEFT format (adapter_model.safetensors +
        adapter_config.json, no optimizer) at tinker://<model_id>/external_weights/<name>,
        deleted after `ttl_seconds` if given. With `age_recipients` (age1... or SSH public
        keys; needs `pyrage`), every file is age-encrypted to them when downloaded."""
        with self._door(model_id, owner, seq_id):
            path = tinker_path(model_id, "external_weights", name)
            check_age_recipients(age_recipients or [])
            check_ttl(ttl_seconds)

        def work() -> CheckpointInfo:
            run = self.engine.run(model_id)
            # Recipients first: a crash right after the save must not leave the adapter
            # downloadable unencrypted.
            if owner is not None or age_recipients:  # (an embedded caller's store stays unopened)
                self.store.set_age_recipients(path, age_recipients or [])
            info = self.checkpoints.save(run, "external_weights", name, with_optimizer=False)
            self._expire_after(owner, path, ttl_seconds)
            return info

        return self._run_work(owner, model_id, work, seq_id)

    def _expire_after(self, owner: Owner, path: str, ttl_seconds: int | None) -> None:
        """The TTL of a checkpoint just saved (an overwrite drops the old one's)."""
        if ttl_seconds is not None or owner is not None:  # embedded, no TTL: no store
            self.catalog.set_ttl(path, owner, ttl_seconds)

    def load_state(
        self,
        owner: Owner,
        model_id: str,
        path: str,
        with_optimizer: bool,
        seq_id: int | None = None,
    ) -> Future[None]:
        with self._door(model_id, owner, seq_id):
            if owner is not None:  # the local caller may load any checkpoint
                self.catalog.readable(path, owner)
        work = lambda: self.engine.load_state(model_id, path, with_optimizer)  # noqa: E731
        return self._run_work(owner, model_id, work, seq_id)

    # ---------------------------------------------------------------- sampling

    def save_weights_for_sampler(
        self,
        owner: Owner,
        model_id: str,
        name: str | None,
        sampling_session_seq_id: int | None = None,
        seq_id: int | None = None,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> Future[tuple[SamplerWeights, str | None]]:
        """Freeze the run's weights (after its earlier requests) for sampling: saved as
        `name`, or ephemeral; with a `sampling_session_seq_id`, in a new sampling session.
        The future gives (weights, sampling session id or None). `ttl_seconds` and
        `user_metadata` as for `save_state`; they need a name."""
        with self._door(model_id, owner, seq_id):
            if name is None and (ttl_seconds is not None or user_metadata):
                raise InvalidRequestError(
                    "ttl_seconds and user_metadata need a path (a name): ephemeral sampler "
                    "weights are not a checkpoint"
                )
            if owner is not None and name is None and sampling_session_seq_id is None:
                raise InvalidRequestError("give a path (a name) or a sampling_session_seq_id")
            check_ttl(ttl_seconds)

        def work() -> tuple[SamplerWeights, str | None]:
            weights = self.engine.save_weights_for_sampler(model_id, name, user_metadata)
            if weights.model_path is not None:
                self._expire_after(owner, weights.model_path, ttl_seconds)
            if name is not None or sampling_session_seq_id is None:
                return weights, None
            sampling_id = f"{model_id}:sample:{sampling_session_seq_id}"
            self.sessions.add_sampler(sampling_id, owner, weights)
            return weights, sampling_id

        return self._run_work(owner, model_id, work, seq_id)

"""The engine: training runs (LoRA adapters) on shared base models.

A facade: the runs registry lives here, checkpoints in `checkpoints`, the compute in
`compute` (one path for every pass), sampler versions in `sampler_weights`. All methods
are synchronous and thread-safe; calls on runs of one base model are serialised by that
base's lock, since they share one module tree. Queueing, ordering and futures live above
the engine (`tinkerd.service.scheduler`). With `parallel` a torch.distributed group, each
rank's engine computes its share of every batch (`tinkerd.engine.distributed`).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from tinkerd import losses
from tinkerd.engine.adapters import Run, create_run, delete_run, optimizer_step, step_hyper
from tinkerd.engine.batch import DEFAULT_MAX_BATCH_TOKENS, Batch, collate
from tinkerd.engine.checkpoints import (
    CheckpointInfo,
    CheckpointStore,
    load_adapter_weights,
    load_optimizer_state,
)
from tinkerd.engine.compute import Limits, LossRequest, Member, loss_pass
from tinkerd.engine.memory import bounded_heap, default_budget, parse_bytes
from tinkerd.engine.models import BaseModel, BaseModelRegistry, parse_model_specs
from tinkerd.engine.paging import (
    MAX_RESIDENT_RUNS,
    PagingConfig,
    ResidentSet,
    leftover_pages,
    read_header,
    remove_leftovers,
    spill_dir,
)
from tinkerd.engine.parallel import SingleProcess
from tinkerd.engine.sampler_weights import MAX_SNAPSHOTS, SamplerVersions, SamplerWeights
from tinkerd.engine.sampling.backend import SamplerFactory
from tinkerd.engine.sampling.sampler import Sampler
from tinkerd.engine.tiny import TINY_MODEL_NAME
from tinkerd.errors import InvalidRequestError, ModelUnloadedError, NotFoundError
from tinkerd.types import (
    AdamOptimizerConfig,
    AnyOptimizerConfig,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoraConfig,
    ModelData,
    OptimParams,
    OptimStepResponse,
    SampleResponse,
    SupportedModel,
    UnloadModelResponse,
    WeightsInfoResponse,
)

__all__ = ["Engine", "EngineConfig", "LossRequest", "SamplerWeights"]

log = logging.getLogger("tinkerd.engine")

RANK_OPS = (
    "create_model",
    "create_model_from_state",
    "load_weights",
    "unload_model",
    "run_losses",
    "forward_backward_custom",
    "optim_step",
    "suspend_runs",
    "restore_runs",
)
"""The operations that change runs: every data-parallel rank applies them, in rank 0's
order (`Engine._everywhere`); everything else (sampling, saves, reads) is rank 0's alone."""


@dataclass
class EngineConfig:
    """Limits and sizes of an engine (`tinkerd serve` flags)."""

    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    """Most padded tokens (data x longest datum) in one request (`--max-batch-tokens`)."""
    max_snapshots: int = MAX_SNAPSHOTS
    """Sampler weight versions kept loaded (LoRA-sized each), least recently used out."""
    micro_batch_tokens: int | None = None
    """Most padded tokens per forward of a training pass; a larger pass is cut into
    micro-batches whose gradients accumulate (`compute.Limits`). None: no limit."""
    logits_chunk_tokens: int | None = None
    """Most token positions whose logits are upcast to float32 at once. None: all."""
    dtype: str | None = None
    """Frozen base weights' dtype: `float32`, `bfloat16` or `auto` (bf16 on CUDA, else
    fp32); None: $TINKERD_DTYPE, else auto. LoRA weights, Adam state and logprobs stay fp32."""

    memory_budget_bytes: int | str | None = "auto"
    """Activation memory a pass may use (`--memory-budget`): passes are cut into
    micro-batches, logits chunked and layers checkpointed to fit (`engine.memory`); the
    sizes above, where set, take precedence. `auto`: `memory.default_budget()` (a
    quarter of the memory available at start); None: no budget."""

    run_budget_bytes: int | str | None = "auto"
    """Bytes of runs (LoRA weights, gradients, optimizer state) each base keeps resident
    (`--run-budget`); the least recently used others are paged out (`engine.paging`).
    `auto`: 1/8 of the device's memory (GPU: its total; CPU: available at start); None:
    no limit."""
    max_resident_runs: int | None = MAX_RESIDENT_RUNS
    """Runs each base keeps resident at most (`--max-resident-runs`); None: no limit."""
    host_run_budget_bytes: int | str | None = "auto"
    """Bytes of paged runs kept in host memory before disk (`--host-run-budget`). `auto`:
    a quarter of the host's available memory on a GPU machine, 0 (straight to disk) on
    a CPU-only one."""

    sampling_budget_bytes: int | str | None = "auto"
    """Memory each base model's sampler may hold (`--sampling-memory-budget`): the batch's
    KV cache and a prefill's working memory (long prompts are prefilled in chunks to fit);
    requests join the batch while it fits, and one that never could is a 400. `auto`: a
    quarter of the memory available at start; None: no budget."""
    sampling_latency_rows: int | str | None = "auto"
    """Rows a sampler batch keeps to while a light API key (a few rows) is active
    (`--sampling-latency-rows`; `Sampler.latency_rows`). `auto`: 8 on a CPU, no cap on a
    GPU; None: no cap."""

    @property
    def kv_budget(self) -> int | None:
        budget = self.sampling_budget_bytes
        if isinstance(budget, str):
            budget = default_budget() if budget == "auto" else parse_bytes(budget)
        return budget

    def paging(self, device: str | None) -> PagingConfig:
        """The resident-set sizes, `auto` resolved for `device`."""
        return PagingConfig.resolve(
            self.run_budget_bytes, self.max_resident_runs, self.host_run_budget_bytes, device
        )

    @property
    def limits(self) -> Limits:
        budget = self.memory_budget_bytes
        if isinstance(budget, str):
            budget = default_budget() if budget == "auto" else parse_bytes(budget)
        return Limits(self.micro_batch_tokens, self.logits_chunk_tokens, budget)


def optimizer_for_state(
    info: CheckpointInfo,
    with_optimizer: bool,
    optimizer_config: AnyOptimizerConfig | None,
) -> AnyOptimizerConfig:
    """The optimizer of a run made from checkpoint `info`: the checkpoint's when its state
    is restored (`optimizer_config` may only repeat it), else `optimizer_config` or AdamW."""
    if not with_optimizer:
        return optimizer_config or AdamOptimizerConfig()
    if optimizer_config is not None and optimizer_config != info.optimizer_config:
        raise InvalidRequestError(
            f"{info.tinker_path} holds {info.optimizer_config.type!r} optimizer state; "
            f"optimizer_config {optimizer_config.type!r} cannot override restored state"
        )
    return info.optimizer_config


class Engine:
    def __init__(
        self,
        cache_dir: Path | None = None,
        device: str | None = None,
        extra_models: list[str] | None = None,
        data_dir: Path | None = None,
        recover_checkpoints: bool = True,
        sampler_factory: SamplerFactory = Sampler,
        config: EngineConfig | None = None,
        parallel: SingleProcess | None = None,
    ):
        """`data_dir` defaults to $TINKERD_DATA_DIR, else ~/.tinkerd. `parallel`: this
        process's place in a data-parallel group (default: a single process)."""
        self.data_dir = Path(data_dir or os.environ.get("TINKERD_DATA_DIR") or "~/.tinkerd")
        self.data_dir = self.data_dir.expanduser()
        self.config = config or EngineConfig()
        self.limits = self.config.limits
        """What a pass may compute at once (the memory budget resolved once, at start)."""
        if self.limits.memory_budget_bytes is not None:
            bounded_heap(self.limits.memory_budget_bytes)  # freed activations go back
        self.parallel = parallel or SingleProcess()
        self._checkpoints: CheckpointStore | None = None
        self._recover_checkpoints = recover_checkpoints
        sources = parse_model_specs(extra_models)  # `NAME=SOURCE` or `SOURCE`
        self.registry = BaseModelRegistry(
            cache_dir=cache_dir, device=device, sources=sources, dtype=self.config.dtype
        )
        self.advertised_models = [TINY_MODEL_NAME, *sources]
        self._runs: dict[str, Run] = {}
        self._unloaded: set[str] = set()
        self._lock = threading.Lock()
        self.paging = self.config.paging(device)
        """How many runs each base keeps resident, and where the others go."""
        self._pagers: dict[str, ResidentSet] = {}
        self._spill_dir: Path | None = None
        self.samplers = SamplerVersions(
            self._load_base, lambda: self.checkpoints, sampler_factory, self.config.max_snapshots
        )
        """Sampler versions and the sampler backend of each base model."""
        self.samplers.kv_budget = self.config.kv_budget
        self.samplers.latency_rows = self.config.sampling_latency_rows

    # ------------------------------------------------------------ runs

    def get_server_capabilities(self) -> GetServerCapabilitiesResponse:
        return GetServerCapabilitiesResponse(
            supported_models=[
                SupportedModel(model_name=name, trainable=True, sampleable=True)
                for name in dict.fromkeys(self.advertised_models + self.registry.loaded())
            ]
        )

    def create_model(
        self,
        base_model: str,
        lora_config: LoraConfig,
        model_id: str | None = None,
        optimizer_config: AnyOptimizerConfig | None = None,
    ) -> str:
        """Create a LoRA training run on `base_model`, trained with `optimizer_config`
        (default AdamW) for its whole life; returns its model_id."""
        self._load_base(base_model)  # an unknown model is refused here, on rank 0 alone
        # The same seed and id on every rank, so every rank starts from the same weights.
        seed = lora_config.seed if lora_config.seed is not None else secrets.randbits(63)
        lora = lora_config.model_copy(update={"seed": seed})
        model_id = model_id or f"run-{uuid.uuid4().hex[:12]}"
        return self._everywhere("create_model", base_model, lora, model_id, optimizer_config)

    def _create_model(self, base_model, lora, model_id, optimizer_config) -> str:
        base = self._load_base(base_model)
        run = create_run(base, model_id, lora, optimizer_config)
        self.pager(base).register(run)
        with self._lock:
            self._runs[model_id] = run
        return model_id

    # ------------------------------------------------------------ every rank

    def _everywhere(self, op: str, *args: Any) -> Any:
        """`self._<op>(*args)`: an operation that changes runs, which every data-parallel
        rank applies in rank 0's order (`parallel.in_order`; one process: just this)."""
        with self.parallel.in_order(op, args):
            return getattr(self, f"_{op}")(*args)

    def apply(self, op: str, args: tuple) -> Any:
        """A rank other than 0: apply an operation rank 0 announced (`serve_worker`)."""
        if op not in RANK_OPS:
            raise InvalidRequestError(f"unknown rank operation {op!r}")
        if op == "run_losses":  # requests travel as their arguments: each rank prepares
            keys, backward = args
            return self._run_losses([self._prepare_or_error(key) for key in keys], backward)
        if op == "forward_backward_custom":  # rank 0 alone holds the gradient function
            return self._forward_backward_custom(*args, None)
        return getattr(self, f"_{op}")(*args)

    def _prepare_or_error(self, key: tuple | None) -> LossRequest | Exception:
        if key is None:
            return InvalidRequestError("refused on rank 0")
        try:
            return self.prepare(*key)
        except Exception as e:  # noqa: BLE001 -- fails the request, on every rank alike
            return e

    # ------------------------------------------------------------ paging

    def pager(self, base: BaseModel) -> ResidentSet:
        """The base's resident set (made on first use)."""
        with self._lock:
            if base.name not in self._pagers:
                if self._spill_dir is None:
                    self._spill_dir = spill_dir(self.data_dir, self.parallel.rank)
                self._pagers[base.name] = ResidentSet(base, self.paging, self._spill_dir)
            return self._pagers[base.name]

    def resident(self, *runs: Run) -> None:
        """Page `runs` (of one base) in, if they are not resident, for a change to them."""
        if runs:
            self.pager(runs[0].base).use(list(runs))

    def suspend_runs(self) -> None:
        """A clean shutdown: every run of every base paged to disk and kept there, for
        the next server on this data dir (`restore_runs`). The engine serves no more."""
        self._everywhere("suspend_runs")

    def _suspend_runs(self) -> None:
        with self._lock:
            pagers = list(self._pagers.values())
        for pager in pagers:
            pager.suspend()

    def restore_runs(self, wanted: list[str]) -> list[str]:
        """Take back the runs in `wanted` that an earlier server on this data dir left
        paged to disk (their page files, whole); the rest of its files are removed.
        Returns the model_ids taken back (docs/multi-tenant.md, "Restarts")."""
        return self._everywhere("restore_runs", sorted(wanted))

    def _restore_runs(self, wanted: list[str]) -> list[str]:
        rank, taken, keep = self.parallel.rank, [], set(wanted)
        left = leftover_pages(self.data_dir, rank)
        for path in left:
            try:
                header = read_header(path)
                model_id = header["model_id"]
                if model_id not in keep or model_id in self._runs:
                    continue
                run = self.pager(self._load_base(header["base_model"])).adopt(header, path)
            except (ValueError, KeyError, InvalidRequestError, NotFoundError) as e:
                log.warning("paged run %s not taken back: %s", path.name, e)  # not whole
                continue
            with self._lock:
                self._runs[model_id] = run
            taken.append(model_id)
        moved = {self._runs[m].pager.entries[m].path for m in taken}
        remove_leftovers(self.data_dir, rank, [p for p in left if p not in moved], self._spill_dir)
        return taken

    def paging_stats(self) -> dict[str, dict[str, float]]:
        """Per base model: resident and paged runs, page-ins and their time
        (`ResidentSet.snapshot`)."""
        with self._lock:
            pagers = dict(self._pagers)
        return {name: pager.snapshot() for name, pager in pagers.items()}

    def _load_base(self, name: str) -> BaseModel:
        try:
            return self.registry.get(name)
        except (OSError, ValueError) as e:
            raise InvalidRequestError(f"cannot load base model {name!r}: {e}") from None

    def model_ids(self) -> list[str]:
        """The live runs' model_ids (created, not unloaded)."""
        with self._lock:
            return list(self._runs)

    def run(self, model_id: str) -> Run:
        with self._lock:
            if model_id in self._runs:
                return self._runs[model_id]
            if model_id in self._unloaded:
                raise ModelUnloadedError(f"model {model_id!r} was unloaded")
        raise NotFoundError(f"no training run {model_id!r}")

    def base_model(self, name: str) -> BaseModel:
        return self._load_base(name)

    def get_info(self, model_id: str) -> GetInfoResponse:
        run = self.run(model_id)
        return GetInfoResponse(
            type="get_info",
            model_id=model_id,
            model_data=ModelData(
                arch=run.base.arch, model_name=run.base.name, tokenizer_id=run.base.tokenizer_id
            ),
            is_lora=True,
            lora_rank=run.lora.rank,
            model_name=run.base.name,
            optimizer_config=run.optimizer_config,
        )

    def unload_model(self, model_id: str) -> UnloadModelResponse:
        """Free the run's adapter and optimizer state; the base stays loaded."""
        self.run(model_id)
        return self._everywhere("unload_model", model_id)

    def _unload_model(self, model_id: str) -> UnloadModelResponse:
        run = self.run(model_id)
        with self._lock:
            self._runs.pop(model_id, None)
            self._unloaded.add(model_id)
        delete_run(run)
        return UnloadModelResponse(model_id=model_id, type="unload_model")

    # ------------------------------------------------------------ checkpoints

    @property
    def checkpoints(self) -> CheckpointStore:
        """Durable checkpoints under `<data_dir>/checkpoints` (made on first use)."""
        with self._lock:
            if self._checkpoints is None:
                root = self.data_dir / "checkpoints"
                self._checkpoints = CheckpointStore(root, recover=self._recover_checkpoints)
            return self._checkpoints

    def save_state(
        self,
        model_id: str,
        name: str,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> CheckpointInfo:
        """Save the run's weights and optimizer state as `tinker://<model_id>/weights/<name>`."""
        run = self.run(model_id)
        return self.checkpoints.save(
            run,
            "weights",
            name,
            with_optimizer=True,
            overwrite=overwrite,
            user_metadata=user_metadata,
        )

    def load_state(self, model_id: str, path: str, with_optimizer: bool) -> None:
        """Replace the run's weights with a checkpoint's; its optimizer state too if
        `with_optimizer` (of the same optimizer as the run's), else the optimizer starts
        afresh. Pending gradients are dropped.
        Everything is checked before anything changes, so a refused load leaves the run as
        it was."""
        run = self.run(model_id)
        info = self.checkpoints.resolve(path)
        if with_optimizer and not info.has_optimizer:
            raise InvalidRequestError(
                f"{path} has no optimizer state (sampler weights never do); use load_state"
            )
        saved, kind = info.optimizer_config.type, run.optimizer_config.type
        if with_optimizer and saved != kind:
            raise InvalidRequestError(
                f"{path} holds {saved!r} optimizer state; run {model_id!r} uses the {kind!r} "
                "optimizer (load_state loads the weights alone)"
            )
        self.checkpoints.verify(info)
        self._everywhere("load_weights", model_id, path, with_optimizer)

    def _load_weights(self, model_id: str, path: str, with_optimizer: bool) -> None:
        """The load itself, once `load_state` checked and verified the checkpoint."""
        run, info = self.run(model_id), self.checkpoints.resolve(path)
        with run.base.lock:
            self.resident(run)
            load_adapter_weights(run.base, model_id, info)
            run.reset_optimizer()
            run.step = 0
            if with_optimizer:
                load_optimizer_state(run, info)

    def create_model_from_state(
        self,
        path: str,
        with_optimizer: bool,
        model_id: str | None = None,
        optimizer_config: AnyOptimizerConfig | None = None,
    ) -> str:
        """A new run shaped like the checkpoint (base model, rank, train_* flags), loaded
        from it; returns its model_id. Its optimizer: with `with_optimizer` the
        checkpoint's (an `optimizer_config` naming another is refused), else
        `optimizer_config` (default AdamW)."""
        info = self.checkpoints.resolve(path)  # not found / malformed: refused on rank 0
        optimizer_config = optimizer_for_state(info, with_optimizer, optimizer_config)
        model_id = model_id or f"run-{uuid.uuid4().hex[:12]}"
        args = (path, with_optimizer, model_id, optimizer_config)
        return self._everywhere("create_model_from_state", *args)

    def _create_model_from_state(self, path, with_optimizer, model_id, optimizer_config) -> str:
        info = self.checkpoints.resolve(path)
        lora = LoraConfig(
            rank=info.lora_rank,
            train_mlp=info.train_mlp,
            train_attn=info.train_attn,
            train_unembed=info.train_unembed,
            seed=0,  # every weight is the checkpoint's
        )
        self._create_model(info.base_model, lora, model_id, optimizer_config)
        try:
            self._load_weights(model_id, path, with_optimizer)
        except BaseException:
            self._unload_model(model_id)
            raise
        return model_id

    def weights_info(self, path: str) -> WeightsInfoResponse:
        return self.checkpoints.resolve(path).weights_info()

    # ------------------------------------------------------------ compute

    def forward_backward(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
        backward: bool = True,
    ) -> ForwardBackwardOutput:
        """Loss and per-token logprobs, and (`backward`) the loss's gradient added to the
        run's accumulated one."""
        return self.run_loss(self.prepare(model_id, data, loss_fn, loss_fn_config), backward)

    def forward(self, *args: Any, **kwargs: Any) -> ForwardBackwardOutput:
        """`forward_backward` with no gradient."""
        return self.forward_backward(*args, **kwargs, backward=False)

    def run_loss(self, request: LossRequest, backward: bool) -> ForwardBackwardOutput:
        """One request's pass; raises what it failed with."""
        (out,) = self.run_losses([request], backward)
        if isinstance(out, Exception):
            raise out
        return out

    def check_optim_params(self, model_id: str, params: OptimParams) -> None:
        """Refuse (400) `params` of another optimizer than the run's, or out of range."""
        step_hyper(self.run(model_id), params)

    def optim_step(self, model_id: str, params: OptimParams) -> OptimStepResponse:
        """One step of the run's optimizer (AdamParams for AdamW, DimuonParams for Dimuon)
        from the gradient accumulated since the last (summed over the data-parallel ranks
        first, so that every rank takes the same step)."""
        self.check_optim_params(model_id, params)  # refused on rank 0 alone
        return self._everywhere("optim_step", model_id, params)

    def _optim_step(self, model_id: str, params: OptimParams) -> OptimStepResponse:
        run = self.run(model_id)
        with run.base.lock:
            self.resident(run)
            self.parallel.sum_gradients(run.params)
            return OptimStepResponse(metrics=optimizer_step(run, params))

    def check_custom_data(self, model_id: str, data: list[Datum]) -> None:
        """Validate data for forward_backward_custom without computing anything."""
        self._collate(self.run(model_id).base, data, None, "custom")

    def forward_backward_custom(
        self,
        model_id: str,
        data: list[Datum],
        gradient_fn: Callable[[list[Tensor]], tuple[list[Tensor], Any]] | None,
    ) -> tuple[ForwardBackwardOutput, Any]:
        """One forward, then one backward from the logprobs with the gradient that
        `gradient_fn(per-datum logprobs)` returns (with anything else it returns).
        Data-parallel ranks other than 0 pass no `gradient_fn` and get None."""
        # Bad data fails the same collation on every rank (the service checked it already).
        with self.parallel.in_order("forward_backward_custom", (model_id, data)):  # no fn
            return self._forward_backward_custom(model_id, data, gradient_fn)

    def _forward_backward_custom(
        self, model_id: str, data: list[Datum], gradient_fn: Callable | None
    ) -> tuple[ForwardBackwardOutput, Any]:
        run = self.run(model_id)
        request = LossRequest(model_id, "custom", None, {}, self._collate(run.base, data), data)
        extra: list[Any] = []

        def gradient(logprobs: list[Tensor]) -> list[Tensor]:
            grads, more = gradient_fn(logprobs)
            extra.append(more)
            return grads

        with run.base.lock:
            self.resident(run)
            members = self._members([request], [run])
            outputs = loss_pass([request], members, True, self.parallel, gradient, self.limits)
        if outputs is None:
            return None  # type: ignore[return-value] -- a rank other than 0
        if isinstance(outputs[0], Exception):
            raise outputs[0]
        return outputs[0], extra[0]

    def prepare(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float] | None,
    ) -> LossRequest:
        """Validate a loss request completely (no model compute): callers such as the HTTP
        server use this to reject bad input before queueing it."""
        run = self.run(model_id)
        spec = losses.get_loss(loss_fn)
        config = losses.resolve_config(loss_fn, loss_fn_config)
        batch = self._collate(run.base, data, spec, loss_fn)
        return LossRequest(model_id, loss_fn, spec, config, batch, list(data))

    def pass_limits(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str = "cross_entropy",
        backward: bool = True,
    ) -> Limits:
        """What a pass of `data` alone on the run would compute at once (micro-batch tokens
        and rows, logits chunk, layer checkpointing): the engine's limits with its memory
        budget resolved for these rows (`Limits.for_pass`). For benchmarks and logs."""
        run = self.run(model_id)
        members = self._members([self.prepare(model_id, data, loss_fn, None)], [run])
        return self.limits.for_pass(run.base, members, backward)

    def _collate(
        self,
        base: BaseModel,
        data: list[Datum],
        spec: losses.LossSpec | None = None,
        loss_fn: str = "custom",
    ) -> Batch:
        return collate(
            data,
            spec,
            loss_fn,
            base.vocab_size,
            base.max_context_length,
            self.config.max_batch_tokens,
            base.vision,
            base.name,
        )

    def run_losses(
        self, requests: list[LossRequest | Exception], backward: bool
    ) -> list[ForwardBackwardOutput | Exception]:
        """Several requests (of distinct runs, or not) on one base in one batched pass:
        their rows are packed end to end, each run's rows go through its own adapter
        (`lora`), each request's loss is its own, and one backward of their sum
        gives every run exactly the gradient its request alone would. Returns one output
        per request, or the Exception that request failed with (the others still run;
        a request given as an Exception fails with it). Data-parallel ranks other than 0
        get a list of None."""
        keys = [
            None if isinstance(r, Exception) else (r.model_id, r.data, r.loss_fn, r.config)
            for r in requests
        ]
        with self.parallel.in_order("run_losses", (keys, backward)):
            return self._run_losses(requests, backward)

    def _run_losses(
        self, requests: list[LossRequest | Exception], backward: bool
    ) -> list[ForwardBackwardOutput | Exception]:
        results: list[Any] = [None] * len(requests)
        by_base: dict[str, list[tuple[int, Run]]] = {}
        for i, request in enumerate(requests):
            try:
                if isinstance(request, Exception):
                    raise request
                run = self.run(request.model_id)  # may have been unloaded while queued
            except Exception as e:  # noqa: BLE001 -- handed back as that request's result
                results[i] = e
                continue
            by_base.setdefault(run.base.name, []).append((i, run))
        for whole in by_base.values():  # in the same order on every rank
            pager = self.pager(whole[0][1].base)
            for part in pager.chunks([run for _, run in whole]):  # each fits the budget
                group = [whole[k] for k in part]
                with pager.base.lock:
                    pager.use([run for _, run in group])
                    mine = [requests[i] for i, _ in group]
                    members = self._members(mine, [run for _, run in group])
                    outputs = loss_pass(mine, members, backward, self.parallel, None, self.limits)
                for (i, _), out in zip(group, outputs or [None] * len(group)):
                    results[i] = out
        return results

    def _members(self, requests: list[LossRequest], runs: list[Run]) -> list[Member]:
        """This rank's rows of each request: all of them on a single process, else its
        contiguous share (and, under FSDP, one zero-weight datum where it has none, since
        every rank must join every forward and backward)."""
        parallel, members = self.parallel, []
        for i, (request, run) in enumerate(zip(requests, runs)):
            part, scale = parallel.shard(request.data), 1.0
            if not part and parallel.fsdp:
                part, scale = request.data[:1], 0.0
            if len(part) == len(request.data):
                members.append(Member(i, run, request, scale))
            elif part:
                batch = self._collate(run.base, part, request.spec, request.loss_fn)
                share = LossRequest(
                    request.model_id, request.loss_fn, request.spec, request.config, batch, part
                )
                members.append(Member(i, run, share, scale))
        return members

    # ------------------------------------------------------------ sampling

    def save_weights_for_sampler(
        self, model_id: str, name: str | None = None, user_metadata: dict[str, str] | None = None
    ) -> SamplerWeights:
        """Freeze the run's current weights as a sampler version (`SamplerVersions.save`)."""
        return self.samplers.save(self.run(model_id), name, user_metadata)

    def save_weights_inflight(self, model_id: str) -> SamplerWeights:
        """Publish the run's current weights to its inflight target
        (`SamplerVersions.save_inflight`)."""
        return self.samplers.save_inflight(self.run(model_id))

    def sampler_for(
        self, base_model: str | None = None, model_path: str | None = None
    ) -> SamplerWeights:
        """The weights to sample from: a base model as it is, or saved weights. Given
        both (as the official SDK allows), the saved weights win, and `base_model` must
        be theirs (its served name or hub id)."""
        if base_model is None or model_path is None:
            return self.samplers.find(base_model, model_path)
        weights = self.samplers.find(model_path=model_path)
        if base_model not in (weights.base_model, self._load_base(weights.base_model).hub_id):
            raise InvalidRequestError(
                f"{model_path} was trained on {weights.base_model!r}, not {base_model!r}"
            )
        return weights

    def get_sampler(self, sampler_id: str) -> SamplerWeights:
        return self.samplers.get(sampler_id)

    def sample(self, weights: SamplerWeights, *args: Any, **kwargs: Any) -> Future[SampleResponse]:
        """`SamplerVersions.sample`: validate now (raises InvalidRequestError), decode in the
        base's batched sampler."""
        self._check_sampling()
        return self.samplers.sample(weights, *args, **kwargs)

    def prepare_sample(
        self, weights: SamplerWeights, *args: Any, **options: Any
    ) -> Callable[[], Future[SampleResponse]]:
        """`SamplerVersions.prepare`: validate now (raises InvalidRequestError); the
        returned call queues it in the base's sampler. `options`: `make_spec`'s keywords
        (prompt_logprobs, topk_*, `tenant`, `listener`)."""
        self._check_sampling()
        return self.samplers.prepare(weights, *args, **options)

    def _check_sampling(self) -> None:
        if self.parallel.fsdp:  # rank 0's forward would wait for the other ranks' all-gathers
            raise InvalidRequestError(
                "sampling is not available on a server started with --fsdp (each rank holds "
                "only part of the base model); serve sampling without --fsdp"
            )

    def sampler_stats(self, base_model: str) -> list[tuple[int, int]]:
        """(rows, distinct requests) of the base's recent decode steps."""
        return self.samplers.stats(base_model)

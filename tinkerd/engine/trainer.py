"""The engine: training runs (LoRA adapters) on shared base models.

All methods are synchronous and thread-safe; calls on runs of one base model are
serialised by that base's lock, since they share one module tree. Queueing, ordering
and futures live above the engine (`tinkerd.server.scheduler`).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tinkerd import losses
from tinkerd.engine.adapters import (
    Run,
    adam_step,
    add_frozen_adapter,
    create_run,
    delete_run,
    remove_adapter,
    snapshot_weights,
)
from tinkerd.engine.batch import Batch, collate
from tinkerd.engine.checkpoints import (
    CheckpointInfo,
    CheckpointStore,
    add_adapter_from_checkpoint,
    load_adapter_weights,
    load_optimizer_state,
    tinker_path,
)
from tinkerd.engine.lora import Segment, packed_logits, pad_cat, trainable
from tinkerd.engine.models import BaseModel, BaseModelRegistry, parse_model_specs
from tinkerd.engine.sampling.backend import SamplerBackend, SamplerFactory
from tinkerd.engine.sampling.sampler import Sampler
from tinkerd.engine.sampling.spec import BASE_ADAPTER, make_spec
from tinkerd.engine.tiny import TINY_MODEL_NAME
from tinkerd.errors import InvalidRequestError, ModelUnloadedError, NotFoundError
from tinkerd.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoraConfig,
    ModelData,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    SupportedModel,
    TensorData,
    UnloadModelResponse,
    WeightsInfoResponse,
)


class Engine:
    def __init__(
        self,
        cache_dir: Path | None = None,
        device: str | None = None,
        extra_models: list[str] | None = None,
        data_dir: Path | None = None,
        recover_checkpoints: bool = True,
        sampler_factory: SamplerFactory = Sampler,
    ):
        self.data_dir = Path(data_dir or os.environ.get("TINKERD_DATA_DIR") or "~/.tinkerd")
        self.data_dir = self.data_dir.expanduser()
        self._checkpoints: CheckpointStore | None = None
        self._recover_checkpoints = recover_checkpoints
        sources = parse_model_specs(extra_models)  # `NAME=SOURCE` or `SOURCE`
        self.registry = BaseModelRegistry(cache_dir=cache_dir, device=device, sources=sources)
        self.advertised_models = [TINY_MODEL_NAME, *sources]
        self._runs: dict[str, Run] = {}
        self._unloaded: set[str] = set()
        self._lock = threading.Lock()
        self.sampler_factory = sampler_factory
        """Makes the sampler backend of each base model (`tinkerd.engine.sampling.backend`)."""
        self._samplers: dict[str, SamplerBackend] = {}
        self._sampler_weights: dict[str, SamplerWeights] = {}  # by sampler_id
        self._snapshots: OrderedDict[str, SamplerWeights] = OrderedDict()  # in memory, LRU
        self.max_snapshots = MAX_SNAPSHOTS
        self._reload_lock = threading.Lock()

    # ------------------------------------------------------------ runs

    def get_server_capabilities(self) -> GetServerCapabilitiesResponse:
        return GetServerCapabilitiesResponse(
            supported_models=[
                SupportedModel(model_name=name, trainable=True, sampleable=True)
                for name in dict.fromkeys(self.advertised_models + self.registry.loaded())
            ]
        )

    def create_model(
        self, base_model: str, lora_config: LoraConfig, model_id: str | None = None
    ) -> str:
        """Create a LoRA training run on `base_model`; returns its model_id."""
        model_id = model_id or f"run-{uuid.uuid4().hex[:12]}"
        base = self._load_base(base_model)
        run = create_run(base, model_id, lora_config)
        with self._lock:
            self._runs[model_id] = run
        return model_id

    def _load_base(self, name: str) -> BaseModel:
        try:
            return self.registry.get(name)
        except (OSError, ValueError) as e:
            raise InvalidRequestError(f"cannot load base model {name!r}: {e}") from None

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
                arch=run.base.arch, model_name=run.base.name, tokenizer_id=str(run.base.path)
            ),
            is_lora=True,
            lora_rank=run.lora.rank,
            model_name=run.base.name,
        )

    def unload_model(self, model_id: str) -> UnloadModelResponse:
        """Free the run's adapter and optimizer state; the base stays loaded."""
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

    def save_state(self, model_id: str, name: str, overwrite: bool = False) -> CheckpointInfo:
        """Save the run's weights and optimizer state as `tinker://<model_id>/weights/<name>`."""
        run = self.run(model_id)
        return self.checkpoints.save(run, "weights", name, with_optimizer=True, overwrite=overwrite)

    def load_state(self, model_id: str, path: str, with_optimizer: bool) -> None:
        """Replace the run's weights with a checkpoint's; its AdamW state too if
        `with_optimizer`, else the optimizer starts afresh. Pending gradients are dropped.
        Everything is checked before anything changes, so a refused load leaves the run as
        it was."""
        run = self.run(model_id)
        info = self.checkpoints.resolve(path)
        if with_optimizer and not info.has_optimizer:
            raise InvalidRequestError(
                f"{path} has no optimizer state (sampler weights never do); use load_state"
            )
        self.checkpoints.verify(info)
        with run.base.lock:
            load_adapter_weights(run.base, model_id, info)
            run.optimizer.zero_grad(set_to_none=True)
            run.optimizer.state.clear()
            run.step = 0
            if with_optimizer:
                load_optimizer_state(run, info)

    def create_model_from_state(
        self, path: str, with_optimizer: bool, model_id: str | None = None
    ) -> str:
        """A new run shaped like the checkpoint (base model, rank, train_* flags), loaded
        from it; returns its model_id."""
        info = self.checkpoints.resolve(path)
        lora = LoraConfig(
            rank=info.lora_rank,
            train_mlp=info.train_mlp,
            train_attn=info.train_attn,
            train_unembed=info.train_unembed,
        )
        model_id = self.create_model(info.base_model, lora, model_id)
        try:
            self.load_state(model_id, path, with_optimizer)
        except BaseException:
            self.unload_model(model_id)
            raise
        return model_id

    def weights_info(self, path: str) -> WeightsInfoResponse:
        return self.checkpoints.resolve(path).weights_info()

    # ------------------------------------------------------------ compute

    def forward(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        """Loss and per-token logprobs, with no gradient."""
        return self.run_loss(self.prepare(model_id, data, loss_fn, loss_fn_config), False)

    def forward_backward(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        """Loss, logprobs, and the loss's gradient added to the run's accumulated one."""
        return self.run_loss(self.prepare(model_id, data, loss_fn, loss_fn_config), True)

    def optim_step(self, model_id: str, adam_params: AdamParams) -> OptimStepResponse:
        run = self.run(model_id)
        with run.base.lock:
            return OptimStepResponse(metrics=adam_step(run, adam_params))

    def check_custom_data(self, model_id: str, data: list[Datum]) -> None:
        """Validate data for forward_backward_custom without computing anything."""
        base = self.run(model_id).base
        collate(data, None, "custom", base.vocab_size, base.max_context_length)

    def forward_backward_custom(
        self,
        model_id: str,
        data: list[Datum],
        gradient_fn: Callable[[list[Tensor]], tuple[list[Tensor], Any]],
    ) -> tuple[ForwardBackwardOutput, Any]:
        """One forward, then one backward from the logprobs with the gradient that
        `gradient_fn(per-datum logprobs)` returns (with anything else it returns)."""
        run = self.run(model_id)
        base = run.base
        batch = collate(data, None, "custom", base.vocab_size, base.max_context_length)
        with base.lock:
            run.activate()
            with torch.enable_grad():
                logprobs = token_logprobs(base.peft_model, batch, base.device)
            per_datum = list(logprobs.detach().cpu().split(batch.lengths))
            grads, extra = gradient_fn(per_datum)  # no gradient reaches the model if it raises
            logprobs.backward(
                torch.cat([g.reshape(p.shape) for g, p in zip(grads, per_datum)]).to(
                    logprobs.device, logprobs.dtype
                )
            )
        out = _output(batch, logprobs.detach(), None, 0.0)
        return out, extra

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
        base = run.base
        batch = collate(data, spec, loss_fn, base.vocab_size, base.max_context_length)
        return LossRequest(model_id, loss_fn, spec, config, batch)

    def run_loss(self, request: LossRequest, backward: bool) -> ForwardBackwardOutput:
        run = self.run(request.model_id)  # may have been unloaded while queued
        base, batch = run.base, request.batch
        with base.lock, torch.set_grad_enabled(backward):
            run.activate()
            logprobs = token_logprobs(base.peft_model, batch, base.device)
            inputs = {k: v.to(logprobs.device) for k, v in batch.inputs.items()}
            elementwise = request.spec.fn(logprobs, inputs, request.config)
            loss = elementwise.sum()
            if not torch.isfinite(loss):
                raise _non_finite(request, loss)
            if backward:
                loss.backward()
        return _output(batch, logprobs.detach(), elementwise.detach(), loss.item())

    def run_losses(
        self, requests: list[LossRequest], backward: bool
    ) -> list[ForwardBackwardOutput | Exception]:
        """Several requests (of distinct runs, or not) on one base in one batched pass:
        their rows are packed end to end, each run's rows go through its own adapter
        (`tinkerd.engine.lora`), each request's loss is its own, and one backward of their sum
        gives every run exactly the gradient its request alone would. Returns one output
        per request, or the Exception that request failed with (the others still run)."""
        if len(requests) == 1:
            try:
                return [self.run_loss(requests[0], backward)]
            except Exception as e:  # noqa: BLE001 -- handed back as that request's result
                return [e]
        results: list[Any] = [None] * len(requests)
        by_base: dict[str, list[tuple[int, Run]]] = {}
        for i, request in enumerate(requests):
            try:
                run = self.run(request.model_id)  # may have been unloaded while queued
            except Exception as e:  # noqa: BLE001
                results[i] = e
                continue
            by_base.setdefault(run.base.name, []).append((i, run))
        for members in by_base.values():
            outputs = self._packed_pass([requests[i] for i, _ in members], members, backward)
            for (i, _), out in zip(members, outputs):
                results[i] = out
        return results

    def _packed_pass(
        self, requests: list[LossRequest], members: list[tuple[int, Run]], backward: bool
    ) -> list[ForwardBackwardOutput | Exception]:
        base = members[0][1].base
        width = max(r.batch.input_ids.shape[1] for r in requests)
        segments, start = [], 0
        for request, (_, run) in zip(requests, members):
            rows = request.batch.input_ids.shape[0]
            segments.append(Segment(run.model_id, start, start + rows))
            start += rows
        input_ids = pad_cat([r.batch.input_ids for r in requests], width).to(base.device)
        results: list[Any] = [None] * len(requests)
        finished = []  # (index, logprobs, elementwise, loss) of the finite losses
        with base.lock, torch.set_grad_enabled(backward):
            if backward:
                for _, run in members:
                    trainable(run.params)
            logits = packed_logits(base.peft_model, input_ids, segments)
            for k, (request, seg) in enumerate(zip(requests, segments)):
                batch = request.batch
                mask = batch.mask.to(base.device)
                rows = logits[seg.start : seg.end, : mask.shape[1]][mask].float()
                logprobs = target_logprobs(rows, batch.targets.to(base.device))
                inputs = {key: v.to(logprobs.device) for key, v in batch.inputs.items()}
                elementwise = request.spec.fn(logprobs, inputs, request.config)
                loss = elementwise.sum()
                if not torch.isfinite(loss):
                    results[k] = _non_finite(request, loss)
                    continue
                finished.append((k, logprobs, elementwise, loss))
            if backward and finished:
                # Only into the runs whose loss is finite: the others' adapters are in the
                # graph too, and would otherwise accumulate a (zero) gradient.
                params = list(
                    {id(p): p for k, *_ in finished for p in members[k][1].params}.values()
                )
                torch.stack([loss for *_, loss in finished]).sum().backward(inputs=params)
        for k, logprobs, elementwise, loss in finished:
            results[k] = _output(
                requests[k].batch, logprobs.detach(), elementwise.detach(), loss.item()
            )
        return results

    # ------------------------------------------------------------ sampling

    def save_weights_for_sampler(self, model_id: str, name: str | None = None) -> SamplerWeights:
        """Freeze the run's current weights as a sampler version. Named versions are also
        written to disk as `tinker://<model_id>/sampler_weights/<name>` (a re-save under
        a name replaces it); unnamed ones live in memory only and get an id."""
        run = self.run(model_id)
        path = None if name is None else tinker_path(model_id, "sampler_weights", name)
        if name is not None:
            self.checkpoints.save(
                run, "sampler_weights", name, with_optimizer=False, overwrite=True
            )
        config, weights = snapshot_weights(run)  # under the base lock: after queued steps
        adapter = f"s{uuid.uuid4().hex[:12]}"
        add_frozen_adapter(run.base, adapter, config, weights)
        return self._register(
            SamplerWeights(_new_sampler_id(), run.base.name, adapter, path, model_id)
        )

    def _register(self, sw: SamplerWeights) -> SamplerWeights:
        with self._lock:
            if sw.model_path is not None:
                for old in [
                    w for w in self._sampler_weights.values() if w.model_path == sw.model_path
                ]:
                    self._sampler_weights.pop(old.sampler_id)  # a re-save replaces the name
            self._sampler_weights[sw.sampler_id] = sw
            self._snapshots[sw.adapter] = sw
        self._evict_snapshots()
        return sw

    def sampler_for(
        self, base_model: str | None = None, model_path: str | None = None
    ) -> SamplerWeights:
        """The weights to sample from: a base model as it is, or saved weights (loaded
        from disk if they are not in memory: after a restart, or once evicted)."""
        if (base_model is None) == (model_path is None):
            raise InvalidRequestError("give exactly one of base_model and model_path")
        if base_model is not None:
            self._load_base(base_model)
            return SamplerWeights(f"base:{base_model}", base_model, BASE_ADAPTER, None, None)
        with self._lock:
            found = [w for w in self._sampler_weights.values() if w.model_path == model_path]
        if found:
            return found[-1]
        info = self.checkpoints.resolve(model_path)
        weights = SamplerWeights(_new_sampler_id(), info.base_model, "", model_path, info.model_id)
        self._load_from_disk(weights, info)
        return self._register(weights)

    def _load_from_disk(self, weights: SamplerWeights, info: CheckpointInfo) -> None:
        """(Re)load saved sampler weights as a fresh frozen adapter."""
        adapter = f"s{uuid.uuid4().hex[:12]}"
        add_adapter_from_checkpoint(self._load_base(info.base_model), adapter, info)
        weights.adapter = adapter

    def get_sampler(self, sampler_id: str) -> SamplerWeights:
        if sampler_id.startswith("base:"):
            return self.sampler_for(base_model=sampler_id.removeprefix("base:"))
        with self._lock:
            if sampler_id in self._sampler_weights:
                return self._sampler_weights[sampler_id]
        raise NotFoundError(f"no sampler {sampler_id!r}")

    def sample(
        self,
        weights: SamplerWeights,
        prompt: list[int],
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
    ) -> Future[SampleResponse]:
        """Validate now (raises InvalidRequestError), decode in the base's batched sampler."""
        base = self._load_base(weights.base_model)
        self._ensure_loaded(weights)
        with self._lock:
            sampler = self._samplers.get(base.name)
            if sampler is None:
                sampler = self._samplers[base.name] = self.sampler_factory(base)
        spec = make_spec(
            base,
            prompt,
            num_samples,
            sampling_params,
            adapter=weights.adapter,
            prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
            topk_sample_logprobs=topk_sample_logprobs,
        )
        return sampler.submit(spec)

    def _ensure_loaded(self, weights: SamplerWeights) -> None:
        """Mark the weights recently used; reload them from disk if they were evicted."""
        with self._lock:
            if weights.adapter in self._snapshots:
                self._snapshots.move_to_end(weights.adapter)
            if weights.adapter == BASE_ADAPTER or weights.adapter in self._snapshots:
                return
        if weights.model_path is None:
            raise NotFoundError(
                f"sampler weights {weights.sampler_id} were evicted (at most "
                f"{self.max_snapshots} unnamed versions stay loaded); save them again"
            )
        with self._reload_lock:  # concurrent samples of one evicted version load it once
            if weights.adapter not in self._snapshots:
                self._load_from_disk(weights, self.checkpoints.resolve(weights.model_path))
                with self._lock:
                    self._snapshots[weights.adapter] = weights
                self._evict_snapshots()

    def sampler_stats(self, base_model: str) -> list[tuple[int, int]]:
        """(rows, distinct requests) of the base's recent decode steps."""
        sampler = self._samplers.get(base_model)
        return sampler.recent_steps() if sampler is not None else []

    def _evict_snapshots(self) -> None:
        """Unload the least recently used sampler versions beyond `max_snapshots`."""
        busy = set().union(*(s.adapters_in_use() for s in list(self._samplers.values())))
        with self._lock:
            extra = len(self._snapshots) - self.max_snapshots
            victims = [w for a, w in self._snapshots.items() if a not in busy][: max(extra, 0)]
            for w in victims:
                self._snapshots.pop(w.adapter)
        for w in victims:
            remove_adapter(self.registry.get(w.base_model), w.adapter)


MAX_SNAPSHOTS = 64  # sampler weight versions kept loaded (LoRA-sized each)


def _new_sampler_id() -> str:
    return f"sampler-{uuid.uuid4().hex[:12]}"


@dataclass
class SamplerWeights:
    """A frozen weight version to sample from: an inference-only adapter, or the base."""

    sampler_id: str
    base_model: str
    adapter: str
    model_path: str | None
    """`tinker://<model_id>/sampler_weights/<name>` when saved under a name."""
    model_id: str | None
    """The training run the weights came from."""


@dataclass
class LossRequest:
    """A validated forward / forward_backward request, ready to run."""

    model_id: str
    loss_fn: str
    spec: losses.LossSpec
    config: dict[str, float]
    batch: Batch

    @property
    def padded_tokens(self) -> int:
        return self.batch.input_ids.numel()


def token_logprobs(model: torch.nn.Module, batch: Batch, device: torch.device) -> Tensor:
    """Log-probability of each target token, `[n_tokens]` (or `[n_tokens, k]`), float32."""
    logits = model(input_ids=batch.input_ids.to(device)).logits
    logits = logits[batch.mask.to(device)].float()  # [n_tokens, vocab]: real positions only
    return target_logprobs(logits, batch.targets.to(device))


def target_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """Log-probability of `targets` (`[n_tokens]` or `[n_tokens, k]`) under `logits`
    (`[n_tokens, vocab]`, float32)."""
    if targets.ndim == 1:
        return -F.cross_entropy(logits, targets, reduction="none")
    return logits.log_softmax(-1).gather(-1, targets)


def _non_finite(request: LossRequest, loss: Tensor) -> InvalidRequestError:
    return InvalidRequestError(
        f"{request.loss_fn} loss is {loss.item()}; no gradient was applied "
        "(check advantages and sampling logprobs)"
    )


def _output(
    batch: Batch, logprobs: Tensor, elementwise: Tensor | None, loss: float
) -> ForwardBackwardOutput:
    """Per datum `logprobs` (and `elementwise_loss` for built-in losses)."""
    split = batch.lengths
    outputs = [{"logprobs": TensorData.from_torch(lp)} for lp in logprobs.cpu().split(split)]
    if elementwise is None:
        return ForwardBackwardOutput(loss_fn_output_type="custom", loss_fn_outputs=outputs)
    for out, el in zip(outputs, elementwise.cpu().split(split)):
        out["elementwise_loss"] = TensorData.from_torch(el)
    return ForwardBackwardOutput(
        loss_fn_output_type="TorchLossReturn", loss_fn_outputs=outputs, metrics={"loss:sum": loss}
    )

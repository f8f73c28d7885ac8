"""Sampler versions: frozen copies of a run's weights to sample from, and their samplers.

`save_weights_for_sampler` freezes a run's current adapter as an inference-only adapter
on the shared base (and, when named, on disk). At most `max_snapshots` of them stay
loaded, least recently used first out; a named one comes back from disk when sampled
again, an unnamed one is gone. Each base model has one sampler backend
(`tinkerd.engine.sampling.backend`), made on first use.

Weights loaded from a path are cached by what the checkpoint holds (its `identity`, a
checksum), never by the path alone: once a path is overwritten (or deleted and saved
again), asking for it loads what it holds now. A sampler version already handed out keeps
the weights it was made from (a snapshot); if those were evicted meanwhile and the path
now holds others, sampling from it is refused rather than served with other weights.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from tinkerd.engine.adapters import Run, add_frozen_adapter, remove_adapter, snapshot_weights
from tinkerd.engine.checkpoints import (
    CheckpointInfo,
    CheckpointStore,
    add_adapter_from_checkpoint,
    tinker_path,
)
from tinkerd.engine.models import BaseModel
from tinkerd.engine.sampling.backend import SamplerBackend, SamplerFactory
from tinkerd.engine.sampling.spec import BASE_ADAPTER, make_spec
from tinkerd.errors import InvalidRequestError, NotFoundError
from tinkerd.types import SampleResponse, SamplingParams

MAX_SNAPSHOTS = 64  # sampler weight versions kept loaded (LoRA-sized each)


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
    identity: str = ""
    """Of the checkpoint at `model_path` these weights are (`CheckpointInfo.identity`)."""


class SamplerVersions:
    """The sampler versions of one engine, and the sampler backend of each base model."""

    def __init__(
        self,
        load_base: Callable[[str], BaseModel],
        checkpoints: Callable[[], CheckpointStore],
        sampler_factory: SamplerFactory,
        max_snapshots: int = MAX_SNAPSHOTS,
    ):
        self._load_base = load_base
        self._checkpoints = checkpoints
        self.sampler_factory = sampler_factory
        self.max_snapshots = max_snapshots
        self.samplers: dict[str, SamplerBackend] = {}  # by base model name
        self.kv_budget: int | None = None
        """Bytes each base's sampler may hold: KV cache and prefill (EngineConfig)."""
        self.latency_rows: int | str | None = "auto"
        """Each built-in sampler's `latency_rows` (EngineConfig); `auto`: its default."""
        self._by_id: dict[str, SamplerWeights] = {}
        self._loaded: OrderedDict[str, SamplerWeights] = OrderedDict()  # by adapter, LRU
        self._inflight: dict[str, SamplerWeights] = {}  # by run: its inflight target
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()

    def save(
        self, run: Run, name: str | None = None, user_metadata: dict[str, str] | None = None
    ) -> SamplerWeights:
        """Freeze the run's current weights as a sampler version. Named versions are also
        written to disk as `tinker://<model_id>/sampler_weights/<name>` (a re-save under
        a name replaces it); unnamed ones live in memory only and get an id."""
        path = None if name is None else tinker_path(run.model_id, "sampler_weights", name)
        identity = ""
        if name is not None:
            saved = self._checkpoints().save(
                run,
                "sampler_weights",
                name,
                with_optimizer=False,
                overwrite=True,
                user_metadata=user_metadata,
            )
            identity = saved.identity
        config, weights = snapshot_weights(run)  # under the base lock: after queued steps
        adapter = f"s{uuid.uuid4().hex[:12]}"
        add_frozen_adapter(run.base, adapter, config, weights)
        return self._register(
            SamplerWeights(_new_sampler_id(), run.base.name, adapter, path, run.model_id, identity)
        )

    def save_inflight(self, run: Run) -> SamplerWeights:
        """Publish the run's current weights to its one mutable inflight target (SDK 0.38's
        `kind="inflight"`): the first save makes it, each later one points it at a new
        frozen adapter, so every sampling client holding it samples the newest weights
        from its next request on. The adapter it replaces is kept while requests read it,
        then evicted like any version."""
        config, weights = snapshot_weights(run)  # under the base lock: after queued steps
        adapter = f"s{uuid.uuid4().hex[:12]}"
        add_frozen_adapter(run.base, adapter, config, weights)
        with self._lock:
            target = self._inflight.get(run.model_id)
            if target is None:
                target = SamplerWeights(
                    _new_sampler_id(), run.base.name, adapter, None, run.model_id
                )
                self._inflight[run.model_id] = self._by_id[target.sampler_id] = target
            else:
                old = target.adapter
                target.adapter = adapter
                # the old adapter stays in the LRU under a stand-in until evicted
                self._loaded[old] = dataclasses.replace(target, adapter=old)
            self._loaded[adapter] = target
        self._evict()
        return target

    def _register(self, sw: SamplerWeights) -> SamplerWeights:
        with self._lock:
            if sw.model_path is not None:
                for old in [w for w in self._by_id.values() if w.model_path == sw.model_path]:
                    # A re-save replaces the name: `find` no longer hands the old out.
                    # (A sampler session holding it keeps its snapshot while loaded.)
                    self._by_id.pop(old.sampler_id)
            self._by_id[sw.sampler_id] = sw
            self._loaded[sw.adapter] = sw
        self._evict()
        return sw

    def find(self, base_model: str | None = None, model_path: str | None = None) -> SamplerWeights:
        """The weights to sample from: a base model as it is, or saved weights (loaded
        from disk if they are not in memory: after a restart, or once evicted)."""
        if (base_model is None) == (model_path is None):
            raise InvalidRequestError("give exactly one of base_model and model_path")
        if base_model is not None:
            self._load_base(base_model)
            return SamplerWeights(f"base:{base_model}", base_model, BASE_ADAPTER, None, None)
        info = self._checkpoints().resolve(model_path)  # what the path holds now
        with self._lock:
            found = [
                w
                for w in self._by_id.values()
                if w.model_path == model_path and w.identity == info.identity
            ]
        if found:
            return found[-1]
        weights = SamplerWeights(
            _new_sampler_id(), info.base_model, "", model_path, info.model_id, info.identity
        )
        self._load_from_disk(weights, info)
        return self._register(weights)

    def get(self, sampler_id: str) -> SamplerWeights:
        if sampler_id.startswith("base:"):
            return self.find(base_model=sampler_id.removeprefix("base:"))
        with self._lock:
            if sampler_id in self._by_id:
                return self._by_id[sampler_id]
        raise NotFoundError(f"no sampler {sampler_id!r}")

    def _load_from_disk(self, weights: SamplerWeights, info: CheckpointInfo) -> None:
        """(Re)load saved sampler weights as a fresh frozen adapter."""
        adapter = f"s{uuid.uuid4().hex[:12]}"
        add_adapter_from_checkpoint(self._load_base(info.base_model), adapter, info)
        weights.adapter = adapter

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
        return self.prepare(
            weights,
            prompt,
            num_samples,
            sampling_params,
            prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
            topk_sample_logprobs=topk_sample_logprobs,
        )()

    def prepare(
        self,
        weights: SamplerWeights,
        prompt: list[int],
        num_samples: int,
        sampling_params: SamplingParams,
        **options: Any,
    ) -> Callable[[], Future[SampleResponse]]:
        """Validate now (raises InvalidRequestError); the returned call queues the request
        in the base's sampler (so a caller may admit it, or refuse it, in between).
        `options`: `make_spec`'s keywords (logprobs, `tenant`, `listener`)."""
        base = self._load_base(weights.base_model)
        self._ensure_loaded(weights)
        with self._lock:
            sampler = self.samplers.get(base.name)
            if sampler is None:
                sampler = self.samplers[base.name] = self.sampler_factory(base)
                if hasattr(sampler, "kv_budget"):  # the built-in sampler's memory bound
                    sampler.kv_budget = self.kv_budget
                if hasattr(sampler, "latency_rows") and self.latency_rows != "auto":
                    sampler.latency_rows = self.latency_rows
        spec = make_spec(
            base, prompt, num_samples, sampling_params, adapter=weights.adapter, **options
        )
        check = getattr(sampler, "check", None)
        if check is not None:
            check(spec)  # a request that could never fit: refused before it is admitted
        return lambda: sampler.submit(spec)

    def _ensure_loaded(self, weights: SamplerWeights) -> None:
        """Mark the weights recently used; reload them from disk if they were evicted."""
        with self._lock:
            if weights.adapter in self._loaded:
                self._loaded.move_to_end(weights.adapter)
            if weights.adapter == BASE_ADAPTER or weights.adapter in self._loaded:
                return
        if weights.model_path is None:
            raise NotFoundError(
                f"sampler weights {weights.sampler_id} were evicted (at most "
                f"{self.max_snapshots} unnamed versions stay loaded); save them again"
            )
        with self._reload_lock:  # concurrent samples of one evicted version load it once
            if weights.adapter not in self._loaded:
                info = self._checkpoints().resolve(weights.model_path)
                if info.identity != weights.identity:
                    raise NotFoundError(
                        f"{weights.model_path} was overwritten after this sampling client "
                        "was made, and its old weights are no longer loaded; create a new "
                        "sampling client to sample from what it holds now"
                    )
                self._load_from_disk(weights, info)
                with self._lock:
                    self._loaded[weights.adapter] = weights
                self._evict()

    def stats(self, base_model: str) -> list[tuple[int, int]]:
        """(rows, distinct requests) of the base's recent decode steps (the backend's
        `recent_steps`); empty before its first sample."""
        sampler = self.samplers.get(base_model)
        return sampler.recent_steps() if sampler is not None else []

    def _evict(self) -> None:
        """Unload the least recently used sampler versions beyond `max_snapshots`."""
        busy = set().union(*(s.adapters_in_use() for s in list(self.samplers.values())))
        with self._lock:
            extra = len(self._loaded) - self.max_snapshots
            victims = [w for a, w in self._loaded.items() if a not in busy][: max(extra, 0)]
            for w in victims:
                self._loaded.pop(w.adapter)
        for w in victims:
            remove_adapter(self._load_base(w.base_model), w.adapter)


def _new_sampler_id() -> str:
    return f"sampler-{uuid.uuid4().hex[:12]}"

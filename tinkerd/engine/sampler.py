"""Batched sampling with a KV cache, each row with its own LoRA adapter (or none).

One `Sampler` per base model runs a decode loop on its own thread. Every active sequence
advances one token per forward pass. New requests join the running batch between steps:
their prompts are prefilled together (once per prompt, however many samples), and their
cache rows are merged in, left-padded. Finished rows leave the batch. So concurrent
requests from different clients share forward passes, and PEFT's mixed-batch LoRA
(`adapter_names`) routes each row through its own adapter on the one shared base.

Sampled-token logprobs come from the model's distribution at temperature 1 before any
top-k/top-p filtering: the number a training forward computes for that token.

A step costs little besides its forward pass: per-row settings are tensors rebuilt only
when rows join or leave (`_Plan`), the KV cache grows in place (`GrowingLayer`), and a
batch whose rows share one adapter (or none) skips PEFT's mixed-batch machinery
(`_AdapterRouting`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import math
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tinkerd.engine.fast_decode import FastDecoder
from tinkerd.engine.models import BaseModel
from tinkerd.errors import InvalidRequestError
from tinkerd.types import SampledSequence, SampleResponse, SamplingParams

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
MAX_NUM_SAMPLES = 128
MAX_TOPK_LOGPROBS = 64
MAX_BATCH_ROWS = 256  # sequences decoded together; more requests wait for a free row


@dataclass(frozen=True)
class SampleSpec:
    """A validated sample request."""

    prompt: list[int]
    num_samples: int
    max_tokens: int
    temperature: float
    top_k: int  # 0: no limit
    top_p: float
    seed: int | None
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]
    prompt_logprobs: bool
    topk_prompt_logprobs: int
    topk_sample_logprobs: int
    adapter: str = BASE_ADAPTER


def make_spec(
    base: BaseModel,
    prompt: list[int],
    num_samples: int,
    params: SamplingParams,
    *,
    adapter: str = BASE_ADAPTER,
    prompt_logprobs: bool = False,
    topk_prompt_logprobs: int = 0,
    topk_sample_logprobs: int = 0,
) -> SampleSpec:
    """Check a request completely; raises InvalidRequestError with what is wrong."""
    vocab, context = base.vocab_size, base.max_context_length
    if not prompt:
        raise InvalidRequestError("prompt is empty: give at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside [0, {vocab})")
    if not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise InvalidRequestError(f"num_samples must be in [1, {MAX_NUM_SAMPLES}]: {num_samples}")
    room = context - len(prompt)
    if room < 1:
        raise InvalidRequestError(f"prompt of {len(prompt)} tokens fills the {context} context")
    max_tokens = room if params.max_tokens is None else params.max_tokens
    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be at least 1, got {max_tokens}")
    if max_tokens > room:
        raise InvalidRequestError(
            f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds the context of {context}"
        )
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise InvalidRequestError(f"temperature must be >= 0, got {params.temperature}")
    if not (0 < params.top_p <= 1):
        raise InvalidRequestError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < -1:
        raise InvalidRequestError(f"top_k must be -1 (no limit) or positive, got {params.top_k}")
    for name, k in [
        ("topk_prompt_logprobs", topk_prompt_logprobs),
        ("topk_sample_logprobs", topk_sample_logprobs),
    ]:
        if not 0 <= k <= MAX_TOPK_LOGPROBS:
            raise InvalidRequestError(f"{name} must be in [0, {MAX_TOPK_LOGPROBS}], got {k}")
    stop_tokens, stop_strings = _stops(base, params.stop, vocab)
    return SampleSpec(
        prompt=list(prompt),
        num_samples=num_samples,
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_k=params.top_k if params.top_k > 0 else 0,
        top_p=params.top_p,
        seed=params.seed,
        stop_tokens=stop_tokens,
        stop_strings=stop_strings,
        prompt_logprobs=prompt_logprobs or topk_prompt_logprobs > 0,
        topk_prompt_logprobs=topk_prompt_logprobs,
        topk_sample_logprobs=topk_sample_logprobs,
        adapter=adapter,
    )


def _stops(
    base: BaseModel, stop: str | list | None, vocab: int
) -> tuple[frozenset[int], tuple[str, ...]]:
    if stop is None:
        return frozenset(eos_token_ids(base)), ()
    if isinstance(stop, str):
        stop = [stop]
    if all(isinstance(s, str) for s in stop):
        if any(s == "" for s in stop):
            raise InvalidRequestError("stop strings must not be empty")
        return frozenset(), tuple(stop)
    bad = [t for t in stop if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"stop token ids {bad[:5]} are outside [0, {vocab})")
    return frozenset(stop), ()


def eos_token_ids(base: BaseModel) -> set[int]:
    ids = getattr(getattr(base.model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(base.tokenizer, "eos_token_id", None)
    if ids is None:
        return set()
    return {int(i) for i in (ids if isinstance(ids, list) else [ids])}


# ---------------------------------------------------------------- the decode loop


@dataclass(eq=False)
class _Job:
    spec: SampleSpec
    future: Future
    generator: torch.Generator | None
    sequences: list[SampledSequence | None]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list | None = None
    remaining: int = 0


@dataclass(eq=False)
class _Row:
    job: _Job
    index: int  # which of the job's samples
    position: int  # position id of its first sampled token (the prompt's length)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list = field(default_factory=list)


@dataclass
class _Plan:
    """What choosing tokens needs to know about the current rows, as tensors. Built when
    rows join or leave, not every step: the per-row Python work and host-to-device copies
    then happen once per batch change."""

    requests: int  # distinct requests among the rows
    sampled: Tensor | None  # rows with temperature > 0; None: all of them
    temps: Tensor | None  # [sampled, 1]; None: all 1, where dividing changes nothing
    top_k: Tensor | None  # [sampled]; None: no sampled row limits k
    top_p: Tensor | None  # [sampled]; None: no sampled row uses top-p
    unseeded: Tensor | None  # sampled rows drawing from the sampler's generator
    seeded: list[tuple[_Job, Tensor, Tensor]]  # (job, its sampled rows, their sample indices)
    topk_logprobs: int  # most top-k sample logprobs any row asks for


def _plan(rows: list[_Row], vocab: int, device: torch.device) -> _Plan:
    specs = [r.job.spec for r in rows]
    sampled = [i for i, s in enumerate(specs) if s.temperature > 0]
    sub = [specs[i] for i in sampled]

    def tensor(values: list, dtype=None) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    temps = tensor([s.temperature for s in sub])[:, None]
    top_k = tensor([min(s.top_k or vocab, vocab) for s in sub])
    top_p = tensor([s.top_p for s in sub])
    unseeded, seeded = [], {}
    for i, r in enumerate(rows[i] for i in sampled):
        if r.job.generator is None:
            unseeded.append(i)
        else:
            seeded.setdefault(r.job, []).append(i)
    return _Plan(
        requests=len({id(r.job) for r in rows}),
        sampled=None if len(sampled) == len(rows) else tensor(sampled, torch.long),
        # decided on the float32 tensors, as the per-step arithmetic sees the values
        temps=None if bool((temps == 1).all()) else temps,
        top_k=top_k if bool((top_k < vocab).any()) else None,
        top_p=top_p if bool((top_p < 1).any()) else None,
        unseeded=tensor(unseeded, torch.long) if seeded and unseeded else None,
        seeded=[
            (job, tensor(idx, torch.long), tensor([rows[sampled[i]].index for i in idx]))
            for job, idx in seeded.items()
        ],
        topk_logprobs=max(s.topk_sample_logprobs for s in specs),
    )


class Sampler:
    """Decodes every sample request on one base model, batched, on a background thread."""

    def __init__(
        self, base: BaseModel, max_batch_rows: int = MAX_BATCH_ROWS, fast_decode: bool = True
    ):
        self.base = base
        self.max_batch_rows = max_batch_rows
        # decode steps straight from the weights where the architecture allows (Llama)
        self._fast = FastDecoder.build(base.model) if fast_decode else None
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._reset()
        self._rng = torch.Generator(device=base.device)
        self._rng.seed()
        self._lora = _AdapterRouting()
        # transformers 5.x renamed `past_key_values` to `cache`; accept either
        params = inspect.signature(base.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.steps: deque[tuple[int, int]] = deque(maxlen=4096)
        """(rows, distinct requests) of each recent decode step: how much was batched."""
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"sampler-{base.name}", daemon=True)
        self._thread.start()
        # A daemon thread still inside a torch op at interpreter teardown aborts the process
        # ("terminate called without an active exception"): stop and join it first.
        atexit.register(self.close)

    def close(self) -> None:
        """Stop decoding (queued and running requests fail) and end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _reset(self) -> None:
        """Drop the running batch (its rows are finished or failed)."""
        self._rows: list[_Row] = []
        self._cache = None  # transformers Cache of the rows, left-padded to a common length
        self._mask: Tensor | None = None  # [rows, cache_len] 1 where a real token is
        self._positions: Tensor | None = None  # [rows, 1] position id of the next input
        self._next_logits: Tensor | None = None  # [rows, vocab] float32
        self._plan: _Plan | None = None
        self._fast_lora: tuple[_Plan | None, list | None, bool] = (None, None, False)

    def submit(self, spec: SampleSpec) -> Future:
        """Queue a validated request; the future resolves to a SampleResponse."""
        gen = None
        if spec.seed is not None:
            gen = torch.Generator(device=self.base.device)
            gen.manual_seed(spec.seed)
        job = _Job(spec, Future(), gen, [None] * spec.num_samples, remaining=spec.num_samples)
        with self._cond:
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def adapters_in_use(self) -> set[str]:
        """Adapters that queued or running requests read (they must not be unloaded)."""
        with self._cond:
            jobs = [*self._pending, *(r.job for r in self._rows)]
        return {j.spec.adapter for j in jobs}

    # ------------------------------------------------------------ loop

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._pending and not self._rows and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        self._fail_all(RuntimeError("the sampler was closed"))
                        return
                    new = self._take_pending()
                jobs = new + list(dict.fromkeys(r.job for r in self._rows))
                try:
                    if new:
                        self._admit(new)
                    if self._rows:
                        self._step()
                except Exception as e:  # a failed step fails its requests, not the sampler
                    self._reset()
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(e)

    def _fail_all(self, error: Exception) -> None:
        jobs = [*self._pending, *(r.job for r in self._rows)]
        self._pending.clear()
        self._reset()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    def _take_pending(self) -> list[_Job]:
        if self._rows and not _mergeable(self._cache):
            return []  # this cache type cannot take new rows mid-flight: wait for a drain
        taken, rows = [], len(self._rows)
        while self._pending and rows + self._pending[0].spec.num_samples <= self.max_batch_rows:
            job = self._pending.popleft()
            taken.append(job)
            rows += job.spec.num_samples
        if not taken and not self._rows and self._pending:
            taken.append(self._pending.popleft())  # larger than a batch: run it alone
        return taken

    def _forward(
        self,
        input_ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        adapters: list[str],
        cache,
        logits_to_keep: int,
    ) -> tuple[Tensor, object]:
        base = self.base
        kwargs = dict(
            input_ids=input_ids.to(base.device),
            attention_mask=mask.to(base.device),
            position_ids=positions.to(base.device),
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        kwargs[self._cache_kw] = cache
        with base.lock:
            if base.peft_model is None:
                out = base.model(**kwargs)
            elif len(set(adapters)) == 1:
                with self._lora.only(base.peft_model, adapters[0]):
                    out = base.model(**kwargs)  # the injected model: skips PeftModel.forward
            else:
                out = base.peft_model(**kwargs, adapter_names=adapters)
        return out.logits, getattr(out, self._cache_kw)

    def _admit(self, jobs: list[_Job]) -> None:
        """Prefill the new prompts together, then add num_samples rows per prompt."""
        lengths = [len(j.spec.prompt) for j in jobs]
        width = max(lengths)
        pad = 0
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):
            ids[i, width - lengths[i] :] = torch.tensor(job.spec.prompt)
            mask[i, width - lengths[i] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        keep_all = any(j.spec.prompt_logprobs for j in jobs)
        logits, cache = self._forward(
            ids, mask, positions, [j.spec.adapter for j in jobs], None, 0 if keep_all else 1
        )
        logits = logits.float()
        for i, job in enumerate(jobs):
            if job.spec.prompt_logprobs:
                _prompt_logprobs(job, logits[i, width - lengths[i] :], lengths[i])
        rows_of = [i for i, job in enumerate(jobs) for _ in range(job.spec.num_samples)]
        index = torch.tensor(rows_of, device=logits.device)
        cache.batch_select_indices(index)
        new_rows = [
            _Row(job, k, len(job.spec.prompt)) for job in jobs for k in range(job.spec.num_samples)
        ]
        device = self.base.device
        new_mask = mask[rows_of].to(device)
        new_positions = torch.tensor([[r.position] for r in new_rows], device=device)
        new_logits = logits[:, -1][index]
        if self._cache is None:
            _grow_in_place(cache)
            self._cache, self._mask, self._next_logits = cache, new_mask, new_logits
            self._positions = new_positions
        else:
            self._cache, self._mask = _merge(self._cache, self._mask, cache, new_mask)
            self._next_logits = torch.cat([self._next_logits, new_logits])
            self._positions = torch.cat([self._positions, new_positions])
        self._rows += new_rows
        self._plan = _plan(self._rows, logits.shape[-1], logits.device)

    def _step(self) -> None:
        """Sample one token for every row, retire finished rows, run the rest forward."""
        rows, logits = self._rows, self._next_logits
        self.steps.append((len(rows), self._plan.requests))
        tokens, logprobs, topk = self._choose(logits, self._plan)
        tokens_list, logprobs_list = tokens.tolist(), logprobs.tolist()
        alive = []
        for i, row in enumerate(rows):
            row.tokens.append(tokens_list[i])
            row.logprobs.append(logprobs_list[i])
            if topk is not None and row.job.spec.topk_sample_logprobs:
                k = row.job.spec.topk_sample_logprobs
                row.topk.append(list(zip(topk[1][i, :k].tolist(), topk[0][i, :k].tolist())))
            reason = self._stop_reason(row)
            if reason:
                self._finish(row, reason)
            else:
                alive.append(i)
        if len(alive) < len(rows):
            if not alive:
                self._reset()
                return
            self._retire(alive)
            rows = self._rows
            tokens = tokens[torch.tensor(alive, device=tokens.device)]
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], 1)
        lora, fast = self._fast_lora_for_plan()
        if fast:
            with self.base.lock:
                logits = self._fast.step(
                    tokens, self._positions[:, 0], self._mask, self._cache, lora
                )
        else:
            logits, self._cache = self._forward(
                tokens[:, None],
                self._mask,
                self._positions,
                [r.job.spec.adapter for r in rows],
                self._cache,
                1,
            )
            logits = logits[:, -1]
        self._positions = self._positions + 1
        self._next_logits = logits.float()

    def _fast_lora_for_plan(self) -> tuple[list | None, bool]:
        """(the fast path's adapters for the current rows, whether it can run this step):
        worked out once per batch change."""
        plan, lora, fast = self._fast_lora
        if plan is not self._plan:
            lora, fast = None, self._fast is not None and _mergeable(self._cache)
            if fast:
                adapters = [r.job.spec.adapter for r in self._rows]
                with self.base.lock:
                    lora = self._fast.plan(adapters, self.base.device)
                fast = lora is not None
            self._fast_lora = (self._plan, lora, fast)
        return lora, fast

    def _retire(self, alive: list[int]) -> None:
        """Keep only the rows at indices `alive`, and drop the leading cache columns that
        are padding in all of them."""
        keep = torch.tensor(alive, device=self._mask.device)
        self._mask = self._mask[keep]
        self._positions = self._positions[keep]
        self._rows = [self._rows[i] for i in alive]
        self._plan = _plan(self._rows, self._next_logits.shape[-1], self._mask.device)
        if not _mergeable(self._cache):
            self._cache.batch_select_indices(keep)
            return
        first = int(self._mask.any(0).nonzero()[0])
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            if hasattr(layer, "keep"):
                layer.keep(keep, first)
            else:
                layer.keys, layer.values = (
                    layer.keys[keep, :, first:],
                    layer.values[keep, :, first:],
                )

    def _choose(self, logits: Tensor, plan: _Plan) -> tuple[Tensor, Tensor, tuple | None]:
        """Next token per row: greedy at temperature 0, else the Gumbel-max trick on the
        top-k/top-p filtered, temperature-scaled logits."""
        logprobs_all = logits.log_softmax(-1)
        sampled = plan.sampled
        scores = logits if sampled is None else logits[sampled]
        if plan.temps is not None:
            scores = scores / plan.temps
        scores = _filter_top_k_top_p(scores, plan.top_k, plan.top_p)
        if len(scores):
            # argmax(scores + Gumbel noise), the noise -log(-log(u)) computed in place
            noise = self._uniform_noise(plan, len(scores), logits.shape[-1], logits.device)
            drawn = noise.log_().neg_().log_().neg_().add_(scores).argmax(-1)
        if sampled is None:
            choice = drawn
        else:
            choice = logits.argmax(-1)
            if len(sampled):
                choice[sampled] = drawn
        token_logprobs = logprobs_all.gather(1, choice[:, None]).squeeze(1)
        k = plan.topk_logprobs
        topk = logprobs_all.topk(k, -1) if k else None
        return choice, token_logprobs, topk

    def _uniform_noise(self, plan: _Plan, rows: int, vocab: int, device: torch.device) -> Tensor:
        """U(0,1) noise `[sampled rows, vocab]`. A seeded request draws noise for all its
        samples each step from its own generator, so its tokens do not depend on the batch."""
        if not plan.seeded:
            noise = torch.rand((rows, vocab), generator=self._rng, device=device)
        else:
            noise = torch.empty((rows, vocab), device=device)
            if plan.unseeded is not None:
                shape = (len(plan.unseeded), vocab)
                noise[plan.unseeded] = torch.rand(shape, generator=self._rng, device=device)
            for job, where, which in plan.seeded:
                shape = (job.spec.num_samples, vocab)
                noise[where] = torch.rand(shape, generator=job.generator, device=device)[which]
        return noise.clamp_(torch.finfo(noise.dtype).tiny, 1.0 - 1e-7)

    def _stop_reason(self, row: _Row) -> str | None:
        spec = row.job.spec
        if row.tokens[-1] in spec.stop_tokens:
            return "stop"
        if spec.stop_strings:
            window = max(len(s.encode()) for s in spec.stop_strings) + 1
            text = self.base.tokenizer.decode(row.tokens[-window:])
            if any(s in text for s in spec.stop_strings):
                return "stop"
        if len(row.tokens) >= spec.max_tokens:
            return "length"
        return None

    def _finish(self, row: _Row, reason: str) -> None:
        job = row.job
        job.sequences[row.index] = SampledSequence(
            stop_reason=reason,
            tokens=row.tokens,
            logprobs=row.logprobs,
            topk_logprobs=row.topk if job.spec.topk_sample_logprobs else None,
        )
        job.remaining -= 1
        if job.remaining == 0 and not job.future.done():
            job.future.set_result(
                SampleResponse(
                    sequences=job.sequences,
                    prompt_logprobs=job.prompt_logprobs,
                    topk_prompt_logprobs=job.topk_prompt_logprobs,
                    type="sample",
                )
            )


# ---------------------------------------------------------------- cache and adapters


_UNSET = object()


class _AdapterRouting:
    """Runs a batch through the LoRA layers by the cheapest path that its adapters allow.

    PEFT's mixed-batch path (`adapter_names`) walks the whole module tree to register a
    hook on every LoRA layer at each call, and every layer then splits its input by
    adapter in Python. That is only needed when rows use different adapters. When all
    rows use one adapter, or none, each LoRA layer is instead pointed at that adapter (or
    disabled) for the call: PEFT's plain single-adapter path, the same arithmetic per
    row. Only the layers' flags change (not requires_grad, as `set_adapter` would), and
    they are restored after; the caller holds the base's lock, so no other computation
    sees them (training selects its own adapter under that lock).
    """

    def __init__(self):
        self._key: tuple | None = None
        self._layers: list = []

    def _lora_layers(self, peft_model) -> list:
        key = (id(peft_model), tuple(peft_model.peft_config))  # changes with the adapters
        if key != self._key:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
            self._key = key
        return self._layers

    @contextlib.contextmanager
    def only(self, peft_model, adapter: str):
        # The flags are plain attributes: set them in each layer's __dict__ directly, as
        # nn.Module.__setattr__ (which checks for parameters and submodules) costs more
        # than the rest of this, at every step.
        flags = [vars(layer) for layer in self._lora_layers(peft_model)]
        name, value = (
            ("_disable_adapters", True)
            if adapter == BASE_ADAPTER
            else ("_active_adapter", [adapter])
        )
        saved = [f.get(name, _UNSET) for f in flags]
        try:
            for f in flags:
                f[name] = value
            yield
        finally:
            for f, old in zip(flags, saved):
                if old is _UNSET:
                    del f[name]  # back to the class default
                else:
                    f[name] = old


@functools.cache
def _growing_layer() -> tuple[type, type]:
    """(DynamicLayer, GrowingLayer); made on first use, as transformers loads lazily."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer that appends each step's keys and values in place, into spare
        room at the end of a buffer, instead of concatenating (copying) the whole cache
        every step. `keys`/`values` are views of the buffer's filled part. Anything that
        assigns them instead (a merge, batch_select_indices) just makes the next update
        copy them into a fresh buffer."""

        _key_buffer = _value_buffer = _key_view = None

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
            if not self.is_initialized or self.keys.dim() != 4:
                return super().update(key_states, value_states, *args, **kwargs)
            length, new = self.keys.shape[-2], key_states.shape[-2]
            if self.keys is not self._key_view or length + new > self._key_buffer.shape[-2]:
                self._rebuffer(length + new)
            end = length + new
            self._key_buffer[:, :, length:end] = key_states
            self._value_buffer[:, :, length:end] = value_states
            self.keys = self._key_view = self._key_buffer[:, :, :end]
            self.values = self._value_buffer[:, :, :end]
            return self.keys, self.values

        def keep(self, rows: Tensor, first: int) -> None:
            """Keep cache rows `rows`, less the first `first` columns: one copy, taken
            from the buffer so that the room after the filled part stays."""
            if self.keys is not self._key_view:  # not buffered (merged this step)
                self.keys, self.values = self.keys[rows, :, first:], self.values[rows, :, first:]
                return
            length = self.keys.shape[-2] - first
            self._key_buffer = self._key_buffer[rows, :, first:]
            self._value_buffer = self._value_buffer[rows, :, first:]
            self.keys = self._key_view = self._key_buffer[:, :, :length]
            self.values = self._value_buffer[:, :, :length]

        def _rebuffer(self, needed: int) -> None:
            room = needed + max(16, needed // 4)  # a copy every ~length/4 steps, not every step
            self._key_buffer = _with_room(self.keys, room)
            self._value_buffer = _with_room(self.values, room)

    return DynamicLayer, GrowingLayer


def _with_room(states: Tensor, room: int) -> Tensor:
    """A `[batch, heads, room, dim]` buffer starting with `states`."""
    buffer = states.new_empty((*states.shape[:2], room, states.shape[3]))
    buffer[:, :, : states.shape[2]] = states
    return buffer


def _grow_in_place(cache) -> None:
    """Make the cache's plain dynamic layers GrowingLayers, keeping their contents."""
    plain, growing = _growing_layer()
    layers = getattr(cache, "layers", [])
    for i, layer in enumerate(layers):
        if type(layer) is plain:
            swapped = growing.__new__(growing)
            swapped.__dict__.update(layer.__dict__)
            layers[i] = swapped


def _mergeable(cache) -> bool:
    """Whether rows can be merged into / cropped from the cache (plain dynamic layers)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in _growing_layer() for layer in layers)


def _merge(cache, mask: Tensor, new_cache, new_mask: Tensor):
    """Stack two left-padded caches (and masks) along the batch, padding the shorter."""
    width = max(mask.shape[1], new_mask.shape[1])

    def pad(t: Tensor, dim: int) -> Tensor:
        missing = width - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim)

    for layer, new_layer in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([pad(layer.keys, 2), pad(new_layer.keys, 2)])
        layer.values = torch.cat([pad(layer.values, 2), pad(new_layer.values, 2)])
    return cache, torch.cat([pad(mask, 1), pad(new_mask, 1)])


def _filter_top_k_top_p(scores: Tensor, ks: Tensor | None, ps: Tensor | None) -> Tensor:
    """Set to -inf every logit outside each row's top-k (`ks`, vocab: no limit) and top-p
    (`ps`) nucleus. None: no row uses that filter."""
    if ks is not None:
        kth = scores.topk(int(ks.max()), -1).values.gather(1, (ks - 1)[:, None])
        scores = scores.masked_fill(scores < kth, -math.inf)
    if ps is not None:
        ordered, order = scores.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs >= ps[:, None]  # mass before it already reaches p
        ordered = ordered.masked_fill(outside, -math.inf)
        scores = torch.full_like(scores, -math.inf).scatter(1, order, ordered)
    return scores


def _prompt_logprobs(job: _Job, logits: Tensor, length: int) -> None:
    """Fill job.prompt_logprobs (and top-k) from the prefill logits `[length, vocab]`."""
    logprobs = logits[:-1].log_softmax(-1)  # position i predicts prompt token i + 1
    targets = torch.tensor(job.spec.prompt[1:], device=logits.device)
    picked = logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
    job.prompt_logprobs = [None, *picked]
    k = job.spec.topk_prompt_logprobs
    if k:
        top = logprobs.topk(k, -1)
        job.topk_prompt_logprobs = [None] + [
            list(zip(ids, lps)) for ids, lps in zip(top.indices.tolist(), top.values.tolist())
        ]

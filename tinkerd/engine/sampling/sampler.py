"""The built-in sampler: batched decoding with a KV cache, each row with its own LoRA
adapter (or none).

One `Sampler` per base model runs a decode loop on its own thread. Every active sequence
advances one token per forward pass. New requests join the running batch between steps:
their prompts are prefilled together (once per prompt, however many samples), and their
cache rows are merged in, left-padded. Finished rows leave the batch. So concurrent
requests from different clients share forward passes, and `tinkerd.engine.lora` routes
each row through its own adapter on the one shared base (`route_rows` in the Hugging
Face forward; the same rows' stacked adapters in `FastDecoder` steps).

A step costs little besides its forward pass: per-row settings are tensors rebuilt only
when rows join or leave (`choose.Plan`), and the KV cache grows in place (`kv_cache`).

Waiting requests join by turns of tenant (`SampleSpec.tenant`, the API key): one request
of each tenant in turn, round after round, while rows are free. A tenant with no row in
the batch may also take the `newcomer_rows` held back beyond `max_batch_rows`, so one key
that fills the batch delays another key's first request by one step, not by its own
requests' length. A request whose future is cancelled (a client that went away) leaves
the batch before the next step.

With a `kv_budget` (bytes), the batch's KV cache stays within it: the cache is at most
rows x the longest row's prompt + max_tokens columns (columns that are padding in every
row are cropped), plus the growing buffer's quarter of spare room (`kv_cache`); requests
join while that bound fits in `FILL` of the budget (a newcomer tenant: the whole budget),
and a request that could never fit is refused when it is submitted (`check`).
"""

from __future__ import annotations

import atexit
import inspect
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from concurrent.futures import Future

import torch
from torch import Tensor

from tinkerd.engine.fast_decode import FastDecoder
from tinkerd.engine.lora import route_rows, segments
from tinkerd.engine.models import BaseModel
from tinkerd.engine.sampling import kv_cache
from tinkerd.engine.sampling.choose import Plan, choose, make_plan, prompt_logprobs
from tinkerd.engine.sampling.jobs import Job, Row
from tinkerd.engine.sampling.spec import SampleSpec
from tinkerd.engine.vision import decode_positions, forward_inputs
from tinkerd.errors import InvalidRequestError
from tinkerd.timing import Ran, resolving
from tinkerd.types import SampledSequence, SampleResponse

MAX_BATCH_ROWS = 256  # sequences decoded together; more requests wait for a free row
FILL = 0.8  # of the KV budget that requests fill; the rest is for newcomer tenants
log = logging.getLogger("tinkerd.sampler")


class Sampler:
    """Decodes every sample request on one base model, batched, on a background thread.
    A `tinkerd.engine.sampling.backend.SamplerBackend`."""

    def __init__(
        self, base: BaseModel, max_batch_rows: int = MAX_BATCH_ROWS, fast_decode: bool = True
    ):
        self.base = base
        self.max_batch_rows = max_batch_rows
        # decode steps straight from the weights where the architecture allows
        self._fast = FastDecoder.build(base.model)
        self.fast_decode = fast_decode
        """Whether decode steps take the fast path where the model allows (`FastDecoder`);
        read when a batch changes."""
        self.kv_budget: int | None = None
        """Bytes the batch's KV cache may take (None: no bound but the rows)."""
        self.kv_per_token = kv_bytes_per_token(base.model)
        self.newcomer_rows = max(1, max_batch_rows // 4)
        """Rows beyond `max_batch_rows` that only a tenant with no row running may take."""
        # tenant: its waiting jobs, tenants in turn order; never an empty deque
        self._pending: OrderedDict[Hashable, deque[Job]] = OrderedDict()
        self._cancelled = False  # a job's future was cancelled: drop its rows
        self._cond = threading.Condition()
        self._reset()
        self._rng = torch.Generator(device=base.device)
        self._rng.seed()
        # transformers 5.x renamed `past_key_values` to `cache`; accept either
        params = inspect.signature(base.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.steps: deque[tuple[int, int]] = deque(maxlen=4096)
        """(rows, distinct requests) of each recent decode step: how much was batched."""
        # Running totals for metrics (read unlocked by a scrape; only this thread writes).
        self.prefill_tokens = 0
        """Prompt tokens prefilled."""
        self.decode_tokens = 0
        """Tokens chosen by decode steps (each step chooses one per row)."""
        self.decode_steps = 0
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
        self._rows: list[Row] = []
        self._cache = None  # transformers Cache of the rows, left-padded to a common length
        self._mask: Tensor | None = None  # [rows, cache_len] 1 where a real token is
        self._positions: Tensor | None = None  # [rows, 1] position id of the next input
        self._deltas: Tensor | None = None  # [rows] multimodal RoPE shift (vision models)
        self._next_logits: Tensor | None = None  # [rows, vocab] float32
        self._plan: Plan | None = None
        self._fast_lora: tuple[Plan | None, list | None, bool] = (None, None, False)

    def kv_bytes(self, rows: int, length: int) -> int:
        """Bound on the KV cache of `rows` rows whose longest is `length` tokens."""
        return rows * (length + length // 4 + 16) * self.kv_per_token

    def check(self, spec: SampleSpec) -> None:
        """Refuse (InvalidRequestError, 400) a request that could never fit the budget."""
        need = self.kv_bytes(spec.num_samples, len(spec.prompt) + spec.max_tokens)
        if self.kv_budget is not None and need > self.kv_budget:
            raise InvalidRequestError(
                f"{spec.num_samples} samples of {len(spec.prompt)} prompt + {spec.max_tokens} "
                f"new tokens need {need} bytes of KV cache, more than the sampling memory "
                f"budget of {self.kv_budget} bytes (tinkerd serve --sampling-memory-budget): "
                "ask for fewer samples or tokens"
            )

    def submit(self, spec: SampleSpec) -> Future:
        """Queue a validated request; the future resolves to a SampleResponse."""
        self.check(spec)
        gen = None
        if spec.seed is not None:
            gen = torch.Generator(device=self.base.device)
            gen.manual_seed(spec.seed)
        job = Job(spec, Future(), gen, [None] * spec.num_samples, remaining=spec.num_samples)
        job.future.add_done_callback(self._on_done)
        with self._cond:
            self._pending.setdefault(spec.tenant, deque()).append(job)
            self._cond.notify()
        return job.future

    def _on_done(self, future: Future) -> None:
        if future.cancelled():
            with self._cond:
                self._cancelled = True
                self._cond.notify()

    def adapters_in_use(self) -> set[str]:
        """Adapters that queued or running requests read (they must not be unloaded)."""
        with self._cond:
            jobs = [*self._waiting(), *(r.job for r in self._rows)]
        return {j.spec.adapter for j in jobs}

    def _waiting(self) -> list[Job]:
        return [job for queue in self._pending.values() for job in queue]

    def recent_steps(self) -> list[tuple[int, int]]:
        """(rows, distinct requests) of each recent decode step, oldest first."""
        return list(self.steps)

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
                    if self._cancelled:
                        self._cancelled = False
                        self._drop_cancelled()
                    new = self._take_pending()
                jobs = new + list(dict.fromkeys(r.job for r in self._rows))
                try:
                    if new:
                        self._admit(new)
                        if any(j.future.cancelled() for j in new):  # while prefilling
                            with self._cond:
                                self._cancelled = True
                    if self._rows:
                        self._step()
                except Exception as e:  # a failed step fails its requests, not the sampler
                    self._reset()
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(e)

    def _fail_all(self, error: Exception) -> None:
        jobs = [*self._waiting(), *(r.job for r in self._rows)]
        self._pending.clear()
        self._reset()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    def _take_pending(self) -> list[Job]:
        """Waiting jobs to admit now: one per tenant in turn, round after round, while
        their rows fit (a tenant with no row running may use `newcomer_rows` more)."""
        if self._rows and not kv_cache.mergeable(self._cache):
            return []  # this cache type cannot take new rows mid-flight: wait for a drain
        taken, rows = [], len(self._rows)
        length = max((_length(r.job) for r in self._rows), default=0)
        running = {r.job.spec.tenant for r in self._rows}
        progressed = True
        while self._pending and progressed:
            progressed = False
            for tenant in list(self._pending):  # a round: each tenant's next job
                queue = self._pending[tenant]
                job = queue[0]
                new = tenant not in running
                more, longest = rows + job.spec.num_samples, max(length, _length(job))
                if more > self.max_batch_rows + (self.newcomer_rows if new else 0):
                    continue
                budget = self.kv_budget
                if budget is not None and self.kv_bytes(more, longest) > budget * (
                    1 if new else FILL
                ):
                    continue
                queue.popleft()
                del self._pending[tenant]
                if queue:
                    self._pending[tenant] = queue  # to the back of the turn order
                taken.append(job)
                rows, length = more, longest
                running.add(tenant)
                progressed = True
        if not taken and not self._rows and self._pending:  # larger than a batch: alone
            tenant, queue = next(iter(self._pending.items()))
            taken.append(queue.popleft())
            del self._pending[tenant]
            if queue:
                self._pending[tenant] = queue
        return taken

    def _drop_cancelled(self) -> None:
        """Forget waiting and running jobs whose future was cancelled."""
        for tenant, queue in list(self._pending.items()):
            live = deque(j for j in queue if not j.future.cancelled())
            if live:
                self._pending[tenant] = live
            else:
                del self._pending[tenant]
        alive = [i for i, r in enumerate(self._rows) if not r.job.future.cancelled()]
        if len(alive) == len(self._rows):
            return
        if not alive:
            self._reset()
            return
        self._next_logits = self._next_logits[torch.tensor(alive, device=self._mask.device)]
        self._retire(alive)

    def _forward(
        self,
        input_ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        adapters: list[str],
        cache,
        logits_to_keep: int,
        extra: dict | None = None,
    ) -> tuple[Tensor, object]:
        """The Hugging Face forward of rows `input_ids` `[rows, len]`, row i through
        adapter `adapters[i]`: (logits, the cache). `extra`: a vision model's images and
        position ids (`tinkerd.engine.vision`)."""
        base = self.base
        kwargs = dict(
            input_ids=input_ids.to(base.device),
            attention_mask=mask.to(base.device),
            position_ids=positions.to(base.device),
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        kwargs.update(extra or {})
        kwargs[self._cache_kw] = cache
        with base.lock:
            if base.peft_model is None:
                out = base.model(**kwargs)
            else:
                with route_rows(base.peft_model, segments(adapters)):
                    out = base.model(**kwargs)  # the injected model: skips PeftModel.forward
        return out.logits, getattr(out, self._cache_kw)

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the new prompts together, then add num_samples rows per prompt."""
        lengths = [len(j.spec.prompt) for j in jobs]
        now = time.time()
        for job in jobs:
            job.admitted = now
        self.prefill_tokens += sum(lengths)
        width = max(lengths)
        pad = 0
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):
            ids[i, width - lengths[i] :] = torch.tensor(job.spec.prompt)
            mask[i, width - lengths[i] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        keep_all = any(j.spec.prompt_logprobs for j in jobs)
        images = [list(j.spec.images) for j in jobs]
        extra, deltas = forward_inputs(self.base.vision, ids, images, mask)
        if self.base.vision is not None and deltas is None:
            deltas = torch.zeros(len(jobs), dtype=torch.long)
        # the fast path's cache keeps every token (sliding windows are its masks), so
        # that rows can join and leave any model's batch
        cache = kv_cache.plain() if self._fast_on() else None
        logits, cache = self._forward(
            ids, mask, positions, [j.spec.adapter for j in jobs], cache, 0 if keep_all else 1, extra
        )
        logits = logits.float()
        for i, job in enumerate(jobs):
            if job.spec.prompt_logprobs:
                job.prompt_logprobs, job.topk_prompt_logprobs = prompt_logprobs(
                    job.spec.prompt, logits[i, width - lengths[i] :], job.spec.topk_prompt_logprobs
                )
        rows_of = [i for i, job in enumerate(jobs) for _ in range(job.spec.num_samples)]
        index = torch.tensor(rows_of, device=logits.device)
        cache.batch_select_indices(index)
        new_rows = [
            Row(job, k, len(job.spec.prompt)) for job in jobs for k in range(job.spec.num_samples)
        ]
        device = self.base.device
        new_mask = mask[rows_of].to(device)
        new_positions = torch.tensor([[r.position] for r in new_rows], device=device)
        new_logits = logits[:, -1][index]
        new_deltas = None if deltas is None else deltas[rows_of].to(device)
        if self._cache is None:
            kv_cache.grow_in_place(cache)
            self._cache, self._mask, self._next_logits = cache, new_mask, new_logits
            self._positions, self._deltas = new_positions, new_deltas
        else:
            self._cache, self._mask = kv_cache.merge(self._cache, self._mask, cache, new_mask)
            self._next_logits = torch.cat([self._next_logits, new_logits])
            self._positions = torch.cat([self._positions, new_positions])
            if new_deltas is not None:
                self._deltas = torch.cat([self._deltas, new_deltas])
        self._rows += new_rows
        self._plan = make_plan(self._rows, logits.shape[-1], logits.device)

    def _step(self) -> None:
        """Sample one token for every row, retire finished rows, run the rest forward."""
        rows, logits = self._rows, self._next_logits
        self.steps.append((len(rows), self._plan.requests))
        self.decode_steps += 1
        self.decode_tokens += len(rows)
        tokens, logprobs, topk = choose(logits, self._plan, self._rng)
        tokens_list, logprobs_list = tokens.tolist(), logprobs.tolist()
        now = time.time()
        alive = []
        for i, row in enumerate(rows):
            row.job.sampled += 1
            if row.job.first_token is None:
                row.job.first_token = now
            row.tokens.append(tokens_list[i])
            row.logprobs.append(logprobs_list[i])
            if row.job.spec.listener is not None:
                try:
                    row.job.spec.listener(row.index, tokens_list[i])
                except Exception:  # a listener's bug never fails the batch
                    log.exception("a sample listener failed")
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
            positions = self._positions
            if self._deltas is not None:  # a vision model's text and RoPE positions
                positions = decode_positions(positions, self._deltas)
            logits, self._cache = self._forward(
                tokens[:, None],
                self._mask,
                positions,
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
            lora, fast = None, self._fast_on() and kv_cache.mergeable(self._cache)
            if fast:
                adapters = [r.job.spec.adapter for r in self._rows]
                with self.base.lock:
                    lora = self._fast.plan(adapters, self.base.device)
                fast = lora is not None
            self._fast_lora = (self._plan, lora, fast)
        return lora, fast

    def _fast_on(self) -> bool:
        return self._fast is not None and self.fast_decode

    def _retire(self, alive: list[int]) -> None:
        """Keep only the rows at indices `alive` (and their cache rows)."""
        keep = torch.tensor(alive, device=self._mask.device)
        self._positions = self._positions[keep]
        if self._deltas is not None:
            self._deltas = self._deltas[keep]
        self._rows = [self._rows[i] for i in alive]
        self._plan = make_plan(self._rows, self._next_logits.shape[-1], self._mask.device)
        self._mask = kv_cache.keep_rows(self._cache, self._mask, keep)

    def _stop_reason(self, row: Row) -> str | None:
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

    def _finish(self, row: Row, reason: str) -> None:
        job = row.job
        job.sequences[row.index] = SampledSequence(
            stop_reason=reason,
            tokens=row.tokens,
            logprobs=row.logprobs,
            topk_logprobs=row.topk if job.spec.topk_sample_logprobs else None,
        )
        job.remaining -= 1
        if job.remaining == 0 and not job.future.done():
            tokens = len(job.spec.prompt) + job.sampled
            ran = Ran(
                self.base.name,
                job.admitted,
                time.time(),
                tokens=tokens,
                first_token=job.first_token,
                batch_rows=len(self._rows),
            )
            with resolving(ran):
                job.future.set_result(
                    SampleResponse(
                        sequences=job.sequences,
                        prompt_logprobs=job.prompt_logprobs,
                        topk_prompt_logprobs=job.topk_prompt_logprobs,
                        type="sample",
                    )
                )


def _length(job: Job) -> int:
    """Columns a job's rows may reach: its prompt and every new token."""
    return len(job.spec.prompt) + job.spec.max_tokens


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of keys and values one token of one row adds to the cache: 2 x layers x
    key/value heads x head size x the weights' element size."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    layers = getattr(text, "num_hidden_layers", 0) or 0
    heads = getattr(text, "num_attention_heads", 1) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or getattr(text, "hidden_size", 0) // heads
    element = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * element

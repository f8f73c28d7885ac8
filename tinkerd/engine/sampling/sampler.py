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

A light tenant (at most `light_rows` rows running and waiting: an interactive caller,
one request at a time) is also kept from waiting on the cost of a large batch: while one
is active, and for `LINGER` seconds after (the gap between its requests), the others'
requests join only while the batch stays within `latency_rows` (they keep at least
`light_rows` rows however many light tenants there are). On a CPU a step's cost
grows with its rows (tinkerd/tiny: 2 ms for 1 row, 88 ms for 256), so one key's 256 rows
would make another key's one-row request ~40x slower; with the cap its steps cost a few
rows' worth. When a light tenant arrives at a batch over the cap, the heavy tenants'
rows beyond it are parked (set aside with their KV cache rows, `Parked`) and merged back,
unchanged, as the cap allows; the heavy tenants keep the whole batch when no light one
is active.
`latency_rows` is None (no cap) on a GPU, where a step costs about the same at any size.

With a `kv_budget` (bytes: the sampling memory budget), the sampler's memory stays
within it. `PREFILL_SHARE` of it is the working memory of a prefill forward
(activations, attention scores, logits: `prefill_bytes`): the new prompts are prefilled
in groups of rows and, where a group's prompts are long, in chunks of tokens (each chunk
attends to the cache the earlier ones made), sized to fit. `HEAP_SHARE` is left for
freed prefill blocks that the heap keeps. The rest holds the KV cache of the batch and
of its parked rows: at most rows x the longest row's prompt + max_tokens columns
(columns that are padding in every row are cropped), plus the growing buffer's quarter
of spare room (`kv_cache`); requests join while that bound fits in `FILL` of it (a
newcomer tenant: all of it), and a request that could never fit is refused when it is
submitted (`check`).
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
from tinkerd.engine.sampling.choose import Plan, choose, make_plan, next_token_logprobs
from tinkerd.engine.sampling.jobs import Job, Parked, Row
from tinkerd.engine.sampling.spec import SampleSpec
from tinkerd.engine.vision import decode_positions, forward_inputs
from tinkerd.errors import InvalidRequestError
from tinkerd.threads import compute
from tinkerd.timing import Ran, resolving
from tinkerd.types import SampledSequence, SampleResponse

MAX_BATCH_ROWS = 256  # sequences decoded together; more requests wait for a free row
FILL = 0.8  # of the KV budget that requests fill; the rest is for newcomer tenants
PREFILL_SHARE = 0.25  # of the sampling budget: a prefill forward's working memory
# and as much again for what the allocator keeps of freed prefill blocks: the heap keeps
# blocks under its mmap threshold (engine/memory.py), which the KV cache's growing
# tensors reuse only in part (64 x 2,000-token prompts, tiny: 1.19x the budget without it)
HEAP_SHARE = 0.25
MIN_CHUNK = 16  # fewest prompt tokens a prefill forward takes per row (unless shorter)
LATENCY_ROWS_CPU = 8  # rows a batch keeps to while a light tenant is active (CPU)
LINGER = 1.0  # seconds a light tenant counts as active after its last request
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
        """Bytes the sampler may take: the batch's KV cache and a prefill's working memory
        (None: no bound but the rows)."""
        self.kv_per_token = kv_bytes_per_token(base.model)
        self._shape = model_shape(base.model)
        self.newcomer_rows = max(1, max_batch_rows // 4)
        """Rows beyond `max_batch_rows` that only a tenant with no row running may take."""
        on_cpu = torch.device(base.device).type == "cpu"
        self.latency_rows: int | None = LATENCY_ROWS_CPU if on_cpu else None
        """Rows the batch keeps to (heavy tenants' requests wait) while a light tenant is
        active; None: no cap."""
        self._light_until = 0.0  # time.monotonic() until which a light tenant counts
        # tenant: its waiting jobs, tenants in turn order; never an empty deque
        self._pending: OrderedDict[Hashable, deque[Job]] = OrderedDict()
        self._cancelled = False  # a job's future was cancelled: drop its rows
        self._parked: list[Parked] = []  # rows set aside for a light tenant, oldest first
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
        self.prefill_forwards = 0
        """Prefill forward passes (a long prompt's chunks count one each)."""
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

    def prefill_bytes(self, rows: int, tokens: int, columns: int, all_logits: bool) -> int:
        """Bound on the working memory of a prefill forward of `rows` rows x `tokens` new
        tokens attending to `columns` in all (the KV cache it makes aside): per token the
        layer's hidden states, q/k/v and MLP products; per (token, column) the attention
        scores and mask; and the logits, upcast to float32 (every position's when prompt
        logprobs are asked for, else the last)."""
        hidden, intermediate, heads, vocab, element = self._shape
        per_token = element * (8 * hidden + 3 * intermediate + 3 * heads * columns)
        kept = tokens if all_logits else 1
        return rows * (tokens * per_token + kept * vocab * (element + 8))

    @property
    def prefill_budget(self) -> int | None:
        return None if self.kv_budget is None else int(self.kv_budget * PREFILL_SHARE)

    @property
    def cache_budget(self) -> int | None:
        """Bytes of the budget for KV cache (the batch's and its parked rows')."""
        if self.kv_budget is None:
            return None
        return self.kv_budget - self.prefill_budget - int(self.kv_budget * HEAP_SHARE)

    def check(self, spec: SampleSpec) -> None:
        """Refuse (InvalidRequestError, 400) a request that could never fit the budget."""
        if self.kv_budget is None:
            return
        length = len(spec.prompt)
        need = self.kv_bytes(spec.num_samples, length + spec.max_tokens)
        prefill = self.prefill_bytes(1, min(length, MIN_CHUNK), length, spec.prompt_logprobs)
        if need > self.cache_budget or prefill > self.prefill_budget:
            raise InvalidRequestError(
                f"{spec.num_samples} samples of {length} prompt + {spec.max_tokens} "
                f"new tokens need {need} bytes of KV cache and {prefill} of prefill, more "
                f"than the sampling memory budget of {self.kv_budget} bytes allows "
                f"({self.cache_budget} for KV cache, {self.prefill_budget} for prefill; "
                "tinkerd serve --sampling-memory-budget): ask for fewer samples or tokens"
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
            jobs = [*self._waiting(), *(r.job for r in self._rows + self._parked_rows())]
        return {j.spec.adapter for j in jobs}

    def _parked_rows(self) -> list[Row]:
        return [row for part in self._parked for row in part.rows]

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
                    while not (self._pending or self._rows or self._parked or self._closed):
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
                    # intra-op threads sized to the free cores; while rows are left, the
                    # next step follows at once (tinkerd.threads)
                    with compute(stay=lambda: bool(self._rows or self._parked or self._pending)):
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
        jobs = [*self._waiting(), *(r.job for r in self._rows + self._parked_rows())]
        self._pending.clear()
        self._parked.clear()
        self._reset()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    def _take_pending(self) -> list[Job]:
        """Waiting jobs to admit now: one per tenant in turn, round after round, while
        their rows fit (a tenant with no row running may use `newcomer_rows` more)."""
        if self._rows and not kv_cache.mergeable(self._cache):
            return []  # this cache type cannot take new rows mid-flight: wait for a drain
        running = {r.job.spec.tenant for r in self._rows}
        light, cap = self._light_tenants()
        heavy = sum(r.job.spec.tenant not in light for r in self._rows)
        # while a light tenant is active, the heavy ones' rows: the cap less the light
        # rows, but never less than `light_rows` (many light tenants do not starve them)
        room = None if cap is None else max(self.light_rows, cap - (len(self._rows) - heavy))
        if room is not None and heavy > room:
            self._park_heavy(light, room)
            heavy = room
        elif self._parked:  # the oldest rows first
            free = self.max_batch_rows - len(self._rows) if room is None else room - heavy
            self._unpark(free)
            heavy = sum(r.job.spec.tenant not in light for r in self._rows)
        taken, rows = [], len(self._rows)
        held = self._parked_rows()  # their KV cache counts against the budget too
        length = max((_length(r.job) for r in self._rows + held), default=0)
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
                heavy_job = room is not None and tenant not in light
                if heavy_job and heavy + job.spec.num_samples > room:
                    continue  # a light tenant is active: keep its steps cheap
                budget = self.cache_budget
                if budget is not None and self.kv_bytes(more + len(held), longest) > budget * (
                    1 if new else FILL
                ):
                    continue
                queue.popleft()
                del self._pending[tenant]
                if queue:
                    self._pending[tenant] = queue  # to the back of the turn order
                taken.append(job)
                rows, length = more, longest
                heavy += job.spec.num_samples if heavy_job else 0
                running.add(tenant)
                progressed = True
        if not taken and not self._rows and not held and self._pending:  # larger than a batch
            tenant, queue = next(iter(self._pending.items()))
            taken.append(queue.popleft())
            del self._pending[tenant]
            if queue:
                self._pending[tenant] = queue
        return taken

    @property
    def light_rows(self) -> int:
        """Most rows (running and waiting) of a light tenant."""
        return max(1, (self.latency_rows or 0) // 2)

    def _light_tenants(self) -> tuple[set[Hashable], int | None]:
        """(the tenants with at most `light_rows` rows running, parked and waiting, the batch's
        row cap for the others now: `latency_rows` while a light tenant is or was
        active within `LINGER` seconds, else None)."""
        if self.latency_rows is None:
            return set(), None
        rows: dict[Hashable, int] = {}
        for row in self._rows + self._parked_rows():
            rows[row.job.spec.tenant] = rows.get(row.job.spec.tenant, 0) + 1
        for tenant, queue in self._pending.items():
            rows[tenant] = rows.get(tenant, 0) + sum(j.spec.num_samples for j in queue)
        light = {t for t, n in rows.items() if n <= self.light_rows}
        now = time.monotonic()
        if light and len(rows) > 1:
            self._light_until = now + LINGER
        return light, self.latency_rows if now < self._light_until else None

    def _park_heavy(self, light: set[Hashable], room: int) -> None:
        """Set aside the rows of heavy tenants beyond their first `room` (the oldest stay)."""
        keep = [i for i, r in enumerate(self._rows) if r.job.spec.tenant in light]
        keep += [i for i, r in enumerate(self._rows) if r.job.spec.tenant not in light][:room]
        keep.sort()
        out = sorted(set(range(len(self._rows))) - set(keep))
        self._parked.append(self._select(self._batch(), out))
        if not keep:
            self._reset()
            return
        self._next_logits = self._next_logits[torch.tensor(keep, device=self._mask.device)]
        self._retire(keep)

    def _unpark(self, room: int) -> None:
        """Merge up to `room` parked rows back into the batch, oldest first."""
        while self._parked and room > 0:
            part = self._parked[0]
            if len(part.rows) > room:
                n = len(part.rows)
                self._parked[0] = self._select(part, list(range(room, n)))
                part = self._select(part, list(range(room)))
            else:
                self._parked.pop(0)
            self._merge(part)
            room -= len(part.rows)

    def _batch(self) -> Parked:
        """The running batch's rows and state (not copied)."""
        return Parked(
            self._rows, self._cache, self._mask, self._positions, self._deltas, self._next_logits
        )

    def _select(self, part: Parked, indices: list[int]) -> Parked:
        """Copies of rows `indices` of `part`."""
        index = torch.tensor(indices, device=part.mask.device)
        cache, mask = kv_cache.take_rows(part.cache, part.mask, index)
        deltas = None if part.deltas is None else part.deltas[index]
        rows = [part.rows[i] for i in indices]
        return Parked(rows, cache, mask, part.positions[index], deltas, part.next_logits[index])

    def _merge(self, part: Parked) -> None:
        """Add `part`'s rows to the batch (left-padded to a common length)."""
        if self._cache is None:
            kv_cache.grow_in_place(part.cache)
            self._cache, self._mask, self._next_logits = part.cache, part.mask, part.next_logits
            self._positions, self._deltas, self._rows = part.positions, part.deltas, []
        else:
            self._cache, self._mask = kv_cache.merge(self._cache, self._mask, part.cache, part.mask)
            self._next_logits = torch.cat([self._next_logits, part.next_logits])
            self._positions = torch.cat([self._positions, part.positions])
            if part.deltas is not None:
                self._deltas = torch.cat([self._deltas, part.deltas])
        self._rows += part.rows
        self._plan = make_plan(self._rows, self._next_logits.shape[-1], self._mask.device)

    def _drop_cancelled(self) -> None:
        """Forget waiting, parked and running jobs whose future was cancelled."""
        parked, self._parked = self._parked, []
        for part in parked:
            alive = [k for k, r in enumerate(part.rows) if not r.job.future.cancelled()]
            if len(alive) == len(part.rows):
                self._parked.append(part)
            elif alive:
                self._parked.append(self._select(part, alive))
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
        """Prefill the new prompts (in groups and chunks that fit the prefill's share of
        the budget), then add num_samples rows per prompt."""
        now = time.time()
        for job in jobs:
            job.admitted = now
        self.prefill_tokens += sum(len(j.spec.prompt) for j in jobs)
        for group, chunk in self._prefill_plan(jobs):
            self._prefill(group, chunk)

    def _prefill_plan(self, jobs: list[Job]) -> list[tuple[list[Job], int]]:
        """(jobs prefilled together, the prompt tokens each of their forwards takes): as
        many rows, then as many tokens, as keep a forward within `prefill_budget`."""
        width = max(len(j.spec.prompt) for j in jobs)
        budget = self.prefill_budget
        if budget is None or self.base.vision is not None:  # images go in one forward
            return [(jobs, width)]
        all_logits = any(j.spec.prompt_logprobs for j in jobs)
        one = self.prefill_bytes(1, min(width, MIN_CHUNK), width, all_logits)
        size = max(1, budget // one)
        plan = []
        for i in range(0, len(jobs), size):
            group = jobs[i : i + size]
            width = max(len(j.spec.prompt) for j in group)
            per_token = self.prefill_bytes(len(group), 1, width, all_logits)
            plan.append((group, min(width, max(MIN_CHUNK, budget // per_token))))
        return plan

    def _prefill(self, jobs: list[Job], chunk: int) -> None:
        """Prefill `jobs`' prompts together, `chunk` tokens a forward (left-padded to the
        longest; each chunk attends to the cache of the ones before), and merge
        num_samples rows per prompt into the batch."""
        lengths = [len(j.spec.prompt) for j in jobs]
        width = max(lengths)
        ids = torch.zeros((len(jobs), width), dtype=torch.long)
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
        adapters = [j.spec.adapter for j in jobs]
        picked: dict[int, tuple[list, list]] = {
            i: ([None], [None]) for i, j in enumerate(jobs) if j.spec.prompt_logprobs
        }
        # the fast path's cache keeps every token (sliding windows are its masks), so
        # that rows can join and leave any model's batch
        cache = kv_cache.plain() if self._fast_on() else None
        for start in range(0, width, chunk):
            end = min(width, start + chunk)
            logits, cache = self._forward(
                ids[:, start:end],
                mask[:, :end],
                positions[:, start:end],
                adapters,
                cache,
                0 if keep_all else 1,
                extra if start == 0 else None,
            )
            kv_cache.grow_in_place(cache)  # the next chunk appends in place
            self.prefill_forwards += 1
            logits = logits.float()
            for i, (lps, tops) in picked.items():  # column c predicts column c + 1's token
                first, last = max(start, width - lengths[i]), min(end, width - 1)
                if first < last:
                    k = jobs[i].spec.topk_prompt_logprobs
                    targets = ids[i, first + 1 : last + 1].tolist()
                    more, top = next_token_logprobs(
                        logits[i, first - start : last - start], targets, k
                    )
                    lps += more
                    tops += top or []
        for i, (lps, tops) in picked.items():
            jobs[i].prompt_logprobs = lps
            jobs[i].topk_prompt_logprobs = tops if jobs[i].spec.topk_prompt_logprobs else None
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
        self._merge(Parked(new_rows, cache, new_mask, new_positions, new_deltas, new_logits))

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


def model_shape(model: torch.nn.Module) -> tuple[int, int, int, int, int]:
    """(hidden size, MLP size, attention heads, vocabulary, the weights' element size)."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    hidden = getattr(text, "hidden_size", 0) or 0
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    heads = getattr(text, "num_attention_heads", 1) or 1
    vocab = getattr(text, "vocab_size", 0) or 0
    return hidden, intermediate, heads, vocab, next(model.parameters()).element_size()


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

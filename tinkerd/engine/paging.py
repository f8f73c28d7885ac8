"""Runs are cheap: each base model keeps a resident set of runs within a budget, and pages
the others out (host memory, then disk) and back in, bit for bit, when they are used.

A run is *resident* when its LoRA adapter is attached to the base's one `PeftModel` (on
the base's device) with its optimizer state. Every attached adapter costs memory (its
weights, gradients and optimizer moments) and time (PEFT walks every adapter of every
LoRA layer when the active adapter changes), so a base keeps at most
`PagingConfig.resident_bytes` of runs and `PagingConfig.max_resident_runs` runs resident.
A run that is not resident is *paged*: its adapter is taken out of the `PeftModel` the
way PEFT's `delete_adapter` takes it (every LoRA layer's per-adapter entries, and its
config), and its tensors (weights, pending gradients, AdamW moments or Dimuon momentum)
go

- to host memory (`host`: moved off a GPU; on a CPU nothing moves), up to
  `PagingConfig.host_bytes` (by default only on a GPU machine: on a CPU host memory
  *is* the device's), the adapter's pieces kept with the run's very Parameters and
  optimizer;
- beyond that to disk (`disk`), one self-describing file per run under
  `<data_dir>/paged/r<rank>-<pid>/` (`write_page`), and the run keeps nothing else: its
  modules, Parameters and optimizer are dropped (`_shelve`), so a run on disk costs
  memory only its `Run` record (~2.4 KB).

`ResidentSet.use(runs)` makes runs resident before a pass, an optimizer step or a load,
paging others out first. A host page-in puts the pieces back where they were and the
very tensors back into the same Parameters; a disk page-in copies the emptied modules
of the first run of that LoRA shape that went to disk (its shape's template) and puts
the file's bytes into the copy's Parameters and a fresh optimizer's state, by position
(`_unshelve`). No arithmetic, no initialisation, no random draw: paging never changes a
result. A run has no RNG state of its own (LoRA dropout is 0; sampling seeds are per
request), so there is none to keep; its step counts live on the `Run` and in the file.

A page file is deleted when its run is paged in, before the run can change: a file that
exists is its run's latest state. So runs outlive a restart (`suspend` at a clean
shutdown, `adopt` at the next start: docs/multi-tenant.md).

Eviction: least recently used, with a per-owner share. The owner of a run is the
session its model_id names (`<session>:train:<n>`; embedded runs share one owner): it
is what every data-parallel rank can tell from the model_id alone, so every rank makes
the same choices and holds the same resident set. When room is needed for an owner's
run, the victim is the least recently used unpinned run of

1. that owner itself, if it already holds its share (the budget over the number of
   owners with resident runs) or more: a hot owner recycles its own runs;
2. else the owner furthest over its share;
3. else anyone's (nobody over share: plain LRU).

So one owner's many hot runs cannot push every other owner's last run out each turn.

Operations that only read a run on rank 0 (saves, sampler snapshots) `borrow` it: a
paged run is attached for the read and detached after, leaving the resident set, its
order and the paged copy as they were.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from tinkerd.engine.memory import _mem_available, parse_bytes
from tinkerd.engine.optimizers import Dimuon, make_optimizer

log = logging.getLogger("tinkerd.paging")

if TYPE_CHECKING:
    from tinkerd.engine.adapters import Run
    from tinkerd.engine.models import BaseModel

RESIDENT_FRACTION = 0.125
"""Default resident budget of each base model: this fraction of the device's memory (GPU:
its total; CPU: the memory available at start)."""
HOST_FRACTION = 0.25
"""Default host-memory tier on a GPU machine: this fraction of the host's available
memory. On a CPU-only machine host memory *is* the device's, so paged runs go to disk."""
MAX_RESIDENT_RUNS = 32
"""Default most runs resident per base, however small they are: issue 24 measured a step
at 0.5 s with 50 adapters attached and 1.2 s with 150-300 (a loaded machine; this
project's benchmark at 40 vs 32 attached was within noise: docs/benchmarks.md)."""
GRANULE = 256 << 20
"""`auto` budgets are rounded down to this, so that ranks on alike machines agree."""
MIN_FREE_DISK = 1 << 30
"""Bytes of disk left free: a page-out that would leave less keeps the run in memory."""
SPARE_PIECES = 4
"""Sets of emptied adapter pieces kept per LoRA shape for reuse (`_Shape.spare`)."""
SPILL_DIR = "paged"
"""Under the data dir: one file per run paged to disk."""


@dataclass
class PagingConfig:
    """Where runs live (`EngineConfig` fields; `tinkerd serve` flags)."""

    resident_bytes: int | None = None
    """Bytes of runs (weights, gradients, optimizer state) resident per base; None: no limit."""
    max_resident_runs: int | None = MAX_RESIDENT_RUNS
    """Runs resident per base; None: no limit."""
    host_bytes: int = 0
    """Bytes of paged runs kept in host memory (GPU machines) before they go to disk."""

    @classmethod
    def resolve(
        cls,
        resident: int | str | None,
        max_runs: int | None,
        host: int | str | None,
        device: str | None = None,
    ) -> PagingConfig:
        """`auto` sizes from the machine: RESIDENT_FRACTION of the device's memory and,
        on a GPU, HOST_FRACTION of the host's (0 on a CPU)."""
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if resident == "auto":
            total = torch.cuda.mem_get_info()[1] if cuda else _mem_available()
            resident = max(GRANULE, int(total * RESIDENT_FRACTION) // GRANULE * GRANULE)
        if host == "auto":
            host = int(_mem_available() * HOST_FRACTION) // GRANULE * GRANULE if cuda else 0
        return cls(_bytes(resident), max_runs, _bytes(host) or 0)


def _bytes(value: int | str | None) -> int | None:
    return parse_bytes(value) if isinstance(value, str) else value


@dataclass
class _Entry:
    run: Run
    config: Any
    """The adapter's PEFT LoraConfig (out of the PeftModel while paged)."""
    size: int
    """Bytes resident: weights, a gradient and the optimizer's moments per parameter."""
    owner: str
    where: str = "device"
    """`device` (resident), `host` or `disk`."""
    pieces: dict[tuple[Any, str], Any] | None = None
    """While paged: the adapter's entries of each LoRA layer, by (layer, attribute)."""
    path: Path | None = None
    """While on disk: the file holding its state (`_write_page`)."""
    last_use: int = 0


@dataclass
class _Shape:
    """What the shelved runs of one LoRA shape share (`ResidentSet._shelve`): the PEFT
    config and the adapter's per-layer pieces, emptied, copied for each page-in."""

    config: Any
    pieces: dict[tuple[Any, str], Any]
    order: list[tuple[tuple[Any, str], str]]
    """Where each of a run's `params` is: (its piece, its name in the piece; "" for a
    piece that is the Parameter itself)."""
    spare: list[dict[tuple[Any, str], Any]] = field(default_factory=list)
    """Emptied pieces of runs gone to disk since, up to SPARE_PIECES, taken by the next
    page-ins before the template is copied (a copy costs more than the file's read)."""


def _shape_key(run: Run) -> tuple:
    """Runs alike in this have alike adapters on one base (the seed only sets values)."""
    lora = run.lora
    return (lora.rank, lora.train_attn, lora.train_mlp, lora.train_unembed)


@dataclass
class PagingStats:
    """Counters of one base's resident set (the service's metrics, the dashboard)."""

    page_ins: int = 0
    page_outs: int = 0
    page_in_seconds: float = 0.0
    page_out_seconds: float = 0.0
    disk_writes: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=10_000))
    """Monotonic times of recent page-ins (page-ins per minute)."""


def owner_of(model_id: str) -> str:
    """The session a server run's model_id names (`<session>:train:<n>`); "" otherwise."""
    head, sep, _ = model_id.rpartition(":train:")
    return head if sep else ""


class ResidentSet:
    """The runs of one base model: which are resident, and the paged copies of the rest.
    Every method holds the base's lock (the engine's operations on the base do too)."""

    def __init__(self, base: BaseModel, config: PagingConfig, spill_dir: Path):
        self.base = base
        self.config = config
        self.spill_dir = spill_dir
        self.entries: dict[str, _Entry] = {}
        self.resident: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self.host: OrderedDict[str, _Entry] = OrderedDict()
        self.stats = PagingStats()
        self._clock = 0
        self._layer_list: list[Any] | None = None
        self._shapes: dict[tuple, _Shape] = {}  # templates of shelved runs' modules
        self._lock = threading.Lock()  # the counters, read by the metrics thread

    # ---------------------------------------------------------------- membership

    def register(self, run: Run) -> None:
        """A run just created (attached, resident): room is made for it."""
        with self.base.lock:
            config = self.base.peft_model.peft_config[run.model_id]
            self._layer_list = None  # PEFT may have wrapped more modules for this run
            size = sum(p.numel() * p.element_size() for p in run.params)
            moments = 1 if run.optimizer_config.type == "dimuon" else 2
            entry = _Entry(run, config, size * (2 + moments), owner_of(run.model_id))
            self.entries[run.model_id] = entry
            run.pager = self
            self._touch(entry)
            self.resident[run.model_id] = entry
            self._make_room({run.model_id}, 0)

    def remove(self, run: Run) -> bool:
        """Forget a run being unloaded; True if it was resident (its adapter is still
        attached, and the caller deletes it)."""
        with self.base.lock:
            entry = self.entries.pop(run.model_id, None)
            if entry is None:
                return True
            self.resident.pop(run.model_id, None)
            self.host.pop(run.model_id, None)
            if entry.path is not None:
                entry.path.unlink(missing_ok=True)
            return entry.where == "device"

    def chunks(self, runs: list[Run]) -> list[list[int]]:
        """Indices of `runs` (one per request of a pass, repeats allowed) cut, in order,
        into groups whose distinct runs fit the resident set together (at least one run
        each): a packed pass pages in what it packs, one group at a time."""
        most_runs, most_bytes = self.config.max_resident_runs, self.config.resident_bytes
        groups: list[list[int]] = []
        sizes: dict[str, int] = {}  # the current group's runs
        for i, run in enumerate(runs):
            entry = self.entries.get(run.model_id)
            size = 0 if entry is None else entry.size
            if groups and run.model_id not in sizes:
                too_many = most_runs is not None and len(sizes) + 1 > most_runs
                too_big = most_bytes is not None and sum(sizes.values()) + size > most_bytes
                if too_many or too_big:
                    groups.append([])
                    sizes = {}
            if not groups:
                groups.append([])
            groups[-1].append(i)
            sizes[run.model_id] = size
        return groups

    # ---------------------------------------------------------------- use

    def use(self, runs: list[Run]) -> None:
        """Make `runs` resident (most recently used), paging others out to make room."""
        with self.base.lock:
            wanted = [self.entries[r.model_id] for r in runs if r.model_id in self.entries]
            pinned = {e.run.model_id for e in wanted}
            missing = list({e.run.model_id: e for e in wanted if e.where != "device"}.values())
            self._make_room(pinned, sum(e.size for e in missing), len(missing))
            for entry in missing:
                self._page_in(entry)
                self.resident[entry.run.model_id] = entry
            for entry in wanted:
                self._touch(entry)

    @contextlib.contextmanager
    def borrowed(self, run: Run) -> Iterator[None]:
        """`run` attached for the block, to read it; a paged run goes back where it was
        after (a disk copy is read, not rewritten), the resident set and its order
        unchanged."""
        with self.base.lock:
            entry = self.entries.get(run.model_id)
            if entry is None or entry.where == "device":
                yield
                return
            where = entry.where
            if where == "disk":
                self._from_disk(entry)
            else:
                _move_state(run, lambda t: t.to(self.device))
            self._attach(entry)
            try:
                yield
            finally:
                self._detach(entry)
                if where == "disk":
                    _take_state(run)  # the file still holds this state: free it again
                    self._shelve(entry)
                else:
                    _move_state(run, lambda t: t.to("cpu"))

    # ---------------------------------------------------------------- eviction

    def _touch(self, entry: _Entry) -> None:
        self._clock += 1
        entry.last_use = self._clock
        if entry.run.model_id in self.resident:
            self.resident.move_to_end(entry.run.model_id)

    def _over(self, extra_bytes: int, extra_runs: int) -> bool:
        c = self.config
        used = sum(e.size for e in self.resident.values()) + extra_bytes
        count = len(self.resident) + extra_runs
        return (c.resident_bytes is not None and used > c.resident_bytes) or (
            c.max_resident_runs is not None and count > c.max_resident_runs
        )

    def _make_room(self, pinned: set[str], extra_bytes: int, extra_runs: int = 0) -> None:
        while self._over(extra_bytes, extra_runs):
            victim = self._victim(pinned)
            if victim is None:
                return  # everything resident is in use: over budget until the next call
            self._page_out(victim)

    def _victim(self, pinned: set[str]) -> _Entry | None:
        """The LRU unpinned run, of the owner that should give way (module docstring)."""
        candidates = [e for e in self.resident.values() if e.run.model_id not in pinned]
        if not candidates:
            return None
        held: dict[str, int] = {}
        for e in self.resident.values():
            held[e.owner] = held.get(e.owner, 0) + e.size
        share = sum(held.values()) / len(held)
        wanting = {self.entries[m].owner for m in pinned if m in self.entries}
        for owner in wanting:  # 1. an owner at or over its share recycles its own runs
            if held.get(owner, 0) >= share:
                own = [e for e in candidates if e.owner == owner]
                if own:
                    return own[0]
        over = [e for e in candidates if held[e.owner] > share]  # 2. the owner most over
        if over:
            most = max(held[e.owner] for e in over)
            return next(e for e in over if held[e.owner] == most)
        return candidates[0]  # 3. least recently used

    # ---------------------------------------------------------------- moving state

    def _page_out(self, entry: _Entry) -> None:
        """Detach a resident run: to host memory if it fits there (the host's least
        recently paged runs going on to disk to make room), else to disk."""
        started = time.perf_counter()
        model_id = entry.run.model_id
        self._detach(entry)
        del self.resident[model_id]
        host = entry.size <= self.config.host_bytes or not self._disk_has_room(entry.size)
        while host and self.host and self._host_used() + entry.size > self.config.host_bytes:
            if not self._disk_has_room(entry.size):
                break
            _, oldest = self.host.popitem(last=False)
            self._to_disk(oldest)
        if host:
            _move_state(entry.run, lambda t: t.to("cpu"))  # no copy on a CPU device
            entry.where = "host"
            self.host[model_id] = entry
        else:
            self._to_disk(entry)
        with self._lock:
            self.stats.page_outs += 1
            self.stats.page_out_seconds += time.perf_counter() - started

    def _page_in(self, entry: _Entry) -> None:
        started = time.perf_counter()
        if entry.where == "host":
            self.host.pop(entry.run.model_id)
            _move_state(entry.run, lambda t: t.to(self.device))
        else:
            self._from_disk(entry)
            entry.path.unlink(missing_ok=True)  # from now on the run's state is in memory
            entry.path = None
        self._attach(entry)
        entry.where = "device"
        seconds = time.perf_counter() - started
        with self._lock:
            self.stats.page_ins += 1
            self.stats.page_in_seconds += seconds
            self.stats.recent.append(time.monotonic())

    def _disk_has_room(self, size: int) -> bool:
        """Whether the data dir's disk can take `size` more bytes and keep MIN_FREE_DISK
        free; if not, a paged run stays in host memory (over the budget, logged)."""
        path = self.spill_dir
        while not path.exists() and path != path.parent:
            path = path.parent
        if shutil.disk_usage(path).free >= size + MIN_FREE_DISK:
            return True
        log.warning("disk under %s is full: paged runs stay in memory", self.spill_dir)
        return False

    def _host_used(self) -> int:
        return sum(e.size for e in self.host.values())

    def _to_disk(self, entry: _Entry) -> None:
        """Write the run's state to its file (atomically: a crash leaves the old file or
        none) and free it: its tensors, and its adapter's modules, Parameters and
        optimizer too (`_shelve`), so that a run on disk costs memory only its `Run`."""
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / (_safe(entry.run.model_id) + PAGE_SUFFIX)
        run = entry.run
        write_page(path, run, _take_state(run), run.optimizer)
        self._shelve(entry)
        entry.path, entry.where = path, "disk"
        with self._lock:
            self.stats.disk_writes += 1

    def _from_disk(self, entry: _Entry) -> None:
        """The run's state from its file: one read (and one copy to a GPU), each tensor
        a view of that buffer, into a copy of its shape's modules (`_unshelve`)."""
        header, buffer = read_page(entry.path, self.device)
        self._unshelve(entry)
        _put_state(entry.run, _unpack(header["layout"], buffer))
        entry.run.optimizer.steps = header["optimizer_steps"]
        if header["optimizer_rank"] is not None:
            entry.run.optimizer.rank = header["optimizer_rank"]

    def _shelve(self, entry: _Entry) -> None:
        """Drop a detached run's modules, Parameters and optimizer (emptied, the state in
        its file). The first run of each LoRA shape leaves its emptied modules as the
        shape's template, which `_unshelve` copies; a run whose Parameters are not all
        in its modules (no such adapter is known) keeps its own."""
        run, key = entry.run, _shape_key(entry.run)
        if key not in self._shapes:
            found = {}
            for spot, piece in entry.pieces.items():
                if isinstance(piece, torch.nn.Parameter):
                    found[id(piece)] = (spot, "")
                elif isinstance(piece, torch.nn.Module):
                    found.update({id(p): (spot, n) for n, p in piece.named_parameters()})
            order = [found.get(id(p)) for p in run.params]
            if None in order:
                return
            self._shapes[key] = _Shape(entry.config, entry.pieces, order)
        elif len(self._shapes[key].spare) < SPARE_PIECES:
            self._shapes[key].spare.append(entry.pieces)
        run.params, run.optimizer = [], None
        entry.pieces = entry.config = None

    def _unshelve(self, entry: _Entry) -> None:
        """Give a shelved run modules and Parameters (empty until `_put_state`): a spare
        set of its shape's, else a copy of the template (nothing initialised, no random
        draw), and a fresh optimizer. A run restored after a restart whose shape has
        none yet gets its adapter made by PEFT, as at creation."""
        run = entry.run
        if run.optimizer is not None:
            return  # never shelved: it kept its own
        shape = self._shapes.get(_shape_key(run))
        if shape is None:
            from tinkerd.engine.adapters import create_run

            made = create_run(self.base, run.model_id, run.lora, run.optimizer_config)
            run.params, run.optimizer = made.params, made.optimizer
            entry.config = self.base.peft_model.peft_config[run.model_id]
            self._layer_list = None  # PEFT may have wrapped modules for it
            self._detach(entry)
            _take_state(run)
            return
        pieces = shape.spare.pop() if shape.spare else None
        pieces = pieces or {spot: copy.deepcopy(piece) for spot, piece in shape.pieces.items()}
        run.params = [
            pieces[spot] if not name else pieces[spot].get_parameter(name)
            for spot, name in shape.order
        ]
        run.optimizer = make_optimizer(run.optimizer_config.type, run.params, run.lora.rank)
        entry.pieces, entry.config = pieces, copy.deepcopy(shape.config)

    @property
    def device(self) -> torch.device:
        return self.base.model.get_input_embeddings().weight.device

    def _layers(self) -> list[Any]:
        """The PeftModel's LoRA layers (found again after a run is created: PEFT may have
        wrapped more modules for it)."""
        if self._layer_list is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            modules = self.base.peft_model.modules()
            self._layer_list = [m for m in modules if isinstance(m, BaseTunerLayer)]
        return self._layer_list

    def _detach(self, entry: _Entry) -> None:
        """Take the run's adapter out of the PeftModel, as PEFT's `delete_adapter` does
        (every per-adapter entry of every LoRA layer, and its config), keeping the
        pieces: its modules (with the run's very Parameters) go back in at `_attach`."""
        from tinkerd.engine.adapters import _repoint_active

        name, model = entry.run.model_id, self.base.peft_model
        pieces = {}
        for layer in self._layers():
            for attr in _adapter_attrs(layer):
                held = getattr(layer, attr, None)
                if held is not None and name in held:
                    pieces[layer, attr] = held.pop(name)
        entry.pieces, entry.config = pieces, model.peft_config.pop(name)
        self.base.adapters.discard(name)
        _repoint_active(self.base)

    def _attach(self, entry: _Entry) -> None:
        """Put the run's adapter back: its pieces into the layers they came from."""
        from tinkerd.engine.adapters import _repoint_active

        name = entry.run.model_id
        self.base.peft_model.peft_config[name] = entry.config
        for (layer, attr), piece in entry.pieces.items():
            getattr(layer, attr)[name] = piece
        entry.pieces = None
        self.base.adapters.add(name)
        _repoint_active(self.base)

    # ---------------------------------------------------------------- restarts

    def suspend(self) -> None:
        """At a clean shutdown: every run to disk, and the files kept at exit, so that the
        next server on this data dir takes them back (`adopt`)."""
        with self.base.lock:
            for model_id, entry in list(self.resident.items()):
                self._detach(entry)
                del self.resident[model_id]
                self._to_disk(entry)
            for model_id, entry in list(self.host.items()):
                del self.host[model_id]
                self._to_disk(entry)
            _KEPT.add(self.spill_dir)

    def adopt(self, header: dict, path: Path) -> Run:
        """Take back a run an earlier process left on disk (`header` read from `path` by
        `read_page`): its file moves into this process's directory and the run is
        registered as paged to disk, made resident on its first use."""
        from tinkerd.engine.adapters import Run
        from tinkerd.types import LoraConfig, optimizer_config_from

        with self.base.lock:
            optimizer = optimizer_config_from(header["optimizer_config"])
            lora = LoraConfig.model_validate(header["lora"])
            run = Run(header["model_id"], self.base, lora, [], None, optimizer, header["step"])
            run.pager = self
            weights = sum(s["slot"][1] for s in _slots(header["layout"]["weights"]))
            moments = 1 if optimizer.type == "dimuon" else 2
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            mine = self.spill_dir / path.name
            os.replace(path, mine)
            entry = _Entry(run, None, weights * (2 + moments), owner_of(run.model_id))
            entry.where, entry.path = "disk", mine
            self.entries[run.model_id] = entry
            return run

    # ---------------------------------------------------------------- metrics

    def snapshot(self) -> dict[str, float]:
        """Resident / host / disk runs and bytes, page-ins (total, in the last minute),
        page-outs and their seconds."""
        with self._lock:
            s = self.stats
            now = time.monotonic()
            while s.recent and s.recent[0] < now - 60:
                s.recent.popleft()
            entries = list(self.entries.values())
            return {
                "resident_runs": sum(e.where == "device" for e in entries),
                "host_runs": sum(e.where == "host" for e in entries),
                "disk_runs": sum(e.where == "disk" for e in entries),
                "resident_bytes": sum(e.size for e in entries if e.where == "device"),
                "resident_budget_bytes": self.config.resident_bytes,
                "max_resident_runs": self.config.max_resident_runs,
                "page_ins": s.page_ins,
                "page_ins_last_minute": len(s.recent),
                "page_in_seconds": s.page_in_seconds,
                "mean_page_in_seconds": s.page_in_seconds / s.page_ins if s.page_ins else 0.0,
                "page_outs": s.page_outs,
                "page_out_seconds": s.page_out_seconds,
                "disk_writes": s.disk_writes,
            }


def _safe(model_id: str) -> str:
    """A file name for `model_id` (distinct ids stay distinct: a digest of the id)."""
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", model_id)[:100] + "-" + digest


def _adapter_attrs(layer: Any) -> tuple[str, ...]:
    """A LoRA layer's per-adapter containers (what PEFT's `delete_adapter` empties)."""
    return (*layer.adapter_layer_names, *layer.other_param_names, "lora_variant")


_EMPTY = torch.empty(0)


def _move_state(run: Run, move: Callable[[Tensor], Tensor]) -> None:
    """Move the run's weights, gradients and optimizer state (the same objects: the
    optimizer keys its state by them) with `move`."""
    for p in run.params:
        p.data = move(p.data)
        if p.grad is not None:
            p.grad = move(p.grad)
    if isinstance(run.optimizer, Dimuon):
        run.optimizer.momentum = {i: move(m) for i, m in run.optimizer.momentum.items()}
        return
    state = run.optimizer.state
    for p in list(state):  # AdamW's `step` stays where torch keeps it (a CPU scalar)
        state[p] = {k: v if k == "step" else move(v) for k, v in state[p].items()}


ALIGN = 64  # every tensor starts at a multiple of this in the file (any dtype may view it)
PAGE_MAGIC = b"TKDPAGE1"
PAGE_SUFFIX = ".page"
PAGE_VERSION = 1


def _pack(value: Any, parts: list[Tensor], at: list[int] | None = None) -> Any:
    """`value` (dicts, lists, tensors, numbers) with each tensor replaced by its slot in
    the file, `{"slot": [offset, bytes, shape, dtype]}`; the tensors' bytes (CPU, padded
    to ALIGN) appended to `parts` in file order."""
    at = [0] if at is None else at
    if isinstance(value, Tensor):
        data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        slot = [at[0], data.numel(), list(value.shape), str(value.dtype).removeprefix("torch.")]
        pad = -data.numel() % ALIGN
        parts += [data, torch.zeros(pad, dtype=torch.uint8)] if pad else [data]
        at[0] += data.numel() + pad
        return {"slot": slot}
    if isinstance(value, dict):
        return {str(k): _pack(v, parts, at) for k, v in value.items()}
    if isinstance(value, list):
        return [_pack(v, parts, at) for v in value]
    return value


def _unpack(layout: Any, buffer: Tensor) -> Any:
    """`_pack`'s inverse: each slot becomes a view of `buffer` (the file's tensor bytes)."""
    if isinstance(layout, dict) and "slot" in layout:
        offset, size, shape, dtype = layout["slot"]
        return buffer[offset : offset + size].view(getattr(torch, dtype)).reshape(shape)
    if isinstance(layout, dict):
        return {k: _unpack(v, buffer) for k, v in layout.items()}
    if isinstance(layout, list):
        return [_unpack(v, buffer) for v in layout]
    return layout


def write_page(path: Path, run: Run, state: dict[str, Any], optimizer: Any) -> None:
    """A paged run's file: PAGE_MAGIC, the header's length (8 bytes, little-endian),
    the header (JSON: what the run is and the layout of its tensors), padding to ALIGN,
    the tensors' bytes. Self-describing, so that a restarted server can take the run
    back (`read_page`). Written to a temporary file and renamed: a crash leaves the old
    file or none, never half of one."""
    parts: list[Tensor] = []
    header = {
        "version": PAGE_VERSION,
        "model_id": run.model_id,
        "base_model": run.base.name,
        "lora": run.lora.model_dump(mode="json"),
        "optimizer_config": run.optimizer_config.model_dump(mode="json"),
        "step": run.step,
        "optimizer_steps": optimizer.steps,
        "optimizer_rank": getattr(optimizer, "rank", None),  # Dimuon's
        "layout": _pack(state, parts),
    }
    head = json.dumps(header).encode()
    head += b" " * (-(len(head) + 16) % ALIGN)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(PAGE_MAGIC + len(head).to_bytes(8, "little") + head)
        for part in parts:
            f.write(memoryview(part.numpy()))
    os.replace(tmp, path)


def read_page(path: Path, device: torch.device | str = "cpu") -> tuple[dict, Tensor]:
    """A paged run's file (written by this process, or checked by `read_header`): its
    header, and its tensor bytes as one uint8 tensor on `device`."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"{path}: {e}") from None
    if raw.size < 16 or raw[:8].tobytes() != PAGE_MAGIC:
        raise ValueError(f"{path} is not a paged run")
    length = int.from_bytes(raw[8:16].tobytes(), "little")
    header = json.loads(raw[16 : 16 + length].tobytes())
    return header, torch.from_numpy(raw[16 + length :]).to(device)


def read_header(path: Path) -> dict:
    """A paged run's header alone (what it is; `read_page` checks its tensors' bytes).
    ValueError if the file is not one, or not whole."""
    try:
        with open(path, "rb") as f:
            start = f.read(16)
            if len(start) < 16 or start[:8] != PAGE_MAGIC:
                raise ValueError(f"{path} is not a paged run")
            length = int.from_bytes(start[8:], "little")
            header = json.loads(f.read(length))
            size = os.fstat(f.fileno()).st_size - 16 - length
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    end = max((s["slot"][0] + s["slot"][1] for s in _slots(header["layout"])), default=0)
    if header.get("version") != PAGE_VERSION or size < end:
        raise ValueError(f"{path} is truncated or of another version")
    return header


def _slots(layout: Any) -> Iterator[dict]:
    if isinstance(layout, dict) and "slot" in layout:
        yield layout
    elif isinstance(layout, dict | list):
        for v in layout.values() if isinstance(layout, dict) else layout:
            yield from _slots(v)


def _take_state(run: Run) -> dict[str, Any]:
    """The run's tensors by position in `run.params` (weights, gradients, optimizer
    state), taken out of it: the run keeps its Parameters, emptied."""
    out: dict[str, Any] = {
        "weights": [p.data for p in run.params],
        "grads": [p.grad for p in run.params],
    }
    if isinstance(run.optimizer, Dimuon):
        out["momentum"], run.optimizer.momentum = run.optimizer.momentum, {}
    else:
        state = run.optimizer.state
        out["adam"] = {i: dict(state[p]) for i, p in enumerate(run.params) if p in state}
        state.clear()
    for p in run.params:
        p.data, p.grad = _EMPTY, None
    return out


def _put_state(run: Run, saved: dict[str, Any]) -> None:
    """Give the run back the tensors `_take_state` took (from its file)."""
    for p, weight, grad in zip(run.params, saved["weights"], saved["grads"], strict=True):
        p.data, p.grad = weight, grad
    if isinstance(run.optimizer, Dimuon):
        run.optimizer.momentum = {int(i): m for i, m in saved["momentum"].items()}
        return
    for i, state in saved["adam"].items():  # AdamW's `step` stays on the CPU, as torch keeps it
        state = {k: v.cpu() if k == "step" else v for k, v in state.items()}
        run.optimizer.state[run.params[int(i)]] = state


_KEPT: set[Path] = set()
"""Spill directories to leave in place at exit (`ResidentSet.suspend`: a clean shutdown
of a server whose runs a restart takes back)."""


def spill_dir(data_dir: Path, rank: int = 0) -> Path:
    """This process's directory for runs paged to disk, `<data_dir>/paged/r<rank>-<pid>`.
    Removed when this process exits, unless kept (`ResidentSet.suspend`). What earlier
    processes left (in this directory too, if one had this pid: a container restarted)
    is `leftover_pages`'s: a restarted server takes those runs back
    (`Engine.restore_runs`, docs/multi-tenant.md) and removes the rest."""
    mine = Path(data_dir) / SPILL_DIR / f"r{rank}-{os.getpid()}"
    atexit.register(_remove_unless_kept, mine)
    return mine


def _remove_unless_kept(path: Path) -> None:
    if path not in _KEPT:
        shutil.rmtree(path, ignore_errors=True)


def leftover_pages(data_dir: Path, rank: int = 0) -> list[Path]:
    """The page files this rank's earlier processes left under `<data_dir>/paged/` (those
    no longer running, or of this very pid: a container restarted), oldest first."""
    root = Path(data_dir) / SPILL_DIR
    found = []
    for old in sorted(root.glob(f"r{rank}-*")) if root.is_dir() else []:
        pid = old.name.partition("-")[2]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            found += sorted(old.glob("*" + PAGE_SUFFIX), key=lambda p: p.stat().st_mtime)
    return found


def remove_leftovers(data_dir: Path, rank: int, pages: list[Path], keep: Path | None) -> None:
    """Remove `pages` (`leftover_pages` not taken back) and the directories of this
    rank's processes that are gone, all but `keep` (this process's)."""
    for page in pages:
        page.unlink(missing_ok=True)
    root = Path(data_dir) / SPILL_DIR
    for old in root.glob(f"r{rank}-*") if root.is_dir() else []:
        pid = old.name.partition("-")[2]
        if old != keep and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

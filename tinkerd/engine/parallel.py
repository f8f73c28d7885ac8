"""Where a pass runs: one process, or the ranks of a torch.distributed group.

The compute (`tinkerd.engine.compute`) is written once against this small interface, as
nanoGPT writes one training loop for one GPU and for DDP: a single process is the world of
one rank, where sharding keeps everything, and gathering or agreeing is the identity.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch


class SingleProcess:
    """The whole batch on this process: rank 0 of a world of one."""

    rank = 0
    world = 1
    fsdp = False
    """Whether the base is sharded with FSDP, so every rank must join every forward."""

    def shard(self, items: list) -> list:
        """This rank's contiguous share of `items` (shards in rank order = input order)."""
        n = len(items)
        return items[n * self.rank // self.world : n * (self.rank + 1) // self.world]

    def all_finite(self, finite: list[bool]) -> list[bool]:
        """Element i is true where `finite[i]` is true on every rank."""
        return list(finite)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None on the others)."""
        return [obj]

    def scatter(self, objs: list[Any] | None) -> Any:
        """Rank r gets `objs[r]` (given on rank 0 only)."""
        return objs[0]

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over ranks (a parameter with no
        gradient on some rank counts zero there; with none anywhere it keeps None)."""

    @contextlib.contextmanager
    def in_order(self, op: str, args: tuple) -> Iterator[None]:
        """Around an engine operation that every rank applies (`Engine._everywhere`): on
        rank 0 of a group, tell the other ranks `(op, args)` first, one operation at a
        time, so that all apply the same operations in the same order."""
        yield

    def receive(self) -> tuple[str, tuple]:
        """A rank other than 0: the next operation rank 0 announced."""
        raise RuntimeError("a single process receives no operations")

    def stop_workers(self) -> None:
        """Rank 0: tell the other ranks to return from their loop (`serve_worker`)."""


class TorchDistributed(SingleProcess):
    """This process's rank of the default torch.distributed group (gloo or NCCL)."""

    def __init__(self, fsdp: bool = False):
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.fsdp = fsdp
        # NCCL reduces only GPU tensors (gloo, CPU ones).
        cuda = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        self._order = threading.Lock()

    @contextlib.contextmanager
    def in_order(self, op: str, args: tuple) -> Iterator[None]:
        if self.rank != 0:  # a worker applies what rank 0 announced
            yield
            return
        with self._order:
            self._dist.broadcast_object_list([(op, args)], src=0)
            yield

    def receive(self) -> tuple[str, tuple]:
        box: list = [None]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def stop_workers(self) -> None:
        with self._order:
            self._dist.broadcast_object_list([("stop", ())], src=0)

    def all_finite(self, finite: list[bool]) -> list[bool]:
        flags = torch.tensor([float(f) for f in finite], device=self.device)
        self._dist.all_reduce(flags, op=self._dist.ReduceOp.MIN)
        return [bool(f) for f in flags.tolist()]

    def gather(self, obj: Any) -> list[Any] | None:
        out = [None] * self.world if self.rank == 0 else None
        self._dist.gather_object(obj, out, dst=0)
        return out

    def scatter(self, objs: list[Any] | None) -> Any:
        mine: list = [None]
        self._dist.scatter_object_list(mine, objs if self.rank == 0 else None, src=0)
        return mine[0]

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        self._dist.all_reduce(has_grad, op=self._dist.ReduceOp.MAX)
        params = [p for p, h in zip(params, has_grad.tolist()) if h]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).float()
        self._dist.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p).to(p.dtype)

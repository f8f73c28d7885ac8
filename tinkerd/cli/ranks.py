"""`tinkerd serve --nproc N` (or under torchrun): start the torch.distributed ranks.

Rank 0 is this process and runs the HTTP server over its `Engine`, whose operations that
change runs reach every rank (`engine.parallel`); the other ranks (spawned here, or started
by torchrun on any node) run `serve_worker`. Without a GPU
the ranks talk over gloo and split the machine's cores; with GPUs, over NCCL, one GPU each.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from tinkerd.engine import Engine
from tinkerd.engine.distributed import serve_worker, shard_base_with_fsdp
from tinkerd.engine.models import parse_model_specs, resolve_model_path
from tinkerd.engine.parallel import TorchDistributed
from tinkerd.engine.tiny import TINY_MODEL_NAME


def serve_ranks(
    world: int, args: argparse.Namespace, data_dir: Path, run_server: Callable[[Engine], None]
) -> int:
    if "RANK" in os.environ:  # torchrun started every rank, this one included
        rank = int(os.environ["RANK"])
    else:
        rank = 0
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        context = torch.multiprocessing.get_context("spawn")
        for other in range(1, world):
            context.Process(
                target=_worker, args=(other, world, args, data_dir), daemon=True
            ).start()
    engine = _start_rank(rank, world, args, data_dir)
    if rank != 0:
        serve_worker(engine)
        dist.destroy_process_group()
        return 0
    try:
        run_server(engine)
    finally:
        engine.parallel.stop_workers()
        dist.destroy_process_group()
    return 0


def _worker(rank: int, world: int, args: argparse.Namespace, data_dir: Path) -> None:
    # Die with rank 0 (even on kill -9) rather than wait forever in a collective.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    serve_worker(_start_rank(rank, world, args, data_dir))
    dist.destroy_process_group()


def _start_rank(rank: int, world: int, args: argparse.Namespace, data_dir: Path) -> Engine:
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    # Build tinkerd/tiny before joining the group: under torch.distributed, transformers'
    # save_pretrained writes the weights only on rank 0 and waits at a barrier.
    resolve_model_path(TINY_MODEL_NAME)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=30),
    )
    if cuda:
        torch.cuda.set_device(local_rank)
    else:  # ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    from tinkerd.cli.serve import build_engine

    engine = build_engine(args, data_dir, rank, f"cuda:{local_rank}" if cuda else None)
    engine.parallel = TorchDistributed()
    if args.fsdp:
        for name in [TINY_MODEL_NAME, *parse_model_specs(args.model)]:
            shard_base_with_fsdp(engine, name)
    return engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""`tinkerd serve`: the Tinker wire protocol over HTTP, on an engine in this process
(or on data-parallel ranks: cli/ranks.py)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from tinkerd.engine.sampling.backend import SAMPLER_BACKENDS

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _suspend_at_shutdown(app: Any, service: Any) -> Any:
    """`app`, which at a clean shutdown (SIGTERM, Ctrl-C) finishes the work in hand and
    pages every run out to disk for the next server on the data dir to take back
    (`Service.close(suspend=True)`). In the app's lifespan: uvicorn raises the signal
    again once the app has shut down, so after `uvicorn.run` would be too late."""
    import asyncio
    import contextlib

    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        async with inner(app) as state:
            yield state
        await asyncio.to_thread(service.close, True)

    app.router.lifespan_context = lifespan
    return app


def _serve(args: argparse.Namespace) -> int:
    import ipaddress
    from pathlib import Path

    import uvicorn

    from tinkerd.engine import Engine
    from tinkerd.engine.models import check_model_sources, parse_model_specs
    from tinkerd.engine.sampling.backend import sampler_factory
    from tinkerd.engine.tiny import TINY_MODEL_NAME
    from tinkerd.errors import InvalidRequestError
    from tinkerd.server.app import Server, create_app
    from tinkerd.service import ServiceConfig

    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("TINKERD_API_KEYS", "").split(",") if k.strip()]
    try:
        loopback = args.host in LOOPBACK or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not keys and not loopback:
        print(
            f"refusing to serve on {args.host} without an API key: pass --api-key or set "
            "TINKERD_API_KEYS (with no key, tinkerd only binds to loopback)",
            file=sys.stderr,
        )
        return 2
    try:
        sampler_factory(args.sampler)  # a backend that cannot load stops us now
        models = [TINY_MODEL_NAME, *parse_model_specs(args.model)]
        check_model_sources(parse_model_specs(args.model))  # a bad source stops us now
    except (InvalidRequestError, ValueError) as e:
        print(f"tinkerd serve: {e}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).expanduser()
    if args.image_dir:  # read by tinkerd.engine.vision (every rank inherits it)
        os.environ["TINKERD_IMAGE_DIR"] = str(Path(args.image_dir).expanduser().resolve())

    def run_server(engine: Engine) -> None:
        config = ServiceConfig(
            poll_timeout=args.poll_timeout,
            max_pending=args.max_queue,
            session_timeout=args.session_timeout,
            json_log=args.log_requests,
            telemetry=not args.no_telemetry,
            **{name: getattr(args, name) for name in QUOTAS if hasattr(args, name)},
        )
        metrics_keys = args.metrics_key or None
        server = Server(engine, data_dir, keys, models, config=config, metrics_keys=metrics_keys)
        print(
            f"tinkerd serving {models} on http://{args.host}:{args.port} "
            f"({len(keys)} API key(s); data in {server.service.store.path})",
            flush=True,
        )
        app = _suspend_at_shutdown(create_app(server), server.service)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)

    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    if world > 1:
        from tinkerd.cli.ranks import serve_ranks

        return serve_ranks(world, args, data_dir, run_server)
    run_server(build_engine(args, data_dir))
    return 0


def build_engine(args: argparse.Namespace, data_dir: Any, rank: int = 0, device: str | None = None):
    """The engine `serve`'s flags ask for: one construction for one process and for every
    data-parallel rank (only rank 0 samples and writes checkpoints)."""
    from tinkerd.engine import Engine
    from tinkerd.engine.sampling.backend import sampler_factory

    return Engine(
        extra_models=args.model,
        data_dir=data_dir,
        device=device,
        recover_checkpoints=rank == 0,
        sampler_factory=sampler_factory(args.sampler),
        config=engine_config(args),
    )


def engine_config(args: argparse.Namespace) -> Any:
    """The engine's limits from `serve`'s flags."""
    from tinkerd.engine import EngineConfig

    config = EngineConfig(dtype=args.dtype, memory_budget_bytes=args.memory_budget)
    if args.max_batch_tokens:
        config.max_batch_tokens = args.max_batch_tokens
    config.run_budget_bytes = args.run_budget
    config.max_resident_runs = getattr(args, "max_resident_runs", config.max_resident_runs)
    config.host_run_budget_bytes = args.host_run_budget
    config.sampling_budget_bytes = args.sampling_memory_budget
    config.sampling_latency_rows = getattr(args, "sampling_latency_rows", "auto")
    return config


QUOTAS = {  # ServiceConfig field: what its --flag says (`none`: no limit)
    "max_runs_per_key": "active training runs one API key may hold (403 beyond)",
    "max_sessions_per_key": "open sessions one API key may hold (403 beyond)",
    "max_sampling_sessions_per_key": "sampling sessions one API key holds; beyond it, "
    "its least recently used one is dropped",
    "max_queued_per_key": "requests of one API key queued at once (429 beyond)",
    "max_losses_per_key": "uploaded custom losses one API key holds (403 beyond)",
    "max_loss_bytes_per_key": "bytes of uploaded custom losses one API key holds (403 beyond)",
    "max_body_bytes": "bytes one HTTP request body may hold (413 beyond; default 64 MiB)",
}


def _limit(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _rows(text: str) -> int | str | None:
    """`auto`, `none` or a positive row count."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected auto, none or a row count: {text!r}")
    return int(text)


def _budget(text: str) -> int | str | None:
    """`--memory-budget`, `--run-budget`: `auto`, `none` or a size (`2GiB`)."""
    from tinkerd.engine.memory import parse_bytes

    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve the Tinker wire protocol over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--data-dir",
        default=os.environ.get("TINKERD_DATA_DIR", "~/.tinkerd"),
        help="SQLite store and checkpoints (default: $TINKERD_DATA_DIR or ~/.tinkerd)",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        help="accepted API key, optionally KEY=LABEL to name its owner on the dashboard "
        "(repeatable; also TINKERD_API_KEYS, comma-separated)",
    )
    serve.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]SOURCE",
        help="also serve this base model: a local dir, an HF hub id, tinkerd/tiny-chat or "
        "tinkerd/tiny-vl; "
        "NAME=SOURCE serves it under NAME (e.g. "
        "meta-llama/Llama-3.1-8B-Instruct=tinkerd/tiny-chat, for clients that pick a chat "
        "format by model name)",
    )
    serve.add_argument(
        "--poll-timeout",
        type=float,
        default=25.0,
        help="seconds retrieve_future waits for a result before answering try_again",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=4096,
        help="requests queued at most; beyond it the server answers 429 with Retry-After",
    )
    serve.add_argument(
        "--max-batch-tokens",
        type=int,
        help="most padded tokens (data x longest datum) in one request (default 1048576)",
    )
    serve.add_argument(
        "--memory-budget",
        type=_budget,
        default="auto",
        metavar="BYTES",
        help="activation memory a training pass may use, e.g. 2GiB: bigger passes run in "
        "micro-batches (gradients accumulated), logits in chunks, decoder layers "
        "checkpointed when needed; results are the same (default auto: a quarter of the "
        "memory available at start, GPU memory on CUDA; none: no budget)",
    )
    serve.add_argument(
        "--run-budget",
        type=_budget,
        default="auto",
        metavar="BYTES",
        help="memory of runs (LoRA weights, gradients, optimizer state) each base model "
        "keeps resident; the least recently used others are paged out and back in when "
        "used, results unchanged (default auto: 1/8 of the device's memory; none: no limit)",
    )
    serve.add_argument(
        "--max-resident-runs",
        type=_limit,
        default=argparse.SUPPRESS,
        metavar="N",
        help="runs each base model keeps resident at most (default 32: every attached "
        "adapter slows each step; none: no limit)",
    )
    serve.add_argument(
        "--host-run-budget",
        type=_budget,
        default="auto",
        metavar="BYTES",
        help="memory of paged runs kept in host memory before they go to disk under "
        "--data-dir (default auto: a quarter of host memory on a GPU machine, 0 on CPU)",
    )
    serve.add_argument(
        "--sampling-memory-budget",
        type=_budget,
        default="auto",
        metavar="BYTES",
        help="memory each base model's sampler may hold, e.g. 2GiB: the batch's KV cache "
        "and a prefill's working memory (long prompts are prefilled in chunks); requests "
        "join the batch while it fits, one that never could is a 400 (default auto: a "
        "quarter of the memory available at start; none: no budget)",
    )
    serve.add_argument(
        "--sampling-latency-rows",
        type=_rows,
        default="auto",
        metavar="ROWS",
        help="rows a sampler batch keeps to while an API key with only a few rows is "
        "sampling, so that its steps stay cheap beside another key's flood (default auto: "
        "8 on a CPU, where a step's cost grows with its rows; no cap on a GPU; none: no cap)",
    )
    serve.add_argument(
        "--session-timeout",
        type=float,
        default=300.0,
        help="seconds without a heartbeat after which a session's runs are unloaded",
    )
    serve.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel ranks on this machine (torch.distributed; or launch with torchrun)",
    )
    serve.add_argument(
        "--fsdp", action="store_true", help="shard base models over the ranks with FSDP2"
    )
    serve.add_argument(
        "--sampler",
        choices=list(SAMPLER_BACKENDS),
        default="builtin",
        help="sampler backend: tinkerd's batched sampler, or vLLM on a GPU (tinkerd[vllm])",
    )
    serve.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default=os.environ.get("TINKERD_DTYPE", "auto"),
        help="frozen base weights' dtype (LoRA, Adam state and logprobs stay float32); "
        "auto: bfloat16 on CUDA, else float32",
    )
    for name, what in QUOTAS.items():  # unset: ServiceConfig's default (multi-tenant.md)
        serve.add_argument(
            "--" + name.replace("_", "-"),
            type=_limit,
            default=argparse.SUPPRESS,
            metavar="N",
            help=f"{what}; none: no limit (default: docs/multi-tenant.md)",
        )
    serve.add_argument(
        "--log-requests",
        action="store_true",
        help="one JSON line per request on stderr (request id, key label, session, run, verb, "
        "tokens, queue and run seconds, outcome: docs/operations.md)",
    )
    serve.add_argument(
        "--no-telemetry",
        action="store_true",
        help="record no per-request spans: no request metrics, session traces or request "
        "log (to measure their cost; docs/operations.md)",
    )
    serve.add_argument(
        "--metrics-key",
        action="append",
        default=[k for k in [os.environ.get("TINKERD_METRICS_KEY")] if k],
        help="the only key /metrics accepts, as `Authorization: Bearer KEY` (repeatable; "
        "also TINKERD_METRICS_KEY); default: any API key",
    )
    serve.add_argument(
        "--image-dir",
        default=os.environ.get("TINKERD_IMAGE_DIR"),
        metavar="DIR",
        help="the one directory ImageAssetPointerChunk locations (file://) are read from; "
        "unset: images by location are refused (default: $TINKERD_IMAGE_DIR)",
    )
    serve.add_argument("--log-level", default="warning")
    serve.set_defaults(func=_serve)

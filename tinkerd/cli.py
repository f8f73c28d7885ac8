"""Command line: `tinkerd demo`, `tinkerd serve`, `tinkerd runs|checkpoints|export`."""

from __future__ import annotations

import argparse
import os
import sys

from tinkerd.rest_cli import register as register_rest
from tinkerd.runs_cli import add_show_command


def _demo(args: argparse.Namespace) -> int:
    if args.rl:
        from tinkerd.rl_demo import run_rl_demo

        rewards = run_rl_demo(steps=args.steps or 40, seed=args.seed, progress=not args.no_progress)
        k = min(5, len(rewards))
        return 0 if sum(rewards[-k:]) > sum(rewards[:k]) else 1
    from tinkerd.demo import run_demo

    before, after = run_demo(
        steps=args.steps or 500,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        rank=args.rank,
        seed=args.seed,
        progress=not args.no_progress,
    )
    return 0 if after.loss_per_token < before.loss_per_token else 1


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _serve(args: argparse.Namespace) -> int:
    import ipaddress
    from pathlib import Path

    import uvicorn

    from tinkerd.engine import batch
    from tinkerd.engine.models import parse_model_specs
    from tinkerd.engine.sampling.backend import sampler_factory
    from tinkerd.engine.tiny import TINY_MODEL_NAME
    from tinkerd.engine.trainer import Engine
    from tinkerd.errors import InvalidRequestError
    from tinkerd.server.app import Server, create_app

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
        samplers = sampler_factory(args.sampler)
        models = [TINY_MODEL_NAME, *parse_model_specs(args.model)]
    except (InvalidRequestError, ValueError) as e:
        print(f"tinkerd serve: {e}", file=sys.stderr)
        return 2
    if args.max_batch_tokens:  # here, and in ranks started later (read at import)
        batch.MAX_BATCH_TOKENS = args.max_batch_tokens
        os.environ["TINKERD_MAX_BATCH_TOKENS"] = str(args.max_batch_tokens)
    data_dir = Path(args.data_dir).expanduser()

    def run_server(engine: Engine) -> None:
        server = Server(
            engine,
            data_dir,
            keys,
            models,
            poll_timeout=args.poll_timeout,
            max_pending=args.max_queue,
            session_timeout=args.session_timeout,
        )
        print(
            f"tinkerd serving {models} on http://{args.host}:{args.port} "
            f"({len(keys)} API key(s); data in {server.store.path})",
            flush=True,
        )
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)

    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    if world > 1:
        from tinkerd.server.ranks import serve_ranks

        return serve_ranks(world, args, data_dir, run_server)
    run_server(Engine(extra_models=args.model, data_dir=data_dir, sampler_factory=samplers))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinkerd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="fine-tune tinkerd/tiny to reverse words (about a minute on 2 CPU cores)"
    )
    demo.add_argument("--steps", type=int, help="default: 500 (SFT), 40 (--rl)")
    demo.add_argument(
        "--rl", action="store_true", help="RL instead: GRPO with sampling (about 15 s)"
    )
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--rank", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

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
        help="also serve this base model: a local dir, an HF hub id or tinkerd/tiny-chat; "
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
        choices=["builtin", "vllm"],
        default="builtin",
        help="sampler backend: tinkerd's batched sampler, or vLLM on a GPU (tinkerd[vllm])",
    )
    serve.add_argument("--log-level", default="warning")
    serve.set_defaults(func=_serve)
    rest = register_rest(sub)  # runs list, checkpoints list|download|delete|publish, export
    add_show_command(rest["runs"])  # tinkerd runs show RUN --metrics
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""`tinkerd demo`: fine-tune tinkerd/tiny in this process (SFT, or RL with --rl)."""

from __future__ import annotations

import argparse


def _demo(args: argparse.Namespace) -> int:
    if args.model:
        from tinkerd.demo import facts_demo_cli

        return facts_demo_cli(args)
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


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="fine-tune tinkerd/tiny to reverse words (about a minute on 2 CPU cores)"
    )
    demo.add_argument("--steps", type=int, help="default: 500 (SFT), 40 (--rl)")
    demo.add_argument(
        "--rl", action="store_true", help="RL instead: GRPO with sampling (about 15 s)"
    )
    demo.add_argument(
        "--model",
        help="instead, teach a real model made-up facts, e.g. smollm2 "
        "(HuggingFaceTB/SmolLM2-135M-Instruct; a few minutes on 2 CPU cores)",
    )
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--rank", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

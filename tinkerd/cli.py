"""Command line: `tinkerd demo` (and, as they land, serve / runs / checkpoints)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from tinkerd.demo import run_demo

    before, after = run_demo(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        rank=args.rank,
        seed=args.seed,
        progress=not args.no_progress,
    )
    return 0 if after.loss_per_token < before.loss_per_token else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinkerd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="fine-tune tinkerd/tiny to reverse words (about a minute on 2 CPU cores)"
    )
    demo.add_argument("--steps", type=int, default=500)
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--rank", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

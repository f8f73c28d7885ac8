"""Command line: `tinkerd demo`, `tinkerd serve`, `tinkerd runs|checkpoints|export`."""

from __future__ import annotations

import argparse

from tinkerd.cli import checkpoints, demo, runs, serve
from tinkerd.threads import prefer_passive_wait


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinkerd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo.register(sub)
    serve.register(sub)
    rest = checkpoints.register(sub)  # runs list, checkpoints list|download|..., export
    runs.add_show_command(rest["runs"])  # tinkerd runs show RUN --metrics
    return parser


def main(argv: list[str] | None = None) -> int:
    prefer_passive_wait()  # before any command loads torch (`tinkerd.threads`)
    args = build_parser().parse_args(argv)
    return args.func(args)

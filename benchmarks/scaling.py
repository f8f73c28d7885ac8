"""Data-parallel scaling: training tokens/s of `tinkerd serve --nproc N` for N = 1, 2, ...

Each layout is a fresh server on loopback (gloo on CPU: the ranks split the machine's
cores; NCCL with one GPU per rank where there are GPUs), trained by tinkerd's HTTP client
on the same fixed batch (LoRA rank 32, summed cross-entropy, AdamW). The first step's
loss must agree across layouts: data parallelism changes speed, not results.

    python benchmarks/scaling.py [--model tinkerd/tiny] [--batch 16] [--seq 256] [--nproc 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, record  # noqa: E402
from train_overhead import (  # noqa: E402
    BENCH_KEY,
    make_batch,
    tinkerd_server,
    tinkerd_step_fn,
    tokens_per_second,
)

from tinkerd import ServiceClient  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tinkerd/tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--fsdp", action="store_true", help="shard the base with FSDP2")
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()

    tokens = make_batch(256, args.batch, args.seq)
    n_tokens = args.batch * args.seq
    rates, first_loss = {}, {}
    for world in args.nproc:
        extra = ("--nproc", str(world), *(["--fsdp"] if args.fsdp else []))
        with tinkerd_server(args.model, extra=extra) as url:
            service = ServiceClient(base_url=url, api_key=BENCH_KEY)
            step = tinkerd_step_fn(args.model, tokens, args.rank, 1e-4, service)
            first_loss[world] = step()
            step()  # warm-up
            runs = [tokens_per_second(step, n_tokens, args.steps) for _ in range(args.rounds)]
            rates[world] = statistics.median(runs)
            service.close()

    base = rates[args.nproc[0]]
    print(f"machine: {machine()}")
    print(f"first-step loss per layout (must agree): {first_loss}")
    rows = [
        f"| ranks | tokens/s (median of rounds) | speed-up over {args.nproc[0]} |",
        "|---|---|---|",
    ]
    rows += [f"| {w} | {r:,.0f} | {r / base:.2f} |" for w, r in rates.items()]
    print("\n".join(rows))
    if not args.no_record:
        fsdp = " --fsdp" if args.fsdp else ""
        record(
            f"scaling ({args.model}, {args.batch}x{args.seq}{fsdp})",
            f"`python benchmarks/scaling.py --model {args.model} --batch {args.batch} --seq "
            f"{args.seq}{fsdp}`: `tinkerd serve --nproc N{fsdp}` on loopback, trained through "
            f"tinkerd's HTTP client; median of {args.rounds} rounds of {args.steps} steps "
            "(forward_backward + optim_step), LoRA rank "
            f"{args.rank}. On CPU the ranks share the machine's cores (gloo).\n\n"
            + "\n".join(rows),
        )


if __name__ == "__main__":
    main()

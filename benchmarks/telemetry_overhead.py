"""What telemetry costs: training steps and sample requests through the official SDK against
two `tinkerd serve` subprocesses, one with `--no-telemetry` and one with telemetry and the
JSON request log on (`--log-requests`, written to /dev/null), back to back in alternating
rounds; the median of the rounds is reported as on/off ratios (docs/operations.md).

The training step is train_overhead.py's official-SDK loop (forward_backward + optim_step
of a fixed batch); the sampling loop sends `--samples` concurrent sample requests of
`--max-tokens` tokens and waits for all of them.

    python benchmarks/telemetry_overhead.py [--batch 8] [--seq 256] [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, record  # noqa: E402
from train_overhead import (  # noqa: E402
    BENCH_KEY,
    make_batch,
    official_sdk_step_fn,
    tinkerd_server,
)


def sample_fn(url: str, n: int, max_tokens: int) -> Callable[[], int]:
    """`n` concurrent SDK sample requests on the base model; returns tokens sampled."""
    import tinker

    service = tinker.ServiceClient(base_url=url, api_key=BENCH_KEY)
    sampler = service.create_sampling_client(base_model="tinkerd/tiny").result()
    prompt = tinker.ModelInput.from_ints([256, *b"the quick brown fox"])
    params = tinker.SamplingParams(max_tokens=max_tokens, temperature=1.0)

    def run() -> int:
        futures = [sampler.sample(prompt, 1, params) for _ in range(n)]
        return sum(len(f.result().sequences[0].tokens) for f in futures)

    return run


def rate(fn: Callable[[], int | float], repeats: int, units: float | None) -> float:
    """Units per second over `repeats` calls (`units` each; None: what `fn` returns)."""
    start, done = time.perf_counter(), 0.0
    for _ in range(repeats):
        got = fn()
        done += units if units is not None else got
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="training steps per round")
    parser.add_argument("--samples", type=int, default=16, help="concurrent sample requests")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sample-repeats", type=int, default=3, help="sample loops per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    tokens = make_batch(256, args.batch, args.seq)
    n_tokens = args.batch * args.seq
    with contextlib.ExitStack() as stack:
        devnull = stack.enter_context(open("/dev/null", "w"))
        urls = {
            "off": stack.enter_context(tinkerd_server("tinkerd/tiny", extra=("--no-telemetry",))),
            "on": stack.enter_context(
                tinkerd_server("tinkerd/tiny", extra=("--log-requests",), stderr=devnull)
            ),
        }
        loops = {}
        for mode, url in urls.items():
            train = official_sdk_step_fn("tinkerd/tiny", tokens, args.rank, 1e-4, url)
            sample = sample_fn(url, args.samples, args.max_tokens)
            loops[f"train {mode}"] = lambda t=train: rate(t, args.steps, n_tokens)
            loops[f"sample {mode}"] = lambda s=sample: rate(s, args.sample_repeats, None)
        for loop in loops.values():  # warm up both servers
            loop()
        rates: dict[str, list[float]] = {name: [] for name in loops}
        for i in range(args.rounds):
            order = list(loops.items())
            if i % 2:  # alternate which server goes first
                order = [order[j] for j in (2, 3, 0, 1)]
            for name, loop in order:
                rates[name].append(loop())
    median = {name: statistics.median(r) for name, r in rates.items()}
    rows = [
        "| loop | telemetry off | telemetry + JSON log on | on / off |",
        "|---|---|---|---|",
    ]
    for what, unit in (("train", "tokens/s"), ("sample", "sampled tokens/s")):
        off, on = median[f"{what} off"], median[f"{what} on"]
        rows.append(f"| {what} ({unit}) | {off:,.0f} | {on:,.0f} | {on / off:.3f} |")
    one, five, fifteen = os.getloadavg()
    load = f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) at the end"
    print(f"machine: {machine()}; {load}")
    for name, values in rates.items():
        print(f"{name}: " + " ".join(f"{v:,.0f}" for v in values))
    print("\n".join(rows))
    if not args.no_record:
        record(
            "telemetry_overhead",
            f"`python benchmarks/telemetry_overhead.py --batch {args.batch} --seq {args.seq}"
            f" --rounds {args.rounds}`: official SDK against two `tinkerd serve` on loopback "
            f"(`--no-telemetry` vs `--log-requests`), alternating rounds, medians; training "
            f"{args.steps} steps of {args.batch}x{args.seq} tokens per round, sampling "
            f"{args.sample_repeats}x{args.samples} concurrent requests of {args.max_tokens} "
            f"tokens per round; {load}.\n\n" + "\n".join(rows),
        )


if __name__ == "__main__":
    main()

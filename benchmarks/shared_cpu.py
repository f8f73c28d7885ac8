"""Training on a shared CPU: tinkerd's default threading against a one-thread loop.

Each measurement is a fresh process (OpenMP reads its settings when torch loads) that
trains tinkerd/tiny embedded (LoRA rank 32, 8 x 64 tokens, cross-entropy + AdamW) for
`--steps` steps after one warm-up step and prints the seconds they took. Variants:

- `default`: tinkerd as a user runs it (this checkout's threading choices);
- `one-thread`: the same loop with `OMP_NUM_THREADS=1`, the baseline;
- `before` (with `--before PATH`): the loop on another checkout (e.g. `git archive` of
  main), for the before/after of a change;
- `NAME=VALUE`: the default with that environment variable set (e.g. `OMP_WAIT_POLICY=ACTIVE`).

The "shared" case starts `--busy` processes that each spin a core in pure Python (what a
browser, an IDE or another job does to a laptop) for the whole of its measurements; the
"quiet" case starts none. Variants alternate, fresh processes, `--rounds` times; the
median is reported with its ratio to the one-thread loop of the same case.

    python benchmarks/shared_cpu.py [--steps 25] [--rounds 3] [--busy 2] [--before DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SPIN = "while True: pass"


def child(steps: int) -> None:
    """One measured loop in this process: prints the seconds of `steps` steps."""
    from tinkerd import AdamParams, Datum, ModelInput, ServiceClient

    client = ServiceClient().create_lora_training_client("tinkerd/tiny", rank=32, seed=0)
    rows = [[(7 * r + 3 * i) % 200 + 1 for i in range(65)] for r in range(8)]
    data = [
        Datum(
            model_input=ModelInput.from_ints(row[:-1]),
            loss_fn_inputs={"target_tokens": row[1:], "weights": [1.0] * 64},
        )
        for row in rows
    ]

    def step() -> None:
        client.forward_backward(data, "cross_entropy")
        client.optim_step(AdamParams(learning_rate=1e-3)).result()

    step()  # warm-up: model build, first allocations
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print(f"SECONDS {time.perf_counter() - start:.3f}")


def run_variant(variant: str, steps: int, before: Path | None) -> float:
    env = dict(os.environ)
    path = before if variant == "before" else ROOT
    env["PYTHONPATH"] = str(path)
    if variant == "one-thread":
        env["OMP_NUM_THREADS"] = "1"
    elif "=" in variant:
        name, value = variant.split("=", 1)
        env[name] = value
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=path)
    return float(out.stdout.split("SECONDS")[-1])


@contextlib.contextmanager
def busy(n: int):
    """`n` processes spinning a core each, for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2)
    parser.add_argument("--before", type=Path, help="another checkout to measure as 'before'")
    parser.add_argument("--cases", nargs="+", default=["quiet", "shared"])
    parser.add_argument("--variants", nargs="+", default=["default", "one-thread"])
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.steps)
        return
    variants = args.variants + (["before"] if args.before else [])
    for case in args.cases:
        times: dict[str, list[float]] = {v: [] for v in variants}
        load = os.getloadavg()[0]
        with busy(args.busy) if case == "shared" else contextlib.nullcontext():
            for r in range(args.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for v in order:
                    times[v].append(run_variant(v, args.steps, args.before))
                    print(f"  {case} round {r} {v}: {times[v][-1]:.2f} s", flush=True)
        n = args.busy if case == "shared" else 0
        after = os.getloadavg()[0]
        print(f"\n{case} ({n} busy processes; load before {load:.2f}, after {after:.2f})")
        base = statistics.median(times["one-thread"])
        for v in variants:
            med = statistics.median(times[v])
            runs = ", ".join(f"{t:.1f}" for t in times[v])
            print(f"  {v:24s} {med:7.2f} s  ({runs})  / one-thread {med / base:.2f}")


if __name__ == "__main__":
    main()

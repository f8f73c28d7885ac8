"""What telemetry costs: training steps and sample requests through the official SDK against
two `tinkerd serve` subprocesses, one with `--no-telemetry` and one with telemetry and the
JSON request log on (`--log-requests`, written to /dev/null), back to back in alternating
rounds; the medians of the rounds are reported as on/off ratios (docs/operations.md): the
throughput, and the CPU time the server process spent per token, which other load on the
machine disturbs far less than wall time. First, the telemetry path's cost per request,
measured in-process.

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


def per_request_cost(n: int = 20_000) -> float:
    """Microseconds the telemetry path adds to one request, in-process: the done callback
    (`Telemetry.request` -> `_finished`: outcome, tokens, span, counters, histograms, the
    ring) plus its JSON log line, written to /dev/null."""
    from concurrent.futures import Future

    from tinkerd.service.telemetry import Telemetry
    from tinkerd.types import ForwardBackwardOutput, TensorData

    devnull = open(os.devnull, "w")  # noqa: SIM115
    telemetry = Telemetry(engine=None, json_log=True, log_stream=devnull)
    logprobs = TensorData(data=[0.0] * 256, dtype="float32")
    result = ForwardBackwardOutput(
        loss_fn_output_type="x", loss_fn_outputs=[{"logprobs": logprobs}] * 8
    )
    futures = [Future() for _ in range(n)]
    start = time.perf_counter()
    for i, future in enumerate(futures):
        telemetry.request(f"req-{i}", "key-a", "forward_backward", future, "s:train:0")
        future.set_result(result)
    seconds = time.perf_counter() - start
    devnull.close()

    return seconds / n * 1e6


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(fn: Callable[[], int | float], repeats: int, units: float | None, pid: int):
    """(units per second, server CPU milliseconds per 1,000 units) over `repeats` calls
    (`units` each; None: what `fn` returns). The CPU figure is what the server process
    spent, so it moves far less than wall time when other work shares the machine."""
    start, cpu, done = time.perf_counter(), cpu_seconds(pid), 0.0
    for _ in range(repeats):
        got = fn()
        done += units if units is not None else got
    wall, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    return done / wall, cpu * 1e6 / done


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
    micro = per_request_cost()
    print(f"telemetry + JSON log line: {micro:.1f} us per request (in-process)")
    tokens = make_batch(256, args.batch, args.seq)
    n_tokens = args.batch * args.seq
    with contextlib.ExitStack() as stack:
        devnull = stack.enter_context(open("/dev/null", "w"))
        pids = {"off": {}, "on": {}}
        urls = {
            "off": stack.enter_context(
                tinkerd_server("tinkerd/tiny", pids["off"], extra=("--no-telemetry",))
            ),
            "on": stack.enter_context(
                tinkerd_server("tinkerd/tiny", pids["on"], ("--log-requests",), stderr=devnull)
            ),
        }
        loops = {}
        for mode, url in urls.items():
            pid = pids[mode]["pid"]
            train = official_sdk_step_fn("tinkerd/tiny", tokens, args.rank, 1e-4, url)
            sample = sample_fn(url, args.samples, args.max_tokens)
            loops[f"train {mode}"] = lambda t=train, p=pid: measure(t, args.steps, n_tokens, p)
            loops[f"sample {mode}"] = lambda s=sample, p=pid: measure(
                s, args.sample_repeats, None, p
            )
        for loop in loops.values():  # warm up both servers
            loop()
        rates: dict[str, list[tuple[float, float]]] = {name: [] for name in loops}
        for i in range(args.rounds):
            order = list(loops.items())
            if i % 2:  # alternate which server goes first
                order = [order[j] for j in (2, 3, 0, 1)]
            for name, loop in order:
                rates[name].append(loop())
    median = {
        (name, i): statistics.median(r[i] for r in runs)
        for name, runs in rates.items()
        for i in (0, 1)
    }
    rows = [
        "| loop | telemetry off | telemetry + JSON log on | on / off |",
        "|---|---|---|---|",
    ]
    for what, unit in (("train", "tokens"), ("sample", "sampled tokens")):
        for i, (figure, fmt) in enumerate(
            ((f"{unit}/s", ",.0f"), (f"server CPU ms per 1,000 {unit}", ",.1f"))
        ):
            off, on = median[f"{what} off", i], median[f"{what} on", i]
            rows.append(f"| {what}: {figure} | {off:{fmt}} | {on:{fmt}} | {on / off:.3f} |")
    # What the per-request cost is of the server's CPU per request (off): a bound that
    # does not depend on how busy the machine was between rounds.
    train_cpu_us = median["train off", 1] * n_tokens  # ms per 1,000 tokens -> us per step
    sample_cpu_us = median["sample off", 1] * args.max_tokens  # us per request (at most)
    rows.append(
        f"\nIn-process, the telemetry path (span, metrics, ring, JSON log line) costs {micro:.1f}"
        f" us per request: {2 * micro / train_cpu_us:.2%} of the server CPU of a training step"
        f" (2 requests), about {micro / sample_cpu_us:.2%} of a {args.max_tokens}-token sample"
        " request's."
    )
    one, five, fifteen = os.getloadavg()
    load = f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) at the end"
    print(f"machine: {machine()}; {load}")
    for name, values in rates.items():
        print(f"{name}: " + " ".join(f"{v:,.0f}/s {c:,.1f}ms" for v, c in values))
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

"""Peak memory of the sampler under many long prompts, against the sampling budget.

Each model runs in a fresh process (so that its peak RSS is its own): the engine with
`--sampling-memory-budget` of `--budget`, one short warm-up sample, then the resident set
after it (the runtime and the model: the baseline), then `--prompts` concurrent requests
of `--prompt-tokens` random tokens each (`--max-tokens` new tokens, one sample each)
straight on the engine. A thread reads VmRSS every 10 ms; the figure is the peak over the
baseline, against the budget. A model too slow to get through them all (SmolLM2 on a
CPU) stops after `--seconds`: the rows admitted by then are those the budget allowed, and
the ones still waiting would repeat the same pattern.

    python benchmarks/sampling_memory.py [--models tinkerd/tiny smollm2] [--budget 512MiB]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

MIB = 1 << 20


def rss() -> int:
    """This process's resident set, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(args: argparse.Namespace) -> dict:
    """Run the prompts on `args.child` in this process; its figures as a dict."""
    from tinkerd.engine.engine import Engine, EngineConfig
    from tinkerd.types import SamplingParams

    model = args.child
    extra = [] if model == "tinkerd/tiny" else [model]
    engine = Engine(extra_models=extra, config=EngineConfig(sampling_budget_bytes=args.budget))
    weights = engine.sampler_for(base_model=model)
    engine.sample(weights, [1, 2, 3], 1, SamplingParams(max_tokens=2)).result()
    sampler = engine.samplers.samplers[model]
    baseline, peak = rss(), [rss()]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rng = random.Random(0)
    vocab = engine.base_model(model).vocab_size
    params = SamplingParams(max_tokens=args.max_tokens, stop=[], temperature=1.0)
    start = time.perf_counter()
    futures = [
        engine.prepare_sample(
            weights, [rng.randrange(vocab) for _ in range(args.prompt_tokens)], 1, params
        )()
        for _ in range(args.prompts)
    ]
    deadline = start + args.seconds
    while time.perf_counter() < deadline and not all(f.done() for f in futures):
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    finished = sum(f.done() and not f.cancelled() for f in futures)
    most_rows = max((rows for rows, _ in sampler.recent_steps()), default=0)
    for f in futures:
        f.cancel()
    done.set()
    watcher.join()
    return {
        "model": model,
        "budget": sampler.kv_budget,
        "baseline": baseline,
        "peak": peak[0],
        "finished": finished,
        "seconds": seconds,
        "most_rows": most_rows,
        "prefill_forwards": sampler.prefill_forwards,
        "prefill_tokens": sampler.prefill_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tinkerd/tiny", "smollm2"])
    parser.add_argument("--budget", default="512MiB")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        os._exit(0)  # not waiting for a sampler still inside a cancelled prefill
    from _report import record

    rows = []
    for model in args.models:
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", model],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        grew = r["peak"] - r["baseline"]
        rows.append(
            f"| {model} | {r['budget'] / MIB:.0f} | {r['baseline'] / MIB:.0f} | "
            f"{r['peak'] / MIB:.0f} | **{grew / MIB:.0f}** ({grew / r['budget']:.2f} of the "
            f"budget) | {r['finished']} of {args.prompts} in {r['seconds']:.0f} s | "
            f"{r['most_rows']} | {r['prefill_forwards']} |"
        )
        print(rows[-1], flush=True)
    body = f"""`benchmarks/sampling_memory.py --budget {args.budget} --prompts {args.prompts} \
--prompt-tokens {args.prompt_tokens} --max-tokens {args.max_tokens} --seconds {args.seconds:.0f}`:
{args.prompts} concurrent requests of {args.prompt_tokens} random prompt tokens ({args.max_tokens}
new tokens each) on the engine, one fresh process per model; RSS in MiB, polled every 10 ms.

| model | budget | RSS after warm-up (runtime + model) | peak RSS | peak - baseline | \
requests finished | most rows in a step | prefill forwards |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows)
    print(body)
    record("Sampling memory (many long prompts)", body)


if __name__ == "__main__":
    main()

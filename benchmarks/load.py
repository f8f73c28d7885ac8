"""Load test on loopback: N concurrent official-SDK clients, each training and sampling
for a fixed number of steps, in several rounds of fresh sessions. Every request must
complete or fail cleanly, and the server's memory must level off across rounds (ended
sessions free their runs). Writes a table to docs/reliability.md.

    python benchmarks/load.py --clients 8 --steps 5 --rounds 3
"""

from __future__ import annotations

import argparse
import math
import re
import threading
import time
import traceback
from pathlib import Path

import tinker
from tinker import types
from train_overhead import BENCH_KEY, tinkerd_server

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024


def one_client(url: str, steps: int, seed: int, latencies: dict, failures: list) -> None:
    """Train `steps` steps, and sample from each step's weights, as a Tinker user would."""
    try:
        service = tinker.ServiceClient(base_url=url, api_key=BENCH_KEY)
        client = service.create_lora_training_client(
            base_model="tinkerd/tiny", rank=8, seed=seed
        ).result()
        text = f"load test client {seed} says hello".encode()
        tokens = [256, *text]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=seed)
        for _ in range(steps):
            start = time.perf_counter()
            client.forward_backward([datum], "cross_entropy")
            client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            latencies["train step"].append(time.perf_counter() - start)
            start = time.perf_counter()
            sampler = client.save_weights_and_get_sampling_client().result()
            sampler.sample(types.ModelInput.from_ints(tokens[:4]), 4, params).result()
            latencies["save + sample 4x16"].append(time.perf_counter() - start)
        service.close("success").result()
    except Exception:  # noqa: BLE001 -- a failure is a result here, counted and shown
        failures.append(traceback.format_exc(limit=3))


def run(url: str, pid: int, clients: int, steps: int, rounds: int) -> dict:
    latencies: dict[str, list[float]] = {"train step": [], "save + sample 4x16": []}
    failures: list[str] = []
    rss = [rss_mib(pid)]
    peak = rss[0]
    started = time.perf_counter()
    for r in range(rounds):
        threads = [
            threading.Thread(
                target=one_client, args=(url, steps, r * clients + i, latencies, failures)
            )
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_mib(pid))
            time.sleep(0.2)
        rss.append(rss_mib(pid))
        print(f"round {r + 1}: server RSS {rss[-1]:.0f} MiB, failures so far {len(failures)}")
    return {
        "latencies": latencies,
        "failures": failures,
        "rss": rss,
        "peak": peak,
        "seconds": time.perf_counter() - started,
        "requests": sum(len(v) for v in latencies.values()) * 2 + rounds * clients * 2,
    }


def report(args: argparse.Namespace, result: dict) -> str:
    lat = result["latencies"]

    def pct(values: list[float], q: int) -> str:
        """Nearest-rank percentile, in ms."""
        ordered = sorted(values)
        return f"{ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] * 1000:,.0f}"

    rows = "\n".join(
        f"| {name} | {len(v)} | {pct(v, 50)} | {pct(v, 95)} | {max(v) * 1000:,.0f} |"
        for name, v in lat.items()
        if v
    )
    rss = ", ".join(f"{x:.0f}" for x in result["rss"])
    command = f"--clients {args.clients} --steps {args.steps} --rounds {args.rounds}"
    failures = len(result["failures"])
    return f"""`python benchmarks/load.py {command}`:
{args.clients} concurrent official-SDK clients per round, each with its own session and LoRA
run (rank 8) on tinkerd/tiny, {args.steps} steps of forward_backward + optim_step and, after
each step, save_weights_and_get_sampling_client + 4 samples of 16 tokens; then it closes its
session. {args.rounds} rounds of fresh clients; server and clients share the machine.

| operation | count | p50 ms | p95 ms | max ms |
|---|---|---|---|---|
{rows}

- HTTP requests (approx., excluding polls): {result["requests"]:,}; failures: {failures}
- wall time: {result["seconds"]:.1f} s
- server RSS (MiB) at start and after each round: {rss}; peak {result["peak"]:.0f}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server: dict = {}
    with tinkerd_server("tinkerd/tiny", server) as url:
        result = run(url, server["pid"], args.clients, args.steps, args.rounds)
    body = report(args, result)
    print(body)
    for failure in result["failures"][:3]:
        print(failure)
    from _report import machine

    text = DOC.read_text()
    section = f"## Load test\n\nMeasured {time.strftime('%Y-%m-%d')} on: {machine()}\n\n{body}"
    text = re.sub(
        r"## Load test\n.*?(?=^## |\Z)", lambda _: section + "\n", text, flags=re.S | re.M
    )
    DOC.write_text(text.rstrip() + "\n")


if __name__ == "__main__":
    main()

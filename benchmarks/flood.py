"""Flood on loopback: one API key floods the server while another trains; how much slower
does the victim's step get, and does the server's memory stay bounded by the quotas?

The victim (one official-SDK client, one run) trains `--steps` steps alone (baseline),
then again while the flooder (another key) tries to create `--flood-sessions` sessions,
`--flood-runs` training runs (each training forward_backward + optim_step in a loop from
its own thread), and `--flood-samplers` sampling sessions, pipelining up to `--depth`
requests per run. The server runs with its per-key quotas (`--quota-runs` etc.), so most
of the flood is refused (403 / 429) and the rest takes turns with the victim by key
(service/scheduler.py). Records a section in docs/benchmarks.md.

    python benchmarks/flood.py --steps 15 --flood-runs 30 --flood-sessions 200
"""

from __future__ import annotations

import argparse
import math
import threading
import time
import traceback

import httpx
import tinker
from _report import record
from load import rss_mib
from tinker import types
from train_overhead import BENCH_KEY, tinkerd_server

FLOOD_KEY = "tml-flooder"
TINY = "tinkerd/tiny"


def datum(text: bytes) -> types.Datum:
    tokens = [256, *text]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def victim_steps(client, steps: int) -> list[float]:
    """Seconds of each forward_backward + optim_step, as the client waits for them."""
    batch = [datum(b"the victim trains on its own small batch of text")] * 4
    adam = types.AdamParams(learning_rate=1e-3)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        client.forward_backward(batch, "cross_entropy")
        client.optim_step(adam).result()
        seconds.append(time.perf_counter() - start)
    return seconds


class Flood:
    """The flooder's threads: sessions, runs that train nonstop, sampling sessions."""

    def __init__(self, url: str, args: argparse.Namespace):
        self.url, self.args = url, args
        self.stop = threading.Event()
        self.refused: dict[str, int] = {}
        self.errors: list[str] = []
        self.granted = {"sessions": 0, "runs": 0, "sampling sessions": 0}
        self.steps = 0
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def _refusal(self, e: Exception) -> None:
        status = getattr(e, "status_code", None)
        with self.lock:
            if status in (403, 429):
                self.refused[str(status)] = self.refused.get(str(status), 0) + 1
            else:
                self.errors.append(traceback.format_exc(limit=2))

    def start(self) -> None:
        self.service = tinker.ServiceClient(base_url=self.url, api_key=FLOOD_KEY)
        clients = []
        for seed in range(self.args.flood_runs):
            try:
                create = self.service.create_lora_training_client
                clients.append(create(base_model=TINY, rank=8, seed=seed).result())
                self.granted["runs"] += 1
            except tinker.APIStatusError as e:
                self._refusal(e)
        for _ in range(self.args.flood_samplers):
            try:
                self.service.create_sampling_client(base_model=TINY)
                self.granted["sampling sessions"] += 1
            except tinker.APIStatusError as e:
                self._refusal(e)
        headers = {"X-API-Key": FLOOD_KEY}
        with httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=60) as http:
            for _ in range(self.args.flood_sessions):  # raw: no heartbeat threads
                r = http.post("/create_session", json={"tags": [], "user_metadata": {}})
                if r.status_code == 200:
                    self.granted["sessions"] += 1
                else:
                    self.refused[str(r.status_code)] = self.refused.get(str(r.status_code), 0) + 1
        for k, client in enumerate(clients):
            thread = threading.Thread(target=self._train, args=(client, k), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _train(self, client, k: int) -> None:
        batch = [datum(f"flood run {k} pushes its own text through".encode())] * 4
        adam = types.AdamParams(learning_rate=1e-3)
        while not self.stop.is_set():
            try:  # `depth` forward_backwards in flight, then a step
                futures = [
                    client.forward_backward(batch, "cross_entropy") for _ in range(self.args.depth)
                ]
                client.optim_step(adam).result()
                for f in futures:
                    f.result()
                with self.lock:
                    self.steps += 1
            except Exception as e:  # noqa: BLE001 -- refusals are counted, not fatal
                self._refusal(e)
                time.sleep(0.5)

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def pct(values: list[float], q: int) -> float:
    """Nearest-rank percentile, in ms."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--flood-runs", type=int, default=30)
    parser.add_argument("--flood-sessions", type=int, default=200)
    parser.add_argument("--flood-samplers", type=int, default=50)
    parser.add_argument("--depth", type=int, default=2, help="forward_backwards per flood step")
    parser.add_argument("--quota-runs", default="4")
    parser.add_argument("--quota-sessions", default="8")
    parser.add_argument("--quota-samplers", default="8")
    parser.add_argument("--quota-queued", default="16")
    args = parser.parse_args()
    quotas = (
        "--max-runs-per-key", args.quota_runs,
        "--max-sessions-per-key", args.quota_sessions,
        "--max-sampling-sessions-per-key", args.quota_samplers,
        "--max-queued-per-key", args.quota_queued,
        "--api-key", FLOOD_KEY,
    )  # fmt: skip
    server: dict = {}
    rss: dict[str, float] = {}
    with tinkerd_server(TINY, server, quotas) as url:
        pid = server["pid"]
        rss["start"] = rss_mib(pid)
        victim_service = tinker.ServiceClient(base_url=url, api_key=BENCH_KEY)
        victim = victim_service.create_lora_training_client(base_model=TINY, rank=8).result()
        victim_steps(victim, 2)  # warm-up
        alone = victim_steps(victim, args.steps)
        rss["after baseline"] = rss_mib(pid)
        flood = Flood(url, args)
        flood.start()
        peak = [rss_mib(pid)]
        watching = threading.Event()

        def watch() -> None:
            while not watching.wait(0.5):
                peak.append(rss_mib(pid))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        flooded = victim_steps(victim, args.steps)
        flood.end()
        watching.set()
        watcher.join()
        rss["peak during flood"] = max(peak)
        time.sleep(3)  # the lane goes idle and trims its heap
        rss["after flood"] = rss_mib(pid)
        victim_service.close("success").result()

    ratio50, ratio95 = pct(flooded, 50) / pct(alone, 50), pct(flooded, 95) / pct(alone, 95)
    refused = ", ".join(f"{n} x {s}" for s, n in sorted(flood.refused.items())) or "none"
    granted = ", ".join(f"{v} {k}" for k, v in flood.granted.items())
    body = f"""`python benchmarks/flood.py --steps {args.steps} --flood-runs {args.flood_runs} \
--flood-sessions {args.flood_sessions} --flood-samplers {args.flood_samplers} --depth {args.depth}`,
server quotas per key: runs {args.quota_runs}, sessions {args.quota_sessions}, sampling sessions
{args.quota_samplers}, queued requests {args.quota_queued}. The victim (one run, 4 rows) trains
{args.steps} steps alone, then {args.steps} while the flooder's runs train nonstop ({args.depth}
forward_backwards in flight per step). Server, victim and flooder share the machine.

| victim step | p50 ms | p95 ms |
|---|---|---|
| alone | {pct(alone, 50):,.0f} | {pct(alone, 95):,.0f} |
| during the flood | {pct(flooded, 50):,.0f} | {pct(flooded, 95):,.0f} |
| ratio | {ratio50:.2f}x | {ratio95:.2f}x |

- flooder granted: {granted}; refused: {refused}; other errors: {len(flood.errors)};
  flood steps done: {flood.steps}
- server RSS (MiB): {", ".join(f"{k} {v:.0f}" for k, v in rss.items())}
"""
    print(body)
    for error in flood.errors[:3]:
        print(error)
    record("flood (tinkerd/tiny)", body)


if __name__ == "__main__":
    main()

"""Flood on loopback: one API key floods the server while another trains; how much slower
does the victim's step get, and does the server's memory stay bounded by the quotas?

The flooder (another key, in a process of its own unless `--flood-in-process`) tries to
create `--flood-sessions` sessions, `--flood-runs` training runs (each training
forward_backward + optim_step in a loop from its own thread) and `--flood-samplers`
sampling sessions, pipelining up to `--depth` requests per run. The server runs with its
per-key quotas (`--quota-runs` etc.), so most of the flood is refused (403 / 429) and the
rest takes turns with the victim by key (service/scheduler.py). The victim (one
official-SDK client, one run) times its steps in alternating blocks: alone (the flood
paused), beside `--burners` CPU-burner processes (what CPU contention alone costs it), and
during the flood. Records a section in docs/benchmarks.md.

    python benchmarks/flood.py --steps 5 --blocks 3 --flood-runs 30 --flood-sessions 200
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
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

    def __init__(self, url: str, args: argparse.Namespace, running=None):
        self.url, self.args = url, args
        self.stop = threading.Event()
        self.running = running or threading.Event()
        """Clear: the runs pause between steps (the victim's blocks alone)."""
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
            if not self.running.wait(0.2):
                continue
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


def flood_process(url: str, args: argparse.Namespace, running, started, stop, results) -> None:
    """The flooder in a process of its own (as another user's client would be): its 30
    threads then compete with the victim's client for the CPU, not for one GIL."""
    flood = Flood(url, args, running)
    flood.start()
    started.set()
    stop.wait()
    flood.end()
    results.put((flood.granted, flood.refused, flood.errors[:3], flood.steps, cpu_seconds()))


def burn(stop) -> None:
    """Spin until `stop`: a CPU burner standing in for the flooder's client."""
    while not stop.is_set():
        sum(range(10_000))


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: int) -> float:
    """Nearest-rank percentile, in ms."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="victim steps per block")
    parser.add_argument("--blocks", type=int, default=3, help="alone/burners/flood rounds")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before a block")
    parser.add_argument("--flood-runs", type=int, default=30)
    parser.add_argument("--flood-sessions", type=int, default=200)
    parser.add_argument("--flood-samplers", type=int, default=50)
    parser.add_argument("--depth", type=int, default=2, help="forward_backwards per flood step")
    parser.add_argument("--quota-runs", default="4")
    parser.add_argument("--quota-sessions", default="8")
    parser.add_argument("--quota-samplers", default="8")
    parser.add_argument("--quota-queued", default="16")
    parser.add_argument(
        "--burners", type=int, default=2, help="CPU-burner processes in the contention phase"
    )
    parser.add_argument(
        "--flood-in-process",
        action="store_true",
        help="run the flooder's threads in this process (sharing the victim client's GIL), "
        "as before issue 23's round 3; default: a process of its own",
    )
    parser.add_argument("--no-record", action="store_true", help="print only")
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
        rss["after warm-up"] = rss_mib(pid)
        spawn = multiprocessing.get_context("spawn")
        running = spawn.Event()  # set: the flood trains; clear: it pauses
        if args.flood_in_process:
            flood = Flood(url, args, running)
            flood.start()
        else:
            started, stop, results = spawn.Event(), spawn.Event(), spawn.Queue()
            child = spawn.Process(
                target=flood_process, args=(url, args, running, started, stop, results)
            )
            child.start()
            started.wait()
        peak = [rss_mib(pid)]
        watching = threading.Event()

        def watch() -> None:
            while not watching.wait(0.5):
                peak.append(rss_mib(pid))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        # Blocks alternate (alone, CPU burners, flood) so that all three see the same
        # machine load. The burners stand in for the flooder's client: CPU contention
        # alone, with no flood request, which no scheduler can give back.
        alone: list[float] = []
        burned: list[float] = []
        flooded: list[float] = []
        returning: list[float] = []
        server_cpu = flood_seconds = flood_cpu = 0.0
        for _ in range(args.blocks):
            time.sleep(args.settle)  # the paused flood's last requests finish
            alone += victim_steps(victim, args.steps)
            stop_burners = spawn.Event()
            burners = [
                spawn.Process(target=burn, args=(stop_burners,)) for _ in range(args.burners)
            ]
            for burner in burners:
                burner.start()
            burned += victim_steps(victim, args.steps)
            stop_burners.set()
            for burner in burners:
                burner.join()
            running.set()
            ramp = time.perf_counter() + args.settle
            while time.perf_counter() < ramp:  # the flood ramps up; the victim keeps training
                victim_steps(victim, 1)
            cpu, start = cpu_seconds(pid), time.perf_counter()
            client_cpu = 0.0 if args.flood_in_process else cpu_seconds(child.pid)
            flooded += victim_steps(victim, args.steps)
            server_cpu += cpu_seconds(pid) - cpu
            if not args.flood_in_process:
                flood_cpu += cpu_seconds(child.pid) - client_cpu
            flood_seconds += time.perf_counter() - start
            time.sleep(args.settle)  # the victim pauses (sampling, evaluating) ...
            returning += victim_steps(victim, 1)  # ... and comes back to a flooded lane
            running.clear()
        if args.flood_in_process:
            flood.end()
        else:
            stop.set()
            granted, refused, errors, steps, _ = results.get()
            child.join()
            flood = Flood(url, args)  # a record of the child's flood
            flood.granted, flood.refused, flood.errors, flood.steps = (
                granted, refused, errors, steps,
            )  # fmt: skip
        watching.set()
        watcher.join()
        rss["peak during flood"] = max(peak)
        time.sleep(3)  # the lane goes idle and trims its heap
        rss["after flood"] = rss_mib(pid)
        victim_service.close("success").result()

    def row(label: str, steps: list[float]) -> str:
        cells = [f"{pct(steps, q):,.0f} ({pct(steps, q) / pct(alone, q):.2f}x)" for q in (50, 95)]
        return f"| {label} | {' | '.join(cells)} |"

    where = "in this process" if args.flood_in_process else "in a process of its own"
    cpu = f"server {server_cpu / flood_seconds:.2f} cores during the victim's flood blocks" + (
        f", flooder's client {flood_cpu / flood_seconds:.2f} cores" if flood_cpu else ""
    )
    refused = ", ".join(f"{n} x {s}" for s, n in sorted(flood.refused.items())) or "none"
    granted = ", ".join(f"{v} {k}" for k, v in flood.granted.items())
    body = f"""`python benchmarks/flood.py --steps {args.steps} --blocks {args.blocks} \
--flood-runs {args.flood_runs} --flood-sessions {args.flood_sessions} \
--flood-samplers {args.flood_samplers} --depth {args.depth}`, server quotas per key: runs
{args.quota_runs}, sessions {args.quota_sessions}, sampling sessions {args.quota_samplers}, queued
requests {args.quota_queued}. The victim (one run, 4 rows) times forward_backward + optim_step
in {args.blocks} rounds of three blocks of {args.steps} steps: alone (the flood paused), while
{args.burners} CPU-burner processes spin (contention alone, no flood request), and while the
flooder's runs train nonstop ({args.depth} forward_backwards in flight per step). Server,
victim and flooder share the machine. After each flood block the victim pauses
{args.settle:g} s (the flood goes on) and times one more step.

| victim step | p50 ms | p95 ms |
|---|---|---|
| alone | {pct(alone, 50):,.0f} | {pct(alone, 95):,.0f} |
{row(f"alone, {args.burners} CPU burners", burned)}
{row("during the flood", flooded)}
{row(f"during the flood, first step after {args.settle:g} s quiet", returning)}

- the flooder's client ran {where}; CPU used during the flood: {cpu}
- victim steps during the flood (ms): {", ".join(f"{x * 1000:,.0f}" for x in flooded)}
- flooder granted: {granted}; refused: {refused}; other errors: {len(flood.errors)};
  flood steps done: {flood.steps}
- server RSS (MiB): {", ".join(f"{k} {v:.0f}" for k, v in rss.items())}
"""
    print(body)
    for error in flood.errors[:3]:
        print(error)
    if not args.no_record:
        record("flood (tinkerd/tiny)", body)


if __name__ == "__main__":
    main()

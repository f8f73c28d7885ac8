"""Fairness inside a packed pass, in-process: a victim key's step while another key floods
with many runs, with shares per pass (`ACTIVE_SECONDS` = 2) and without (0: every key's
heads packed into the pass, as before issue 23), alternating in blocks in one process so
both see the same machine load.

The victim (one run, 4 rows) times forward_backward + optim_step; the flooder's runs each
loop 2 forward_backwards + optim_step from their own threads, straight on the Service (no
HTTP: what is measured is the scheduler). Prints victim p50/p95 ratios to its steps alone,
the flood's steps per second in each mode, and the process's peak RSS.

    python benchmarks/fair_pass.py --flood-runs 30 --steps 6 --blocks 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from _report import record

from tinkerd.engine import Engine
from tinkerd.requests import CreateModelRequest, ForwardBackwardRequest, OptimStepRequest
from tinkerd.service import KeyCaller, Service, ServiceConfig
from tinkerd.service import scheduler as scheduler_module
from tinkerd.types import AdamParams, Datum, LoraConfig, ModelInput

TINY = "tinkerd/tiny"
ADAM = AdamParams(learning_rate=1e-3)


def datum(text: bytes) -> Datum:
    tokens = [256, *text]
    weights = [1.0] * (len(tokens) - 1)
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


class Run:
    """One run of a key, issuing its requests in seq_id order."""

    def __init__(self, service: Service, key: str, session: str, n: int, text: bytes):
        self.service, self.caller, self.seq = service, KeyCaller(key), 0
        create = CreateModelRequest(
            base_model=TINY, lora_config=LoraConfig(rank=8, seed=n), session_id=session,
            model_seq_id=n,
        )  # fmt: skip
        self.model_id = service.submit(self.caller, create).result().model_id
        self.batch = [datum(text)] * 4

    def step(self, forward_backwards: int = 1) -> None:
        requests = [
            ForwardBackwardRequest(
                model_id=self.model_id,
                seq_id=self._seq(),
                data=self.batch,
                loss_fn="cross_entropy",
            )  # fmt: skip
            for _ in range(forward_backwards)
        ]
        requests.append(
            OptimStepRequest(model_id=self.model_id, seq_id=self._seq(), adam_params=ADAM)
        )
        for future in [self.service.submit(self.caller, r) for r in requests]:
            future.result()

    def _seq(self) -> int:
        self.seq += 1
        return self.seq


def pct(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(q / 100 * len(ordered) + 0.5) - 1)] * 1000


def peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flood-runs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=6, help="victim steps per block")
    parser.add_argument("--blocks", type=int, default=3, help="blocks per mode, alternating")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    config = ServiceConfig(expiry_interval=0)  # no heartbeats here: no session expiry
    service = Service(Engine(), Path(tempfile.mkdtemp()), [TINY], config)
    victim_session = service.sessions.create("victim", [], {})
    flood_session = service.sessions.create("flooder", [], {})
    victim = Run(service, "victim", victim_session, 0, b"the victim trains on its own text")
    flood = [
        Run(service, "flooder", flood_session, k, f"flood run {k} pushes text".encode())
        for k in range(args.flood_runs)
    ]

    def timed_steps(n: int) -> list[float]:
        seconds = []
        for _ in range(n):
            start = time.perf_counter()
            victim.step()
            seconds.append(time.perf_counter() - start)
        return seconds

    timed_steps(2)  # warm-up
    alone = timed_steps(args.steps * 2)
    stop = threading.Event()
    done = {"shares": 0, "old": 0}
    mode = ["shares"]

    def flood_loop(run: Run) -> None:
        while not stop.is_set():
            run.step(forward_backwards=2)
            done[mode[0]] += 1

    threads = [threading.Thread(target=flood_loop, args=(r,), daemon=True) for r in flood]
    for thread in threads:
        thread.start()
    flooded: dict[str, list[float]] = {"shares": [], "old": []}
    busy: dict[str, float] = {"shares": 0.0, "old": 0.0}
    for _ in range(args.blocks):
        for name, active in (("shares", 2.0), ("old", 0.0)):
            scheduler_module.ACTIVE_SECONDS = active
            mode[0] = name
            start = time.perf_counter()
            flooded[name] += timed_steps(args.steps)
            busy[name] += time.perf_counter() - start
    stop.set()
    for thread in threads:
        thread.join()
    service.close()

    base50, base95 = pct(alone, 50), pct(alone, 95)
    rows = [f"| alone | {base50:,.0f} | {base95:,.0f} | | |"]
    for name, label in (("old", "flood, every key packed (before)"), ("shares", "flood, shares")):
        p50, p95 = pct(flooded[name], 50), pct(flooded[name], 95)
        rate = done[name] / busy[name]
        rows.append(
            f"| {label} | {p50:,.0f} ({p50 / base50:.2f}x) | {p95:,.0f} ({p95 / base95:.2f}x) "
            f"| {rate:.2f} | {statistics.mean(flooded[name]) * 1000:,.0f} |"
        )
    body = f"""`python benchmarks/fair_pass.py --flood-runs {args.flood_runs} --steps {args.steps} \
--blocks {args.blocks}`: in one process, straight on the Service, a victim key (one run, 4 rows of
~34 tokens) times forward_backward + optim_step alone, then while a flooder key's
{args.flood_runs} runs each loop 2 forward_backwards + optim_step from their own threads; the
two packing modes alternate in {args.blocks} blocks of {args.steps} victim steps each.

| victim step | p50 ms (ratio to alone) | p95 ms (ratio) | flood steps/s | mean ms |
|---|---|---|---|---|
{chr(10).join(rows)}

Peak RSS of the process: {peak_rss_mib():,.0f} MiB.
"""
    print(body)
    if not args.no_record:
        record("fairness inside a packed pass (tinkerd/tiny)", body)


if __name__ == "__main__":
    main()

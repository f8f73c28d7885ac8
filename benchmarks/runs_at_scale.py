"""Runs are cheap: what paging runs in and out of a base's resident set costs (issue 24).

1. Page-out and page-in per run, SmolLM2-135M rank 32 on every linear layer (disk tier,
   and host tier): two runs on an engine keeping one resident, paged in turn; the
   seconds per page and the bytes moved, and from that bandwidth an 8B-class adapter's
   (Llama-3.1-8B shapes, rank 32, every linear layer) by arithmetic.
2. Step overhead: one training step (forward_backward + optim_step, 128 tokens) of a
   run that must be paged in first vs of a run that is resident, alternating, median.
   Goal: a page-in costs less than one such step.
3. Live adapters: one run's step with N runs resident (no budget) vs with the same N
   runs but the default resident set (32): what paging buys in time.
4. RSS vs number of runs on tinkerd/tiny (rank 8, each trained one step): 1, 10, 100,
   1000 runs in a fresh process under the default budget, and without one up to 100.
   Goal: flat beyond the resident set. And the bytes of memory one run on disk keeps.

    python benchmarks/runs_at_scale.py [--quick] [--record]

5. `--sweep`: the issue's end-to-end check at full size, through the official SDK and
   `tinkerd serve` keeping 4 runs (at most 400 MiB) per base resident: 300 tinkerd/tiny
   runs (rank 8) and 40 SmolLM2 runs (rank 32), 2 steps each, interleaved, against
   never-paged controls (tests/e2e/test_paging_sdk.py's `sweep`, which CI runs at 60 + 3): the
   largest loss and weight differences, the server's peak RSS, the wall clock.

`--quick` runs smaller counts (for a loaded machine); `--record` writes the figures to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, record  # noqa: E402

from tinkerd.engine import Engine, EngineConfig  # noqa: E402
from tinkerd.engine.gguf import SMOLLM2_ALIAS  # noqa: E402
from tinkerd.engine.tiny import TINY_MODEL_NAME as TINY  # noqa: E402
from tinkerd.types import AdamParams, Datum, LoraConfig, ModelInput  # noqa: E402

ADAM = AdamParams(learning_rate=1e-3)
LLAMA_8B = dict(hidden=4096, intermediate=14336, kv=1024, layers=32, vocab=128256)


def datum(tokens: int, k: int = 0) -> Datum:
    ids = [1 + (k * 31 + j * 13) % 250 for j in range(tokens + 1)]
    return Datum(
        model_input=ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * tokens},
    )


def step(engine: Engine, model_id: str, tokens: int = 128, k: int = 0) -> float:
    started = time.perf_counter()
    engine.forward_backward(model_id, [datum(tokens, k)], "cross_entropy")
    engine.optim_step(model_id, ADAM)
    return time.perf_counter() - started


def lora_params(hidden: int, intermediate: int, kv: int, layers: int, vocab: int, r: int) -> int:
    """LoRA parameters on q, k, v, o, gate, up, down and lm_head at rank r."""
    per_layer = (hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + intermediate) * 2
    per_layer += intermediate + hidden
    return r * (per_layer * layers + hidden + vocab)


def paging_costs(data_dir: Path, rounds: int) -> dict:
    """Section 1 and 2 on SmolLM2-135M rank 32."""
    out = {}
    for tier, host in (("disk", 0), ("host", "8GiB")):
        config = EngineConfig(max_resident_runs=1, host_run_budget_bytes=host)
        engine = Engine(data_dir=data_dir / tier, extra_models=[SMOLLM2_ALIAS], config=config)
        runs = [engine.create_model(SMOLLM2_ALIAS, LoraConfig(rank=32, seed=k)) for k in (0, 1)]
        for k, model_id in enumerate(runs):
            step(engine, model_id, k=k)  # Adam state and gradients exist: a full run
        pager = engine.pager(engine.run(runs[0]).base)
        size = pager.snapshot()["resident_bytes"]  # one run: weights, grads, 2 moments
        before = pager.snapshot()
        for i in range(2 * rounds):
            pager.use([engine.run(runs[i % 2])])
        after = pager.snapshot()
        ins = after["page_ins"] - before["page_ins"]
        outs = after["page_outs"] - before["page_outs"]
        out[tier] = {
            "page_in_s": (after["page_in_seconds"] - before["page_in_seconds"]) / ins,
            "page_out_s": (after["page_out_seconds"] - before["page_out_seconds"]) / outs,
            "bytes": size,
        }
        if tier == "disk":  # step overhead: alternate a paged-in step and a resident one
            cold, warm = [], []
            for i in range(rounds):
                cold.append(step(engine, runs[(i + 1) % 2]))  # the other one: paged out
                warm.append(step(engine, runs[(i + 1) % 2]))  # the same again: resident
            out["step_resident_s"] = statistics.median(warm)
            out["step_paged_in_s"] = statistics.median(cold)
        print(json.dumps(out), flush=True)  # as it goes: a long run loses nothing
    return out


def live_adapters(data_dir: Path, n: int, rounds: int) -> dict:
    """Section 3: one run's step with n runs attached vs n runs under the default set."""
    out = {}
    for label, config in (
        ("all resident", EngineConfig(max_resident_runs=None, run_budget_bytes=None)),
        ("default resident set", EngineConfig()),
    ):
        engine = Engine(data_dir=data_dir / label.replace(" ", "-"), config=config)
        runs = [engine.create_model(TINY, LoraConfig(rank=8, seed=k)) for k in range(n)]
        step(engine, runs[-1], tokens=128)
        out[label] = statistics.median(step(engine, runs[-1]) for _ in range(rounds))
    print(json.dumps(out), flush=True)
    return out


def rss_child(n: int, budget: bool, data_dir: str) -> None:
    """In a fresh process: n tiny runs, one step each; prints (runs, RSS MiB) as it goes."""
    from tinkerd.service.memory import trim_heap

    config = EngineConfig() if budget else EngineConfig(max_resident_runs=None)
    engine = Engine(data_dir=data_dir, config=config)
    marks = {m for m in (1, 10, 100, 1000) if m <= n}
    for k in range(n):
        model_id = engine.create_model(TINY, LoraConfig(rank=8, seed=k))
        step(engine, model_id, tokens=32, k=k)
        if k + 1 in marks:
            trim_heap(force=True)
            print(json.dumps({"runs": k + 1, "rss_mib": _rss_mib()}), flush=True)


def disk_run_bytes(n: int = 2000) -> float:
    """Section 4b: bytes of memory a run on disk keeps (its Run record and paging entry,
    the modules, Parameters and optimizer gone), by tracemalloc: n copies of one tiny
    run's page file (renamed runs) taken back by a fresh engine, before any is used."""
    import gc
    import tracemalloc

    from tinkerd.engine.paging import PAGE_MAGIC

    with tempfile.TemporaryDirectory() as data_dir:
        first = Engine(data_dir=data_dir, config=EngineConfig(max_resident_runs=1))
        first.create_model(TINY, LoraConfig(rank=8, seed=0), "s:train:0")
        first.suspend_runs()
        page = next(Path(data_dir, "paged").glob("*/*.page"))
        raw = page.read_bytes()
        length = int.from_bytes(raw[8:16], "little")
        header, tensors = json.loads(raw[16 : 16 + length]), raw[16 + length :]
        ids = [f"s:train:{k}" for k in range(1, n + 1)]
        for k, model_id in enumerate(ids):
            head = json.dumps({**header, "model_id": model_id}).encode()
            head += b" " * (-(len(head) + 16) % 64)
            size = len(head).to_bytes(8, "little")
            (page.parent / f"{k}.page").write_bytes(PAGE_MAGIC + size + head + tensors)
        second = Engine(data_dir=data_dir, config=EngineConfig(max_resident_runs=1))
        second.create_model(TINY, LoraConfig(rank=8, seed=0), "warm")  # base and pager made
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        taken = second.restore_runs(ids)
        gc.collect()
        grew = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
        tracemalloc.stop()
    out = grew / len(taken)
    print(json.dumps({"bytes_per_run_on_disk": out}), flush=True)
    return out


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def rss_curve(n: int, budget: bool) -> dict[int, float]:
    with tempfile.TemporaryDirectory() as data_dir:
        args = [sys.executable, __file__, "--rss-child", str(n), "--data-dir", data_dir]
        out = subprocess.run(
            args + ([] if budget else ["--no-budget"]), capture_output=True, text=True, check=True
        ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    print(json.dumps({"budget": budget, "rss": rows}), flush=True)
    return {r["runs"]: r["rss_mib"] for r in rows}


def full_sweep(n_tiny: int, n_smollm2: int, save: bool) -> None:
    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path[:0] = [str(tests), str(tests / "e2e")]
    from test_paging_sdk import sweep

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        result = sweep(Path(tmp), n_tiny, n_smollm2)
    loss_error = max(abs(a - b) for a, b in zip(result.served_losses, result.control_losses))
    body = (
        f"`--sweep {n_tiny} {n_smollm2}` (load average at start {load:.1f}): one key, one "
        f"session of the official SDK; {n_tiny} tinkerd/tiny runs (rank 8) and {n_smollm2} "
        "SmolLM2-135M runs (rank 32, all linear) on `tinkerd serve --max-resident-runs 4 "
        "--run-budget 400MiB`, 2 steps each, interleaved. Against never-paged controls: "
        f"largest second-step loss difference {loss_error:.1e}, largest final-weight "
        f"difference {result.weight_error:.1e}. Served in {result.seconds:.0f} s; server "
        f"peak RSS {result.peak_rss_mib:.0f} MiB. Paging per base: "
        + "; ".join(
            f"{base}: {p['resident_runs']} resident, {p['disk_runs']} on disk, "
            f"{p['page_ins']} page-ins averaging {p['mean_page_in_seconds'] * 1e3:.0f} ms"
            for base, p in result.paging.items()
        )
        + "."
    )
    print(f"{machine()}\n\n{body}")
    if save:
        record("Runs at scale: the full SDK sweep (benchmarks/runs_at_scale.py --sweep)", body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--rss-child", type=int)
    parser.add_argument("--no-budget", action="store_true")
    parser.add_argument("--data-dir")
    parser.add_argument("--sweep", nargs=2, type=int, metavar=("TINY", "SMOLLM2"))
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child, not args.no_budget, args.data_dir)
    if args.sweep:
        return full_sweep(*args.sweep, args.record)
    rounds = 3 if args.quick else 7
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        costs = paging_costs(Path(tmp), rounds)
        live = live_adapters(Path(tmp), 40 if args.quick else 150, rounds)
    paged = rss_curve(100 if args.quick else 1000, budget=True)
    per_run = disk_run_bytes()
    unpaged = rss_curve(10 if args.quick else 100, budget=False)

    disk = costs["disk"]
    bandwidth = disk["bytes"] / disk["page_in_s"]
    big = lora_params(**LLAMA_8B, r=32) * 4 * 4
    lines = [
        f"Load average at start: {load:.1f} (2-core machine shared; compare ratios).",
        "",
        "| SmolLM2-135M, rank 32, all linear | bytes per run | page-out | page-in |",
        "|---|---|---|---|",
    ]
    for tier in ("disk", "host"):
        c = costs[tier]
        lines.append(
            f"| {tier} tier | {c['bytes'] / 2**20:.0f} MiB | {c['page_out_s'] * 1e3:.0f} ms | "
            f"{c['page_in_s'] * 1e3:.0f} ms |"
        )
    lines += [
        "",
        f"8B-class adapter (Llama-3.1-8B shapes, rank 32, all linear): {big / 2**30:.2f} GiB "
        f"per run with gradients and AdamW moments; at the disk tier's measured "
        f"{bandwidth / 2**30:.2f} GiB/s a page-in takes about {big / bandwidth:.1f} s "
        "(on a GPU machine the host tier moves it at PCIe speed instead: ~0.1 s at 16 GB/s).",
        "",
        f"Training step, 128 tokens, SmolLM2 rank 32: resident {costs['step_resident_s']:.3f} s, "
        f"paged in first {costs['step_paged_in_s']:.3f} s "
        f"({costs['step_paged_in_s'] / costs['step_resident_s']:.2f}x); a page-in is "
        f"{disk['page_in_s'] / costs['step_resident_s']:.3f} of a step.",
        "",
        "One tinkerd/tiny run's step (128 tokens) with N runs on the base: "
        + ", ".join(f"{k}: {v * 1e3:.0f} ms" for k, v in live.items())
        + f" ({live['all resident'] / live['default resident set']:.2f}x).",
        "",
        "| tinkerd/tiny runs (rank 8, one step each) | " + " | ".join(str(n) for n in paged) + " |",
        "|---|" + "---|" * len(paged),
        "| RSS, default resident set (MiB) | "
        + " | ".join(f"{v:.0f}" for v in paged.values())
        + " |",
        "| RSS, no budget (MiB) | "
        + " | ".join(f"{unpaged[n]:.0f}" if n in unpaged else "-" for n in paged)
        + " |",
        "",
        f"Memory a run on disk keeps (its Run record and paging entry): {per_run:.0f} bytes.",
    ]
    body = "\n".join(lines)
    print(f"{machine()}\n\n{body}")
    if args.record:
        record("Runs at scale: paging runs in and out (benchmarks/runs_at_scale.py)", body)


if __name__ == "__main__":
    main()

"""Runs are cheap, end to end: the official SDK sweeps many runs on a server whose resident
set holds a few, and every run ends as a never-paged control run (engine/paging.py; the
engine-level tests are tests/unit/engine/test_paging.py)."""

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers import KEYS, TINY, ServerProcess, make_datum

from tinkerd.engine import Engine, EngineConfig
from tinkerd.engine.checkpoint_format import WEIGHTS_FILE as WEIGHTS
from tinkerd.engine.checkpoints import adapter_state_dict
from tinkerd.types import AdamParams, LoraConfig

UNLIMITED = EngineConfig(max_resident_runs=None, run_budget_bytes=None)


# ---------------------------------------------------------------- the official SDK

SWEEP_TINY, SWEEP_SMOLLM2 = 60, 3  # the 300 + 40: benchmarks/runs_at_scale.py --sweep
SWEEP_BUDGET = ("--max-resident-runs", "4", "--run-budget", "400MiB")
"""4 runs per base, and at most 400 MiB of them: 2 SmolLM2 rank-32 runs (~182 MB each)."""


def sweep_tokens(i: int, step: int) -> list[int]:
    """Run i's sequence at `step`: 17 ids below both vocabularies (tiny: 259)."""
    return [1 + (i * 31 + step * 7 + j * 13) % 250 for j in range(17)]


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


@dataclass
class Sweep:
    """What `sweep` measured."""

    served_losses: list[float]
    control_losses: list[float]
    weight_error: float
    """Largest |served - control| over every run's final LoRA weights."""
    paging: dict[str, dict]
    """The server's /api/v1/dashboard/paging per base model, after the sweep."""
    peak_rss_mib: float
    """The server's peak RSS."""
    seconds: float
    """The served sweep, wall clock (runs created, trained, saved)."""


def sweep(data_dir: Path, n_tiny: int, n_smollm2: int, budget=SWEEP_BUDGET) -> Sweep:
    """One key and one session of the official SDK on `tinkerd serve --model smollm2
    *budget`: n_tiny tinkerd/tiny runs (rank 8) and n_smollm2 SmolLM2-135M runs (rank
    32, every linear layer) each train 2 steps, interleaved (every run's step 1, then
    every run's step 2; a run's requests are waited for before the next run's, so no
    pass is packed); then the same on an engine that never pages, same seeds and data."""
    import tinker
    from safetensors.torch import load_file
    from tinker import types

    from tinkerd.engine.gguf import SMOLLM2_ALIAS
    from tinkerd.engine.models import resolve_model_path

    resolve_model_path(SMOLLM2_ALIAS)  # converted once per test session (conftest's cache)
    plan = [(TINY, 8, k) for k in range(n_tiny)] + [
        (SMOLLM2_ALIAS, 32, k) for k in range(n_smollm2)
    ]
    # Equal to 1e-6 means bit for bit (a loss of ~170 in float32 is 1.5e-5 per ulp), and a
    # sum's rounding depends on how many threads share it: the server keeps torch's thread
    # count, as the control engine in this process does, rather than sizing it to the cores
    # free at each pass (tinkerd/threads.py).
    fixed = {"TINKERD_FIXED_THREADS": "1"}
    server = ServerProcess(data_dir / "server", "--model", SMOLLM2_ALIAS, *budget, env=fixed)
    sdk = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
    adam = types.AdamParams(learning_rate=1e-2)
    started = time.perf_counter()
    try:
        clients = [sdk.create_lora_training_client(b, rank=r, seed=k).result() for b, r, k in plan]
        print(f"sweep: created in {time.perf_counter() - started:.1f} s", flush=True)
        served = []
        for step in range(2):
            for i, client in enumerate(clients):
                tokens = sweep_tokens(i, step)
                datum = types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 16},
                )
                fwd_bwd = client.forward_backward([datum], "cross_entropy")
                optim = client.optim_step(adam)
                served.append(fwd_bwd.result().metrics["loss:sum"])
                optim.result()
        print(f"sweep: trained at {time.perf_counter() - started:.1f} s", flush=True)
        paths = [client.save_state("final").result().path for client in clients]
        print(f"sweep: saved at {time.perf_counter() - started:.1f} s", flush=True)
        seconds = time.perf_counter() - started
        url = f"{server.url}/api/v1/dashboard/paging"
        paging = httpx.get(url, headers={"X-API-Key": KEYS[0]}).json()["bases"]
        rss = peak_rss_mib(server.proc.pid)
    finally:
        sdk.close("success").result()
        server.stop()

    control = Engine(data_dir=data_dir / "control", extra_models=[SMOLLM2_ALIAS], config=UNLIMITED)
    ids = [control.create_model(b, LoraConfig(rank=r, seed=k)) for b, r, k in plan]
    expected = []
    for step in range(2):
        for i, model_id in enumerate(ids):
            out = control.forward_backward(
                model_id, [make_datum(sweep_tokens(i, step))], "cross_entropy"
            )
            control.optim_step(model_id, AdamParams(learning_rate=1e-2))
            expected.append(out.metrics["loss:sum"])
    print(f"sweep: control at {time.perf_counter() - started:.1f} s", flush=True)
    error = 0.0
    for model_id, path in zip(ids, paths):
        run_id, _, name = path.removeprefix("tinker://").partition("/weights/")
        saved = load_file(data_dir / "server" / "checkpoints" / run_id / "weights" / name / WEIGHTS)
        run = control.run(model_id)
        with run.base.lock, run.attached():
            weights = adapter_state_dict(run)
        assert saved.keys() == weights.keys()
        error = max([error] + [(saved[k] - v).abs().max().item() for k, v in weights.items()])
    print(f"sweep: compared at {time.perf_counter() - started:.1f} s", flush=True)
    n = len(plan)
    return Sweep(served[n:], expected[n:], error, paging, rss, seconds)


@pytest.mark.timeout(900)  # about a minute on a quiet 2-core machine
def test_official_sdk_sweep_of_many_runs_is_paged_exactly(tmp_path):
    """60 tinkerd/tiny + 3 SmolLM2 runs of one key and one session (`sweep`) on a server
    keeping 4 runs (and at most 400 MiB of them) per base resident, so every run is paged
    out and in again: every run's second-step loss and final weights equal a control
    run's that was never paged, to 1e-6; no 403 at the 33rd run (the old limit)."""
    from tinkerd.engine.gguf import SMOLLM2_ALIAS

    result = sweep(tmp_path, SWEEP_TINY, SWEEP_SMOLLM2)
    print(f"sweep served in {result.seconds:.1f} s, server peak RSS {result.peak_rss_mib:.0f} MiB")
    assert result.served_losses == pytest.approx(result.control_losses, abs=1e-6, rel=0)
    assert result.weight_error <= 1e-6
    tiny, smollm2 = result.paging[TINY], result.paging[SMOLLM2_ALIAS]
    assert tiny["resident_runs"] == 4 and tiny["disk_runs"] == SWEEP_TINY - 4
    assert tiny["page_ins"] >= SWEEP_TINY
    assert smollm2["resident_runs"] == 2  # 400 MiB / ~182 MB a run
    assert smollm2["page_ins"] >= SWEEP_SMOLLM2


# ---------------------------------------------------------------- restarts


def _step(client, i: int, step: int, optim: bool = True) -> float:
    """Run i's forward_backward at `step` (then its optim_step): its loss."""
    from tinker import types

    tokens = sweep_tokens(i, step)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 16},
    )
    loss = client.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
    if optim:
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return loss


@pytest.mark.timeout(600)
def test_runs_go_on_with_their_old_clients_after_a_restart(tmp_path):
    """Official SDK, one run resident at a time: after a clean shutdown every run goes on
    with its old TrainingClient (pending gradients, Adam moments and step counts
    included) exactly as a run never restarted; after a kill -9 the runs paged out and
    untouched since go on too, and the one in use at the crash is refused with a 404
    naming create_training_client_from_state_with_optimizer."""
    import tinker

    # Each run: (seed, then its steps: (step, with optim_step)), in one order for both.
    plan = [(0, 0, True), (1, 0, True), (2, 0, False)]  # run 2 keeps pending gradients
    after_clean = [(0, 1, True), (1, 1, True), (2, 1, True)]  # run 2's step 1 sums both
    after_kill = [(0, 2, True), (1, 2, True)]
    control = Engine(data_dir=tmp_path / "control", config=UNLIMITED)
    ids = [control.create_model(TINY, LoraConfig(rank=4, seed=i)) for i in range(3)]

    def control_step(i: int, step: int, optim: bool) -> float:
        out = control.forward_backward(ids[i], [make_datum(sweep_tokens(i, step))], "cross_entropy")
        if optim:
            control.optim_step(ids[i], AdamParams(learning_rate=1e-2))
        return out.metrics["loss:sum"]

    expected = [control_step(*s) for s in plan + after_clean + after_kill]
    server = ServerProcess(tmp_path / "server", "--max-resident-runs", "1")
    try:
        sdk = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
        clients = [sdk.create_lora_training_client(TINY, rank=4, seed=i).result() for i in range(3)]
        losses = [_step(clients[i], i, step, optim) for i, step, optim in plan]
        server.stop()  # SIGTERM: a clean shutdown pages every run out and keeps the files
        server.start()
        losses += [_step(clients[i], i, step, optim) for i, step, optim in after_clean]
        server.stop(kill=True)  # run 2 is resident (in use): its state was in memory only
        server.start()
        losses += [_step(clients[i], i, step, optim) for i, step, optim in after_kill]
        assert losses == pytest.approx(expected, abs=1e-6, rel=0)
        with pytest.raises(tinker.NotFoundError) as lost:
            _step(clients[2], 2, 2)
        assert "create_training_client_from_state_with_optimizer" in str(lost.value)
        paths = [clients[i].save_state("after").result().path for i in (0, 1)]
    finally:
        server.stop()
    from safetensors.torch import load_file

    for i, path in zip((0, 1), paths):
        run_id, _, name = path.removeprefix("tinker://").partition("/weights/")
        root = tmp_path / "server" / "checkpoints" / run_id / "weights" / name
        saved = load_file(root / WEIGHTS)
        run = control.run(ids[i])
        with run.base.lock, run.attached():
            weights = adapter_state_dict(run)
        assert saved.keys() == weights.keys()
        for key, value in weights.items():
            assert (saved[key] - value).abs().max().item() <= 1e-6, key

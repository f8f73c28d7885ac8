"""Runs are cheap (engine/paging.py): a resident set per base within a budget, the other
runs paged out (host memory, disk) and back in bit for bit.

The end-to-end check with the official SDK on tinkerd/tiny and SmolLM2 is the last test;
benchmarks/runs_at_scale.py measures the costs.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from conftest import TINY, make_datum

from tinkerd.engine import Engine, EngineConfig
from tinkerd.engine.checkpoint_format import WEIGHTS_FILE as WEIGHTS
from tinkerd.engine.checkpoints import adapter_state_dict
from tinkerd.engine.paging import owner_of
from tinkerd.types import AdamParams, DimuonOptimizerConfig, DimuonParams, LoraConfig

UNLIMITED = EngineConfig(max_resident_runs=None, run_budget_bytes=None)


def data(k: int, step: int):
    """Run k's batch at `step` (its own tokens and length)."""
    return [make_datum([256, *f"run {k} step {step} {'xy' * (k % 4)}".encode()])]


def weights(engine: Engine, model_id: str) -> dict[str, torch.Tensor]:
    run = engine.run(model_id)
    with run.base.lock, run.attached():
        return {n.replace(model_id, "*"): p.clone() for n, p in run.adapter_state().items()}


def train(engine: Engine, n: int, dimuon: bool, ids: list[str] | None = None):
    """n runs, 2 steps interleaved: every run's forward_backward, then every run's
    optim_step (so runs are paged out holding gradients). Returns ids, losses, weights."""
    optimizer = DimuonOptimizerConfig() if dimuon else None
    params = DimuonParams(learning_rate=1e-2) if dimuon else AdamParams(learning_rate=1e-2)
    ids = ids or [f"run-{k}" for k in range(n)]
    for k, model_id in enumerate(ids):
        engine.create_model(TINY, LoraConfig(rank=4, seed=k), model_id, optimizer)
    losses = []
    for step in range(2):
        for k, model_id in enumerate(ids):
            out = engine.forward_backward(model_id, data(k, step), "cross_entropy")
            losses.append(out.metrics["loss:sum"])
        for model_id in ids:
            engine.optim_step(model_id, params)
    return ids, losses, {m: weights(engine, m) for m in ids}


@pytest.mark.parametrize("dimuon", [False, True], ids=["adamw", "dimuon"])
def test_paged_runs_train_exactly_as_runs_never_paged(tmp_path, dimuon):
    control = Engine(data_dir=tmp_path / "control", config=UNLIMITED)
    paged = Engine(data_dir=tmp_path / "paged", config=EngineConfig(max_resident_runs=2))
    ids, losses, final = train(control, 6, dimuon)
    _, paged_losses, paged_final = train(paged, 6, dimuon)
    assert paged_losses == losses  # bit for bit: paging moves tensors, computes nothing
    for model_id in ids:
        for name, value in final[model_id].items():
            assert torch.equal(paged_final[model_id][name], value), name
    stats = paged.paging_stats()[TINY]
    assert stats["resident_runs"] == 2 and stats["disk_runs"] == 4
    assert stats["page_ins"] >= 16  # every run, every step, paged in at least twice
    assert control.paging_stats()[TINY]["page_ins"] == 0
    # A paged run's tensors are on disk, not in memory, and its adapter left the base.
    base = paged.run(ids[0]).base
    assert len(base.peft_model.peft_config) == 2
    cold = [paged.run(m) for m in ids if m not in base.adapters]
    assert cold and all(p.numel() == 0 for run in cold for p in run.params)
    assert len(list((tmp_path / "paged" / "paged").glob("*/*.bin"))) == 4


def test_a_packed_pass_pages_in_what_it_packs_a_budget_at_a_time(tmp_path):
    """A pass packing more runs than fit is run as consecutive passes that each fit."""
    control = Engine(data_dir=tmp_path / "control", config=UNLIMITED)
    paged = Engine(data_dir=tmp_path / "paged", config=EngineConfig(max_resident_runs=2))
    results = []
    for engine in (control, paged):
        ids = [engine.create_model(TINY, LoraConfig(rank=4, seed=k)) for k in range(5)]
        requests = [engine.prepare(m, data(k, 0), "cross_entropy", None) for k, m in enumerate(ids)]
        outs = engine.run_losses(requests, backward=True)
        for m in ids:
            engine.optim_step(m, AdamParams(learning_rate=1e-2))
        results.append(([o.metrics["loss:sum"] for o in outs], [weights(engine, m) for m in ids]))
    (losses, final), (paged_losses, paged_final) = results
    assert paged_losses == pytest.approx(losses, abs=1e-5)  # packed 5 vs 2+2+1: rounding
    for a, b in zip(final, paged_final):
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0)
    assert paged.paging_stats()[TINY]["resident_runs"] == 2


def test_saving_or_sampling_a_paged_run_borrows_it(tmp_path):
    """save_state and save_weights_for_sampler of a paged run read it without paging it
    in: the resident set is left as it was (as every data-parallel rank holds it)."""
    engine = Engine(data_dir=tmp_path, config=EngineConfig(max_resident_runs=1))
    first, second = (engine.create_model(TINY, LoraConfig(rank=4, seed=k)) for k in (1, 2))
    engine.forward_backward(first, data(1, 0), "cross_entropy")
    engine.optim_step(first, AdamParams(learning_rate=1e-2))
    expected = weights(engine, first)
    engine.forward_backward(second, data(2, 0), "cross_entropy")  # pages `first` out
    before = engine.paging_stats()[TINY]
    info = engine.save_state(first, "saved")
    sampler = engine.save_weights_for_sampler(first)
    after = engine.paging_stats()[TINY]
    assert (after["page_ins"], after["disk_runs"]) == (before["page_ins"], before["disk_runs"])
    base = engine.run(first).base
    assert second in base.adapters and first not in base.adapters
    restored = engine.create_model_from_state(info.tinker_path, with_optimizer=True)
    got = weights(engine, restored)
    for name, value in expected.items():
        assert torch.equal(got[name.replace(first, restored)], value)
    assert engine.run(restored).step == 1
    assert sampler.model_id == first


def test_unloading_a_paged_run_deletes_its_file(tmp_path):
    engine = Engine(data_dir=tmp_path, config=EngineConfig(max_resident_runs=1))
    first, second = (engine.create_model(TINY, LoraConfig(rank=4, seed=k)) for k in (1, 2))
    files = list((tmp_path / "paged").glob("*/*.bin"))
    assert len(files) == 1  # `first`, paged out to make room for `second`
    engine.unload_model(first)
    assert not files[0].exists()
    engine.forward_backward(second, data(2, 0), "cross_entropy")
    assert engine.paging_stats()[TINY]["resident_runs"] == 1


def test_a_hot_owner_recycles_its_own_runs_not_anothers(tmp_path):
    """Eviction is LRU with a per-owner share: owner A cycling through many runs pages
    out its own, and B's one run (A's least recently used neighbour) stays resident."""
    engine = Engine(data_dir=tmp_path, config=EngineConfig(max_resident_runs=3))
    b = engine.create_model(TINY, LoraConfig(rank=4, seed=0), "sessB:train:0")
    hot = [
        engine.create_model(TINY, LoraConfig(rank=4, seed=k), f"sessA:train:{k}") for k in range(5)
    ]
    assert owner_of(hot[0]) == "sessA" and owner_of(b) == "sessB"
    base = engine.run(b).base
    for k, model_id in enumerate(hot * 2):
        engine.forward_backward(model_id, data(k, 0), "cross_entropy")
        assert b in base.adapters  # plain LRU would have paged B out on the first turn
    engine.forward_backward(b, data(9, 0), "cross_entropy")
    assert engine.paging_stats()[TINY]["resident_runs"] == 3


def test_host_memory_tier_keeps_paged_runs_off_disk(tmp_path):
    """With a host budget (on a GPU machine by default), paged runs stay in host memory
    (none is written) until it is full; results are the same."""
    config = EngineConfig(max_resident_runs=1, host_run_budget_bytes="64MiB")
    engine = Engine(data_dir=tmp_path, config=config)
    control = Engine(data_dir=tmp_path / "control", config=UNLIMITED)
    ids, losses, final = train(control, 3, dimuon=False)
    _, host_losses, host_final = train(engine, 3, dimuon=False)
    assert host_losses == losses
    assert all(torch.equal(host_final[m][n], final[m][n]) for m in ids for n in final[m])
    stats = engine.paging_stats()[TINY]
    assert stats["host_runs"] == 2 and stats["disk_writes"] == 0


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
    from conftest import KEYS, ServerProcess
    from safetensors.torch import load_file
    from tinker import types

    from tinkerd.engine.gguf import SMOLLM2_ALIAS
    from tinkerd.engine.models import resolve_model_path

    resolve_model_path(SMOLLM2_ALIAS)  # converted once per test session (conftest's cache)
    plan = [(TINY, 8, k) for k in range(n_tiny)] + [
        (SMOLLM2_ALIAS, 32, k) for k in range(n_smollm2)
    ]
    server = ServerProcess(data_dir / "server", "--model", SMOLLM2_ALIAS, *budget)
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

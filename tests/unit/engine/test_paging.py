"""Runs are cheap (engine/paging.py): a resident set per base within a budget, the other
runs paged out (host memory, disk) and back in bit for bit.

The end-to-end check with the official SDK on tinkerd/tiny and SmolLM2 is
tests/e2e/test_paging_sdk.py; benchmarks/runs_at_scale.py measures the costs.
"""

import pytest
import torch
from helpers import TINY, make_datum

from tinkerd.engine import Engine, EngineConfig
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
    # A paged run's state is on disk, not in memory: its adapter left the base, and it
    # holds no modules, Parameters nor optimizer of its own (its shape's template does).
    base = paged.run(ids[0]).base
    assert len(base.peft_model.peft_config) == 2
    cold = [paged.run(m) for m in ids if m not in base.adapters]
    assert len(cold) == 4 and all(run.params == [] and run.optimizer is None for run in cold)
    pager = paged.pager(base)
    assert len(pager._shapes) == 1 and all(pager.entries[r.model_id].pieces is None for r in cold)
    assert len(list((tmp_path / "paged" / "paged").glob("*/*.page"))) == 4


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
    files = list((tmp_path / "paged").glob("*/*.page"))
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


def test_a_restarted_engine_takes_back_runs_left_on_disk(tmp_path):
    """`suspend_runs` (a clean shutdown) pages every run out and keeps the files; a new
    engine on the data dir takes back the runs it is asked for, bit for bit (pending
    gradients, AdamW moments and step counts), lazily, and removes the other files; a
    file cut short is not taken back."""
    adam = AdamParams(learning_rate=1e-2)
    control = Engine(data_dir=tmp_path / "control", config=UNLIMITED)
    first = Engine(data_dir=tmp_path / "served", config=EngineConfig(max_resident_runs=1))
    ids = [f"s:train:{k}" for k in range(4)]
    for engine in (control, first):
        for k, model_id in enumerate(ids):
            engine.create_model(TINY, LoraConfig(rank=4, seed=k), model_id)
            engine.forward_backward(model_id, data(k, 0), "cross_entropy")
            engine.optim_step(model_id, adam)
            engine.forward_backward(model_id, data(k, 1), "cross_entropy")  # pending
    first.suspend_runs()
    pages = sorted((tmp_path / "served" / "paged").glob("*/*.page"))
    assert len(pages) == 4 and first.paging_stats()[TINY]["resident_runs"] == 0
    cut = next(p for p in pages if p.name.startswith("s_train_2"))
    cut.write_bytes(cut.read_bytes()[:-100])  # as a crash mid-write would, were it not atomic
    second = Engine(data_dir=tmp_path / "served", config=EngineConfig(max_resident_runs=1))
    assert sorted(second.restore_runs(ids[1:])) == [ids[1], ids[3]]  # 0 not asked, 2 cut
    assert sorted(p.name for p in (tmp_path / "served" / "paged").glob("*/*.page")) == sorted(
        p.name for p in pages if p.name.startswith(("s_train_1", "s_train_3"))
    )
    assert second.paging_stats()[TINY]["disk_runs"] == 2  # nothing read until used
    for k in (1, 3):
        out = second.optim_step(ids[k], adam)
        expected = control.optim_step(ids[k], adam)
        assert out.metrics == expected.metrics  # the step count and grad norm went on
        got = second.forward_backward(ids[k], data(k, 2), "cross_entropy")
        want = control.forward_backward(ids[k], data(k, 2), "cross_entropy")
        assert got.metrics["loss:sum"] == want.metrics["loss:sum"]
        restored, never = weights(second, ids[k]), weights(control, ids[k])
        assert all(torch.equal(restored[n], v) for n, v in never.items())

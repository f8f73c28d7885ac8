"""The activation-memory budget (`EngineConfig.memory_budget_bytes`, `engine.memory`): a
pass of any size runs within it (micro-batches, chunked logits, checkpointed layers) and
gives what one unbounded pass gives, down to the next optim_step's weights."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import TINY, make_datum
from test_compute import RL, SFT, assert_same, grads, same_grad

from tinkerd.engine import Engine, EngineConfig
from tinkerd.engine.compute import micro_batches
from tinkerd.engine.memory import (
    CPU_MICRO_BATCH_BYTES,
    ModelShape,
    checkpointed_layers,
    mmap_threshold,
    parse_bytes,
    plan,
)
from tinkerd.types import AdamParams, LoraConfig

BUDGET = 2_000_000  # bytes: on tinkerd/tiny, ~45 tokens a micro-batch, layers checkpointed


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 << 30
    assert parse_bytes("1.5G") == 1_500_000_000
    assert parse_bytes("512 MiB") == 512 << 20
    assert parse_bytes("1000") == 1000
    for bad in ("", "two gigs", "0", "-1G"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_plan_turns_checkpointing_on_only_when_the_budget_needs_it():
    shape = ModelShape(hidden=576, layers=30, vocab=49152, element_bytes=4)  # SmolLM2-135M
    roomy = plan(shape, 8 << 30, longest_row=1024, backward=True)
    assert not roomy.checkpoint and roomy.micro_batch_tokens >= 2048
    tight = plan(shape, 1536 << 20, longest_row=1024, backward=True)
    assert tight.checkpoint and 1024 <= tight.micro_batch_tokens < 4096
    assert not plan(shape, 1536 << 20, longest_row=1024, backward=False).checkpoint
    assert tight.logits_chunk_tokens * 12 * shape.vocab <= (1536 << 20) // 8


def test_on_a_cpu_a_roomy_budget_still_runs_about_a_gib_a_micro_batch():
    """A few GB of fresh activations in one micro-batch ran slower than ~1 GB pieces
    (SmolLM2 4 x 512 on 2 cores: 128-152 tok/s one micro-batch, 175-200 a row each)."""
    smollm2 = ModelShape(hidden=576, layers=30, vocab=49152, element_bytes=4, chunked_output=True)
    gpu, cpu = (plan(smollm2, 8 << 30, 512, True, cpu=c) for c in (False, True))
    assert gpu.micro_batch_tokens >= 2048 and not gpu.checkpoint
    assert cpu.micro_batch_tokens == 512 and not cpu.checkpoint  # a row: never split
    assert cpu.logits_chunk_tokens == gpu.logits_chunk_tokens
    small = ModelShape(hidden=64, layers=2, vocab=320, element_bytes=4)
    piece = plan(small, 8 << 30, 64, True, cpu=True).micro_batch_tokens
    assert piece == CPU_MICRO_BATCH_BYTES // small.token_bytes(True, checkpoint=False)


def test_checkpointed_layers_keep_less_for_the_backward(engine):
    model_id = engine.create_model(TINY, LoraConfig(rank=4, seed=5))
    base = engine.run(model_id).base
    ids = torch.randint(0, 256, (2, 64))
    kept = {False: 0, True: 0}
    for on in (False, True):

        def pack(t, on=on):
            kept[on] += t.numel() * t.element_size()
            return t

        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            checkpointed_layers(base.model) if on else torch.enable_grad(),
        ):
            engine.run(model_id).activate()
            logits = base.peft_model(input_ids=ids, use_cache=False).logits
            logits.sum().backward()
    assert kept[True] < kept[False] / 3
    engine.unload_model(model_id)


def test_budgeted_packed_pass_and_optim_step_equal_one_pass(engine):
    """Two runs packed in one pass, cut by a budget into micro-batches with checkpointed
    layers: outputs, gradients and the weights after optim_step equal the unbounded
    pass's."""
    small = Engine(config=EngineConfig(memory_budget_bytes=BUDGET))
    ids = {}
    for e in (engine, small):
        ids[e] = [e.create_model(TINY, LoraConfig(rank=4, seed=s)) for s in (31, 32)]
    # Train one step first so lora_B is not zero and every gradient is nonzero.
    for e in (engine, small):
        for m in ids[e]:
            e.forward_backward(m, SFT, "cross_entropy")
            e.optim_step(m, AdamParams(learning_rate=1e-2))
    outs = {}
    for e in (engine, small):
        a, b = ids[e]
        requests = [
            e.prepare(a, SFT, "cross_entropy", None),
            e.prepare(b, RL, "importance_sampling", None),
        ]
        outs[e] = e.run_losses(requests, backward=True)
    requests = [small.prepare(ids[small][0], SFT, "cross_entropy", None)]
    requests.append(small.prepare(ids[small][1], RL, "importance_sampling", None))
    members = small._members(requests, [small.run(m) for m in ids[small]])
    limits = small.limits.for_pass(small.run(ids[small][0]).base, members, backward=True)
    assert limits.checkpoint and len(micro_batches(members, limits.micro_batch_tokens)) >= 2
    for x, y in zip(outs[engine], outs[small], strict=True):
        assert_same(x, y)
    for m, n in zip(ids[engine], ids[small]):
        for g, h in zip(grads(engine, m), grads(small, n), strict=True):
            assert g.abs().sum() > 0 and same_grad(g, h)
        engine.optim_step(m, AdamParams(learning_rate=1e-2))
        small.optim_step(n, AdamParams(learning_rate=1e-2))
        for p, q in zip(engine.run(m).params, small.run(n).params, strict=True):
            assert torch.allclose(p, q, atol=1e-5)
    for e in (engine, small):
        for m in ids[e]:
            e.unload_model(m)


PEAK = """
import json, sys, torch
from tinkerd.engine import Engine, EngineConfig
from tinkerd.types import Datum, LoraConfig, ModelInput
budget = None if sys.argv[1] == "none" else int(sys.argv[1])
engine = Engine(config=EngineConfig(memory_budget_bytes=budget))
model_id = engine.create_model("tinkerd/tiny", LoraConfig(rank=4, seed=1))
def data(rows, n):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 256, (rows, n + 1), generator=g)
    return [Datum(model_input=ModelInput.from_ints(r[:-1].tolist()),
                  loss_fn_inputs={"target_tokens": r[1:].tolist(), "weights": [1.0] * n})
            for r in t]
engine.forward_backward(model_id, data(1, 16))
before = int(open("/proc/self/statm").read().split()[1]) * 4096
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) from here on: this pass's
out = engine.forward_backward(model_id, data(8, 256))
status = open("/proc/self/status").read()
peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"extra": peak - before, "loss": out.metrics["loss:sum"]}))
"""


def peak_extra_bytes(budget: int | None) -> tuple[int, float]:
    """Peak RSS over the RSS before one forward_backward of 8 x 256 tokens, measured in
    a fresh process; and the loss."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(budget or "none")],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["extra"], result["loss"]


def test_a_pass_far_bigger_than_the_budget_stays_within_it():
    """8 x 256 tokens on tinkerd/tiny keep ~250 MB of activations unbounded (measured:
    0.11 MB a token); under an 8 MiB budget the pass grows the process by little more."""
    budget = 8 << 20
    bounded, loss = peak_extra_bytes(budget)
    unbounded, same_loss = peak_extra_bytes(None)
    assert loss == pytest.approx(same_loss, rel=1e-5)
    assert bounded < budget + (64 << 20), bounded
    assert unbounded > 160 << 20, unbounded


def test_micro_batches_hold_one_row_when_rows_are_long(engine):
    """A row longer than the micro-batch is a micro-batch alone (never split)."""
    small = Engine(config=EngineConfig(memory_budget_bytes=BUDGET))
    model_id = small.create_model(TINY, LoraConfig(rank=4, seed=3))
    long = [make_datum([256, *b"x" * 120]), make_datum([256, *b"y" * 90])]
    request = small.prepare(model_id, long, "cross_entropy", None)
    members = small._members([request], [small.run(model_id)])
    limits = small.pass_limits(model_id, long)  # the budget's plan for these rows
    assert limits.checkpoint and limits.micro_batch_tokens < 90
    groups = micro_batches(members, limits.micro_batch_tokens)
    assert [[p.batch.lengths for p in g] for g in groups] == [[[120]], [[90]]]
    out = small.forward_backward(model_id, long, "cross_entropy")
    alone = engine.create_model(TINY, LoraConfig(rank=4, seed=3))
    assert_same(out, engine.forward_backward(alone, long, "cross_entropy"))
    for g, h in zip(grads(small, model_id), grads(engine, alone), strict=True):
        assert same_grad(g, h)
    engine.unload_model(alone)


def test_serve_memory_budget_flag():
    import argparse

    from tinkerd.cli.serve import engine_config, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    budget = lambda *argv: engine_config(parser.parse_args(["serve", *argv])).memory_budget_bytes  # noqa: E731
    assert budget() == "auto"
    assert budget("--memory-budget", "2GiB") == 2 << 30
    assert budget("--memory-budget", "none") is None
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--memory-budget", "lots"])
    assert EngineConfig(memory_budget_bytes="auto").limits.memory_budget_bytes >= 256 << 20


FAULTS = """
import json, resource, sys, torch
from tinkerd.engine import Engine, EngineConfig
from tinkerd.engine.memory import bounded_heap
from tinkerd.types import Datum, LoraConfig, ModelInput
engine = Engine(config=EngineConfig(memory_budget_bytes=4 << 30))
if sys.argv[1] != "engine":  # the allocator as a budget of this many bytes would set it
    bounded_heap(int(sys.argv[1]))
ids = [engine.create_model("tinkerd/tiny", LoraConfig(rank=4, seed=s)) for s in range(2)]
g = torch.Generator().manual_seed(0)
def data():
    t = torch.randint(0, 256, (2, 129), generator=g)
    return [Datum(model_input=ModelInput.from_ints(r[:-1].tolist()),
                  loss_fn_inputs={"target_tokens": r[1:].tolist(), "weights": [1.0] * 128})
            for r in t]
def packed_pass():
    requests = [engine.prepare(m, data(), "cross_entropy", None) for m in ids]
    engine.run_losses(requests, backward=True)
packed_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
packed_pass()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def page_faults(budget: int | None) -> int:
    """Minor page faults of a warm packed pass (2 runs x 2 x 128 tokens on tinkerd/tiny,
    ~50 MB of activations) in a fresh process whose engine has a 4 GiB budget, the
    allocator set as that engine sets it (None) or as for `budget`."""
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, "engine" if budget is None else str(budget)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_roomy_budget_reuses_freed_activations():
    """With a fixed 256 KiB mmap threshold every large tensor of a pass was mapped afresh
    and faulted in page by page (half a packed pass's CPU time in the kernel); a budget
    of 4 GiB lets a warm pass reuse the heap, where a small budget's allocator (the
    same pass) still maps each large block alone."""
    assert mmap_threshold(4 << 30) == 16 << 20
    assert mmap_threshold(64 << 20) == mmap_threshold(1) == 256 << 10
    assert mmap_threshold(1 << 40) == 32 << 20
    roomy, tight = page_faults(None), page_faults(8 << 20)
    # measured on a 2-core Xeon: roomy 1.7k-6.9k faults (glibc's arenas and trimming
    # vary from process to process), tight 55k-56k
    assert roomy * 4096 < 32 << 20, roomy  # under 32 MB of pages touched afresh
    assert tight > 5 * roomy, (tight, roomy)

"""Durable LoRA checkpoints: PEFT layout, atomic saves, exact resume, merged export."""

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY
from safetensors import safe_open
from safetensors.torch import load_file

from tinkerd.engine.checkpoints import (
    CheckpointStore,
    CorruptCheckpointError,
    adapter_state_dict,
    export_merged,
    export_untied_base,
    load_adapter_weights,
    load_optimizer_state,
    parse_tinker_path,
    tinker_path,
)
from tinkerd.engine.tiny import tiny_model_dir
from tinkerd.errors import InvalidRequestError, NotFoundError
from tinkerd.types import AdamParams, LoraConfig

ADAM = AdamParams(learning_rate=0.01, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01)
FILES = ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "tinkerd.json"]


@pytest.fixture
def new_run(engine):
    """`new_run(base=TINY, **lora)` makes a run; all are unloaded afterwards."""
    ids = []

    def make(base=TINY, **lora):
        model_id = engine.create_model(base, LoraConfig(**{"rank": 4, "seed": 0, **lora}))
        ids.append(model_id)
        return engine.run(model_id)

    yield make
    for model_id in ids:
        engine.unload_model(model_id)


@pytest.fixture
def store(tmp_path):
    return CheckpointStore(tmp_path / "ckpt")


def train(engine, run, batch, steps):
    for _ in range(steps):
        engine.forward_backward(run.model_id, batch)
        engine.optim_step(run.model_id, ADAM)


def logprobs(engine, run, batch):
    return [o["logprobs"].to_torch() for o in engine.forward(run.model_id, batch).loss_fn_outputs]


def run_logits(run, tokens) -> torch.Tensor:
    """Logits `[seq, vocab]` of the engine's model through the run's adapter."""
    with run.base.lock, torch.no_grad():
        run.activate()
        input_ids = torch.tensor([tokens], device=run.base.device)
        return run.base.peft_model(input_ids=input_ids).logits[0].float().cpu()


def entries(store):
    """Every path under the store's root, relative, sorted (temp dirs included)."""
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*"))


# ---------------------------------------------------------------- paths and names


def test_tinker_path_round_trip():
    assert tinker_path("run-abc", "weights", "step-3") == "tinker://run-abc/weights/step-3"
    for parts in [("run-abc", "weights", "step-3"), ("0034:train:0", "sampler_weights", "a.b_c")]:
        assert parse_tinker_path(tinker_path(*parts)) == parts


@pytest.mark.parametrize(
    "path, message",
    [
        ("run/weights/x", "must start with"),
        ("http://run/weights/x", "must start with"),
        (None, "must start with"),
        ("tinker://run/weights", "must look like"),
        ("tinker://run/weights/a/b", "must look like"),
        ("tinker://run/optimizer/x", "kind must be one of"),
        ("tinker:///weights/x", "model_id must be a non-empty"),
        ("tinker://run/weights/", "name must be a non-empty"),
        ("tinker://run/weights/..", "invalid checkpoint name"),
        ("tinker://run/weights/a..b", "invalid checkpoint name"),
        ("tinker://run/weights/.hidden", "invalid checkpoint name"),
        ("tinker://run/weights/a b", "invalid checkpoint name"),
        ("tinker://run/weights/" + "x" * 129, "longer than 128"),
        ("tinker://../weights/x", "invalid checkpoint model_id"),
    ],
)
def test_parse_tinker_path_rejects_malformed(path, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_tinker_path(path)


def test_bad_names_and_kinds_are_refused(engine, new_run, store):
    run = new_run()
    for name in ["", "a/b", "..", ".x", "a b", "x" * 129, "é"]:
        with pytest.raises(InvalidRequestError):
            store.save(run, "weights", name, with_optimizer=False)
    with pytest.raises(InvalidRequestError, match="kind"):
        store.save(run, "optimizer", "x", with_optimizer=False)
    assert entries(store) == []


# ---------------------------------------------------------------- what is on disk


def test_saved_files_by_hand(engine, new_run, store, batch):
    new_run()  # so `run` joins the PEFT model by add_adapter, whose config has no base path
    run = new_run(rank=4)
    train(engine, run, batch, 1)
    before = time.time()
    info = store.save(run, "weights", "first", with_optimizer=True)

    assert info.path == store.root / run.model_id / "weights" / "first"
    assert info.tinker_path == f"tinker://{run.model_id}/weights/first"
    assert (info.model_id, info.kind, info.name) == (run.model_id, "weights", "first")
    assert (info.base_model, info.lora_rank, info.step, info.has_optimizer) == (TINY, 4, 1, True)
    assert info.train_attn and info.train_mlp and info.train_unembed
    assert before <= info.created_at <= time.time()
    assert sorted(os.listdir(info.path)) == FILES
    assert info.size_bytes == sum(f.stat().st_size for f in info.path.iterdir())

    # Adapter weights: PEFT's saved names (no adapter name), float32, equal to the run's.
    weights = load_file(info.path / "adapter_model.safetensors")
    assert len(weights) == 2 * (4 * 7 + 1)  # A and B of 7 Linears in 4 layers, and lm_head
    prefix = "base_model.model.model.layers.0."
    assert weights[prefix + "self_attn.q_proj.lora_A.weight"].shape == (4, 256)
    assert weights[prefix + "self_attn.k_proj.lora_B.weight"].shape == (128, 4)
    assert weights[prefix + "mlp.down_proj.lora_A.weight"].shape == (4, 768)
    assert weights["base_model.model.lm_head.lora_B.weight"].shape == (320, 4)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)
    assert not any(run.model_id in k or "base_layer" in k for k in weights)
    live = {k.replace(f".{run.model_id}.", "."): v for k, v in run.adapter_state().items()}
    assert live.keys() == weights.keys()
    for k, v in weights.items():
        assert v.dtype == torch.float32 and torch.equal(v, live[k].cpu())
    assert weights["base_model.model.lm_head.lora_B.weight"].abs().sum() > 0  # trained
    with safe_open(info.path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}

    config = json.loads((info.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(run.base.path)
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 32)
    assert config["inference_mode"] is True
    assert set(config["target_modules"]) == {
        *("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "lm_head",
    }

    # Adam state under the same names, plus the run's step.
    optim = torch.load(info.path / "optimizer.pt", weights_only=True)
    assert optim.pop("run_step") == 1
    assert optim.keys() == weights.keys()
    state = {
        n.replace(f".{run.model_id}.", "."): run.optimizer.state[p]
        for n, p in run.base.peft_model.named_parameters()
        if p in run.optimizer.state
    }
    for name, s in optim.items():
        assert float(s["step"]) == 1.0 and s["exp_avg"].shape == weights[name].shape
        assert torch.equal(s["exp_avg"], state[name]["exp_avg"].cpu())
        assert torch.equal(s["exp_avg_sq"], state[name]["exp_avg_sq"].cpu())

    meta = json.loads((info.path / "tinkerd.json").read_text())
    assert meta["format"] == 1 and meta["step"] == 1 and meta["has_optimizer"] is True
    assert meta["lora"] == {
        "rank": 4,
        "seed": 0,
        "train_unembed": True,
        "train_mlp": True,
        "train_attn": True,
    }
    assert sorted(meta["files"]) == sorted(set(FILES) - {"tinkerd.json"})
    for name, entry in meta["files"].items():
        data = (info.path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def test_get_list_resolve_delete(engine, new_run, store, batch):
    a, b = new_run(), new_run(train_unembed=False)
    saved = [
        store.save(a, "weights", "s1", with_optimizer=True),
        store.save(b, "sampler_weights", "s1", with_optimizer=False),
        store.save(a, "sampler_weights", "s2", with_optimizer=False),
    ]
    assert store.list() == saved  # oldest first
    assert store.list(a.model_id) == [saved[0], saved[2]]
    assert store.list("no-such-run") == []
    assert not saved[1].has_optimizer and not saved[1].train_unembed
    assert "optimizer.pt" not in os.listdir(saved[1].path)
    for info in saved:
        assert store.get(info.model_id, info.kind, info.name) == info
        assert store.resolve(info.tinker_path) == info
    with pytest.raises(NotFoundError):
        store.get(a.model_id, "weights", "s2")
    with pytest.raises(NotFoundError):
        store.resolve(f"tinker://{b.model_id}/weights/s1")

    store.delete(a.model_id, "weights", "s1")
    assert store.list() == saved[1:]
    assert not saved[0].path.exists()
    with pytest.raises(NotFoundError):
        store.get(a.model_id, "weights", "s1")
    with pytest.raises(NotFoundError):
        store.delete(a.model_id, "weights", "s1")
    assert not any(".tmp-" in e for e in entries(store))


def test_directory_without_metadata_is_not_a_checkpoint(new_run, store):
    info = store.save(new_run(), "weights", "ok", with_optimizer=False)
    broken = info.path.parent / "broken"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"partial")
    (broken / "tinkerd.json").write_text("{not json")
    assert store.list() == [info]
    with pytest.raises(NotFoundError):
        store.get(info.model_id, "weights", "broken")


# ---------------------------------------------------------------- loading


def test_peft_from_pretrained_loads_the_directory(engine, new_run, store, batch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = new_run(rank=8)
    train(engine, run, batch, 2)
    info = store.save(run, "sampler_weights", "for-peft", with_optimizer=False)
    base = AutoModelForCausalLM.from_pretrained(run.base.path, dtype=run.base.model.dtype)
    model = PeftModel.from_pretrained(base.to(run.base.device), info.path).eval()
    expected = logprobs(engine, run, batch)
    for datum, want in zip(batch, expected):
        tokens = torch.tensor([datum.model_input.to_ints()], device=run.base.device)
        targets = datum.loss_fn_inputs["target_tokens"].to_torch()
        with torch.no_grad():
            logits = model(input_ids=tokens).logits[0].float().cpu()
        got = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_weights_load_into_another_run(engine, new_run, store, batch):
    a = new_run(seed=1)
    train(engine, a, batch, 2)
    info = store.save(a, "weights", "a", with_optimizer=False)
    b = new_run(seed=2)
    assert not torch.equal(logprobs(engine, a, batch)[0], logprobs(engine, b, batch)[0])
    load_adapter_weights(b.base, b.model_id, info)
    for x, y in zip(logprobs(engine, a, batch), logprobs(engine, b, batch)):
        assert torch.equal(x, y)
    assert b.step == 0  # weights only: the optimizer is untouched


def test_resume_is_bit_for_bit(engine, new_run, store, batch):
    """3 steps, checkpoint, load into a fresh run, 2 more == 5 steps straight."""
    a, straight = new_run(seed=1), new_run(seed=1)
    train(engine, a, batch, 3)
    info = store.save(a, "weights", "step-3", with_optimizer=True)
    assert info.step == 3

    resumed = new_run(seed=2)  # a different initialisation, overwritten by the checkpoint
    load_adapter_weights(resumed.base, resumed.model_id, info)
    load_optimizer_state(resumed, info)
    assert resumed.step == 3
    train(engine, resumed, batch, 2)
    train(engine, straight, batch, 5)
    train(engine, a, batch, 2)

    want = adapter_state_dict(straight)
    for run in (resumed, a):
        assert run.step == 5
        got = adapter_state_dict(run)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        for p, q in zip(run.params, straight.params):
            s, t = run.optimizer.state[p], straight.optimizer.state[q]
            assert all(torch.equal(s[k], t[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_mismatched_checkpoints_are_refused(engine, new_run, store, batch):
    a = new_run(rank=4)
    train(engine, a, batch, 1)
    info = store.save(a, "weights", "r4", with_optimizer=True)
    weights_only = store.save(a, "weights", "r4-weights", with_optimizer=False)

    other_rank, no_unembed = new_run(rank=8), new_run(rank=4, train_unembed=False)
    before = adapter_state_dict(other_rank)
    with pytest.raises(InvalidRequestError, match=r"does not fit.*shape"):
        load_adapter_weights(other_rank.base, other_rank.model_id, info)
    with pytest.raises(InvalidRequestError, match=r"does not fit.*unexpected.*lm_head"):
        load_adapter_weights(no_unembed.base, no_unembed.model_id, info)
    with pytest.raises(InvalidRequestError, match="does not fit"):
        load_optimizer_state(other_rank, info)
    with pytest.raises(InvalidRequestError, match="no optimizer state"):
        load_optimizer_state(a, weights_only)
    with pytest.raises(NotFoundError, match="no adapter"):
        load_adapter_weights(a.base, "no-such-adapter", info)
    after = adapter_state_dict(other_rank)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert other_rank.step == 0 and not other_rank.optimizer.state


# ---------------------------------------------------------------- durability


def test_interrupted_save_leaves_no_checkpoint(engine, new_run, store, batch, monkeypatch):
    import tinkerd.engine.checkpoints as ckpt

    run = new_run()

    def crash(*args):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated"):
        store.save(run, "weights", "x", with_optimizer=True)
    monkeypatch.undo()
    assert store.list() == []
    assert not any(".tmp-" in e or e.endswith("/x") for e in entries(store))

    calls = []
    write_file = ckpt.write_file

    def crash_on_third_file(path, data):
        calls.append(path.name)
        if len(calls) == 3:
            raise OSError("disk full")
        return write_file(path, data)

    monkeypatch.setattr(ckpt, "write_file", crash_on_third_file)
    with pytest.raises(OSError, match="disk full"):
        store.save(run, "weights", "x", with_optimizer=True)
    monkeypatch.undo()
    assert calls[-1] == "optimizer.pt"
    assert store.list() == []

    # A hard crash (no cleanup at all) leaves a complete-looking temp dir behind.
    monkeypatch.setattr(os, "rename", crash)
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(OSError):
        store.save(run, "weights", "x", with_optimizer=True)
    monkeypatch.undo()
    (leftover,) = [p for p in (store.root / run.model_id / "weights").iterdir()]
    assert leftover.name.startswith(".tmp-new-x-") and (leftover / "tinkerd.json").exists()
    assert store.list() == []
    with pytest.raises(NotFoundError):
        store.get(run.model_id, "weights", "x")

    info = store.save(run, "weights", "x", with_optimizer=True)  # the store still works
    assert store.list() == [info]
    store.verify(info)
    CheckpointStore(store.root)  # a restart clears the debris
    assert not leftover.exists()
    assert store.list() == [info]


def test_stale_temp_dirs_are_removed_on_init(new_run, store):
    info = store.save(new_run(), "weights", "keep", with_optimizer=False)
    kind_dir = info.path.parent
    stale = [".tmp-new-a-0123abcd", ".tmp-trash-keep-0123abcd", ".tmp-deleted-z-0123abcd"]
    for name in stale:
        (kind_dir / name).mkdir()
        (kind_dir / name / "adapter_model.safetensors").write_bytes(b"junk")
    CheckpointStore(store.root)
    assert sorted(os.listdir(kind_dir)) == ["keep"]
    assert store.list() == [info]


def test_crash_mid_overwrite_keeps_the_old_checkpoint(engine, new_run, store, batch, monkeypatch):
    run = new_run()
    old = store.save(run, "weights", "x", with_optimizer=True)
    train(engine, run, batch, 1)

    # The new one fails to move in after the old one was moved aside: the old comes back.
    rename, calls = os.rename, []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="simulated"):
        store.save(run, "weights", "x", with_optimizer=True, overwrite=True)
    monkeypatch.undo()
    assert store.list() == [old]
    store.verify(old)
    assert sorted(os.listdir(old.path.parent)) == ["x"]

    # A hard crash between the two renames: a restart puts the old one back.
    os.rename(old.path, old.path.parent / ".tmp-trash-x-0123abcd")
    assert store.list() == []
    assert CheckpointStore(store.root).list() == [old]


def test_overwrite_needs_the_flag(engine, new_run, store, batch):
    run = new_run()
    first = store.save(run, "weights", "x", with_optimizer=True)
    train(engine, run, batch, 1)
    with pytest.raises(InvalidRequestError, match="already exists"):
        store.save(run, "weights", "x", with_optimizer=True)
    assert store.get(run.model_id, "weights", "x") == first
    second = store.save(run, "weights", "x", with_optimizer=False, overwrite=True)
    assert (second.step, second.has_optimizer) == (1, False)
    assert store.list() == [second]
    assert sorted(os.listdir(second.path.parent)) == ["x"]
    assert "optimizer.pt" not in os.listdir(second.path)


def test_verify_catches_a_flipped_byte(engine, new_run, store, batch):
    run = new_run()
    train(engine, run, batch, 1)
    info = store.save(run, "weights", "x", with_optimizer=True)
    store.verify(info)
    for name in ["adapter_model.safetensors", "optimizer.pt"]:
        path = info.path / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError, match=name):
            store.verify(info)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        store.verify(info)

    (info.path / "optimizer.pt").write_bytes(b"x")  # so loading refuses it too
    with pytest.raises(CorruptCheckpointError, match="optimizer.pt"):
        load_optimizer_state(run, info)
    (info.path / "adapter_model.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError, match="cannot read"):
        load_adapter_weights(run.base, run.model_id, info)


# ---------------------------------------------------------------- export


def test_export_merged_is_a_plain_transformers_model(engine, new_run, store, batch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = new_run(rank=4)
    train(engine, run, batch, 2)
    info = store.save(run, "sampler_weights", "final", with_optimizer=False)
    out = tmp_path / "merged"
    export_merged(run.base.path, info, out)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    tokens = batch[2].model_input.to_ints()
    with torch.no_grad():
        got = model(input_ids=torch.tensor([tokens])).logits[0]
    atol = 1e-4 if run.base.model.dtype == torch.float32 else 5e-2  # a bf16 engine on a GPU
    torch.testing.assert_close(got, run_logits(run, tokens), atol=atol, rtol=0)

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("hello", return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, prompt.shape[1] + 5)


def tied_tiny(tmp_path) -> Path:
    """`tinkerd/tiny` with lm_head tied to the input embeddings (as SmolLM2's), saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tied = tmp_path / "tied-tiny"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    model.config.tie_word_embeddings = True
    model.tie_weights()  # lm_head.weight is now embed_tokens.weight
    model.save_pretrained(tied)
    AutoTokenizer.from_pretrained(tiny_model_dir()).save_pretrained(tied)
    return tied


def test_export_merged_unties_a_tied_lm_head(engine, new_run, store, batch, tmp_path):
    """With lm_head tied to the input embeddings, merging lm_head's LoRA into the shared
    matrix would change the embeddings too: the export gives lm_head its own copy."""
    from transformers import AutoModelForCausalLM

    tied = tied_tiny(tmp_path)
    run = new_run(base=str(tied))
    embed, head = run.base.model.get_input_embeddings(), run.base.model.get_output_embeddings()
    assert head.weight is embed.weight
    train(engine, run, batch, 2)
    info = store.save(run, "sampler_weights", "final", with_optimizer=False)
    export_merged(tied, info, tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight
    tokens = batch[0].model_input.to_ints()
    with torch.no_grad():
        got = merged(input_ids=torch.tensor([tokens])).logits[0]
    atol = 1e-4 if run.base.model.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, run_logits(run, tokens), atol=atol, rtol=0)


def test_unembed_adapter_of_a_tied_base_loads_in_peft_tools_that_tie_weights(
    engine, new_run, store, batch, tmp_path
):
    """A train_unembed run on a base whose lm_head is tied to its input embeddings (as
    SmolLM2's): PEFT wraps lm_head, and `tie_weights()` (lm-eval `hf --peft`) then fails
    on the tied base. On the base `export_untied_base` writes, the saved adapter loads,
    survives `tie_weights()` and gives the run's logprobs; the input embeddings stay the
    base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tied_dir = tied_tiny(tmp_path)
    run = new_run(base=str(tied_dir), train_unembed=True, train_mlp=False)
    train(engine, run, batch, 2)
    info = store.save(run, "sampler_weights", "tied", with_optimizer=False)
    expected = logprobs(engine, run, batch)

    tied = AutoModelForCausalLM.from_pretrained(tied_dir)
    with pytest.raises(KeyError, match="already exists"):  # what lm-eval met
        PeftModel.from_pretrained(tied, info.path).tie_weights()

    assert export_untied_base(tied_dir, tmp_path / "untied")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "untied")
    model = PeftModel.from_pretrained(model, info.path).eval()
    model.tie_weights()
    untied = AutoModelForCausalLM.from_pretrained(tmp_path / "untied")  # no adapter
    embed = AutoModelForCausalLM.from_pretrained(tied_dir).get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, embed)
    atol = 1e-4 if run.base.model.dtype == torch.float32 else 5e-2
    for datum, want in zip(batch, expected):
        tokens = torch.tensor([datum.model_input.to_ints()])
        targets = datum.loss_fn_inputs["target_tokens"].to_torch()[:, None]
        with torch.no_grad():
            got = model(input_ids=tokens).logits[0].log_softmax(-1).gather(-1, targets)[:, 0]
            base = untied(input_ids=tokens).logits[0].log_softmax(-1).gather(-1, targets)[:, 0]
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
        assert (got - base).abs().max() > 1e-3  # the adapter's lm_head LoRA is in play
    assert not export_untied_base(tiny_model_dir(), tmp_path / "tiny")  # untied: as is

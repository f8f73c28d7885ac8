"""Engine internals: shared base weights, LoRA flags, Adam, the built-in tiny model."""

import pytest
import torch
from helpers import TINY, make_datum

from tinkerd.engine.tiny import build_tokenizer, tiny_model_dir
from tinkerd.types import AdamParams, LoraConfig


def lora_params(engine, model_id):
    return {
        n: p
        for n, p in engine.run(model_id).base.peft_model.named_parameters()
        if f".{model_id}." in n
    }


def test_base_weights_exist_once(engine):
    ids = [engine.create_model(TINY, LoraConfig(rank=4, seed=i)) for i in range(3)]
    runs = [engine.run(i) for i in ids]
    assert runs[0].base is runs[1].base is runs[2].base
    model = runs[0].base.peft_model
    # Every parameter storage in the shared module tree, counted once.
    storages = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
    }
    base_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n
    )
    adapter_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n
    )
    assert sum(storages.values()) == base_bytes + adapter_bytes
    for i in ids:  # each run adds only its adapter
        assert sum(p.numel() for p in lora_params(engine, i).values()) < 0.05 * base_bytes / 4
        engine.unload_model(i)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (
            dict(train_attn=True, train_mlp=False, train_unembed=False),
            {"q_proj", "k_proj", "v_proj", "o_proj"},
        ),
        (
            dict(train_attn=False, train_mlp=True, train_unembed=False),
            {"gate_proj", "up_proj", "down_proj"},
        ),
        (dict(train_attn=False, train_mlp=False, train_unembed=True), {"lm_head"}),
    ],
)
def test_train_flags_and_rank_choose_the_adapted_modules(engine, flags, expected):
    model_id = engine.create_model(TINY, LoraConfig(rank=6, seed=0, **flags))
    params = lora_params(engine, model_id)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in params}
    assert adapted == expected
    for name, p in params.items():
        assert (p.shape[0] if ".lora_A." in name else p.shape[1]) == 6
    engine.unload_model(model_id)


def test_lora_starts_as_the_base_model(engine):
    """B = 0 at init, so a new run's logprobs equal the base model's."""
    data = [make_datum([256, *b"identity"])]
    run = engine.create_model(TINY, LoraConfig(rank=4, seed=1))
    base = engine.run(run).base
    engine.run(run).activate()
    with torch.no_grad(), base.peft_model.disable_adapter():
        logits = base.peft_model(input_ids=torch.tensor([data[0].model_input.to_ints()])).logits
    expected = logits.log_softmax(-1)[0].gather(
        -1, data[0].loss_fn_inputs["target_tokens"].to_torch()[:, None]
    )[:, 0]
    got = engine.forward(run, data).loss_fn_outputs[0]["logprobs"].to_torch()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    engine.unload_model(run)


def reference_adamw(params, grads_per_step, adam: AdamParams):
    """Textbook AdamW with global-norm clipping, written out by hand."""
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        if adam.grad_clip_norm > 0 and norm > adam.grad_clip_norm:
            grads = [g * adam.grad_clip_norm / norm for g in grads]
        for i, g in enumerate(grads):
            m[i] = adam.beta1 * m[i] + (1 - adam.beta1) * g
            v[i] = adam.beta2 * v[i] + (1 - adam.beta2) * g * g
            m_hat = m[i] / (1 - adam.beta1**t)
            v_hat = v[i] / (1 - adam.beta2**t)
            params[i] = params[i] * (1 - adam.learning_rate * adam.weight_decay)
            params[i] = params[i] - adam.learning_rate * m_hat / (v_hat.sqrt() + adam.eps)
    return params


def test_optim_step_is_adamw_with_every_field(engine, batch):
    # eps = 0.5 makes the step depend on gradient scale, so clipping is visible.
    adam = AdamParams(
        learning_rate=0.01, beta1=0.8, beta2=0.9, eps=0.5, weight_decay=0.1, grad_clip_norm=0.05
    )
    run_id = engine.create_model(TINY, LoraConfig(rank=4, seed=2))
    run = engine.run(run_id)
    start = [p.detach().clone() for p in run.params]
    grads, norms = [], []
    for _ in range(2):
        engine.forward_backward(run_id, batch)
        grads.append([p.grad.clone() for p in run.params])
        norms.append(engine.optim_step(run_id, adam).metrics["grad_norm"])
        assert all(p.grad is None for p in run.params)  # consumed by the step
    expected = reference_adamw(start, grads, adam)
    for got, want in zip(run.params, expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-5)
    for g, norm in zip(grads, norms):  # reported norm is the one before clipping
        assert norm == pytest.approx(torch.sqrt(sum((x**2).sum() for x in g)).item(), rel=1e-5)
        assert norm > adam.grad_clip_norm  # so clipping really happened
    engine.unload_model(run_id)


def test_gradients_accumulate_until_the_step(engine, batch):
    run_id = engine.create_model(TINY, LoraConfig(rank=4, seed=3))
    run = engine.run(run_id)
    engine.forward_backward(run_id, batch)
    once = [p.grad.clone() for p in run.params]
    engine.forward_backward(run_id, batch)
    for g, g1 in zip(run.params, once):
        torch.testing.assert_close(g.grad, 2 * g1)
    engine.unload_model(run_id)


def test_tiny_model_is_deterministic_hugging_face_format(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first, second = tiny_model_dir(tmp_path / "a"), tiny_model_dir(tmp_path / "b")
    assert (first / "config.json").exists() and (first / "tokenizer.json").exists()
    m1 = AutoModelForCausalLM.from_pretrained(first)
    m2 = AutoModelForCausalLM.from_pretrained(second)
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2), n1
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert tokenizer.encode("ab\n") == [97, 98, 10]
    assert tokenizer.decode([tokenizer.bos_token_id, 104, 105]) == "<|bos|>hi"
    assert len(build_tokenizer()) == 259

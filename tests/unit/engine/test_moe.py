"""Mixture-of-experts bases: `train_mlp` adapts the fused expert weights (PEFT's
`target_parameters`, one low-rank update per expert) in a run trained alone, in packed
multi-run passes, in the sampler and in checkpoints and merged exports. On a tiny random
Qwen3-MoE whose experts transformers keeps as 3-D parameters, not Linear modules."""

from pathlib import Path

import pytest
import torch
from helpers import make_datum

from tinkerd import AdamParams, SamplingParams
from tinkerd.engine.adapters import lora_targets
from tinkerd.engine.engine import Engine
from tinkerd.engine.fast_decode import FastDecoder, unsupported_reason
from tinkerd.engine.lora import BASE_ADAPTER, route_rows, segments
from tinkerd.engine.models import BaseModel
from tinkerd.engine.tiny import VOCAB_SIZE, build_tokenizer
from tinkerd.errors import InvalidRequestError
from tinkerd.types import LoraConfig

ADAM = AdamParams(learning_rate=1e-2)
EXPERT_PARAMS = {
    f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")
}


def write_tiny_moe(out: Path, arch: str) -> None:
    """A 2-layer MoE (hidden 64, 4 experts, top-2) from seed 0 with the byte tokenizer:
    `qwen3_moe` (experts `[E, out, in]`) or `gpt_oss` (experts `[E, in, out]`, biases)."""
    from transformers import GptOssConfig, GptOssForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = build_tokenizer()
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if arch == "qwen3_moe":
            config = Qwen3MoeConfig(
                **common, intermediate_size=128, moe_intermediate_size=32, num_experts=4
            )
            model = Qwen3MoeForCausalLM(config)
        else:
            config = GptOssConfig(
                **common,
                intermediate_size=32,
                num_local_experts=4,
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=8,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            )
            model = GptOssForCausalLM(config)
        with torch.no_grad():  # routers that spread tokens over all experts
            for layer in model.model.layers:
                router = layer.mlp.gate if arch == "qwen3_moe" else layer.mlp.router
                router.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module", params=["qwen3_moe", "gpt_oss"])
def moe(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    write_tiny_moe(path, request.param)
    engine = Engine(extra_models=[str(path)], data_dir=tmp_path_factory.mktemp("data"))
    return engine, str(path)


def data(k: int, step: int):
    texts = [f"run {k} step {step} " + "moe" * (k + 1), "experts " * (step + 1)][: 1 + k % 2]
    return [make_datum([256, *t.encode()]) for t in texts]


def expert_deltas(base: BaseModel, model_id: str) -> dict[str, torch.Tensor]:
    """Each expert stack's effective LoRA update under adapter `model_id` (zeros where
    the adapter does not adapt it), by the stack's name in the plain model."""
    from peft.tuners.lora.layer import ParamWrapper

    model = base.peft_model.base_model.model
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            param = module.get_param()
            key = name.replace(".base_layer", "") + "." + module.parameter_name
            with torch.no_grad():
                out[key] = (
                    module.get_delta_weight(model_id).float()
                    if model_id in module.lora_A
                    else torch.zeros(param.shape)
                )
    return out


def test_the_experts_are_found_as_mlp_parameters(moe):
    engine, name = moe
    base = engine.base_model(name)
    assert set(base.parameter_roles) == EXPERT_PARAMS
    assert set(base.parameter_roles.values()) == {"mlp"}
    assert not [n for n, r in base.linear_roles.items() if r == "mlp"]  # no MLP Linear at all
    _, params = lora_targets(base, LoraConfig(rank=4))
    assert set(params) == EXPERT_PARAMS
    assert lora_targets(base, LoraConfig(rank=4, train_mlp=False))[1] == []


def test_a_flag_with_nothing_to_adapt_is_refused():
    base = BaseModel("m", Path("."), torch.nn.Linear(1, 1), None, linear_roles={"q": "attn"})
    with pytest.raises(InvalidRequestError, match="train_mlp=True"):
        lora_targets(base, LoraConfig(rank=4))
    assert lora_targets(base, LoraConfig(rank=4, train_mlp=False, train_unembed=False)) == (
        ["q"],
        [],
    )


def test_a_step_updates_the_experts_only_with_train_mlp(moe):
    engine, name = moe
    with_mlp = engine.create_model(name, LoraConfig(rank=4, seed=1))
    without = engine.create_model(name, LoraConfig(rank=4, seed=2, train_mlp=False))
    base = engine.run(with_mlp).base
    for model_id in (with_mlp, without):
        assert all(not d.any() for d in expert_deltas(base, model_id).values())  # B = 0
        engine.forward_backward(model_id, data(0, 0))
        engine.optim_step(model_id, ADAM)
    moved = expert_deltas(base, with_mlp)
    assert set(moved) == EXPERT_PARAMS
    assert all(d.abs().max() > 1e-4 for d in moved.values())
    assert all(not d.any() for d in expert_deltas(base, without).values())
    names = engine.run(without).adapter_state()
    assert names and not [n for n in names if "experts" in n]
    for model_id in (with_mlp, without):
        engine.unload_model(model_id)


def test_each_row_gets_what_its_adapter_alone_gives(moe):
    engine, name = moe
    a = engine.create_model(name, LoraConfig(rank=4, seed=1))
    b = engine.create_model(name, LoraConfig(rank=8, seed=2))
    c = engine.create_model(name, LoraConfig(rank=4, seed=3, train_mlp=False))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model_id in (a, b, c):
            for p in engine.run(model_id).params:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    base = engine.base_model(name)
    rows = [a, BASE_ADAPTER, b, a, c, b]
    ids = torch.randint(0, 300, (len(rows), 7), generator=torch.Generator().manual_seed(1))
    model, peft_model = base.peft_model.base_model.model, base.peft_model
    with base.lock, torch.no_grad():
        with route_rows(peft_model, segments(rows)):
            routed = model(input_ids=ids).logits
        alone = {}
        for adapter in (a, b, c):
            peft_model.set_adapter(adapter)
            alone[adapter] = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            alone[BASE_ADAPTER] = peft_model(input_ids=ids).logits
    for i, adapter in enumerate(rows):
        assert torch.allclose(routed[i], alone[adapter][i], atol=1e-5), (i, adapter)
        others = [n for n in alone if n != adapter]
        assert all(not torch.allclose(routed[i], alone[n][i], atol=1e-3) for n in others)
    for model_id in (a, b, c):
        engine.unload_model(model_id)


def test_runs_trained_together_end_as_trained_alone(moe):
    engine, name = moe
    configs = [
        LoraConfig(rank=4, seed=7),
        LoraConfig(rank=8, seed=8),
        LoraConfig(rank=4, seed=9, train_mlp=False),
    ]
    alone = [engine.create_model(name, c) for c in configs]
    together = [engine.create_model(name, c) for c in configs]
    for step in range(2):
        outs_alone = [engine.forward_backward(m, data(k, step)) for k, m in enumerate(alone)]
        requests = [
            engine.prepare(m, data(k, step), "cross_entropy", None) for k, m in enumerate(together)
        ]
        outs_together = engine.run_losses(requests, backward=True)
        for x, y in zip(outs_alone, outs_together):
            assert y.metrics["loss:sum"] == pytest.approx(x.metrics["loss:sum"], rel=1e-5)
            for u, v in zip(x.loss_fn_outputs, y.loss_fn_outputs):
                assert torch.allclose(u["logprobs"].to_torch(), v["logprobs"].to_torch(), atol=1e-5)
        for m_alone, m_together in zip(alone, together):
            engine.optim_step(m_alone, ADAM)
            engine.optim_step(m_together, ADAM)
    for m_alone, m_together in zip(alone, together):
        x, y = (
            {n.replace(m, "*"): p for n, p in engine.run(m).adapter_state().items()}
            for m in (m_alone, m_together)
        )
        assert x.keys() == y.keys()
        for key in x:
            assert torch.allclose(x[key], y[key], atol=1e-5), key
    experts_b = [k for k in x if "experts" in k and "lora_B" in k]
    assert not experts_b  # the last pair is the train_mlp=False one
    first = engine.run(together[0]).adapter_state()
    assert any(p.any() for n, p in first.items() if "experts" in n and "lora_B" in n)
    for m in alone + together:
        engine.unload_model(m)


def test_the_sampler_uses_the_trained_experts(moe):
    engine, name = moe
    base = engine.base_model(name)
    assert FastDecoder.build(base.model) is None  # Llama only: MoE decodes via HF
    assert base.model.config.model_type in unsupported_reason(base.model)
    model_id = engine.create_model(name, LoraConfig(rank=4, seed=3))
    for step in range(3):
        engine.forward_backward(model_id, data(1, step))
        engine.optim_step(model_id, ADAM)
    assert any(d.abs().max() > 1e-4 for d in expert_deltas(base, model_id).values())
    weights = engine.save_weights_for_sampler(model_id)
    prompt = [256, *b"experts "]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=5)
    result = engine.sample(weights, prompt, 2, params).result(timeout=120)
    for seq in result.sequences:
        tokens = [*prompt, *seq.tokens]
        out = engine.forward(model_id, [make_datum(tokens)])
        expected = out.loss_fn_outputs[0]["logprobs"].to_torch()[len(prompt) - 1 :]
        assert torch.allclose(torch.tensor(seq.logprobs), expected, atol=1e-4)
    # ... and not the base's, nor an untrained MLP's
    other = engine.create_model(name, LoraConfig(rank=4, seed=3))
    out = engine.forward(other, [make_datum([*prompt, *result.sequences[0].tokens])])
    untrained = out.loss_fn_outputs[0]["logprobs"].to_torch()[len(prompt) - 1 :]
    assert not torch.allclose(torch.tensor(result.sequences[0].logprobs), untrained, atol=1e-3)
    for m in (model_id, other):
        engine.unload_model(m)


def test_checkpoint_round_trip_and_merged_export(moe, tmp_path):
    from transformers import AutoModelForCausalLM

    from tinkerd.engine.checkpoints import export_merged

    engine, name = moe
    model_id = engine.create_model(name, LoraConfig(rank=4, seed=4))
    for step in range(2):
        engine.forward_backward(model_id, data(0, step))
        engine.optim_step(model_id, ADAM)
    info = engine.save_state(model_id, "trained")
    copy = engine.create_model_from_state(info.tinker_path, with_optimizer=True)
    state, loaded = engine.run(model_id).adapter_state(), engine.run(copy).adapter_state()
    assert {n.replace(model_id, "*") for n in state} == {n.replace(copy, "*") for n in loaded}
    assert any("experts" in n for n in state)
    for n, p in state.items():
        assert torch.equal(p, loaded[n.replace(model_id, copy)]), n
    batch = data(1, 0)
    lp = [
        engine.forward(m, batch).loss_fn_outputs[0]["logprobs"].to_torch() for m in (model_id, copy)
    ]
    assert torch.equal(lp[0], lp[1])

    base = engine.base_model(name)
    out = tmp_path / "merged"
    export_merged(name, info, out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    deltas = expert_deltas(base, model_id)
    merged_params = dict(merged.named_parameters())
    for key, delta in deltas.items():
        module, param = key.rsplit(".", 1)
        experts = base.peft_model.base_model.model.get_submodule(module).get_base_layer()
        original = getattr(experts, param)  # the base's own weight, never merged into
        assert torch.allclose(merged_params[key], original + delta, atol=1e-6), key
        assert delta.abs().max() > 1e-4
    ids = torch.tensor([batch[0].model_input.to_ints()])
    with torch.no_grad():
        logits = merged(input_ids=ids).logits[0].log_softmax(-1)
    targets = batch[0].loss_fn_inputs["target_tokens"].to_torch()
    expected = logits[torch.arange(len(targets)), targets]
    assert torch.allclose(lp[0], expected, atol=1e-4)
    for m in (model_id, copy):
        engine.unload_model(m)


def test_the_vllm_backend_refuses_expert_lora(moe):
    from tinkerd.engine.vllm_sampler import check_adapter

    engine, name = moe
    experts = engine.create_model(name, LoraConfig(rank=4, seed=5))
    dense = engine.create_model(name, LoraConfig(rank=4, seed=5, train_mlp=False))
    base = engine.base_model(name)
    with pytest.raises(InvalidRequestError, match="fused expert weights"):
        check_adapter(base, experts)
    check_adapter(base, dense)  # attention and lm_head only: vLLM applies it in full
    check_adapter(base, BASE_ADAPTER)
    for m in (experts, dense):
        engine.unload_model(m)

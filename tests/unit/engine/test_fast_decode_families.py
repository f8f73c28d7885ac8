"""The fast decode path beyond tinkerd/tiny: on tiny random Llama (with biases), Qwen2,
Qwen3, Mistral and Gemma 1-3 models, the sampler's logprobs (decoded by `FastDecoder`,
not the HF forward) equal the trainer's for the same tokens, on the bare base and through
LoRA adapters in one batch.

Each config turns on what its family does differently, at sizes where it matters: a
sliding window (6 tokens) shorter than the sequences, Llama's and Qwen2's biases, Qwen3's
and Gemma 3's q/k norms, Gemma's (1 + w) norms, sandwich norms, scaled and tied
embeddings, GELU-tanh, query_pre_attn_scalar, Gemma 2's attention and logit soft-capping
(small caps, so that tanh bends), Gemma 3's local and global rotary bases."""

import concurrent.futures

import pytest
import torch
from helpers import make_datum

from tinkerd.engine.engine import Engine
from tinkerd.engine.fast_decode import FastDecoder, unsupported_reason
from tinkerd.engine.tiny import write_tiny_family
from tinkerd.types import LoraConfig, SamplingParams

WINDOW = 6
GEMMA = dict(tie_word_embeddings=True, query_pre_attn_scalar=24, sliding_window=WINDOW)
CONFIGS = {
    "llama": dict(attention_bias=True, mlp_bias=True),  # tinkerd/tiny has none
    # layers 2 and 3 slide (Qwen2 slides from max_window_layers on)
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "qwen3": dict(rms_norm_eps=1e-6),
    "mistral": dict(sliding_window=WINDOW),
    "gemma": dict(tie_word_embeddings=True),
    "gemma2": dict(**GEMMA, attn_logit_softcapping=0.5, final_logit_softcapping=2.0),
    "gemma3_text": dict(
        **GEMMA,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        final_logit_softcapping=2.0,
    ),
}
PROMPTS = [[256, *b"a longer prompt"], [256, 7], [256, *b"mid len"]]


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tmp_path_factory):
    """(engine, model name, model_type) of a tiny random model of the family, weights spread wider
    than their init (std 0.05), biases and norm weights random too (init makes them
    constant), so that each part shapes the output."""
    path = tmp_path_factory.mktemp(request.param)
    write_tiny_family(path, request.param, initializer_range=0.05, **CONFIGS[request.param])
    engine = Engine(extra_models=[str(path)], data_dir=tmp_path_factory.mktemp("data"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in engine.base_model(str(path)).model.named_parameters():
            if key.endswith("bias") or "norm" in key:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return engine, str(path), request.param


def trainer_logprobs(engine: Engine, model_id: str, prompt: list[int], tokens: list[int]):
    out = engine.forward(model_id, [make_datum(prompt + tokens)])
    return out.loss_fn_outputs[0]["logprobs"].to_torch()[len(prompt) - 1 :]


def check_against_the_trainer(engine: Engine, name: str) -> int:
    """Concurrent requests on two adapters with nonzero B (one with train_unembed) and on
    the bare base, prompts of 2-16 tokens, 20 new tokens each: every logprob is the
    trainer's for that token within 1e-4 (fp32). Returns how many steps `FastDecoder` ran."""
    gen = torch.Generator().manual_seed(0)
    runs = []
    for seed, unembed in [(1, False), (2, True)]:
        run = engine.create_model(name, LoraConfig(rank=4, seed=seed, train_unembed=unembed))
        with torch.no_grad():
            for p in engine.run(run).params:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        runs.append(run)
    plain = engine.create_model(name, LoraConfig(rank=4, seed=3))  # B = 0: the base
    weights = [engine.save_weights_for_sampler(r) for r in runs]
    weights.append(engine.sampler_for(base_model=name))
    owners = [*runs, plain]
    asks = [(w, o, p, i) for i, p in enumerate(PROMPTS) for w, o in zip(weights, owners)]
    steps = []
    step = FastDecoder.step

    def sample_all():
        futures = [
            engine.sample(w, p, 1, SamplingParams(max_tokens=20, stop=[], seed=i))
            for w, _, p, i in asks
        ]
        return [f.result(timeout=120).sequences[0] for f in futures]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FastDecoder, "step", lambda self, *a: steps.append(1) or step(self, *a))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # one thread runs torch ops
            sequences = pool.submit(sample_all).result()
    for (_, owner, prompt, _), seq in zip(asks, sequences):
        expected = trainer_logprobs(engine, owner, prompt, seq.tokens)
        torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=1e-4, rtol=0)
    # the adapters mattered: the same prompt and seed gave another sequence on the base
    assert sequences[0].tokens != sequences[2].tokens
    return len(steps)


def test_sampler_logprobs_equal_the_trainers_on_the_fast_path(family, monkeypatch):
    """The fast path's logprobs are the trainer's. Where the family slides a window, a
    batch the fast path cannot take (as with a DoRA adapter) also decodes right through
    the HF forward on the cache the fast path made (every token's keys, windows as masks)."""
    engine, name, model_type = family
    assert unsupported_reason(engine.base_model(name).model) is None
    assert check_against_the_trainer(engine, name) >= 19  # every step after the first
    if "sliding_window" in CONFIGS[model_type]:
        monkeypatch.setattr(FastDecoder, "plan", lambda self, *args: None)
        assert check_against_the_trainer(engine, name) == 0


def test_families_the_fast_path_leaves_to_the_hf_forward():
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert "gpt2" in unsupported_reason(gpt2) and FastDecoder.build(gpt2) is None
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, vocab_size=64)
    small.update(num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    scaling = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    dynamic = LlamaForCausalLM(LlamaConfig(**small, rope_parameters=scaling))
    assert "dynamic" in unsupported_reason(dynamic)
    both_ways = Gemma3ForCausalLM(Gemma3TextConfig(**small, use_bidirectional_attention=True))
    assert "bidirectional" in unsupported_reason(both_ways)
    assert unsupported_reason(LlamaForCausalLM(LlamaConfig(**small, attention_bias=True))) is None

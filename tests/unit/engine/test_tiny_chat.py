"""`tinkerd/tiny-chat`: Llama 3's special tokens and chat template on the tiny model, made
deterministically; served under another name with `--model NAME=SOURCE`."""

from __future__ import annotations

import pytest

from tinkerd.engine.models import parse_model_specs
from tinkerd.engine.tiny_chat import (
    SPECIAL_TOKENS,
    TINY_CHAT_CONFIG,
    TINY_CHAT_MODEL_NAME,
    build_chat_tokenizer,
    tiny_chat_model_dir,
)

CONVO = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "\\boxed{5}"},
    {"role": "user", "content": "And 1 plus 1?"},
]


def test_special_tokens_are_single_ids_after_the_bytes():
    tok = build_chat_tokenizer()
    assert len(tok) == 256 + len(SPECIAL_TOKENS) <= TINY_CHAT_CONFIG["vocab_size"]
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.encode(special, add_special_tokens=False) == [256 + i]
        assert tok.decode([256 + i]) == special
    assert tok.bos_token == "<|begin_of_text|>" and tok.bos_token_id == 256
    assert tok.eos_token == "<|eot_id|>" and tok.eos_token_id == TINY_CHAT_CONFIG["eos_token_id"][1]
    assert tok.pad_token_id == TINY_CHAT_CONFIG["pad_token_id"]
    # Text stays byte-level: every byte is its own id, and decoding round-trips.
    text = "héllo <|not special|>"
    assert tok.encode(text, add_special_tokens=False) == list(text.encode())
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_template_is_llama3s_format():
    tok = build_chat_tokenizer()
    text = tok.apply_chat_template(CONVO, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n\\boxed{5}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 1 plus 1?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.apply_chat_template(CONVO, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids == tok.encode(text, add_special_tokens=False)
    no_prompt = tok.apply_chat_template(CONVO[:1], tokenize=False)
    assert not no_prompt.endswith("<|end_header_id|>\n\n")


def test_cookbook_llama3_renderer_matches_the_template():
    """The renderer a Llama 3 instruct name selects makes the template's exact tokens."""
    from tinker_cookbook import renderers

    tok = build_chat_tokenizer()
    renderer = renderers.get_renderer("llama3", tok)
    prompt = renderer.build_generation_prompt(CONVO)
    ids = tok.apply_chat_template(CONVO, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert prompt.to_ints() == list(ids)
    assert renderer.get_stop_sequences() == [tok.eos_token_id]
    message, _ = renderer.parse_response(tok.encode("\\boxed{2}<|eot_id|>"))
    assert message["content"] == "\\boxed{2}"


def test_made_deterministically_and_loads(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first, second = tiny_chat_model_dir(tmp_path / "a"), tiny_chat_model_dir(tmp_path / "b")
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (first / name).read_text() == (second / name).read_text()
    assert tiny_chat_model_dir(tmp_path / "a") == first  # made once, then reused

    tok = AutoTokenizer.from_pretrained(first)
    assert tok.apply_chat_template(
        CONVO, tokenize=False
    ) == build_chat_tokenizer().apply_chat_template(CONVO, tokenize=False)
    model = AutoModelForCausalLM.from_pretrained(first)
    assert model.config.vocab_size == TINY_CHAT_CONFIG["vocab_size"]
    assert model.generation_config.eos_token_id == TINY_CHAT_CONFIG["eos_token_id"]


def test_model_specs():
    assert parse_model_specs(None) == {}
    assert parse_model_specs(
        ["/models/x", "meta-llama/Llama-3.1-8B-Instruct=tinkerd/tiny-chat"]
    ) == {
        "/models/x": "/models/x",
        "meta-llama/Llama-3.1-8B-Instruct": TINY_CHAT_MODEL_NAME,
    }
    for bad in (["=x"], ["x="], ["tinkerd/tiny"], ["a=x", "a=y"]):
        with pytest.raises(ValueError, match="--model"):
            parse_model_specs(bad)


def test_engine_serves_tiny_chat_under_another_name(tmp_path):
    from tinkerd.engine import Engine
    from tinkerd.types import LoraConfig

    name = "meta-llama/Llama-3.1-8B-Instruct"
    engine = Engine(extra_models=[f"{name}={TINY_CHAT_MODEL_NAME}"], data_dir=tmp_path)
    names = [m.model_name for m in engine.get_server_capabilities().supported_models]
    assert names == ["tinkerd/tiny", name]
    model_id = engine.create_model(name, LoraConfig(rank=4))
    info = engine.get_info(model_id)
    assert info.model_data.model_name == name
    assert (tiny_chat_model_dir() / "tokenizer.json").samefile(
        f"{info.model_data.tokenizer_id}/tokenizer.json"
    )

"""The built-in model `tinkerd/tiny`: a small Llama with a byte-level tokenizer.

It is made from a fixed seed on first use and saved in Hugging Face format, then loaded
through the same `from_pretrained` path as any real model. No download is involved, so
everything in tinkerd runs on a laptop CPU with nothing but pip packages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

TINY_MODEL_NAME = "tinkerd/tiny"
TINY_VERSION = 1  # bump when the recipe below changes, so caches are rebuilt

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
NUM_BYTES = 256
VOCAB_SIZE = 320  # 256 bytes + 3 specials, rounded up to a multiple of 64

TINY_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=NUM_BYTES,
    eos_token_id=NUM_BYTES + 1,
    pad_token_id=NUM_BYTES + 2,
)


def default_cache_dir() -> Path:
    root = os.environ.get("TINKERD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tinkerd"
    )
    return Path(root)


def tiny_model_dir(cache_dir: Path | None = None) -> Path:
    """Directory holding `tinkerd/tiny`, created (atomically) if it is not there yet."""
    return cached_model_dir(f"tiny-v{TINY_VERSION}", _write_tiny_model, cache_dir)


def cached_model_dir(
    dirname: str, write: Callable[[Path], None], cache_dir: Path | None = None
) -> Path:
    """`cache_dir/dirname`, made by `write(tmp_dir)` and renamed into place on first use."""
    import fcntl

    target = (cache_dir or default_cache_dir()) / dirname
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Processes that start together (data-parallel ranks, test workers) build it once.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
            write(tmp)
            os.replace(tmp, target)
    return target


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_tokenizer():
    """A byte-level fast tokenizer: token id == byte value, plus bos/eos/pad."""
    return byte_level_tokenizer([BOS, EOS, PAD], bos_token=BOS, eos_token=EOS, pad_token=PAD)


def byte_level_tokenizer(special_tokens: list[str], **kwargs):
    """Token id == byte value (0..255); `special_tokens` get ids 256, 257, ... in order.

    `kwargs` go to `PreTrainedTokenizerFast` (bos_token=..., chat_template=..., ...).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_tokens)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=TINY_CONFIG["max_position_embeddings"], **kwargs
    )


def write_seeded_llama(out: Path, config: dict, tokenizer, name: str, version: int) -> None:
    """Save a Llama made from seed 0 with `config`, and `tokenizer`, in HF format to `out`."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**config))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tinkerd.json").write_text(json.dumps({"name": name, "version": version}))


def write_tiny_family(out: Path, model_type: str, **config) -> None:
    """tinkerd/tiny's sizes and byte tokenizer on another architecture (`model_type`:
    qwen3, gemma3_text, ...), random from seed 0, saved in HF format to `out`; `config`
    overrides config fields. For tests and benchmarks of architecture-specific code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**TINY_CONFIG, "head_dim": TINY_CONFIG["hidden_size"] // 8, **config}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)


def _write_tiny_model(out: Path) -> None:
    write_seeded_llama(out, TINY_CONFIG, build_tokenizer(), TINY_MODEL_NAME, TINY_VERSION)

"""The built-in chat model `tinkerd/tiny-chat`: `tinkerd/tiny` with a real chat format.

Chat tooling (the tinker-cookbook's renderers, `apply_chat_template`) expects what a
real instruct model has: a chat template and the special tokens it is written in. This
is the tiny Llama of `tiny.py` (same config, same seed-0 weights) whose tokenizer keeps
the byte-level vocabulary (ids 0..255) and adds Llama 3's special tokens and Llama 3's
chat format, so a Llama 3 renderer produces exactly the tokens the template does:

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

It is made locally on first use, like `tinkerd/tiny`; nothing is downloaded. A recipe
that picks its renderer by model name can use it under a Llama 3 instruct name:
`tinkerd serve --model meta-llama/Llama-3.1-8B-Instruct=tinkerd/tiny-chat`.
"""

from __future__ import annotations

from pathlib import Path

from tinkerd.engine.tiny import (
    NUM_BYTES,
    TINY_CONFIG,
    byte_level_tokenizer,
    cached_model_dir,
    write_seeded_llama,
)

TINY_CHAT_MODEL_NAME = "tinkerd/tiny-chat"
TINY_CHAT_VERSION = 1  # bump when the recipe below changes, so caches are rebuilt

# Llama 3's special tokens, in the order they take ids 256, 257, ...
BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = [BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT, PAD]

# Llama 3's format: bos once, then a header and the trimmed content per message; the
# generation prompt opens an assistant header.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

_ids = {tok: NUM_BYTES + i for i, tok in enumerate(SPECIAL_TOKENS)}
TINY_CHAT_CONFIG = dict(
    TINY_CONFIG,
    bos_token_id=_ids[BEGIN_OF_TEXT],
    eos_token_id=[_ids[END_OF_TEXT], _ids[EOT]],  # a turn ends a generation, as in Llama 3
    pad_token_id=_ids[PAD],
)


def build_chat_tokenizer():
    """The byte-level tokenizer with Llama 3's special tokens and chat template."""
    return byte_level_tokenizer(
        SPECIAL_TOKENS,
        bos_token=BEGIN_OF_TEXT,
        eos_token=EOT,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_chat_model_dir(cache_dir: Path | None = None) -> Path:
    """Directory holding `tinkerd/tiny-chat`, created (atomically) if it is not there yet."""
    return cached_model_dir(f"tiny-chat-v{TINY_CHAT_VERSION}", _write, cache_dir)


def _write(out: Path) -> None:
    write_seeded_llama(
        out, TINY_CHAT_CONFIG, build_chat_tokenizer(), TINY_CHAT_MODEL_NAME, TINY_CHAT_VERSION
    )

"""The built-in vision-language model `tinkerd/tiny-vl`: a small random Qwen3-VL.

A Qwen3-VL (transformers' `Qwen3VLForConditionalGeneration`: a ViT vision tower whose
merged patches are written into the language model's input at `<|image_pad|>`
positions, 3-D multimodal RoPE) shrunk to a few hundred thousand parameters, made from
seed 0 on first use and saved in Hugging Face format with its processor: the byte-level
tokenizer of `tinkerd/tiny` (ids 0..255 are bytes) plus Qwen's chat and vision special
tokens, and Qwen2-VL's image processor (the PIL one: torchvision is not needed) set for
small images: 8-pixel patches merged 2x2, so one image token covers 16x16 pixels, and
images are resized to at most 64x64 pixels (16 image tokens). Nothing is downloaded.

The chat format is Qwen's (`<|im_start|>user\\n...<|im_end|>\\n`), an image written as
`<|vision_start|>` + its image tokens + `<|vision_end|>`, as tinker-cookbook's Qwen3-VL
renderer lays it out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tinkerd.engine.tiny import NUM_BYTES, byte_level_tokenizer, cached_model_dir

TINY_VL_MODEL_NAME = "tinkerd/tiny-vl"
TINY_VL_VERSION = 1  # bump when the recipe below changes, so caches are rebuilt

# Qwen's special tokens, in the order they take ids 256, 257, ...
END_OF_TEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
_ids = {tok: NUM_BYTES + i for i, tok in enumerate(SPECIAL_TOKENS)}

# Qwen's chat format; an image content part becomes vision_start + image_pad + vision_end
# (the processor expands the one image_pad to the image's token count).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 8, 2, 2
MIN_PIXELS, MAX_PIXELS = 16 * 16, 64 * 64

TEXT_CONFIG = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
    bos_token_id=_ids[END_OF_TEXT],
    eos_token_id=_ids[IM_END],
    pad_token_id=_ids[END_OF_TEXT],
)
VISION_CONFIG = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=PATCH_SIZE,
    spatial_merge_size=MERGE_SIZE,
    temporal_patch_size=TEMPORAL_PATCH_SIZE,
    out_hidden_size=64,
    num_position_embeddings=64,  # an 8x8 grid of learned positions, interpolated
    deepstack_visual_indexes=[0],
)
TINY_VL_CONFIG = dict(
    text_config=TEXT_CONFIG,
    vision_config=VISION_CONFIG,
    image_token_id=_ids[IMAGE_PAD],
    video_token_id=_ids[VIDEO_PAD],
    vision_start_token_id=_ids[VISION_START],
    vision_end_token_id=_ids[VISION_END],
    tie_word_embeddings=False,
)


def build_vl_tokenizer():
    """The byte-level tokenizer with Qwen's chat and vision tokens and chat template."""
    return byte_level_tokenizer(
        SPECIAL_TOKENS,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={
            "image_token": IMAGE_PAD,
            "video_token": VIDEO_PAD,
            "vision_bos_token": VISION_START,
            "vision_eos_token": VISION_END,
        },
    )


def build_image_processor():
    """Qwen2-VL's image processor (PIL backend), set for this model's small patches."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )


def tiny_vl_model_dir(cache_dir: Path | None = None) -> Path:
    """Directory holding `tinkerd/tiny-vl`, created (atomically) if it is not there yet."""
    return cached_model_dir(f"tiny-vl-v{TINY_VL_VERSION}", _write, cache_dir)


def _write(out: Path) -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**TINY_VL_CONFIG))
    model.generation_config.eos_token_id = [_ids[IM_END], _ids[END_OF_TEXT]]
    model.save_pretrained(out)
    build_vl_tokenizer().save_pretrained(out)
    build_image_processor().save_pretrained(out)
    meta = {"name": TINY_VL_MODEL_NAME, "version": TINY_VL_VERSION}
    (out / "tinkerd.json").write_text(json.dumps(meta))

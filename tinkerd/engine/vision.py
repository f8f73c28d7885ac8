"""Images in: what a vision-language base model (Qwen2.5-VL, Qwen3-VL) needs besides
token ids, and the checks on image chunks.

A model input's image chunk becomes `n` copies of the model's image token, where `n` is
what the model's own image processor makes of the image (`grid_t * grid_h * grid_w /
merge_size**2` merged patches): the chunk occupies those `n` positions, as in Tinker,
and its `expected_tokens`, when given, must equal `n` (else the request is refused,
naming the chunk). The language model reads the vision tower's output at those
positions; targets and weights there are ordinary positions (a recipe gives them weight
0). A forward then takes, besides `input_ids`:
- `pixel_values` `[patches, channels * temporal_patch * patch**2]`, every image's patches
  in row order, and `image_grid_thw` `[images, 3]`;
- `position_ids` `[4, rows, seq]`: the text position of each token, then the three
  multimodal RoPE coordinates (time, height, width; an image's tokens lie on a grid, the
  text after it resumes past the grid's larger side). tinkerd computes them itself, so
  the same numbers serve a training forward, a sampler's prefill (left-padded) and its
  decode steps (text position + the row's `delta`), with no state in the model.

Images by location (`ImageAssetPointerChunk`) are read only from the directory named by
$TINKERD_IMAGE_DIR (`tinkerd serve --image-dir`), never fetched over the network.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tinkerd.errors import InvalidRequestError
from tinkerd.types import ImageAssetPointerChunk, ImageChunk, ModelInput

IMAGE_DIR_ENV = "TINKERD_IMAGE_DIR"
MAX_IMAGE_PIXELS = 50_000_000
"""Largest decoded image (width x height) taken; a bigger one (or a decompression bomb) is
refused before its pixels are decoded."""


@dataclass
class Vision:
    """What a vision-language base model reads images with."""

    processor: object
    """The model's image processor (transformers', PIL backend)."""
    image_token_id: int
    video_token_id: int | None
    merge_size: int
    """Patches merged per side into one image token."""


@dataclass
class Image:
    """One image, processed: `pixel_values` `[patches, patch_dim]`, `grid_thw` `[3]`
    (in patches), `tokens` = the positions it occupies."""

    pixel_values: Tensor
    grid_thw: Tensor
    tokens: int


def is_vision_config(config: object) -> bool:
    """Whether a transformers config is of a model that takes images."""
    return getattr(config, "vision_config", None) is not None and hasattr(config, "image_token_id")


def auto_model_class(path: Path | str) -> type:
    """The transformers Auto class that loads the model at `path`: image-text-to-text for
    a vision-language model (Qwen2.5-VL, Qwen3-VL are no causal-LM classes), else causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    vlm = is_vision_config(AutoConfig.from_pretrained(path))
    return AutoModelForImageTextToText if vlm else AutoModelForCausalLM


def load_vision(model: torch.nn.Module, path: Path | str) -> Vision | None:
    """The Vision of a loaded model (None for a text-only model)."""
    config = model.config
    if not is_vision_config(config):
        return None
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    return Vision(
        processor=processor,
        image_token_id=int(config.image_token_id),
        video_token_id=getattr(config, "video_token_id", None),
        merge_size=int(config.vision_config.spatial_merge_size),
    )


def language_linears(roles: dict[str, str]) -> dict[str, str]:
    """The Linear roles of a vision-language model less its vision tower's (and the
    patch merger's): LoRA adapts the language model (and its unembedding) only."""
    return {name: role for name, role in roles.items() if ".visual." not in f".{name}."}


# ---------------------------------------------------------------- image chunks


def read_image(chunk: ImageChunk | ImageAssetPointerChunk, vision: Vision, where: str) -> Image:
    """Decode and preprocess one image chunk; InvalidRequestError naming `where` (e.g.
    `data[0].model_input.chunks[1]`) if it is not a readable image of its `format`, or its
    `expected_tokens` differ from the processor's count."""
    from PIL import Image as PILImage

    data = chunk.data if isinstance(chunk, ImageChunk) else _asset_bytes(chunk, where)
    try:
        image = PILImage.open(io.BytesIO(data))  # reads the header only
    except Exception as e:  # noqa: BLE001 -- whatever the decoder raises, the bytes are bad
        raise InvalidRequestError(
            f"{where}: data is not a readable {chunk.format} image: {e}"
        ) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidRequestError(
            f"{where}: image is {width}x{height}, over {MAX_IMAGE_PIXELS} pixels"
        )
    found = (image.format or "").lower()
    if found != chunk.format:
        raise InvalidRequestError(f"{where}: format is {chunk.format!r} but the data is {found}")
    try:
        out = vision.processor(images=[image.convert("RGB")], return_tensors="pt")
    except Exception as e:  # noqa: BLE001 -- truncated data, an odd shape: the image is bad
        raise InvalidRequestError(f"{where}: image cannot be read or processed: {e}") from None
    grid = out["image_grid_thw"][0]
    tokens = int(grid.prod()) // vision.merge_size**2
    if chunk.expected_tokens is not None and chunk.expected_tokens != tokens:
        raise InvalidRequestError(
            f"{where}: expected_tokens is {chunk.expected_tokens}, but this model's processor "
            f"makes {tokens} image tokens of this {width}x{height} image"
        )
    return Image(out["pixel_values"], grid, tokens)


def _asset_bytes(chunk: ImageAssetPointerChunk, where: str) -> bytes:
    """The file an asset pointer names, if it is inside $TINKERD_IMAGE_DIR."""
    location = chunk.location
    if location.startswith("file://"):
        location = location[len("file://") :]
    elif "://" in location:
        raise InvalidRequestError(
            f"{where}: location {chunk.location!r}: only file:// locations under the server's "
            "image directory are read (no network fetches)"
        )
    root = os.environ.get(IMAGE_DIR_ENV)
    if not root:
        raise InvalidRequestError(
            f"{where}: location: images by location need the server's image directory "
            "(tinkerd serve --image-dir); send the image's bytes in an ImageChunk instead"
        )
    base = Path(root).resolve()
    path = (base / location).resolve()  # an absolute location stays itself
    if not path.is_relative_to(base) or not path.is_file():
        raise InvalidRequestError(
            f"{where}: location {chunk.location!r} is not a file in the server's image directory"
        )
    return path.read_bytes()


def expand(
    model_input: ModelInput, vision: Vision | None, base_name: str, where: str
) -> tuple[list[int], list[Image]]:
    """(token ids with each image's positions holding the image token, the images in
    order). InvalidRequestError if there are images and the model takes none, or a text
    token is the image (or video) token, which only an image chunk may stand for."""
    tokens: list[int] = []
    images: list[Image] = []
    reserved = {vision.image_token_id, vision.video_token_id} if vision else set()
    for j, chunk in enumerate(model_input.chunks):
        at = f"{where}model_input.chunks[{j}]"
        if chunk.type == "encoded_text":
            if reserved.intersection(chunk.tokens):
                raise InvalidRequestError(
                    f"{at}: token id {sorted(reserved.intersection(chunk.tokens))[0]} is "
                    "this model's image (or video) token: give the image as an image chunk"
                )
            tokens.extend(chunk.tokens)
            continue
        if vision is None:
            raise InvalidRequestError(
                f"{at}: {base_name} does not take images (not a vision-language model)"
            )
        image = read_image(chunk, vision, at)
        chunk.expected_tokens = image.tokens  # now known: later counts (metrics) see it
        images.append(image)
        tokens.extend([vision.image_token_id] * image.tokens)
    return tokens, images


# ---------------------------------------------------------------- forward inputs


def rope_positions(
    input_ids: Tensor, images: list[list[Image]], mask: Tensor | None, vision: Vision
) -> tuple[Tensor, Tensor]:
    """(`position_ids` `[4, rows, seq]`, `delta` `[rows]`) of rows `input_ids`
    `[rows, seq]` whose images are `images[row]`; `mask` `[rows, seq]` (None: all real)
    marks real tokens (padding gets position 0). Row 0 of position_ids is each token's
    text position; rows 1-3 the multimodal RoPE (time, height, width) coordinates, as
    Qwen's `get_rope_index`; a text token at text position p past the last image has
    coordinates p + delta."""
    rows, seq = input_ids.shape
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    positions = torch.zeros(4, rows, seq, dtype=torch.long)
    delta = torch.zeros(rows, dtype=torch.long)
    m = vision.merge_size
    for r in range(rows):
        ids = input_ids[r][real[r].cpu()].tolist()
        coords, cur, i, queue = [], 0, 0, list(images[r])
        while i < len(ids):
            if ids[i] == vision.image_token_id and queue:
                image = queue.pop(0)
                _, h, w = (int(x) for x in image.grid_thw)
                h, w = h // m, w // m
                hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                grid = torch.stack(
                    [torch.zeros(h * w, dtype=torch.long), hh.flatten(), ww.flatten()]
                )
                coords.append(grid + cur)
                cur, i = cur + max(h, w), i + image.tokens
            else:
                start = i
                while i < len(ids) and not (ids[i] == vision.image_token_id and queue):
                    i += 1
                coords.append(torch.arange(cur, cur + i - start).expand(3, -1))
                cur += i - start
        coords = torch.cat(coords, 1) if coords else torch.zeros(3, 0, dtype=torch.long)
        where = real[r].cpu()
        positions[0, r, where] = torch.arange(len(ids))
        positions[1:, r, where] = coords
        delta[r] = cur - len(ids)
    return positions, delta


def forward_inputs(
    vision: Vision | None,
    input_ids: Tensor,
    images: list[list[Image]],
    mask: Tensor | None = None,
) -> tuple[dict, Tensor | None]:
    """(extra forward kwargs, each row's RoPE delta `[rows]`) for rows `input_ids` with
    images `images[row]`; ({}, None) when no row has an image (the model's own text
    positions are then the same)."""
    if vision is None or not any(images):
        return {}, None
    device = input_ids.device
    positions, delta = rope_positions(
        input_ids.cpu(), images, None if mask is None else mask.cpu(), vision
    )
    flat = [image for row in images for image in row]
    kwargs = dict(
        pixel_values=torch.cat([image.pixel_values for image in flat]).to(device),
        image_grid_thw=torch.stack([image.grid_thw for image in flat]).to(device),
        position_ids=positions.to(device),
    )
    return kwargs, delta


def decode_positions(positions: Tensor, delta: Tensor) -> Tensor:
    """`position_ids` `[4, rows, 1]` of one decode step: text positions `positions`
    `[rows, 1]`, RoPE coordinates those plus each row's `delta` `[rows]`."""
    shifted = positions + delta.to(positions.device)[:, None]
    return torch.stack([positions, shifted, shifted, shifted])

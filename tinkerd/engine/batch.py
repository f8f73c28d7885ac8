"""Turn a list of Datum into padded model inputs and flat per-token loss inputs.

Everything a request could get wrong is checked here, before any compute, so a bad
request fails whole with a message naming the datum and field, and never leaves a
partial gradient behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tinkerd.engine.vision import Image, Vision, expand
from tinkerd.errors import InvalidRequestError
from tinkerd.losses import LossSpec, datum_index
from tinkerd.types import Datum

DEFAULT_MAX_BATCH_TOKENS = 1 << 20
"""Most padded tokens (data x longest datum) in one request, unless the engine's config
(`EngineConfig.max_batch_tokens`, `serve --max-batch-tokens`) says otherwise."""


@dataclass
class Batch:
    input_ids: Tensor
    """`[batch, max_len]`, right-padded (causal attention never looks right, so real
    positions see exactly what they would unpadded)."""
    mask: Tensor
    """`[batch, max_len]` bool, True at real positions."""
    lengths: list[int]
    targets: Tensor
    """`[n_tokens]` or `[n_tokens, k]`: every datum's target_tokens laid end to end."""
    inputs: dict[str, Tensor]
    """Other loss_fn_inputs, each laid end to end like `targets`."""
    images: list[list[Image]] = field(default_factory=list)
    """Each row's images, in order (`tinkerd.engine.vision`); empty lists for text."""

    def rows(self, start: int, end: int) -> Batch:
        """Data `[start, end)` alone: their rows, trimmed to the longest of them, and
        their tokens' targets and inputs."""
        first = sum(self.lengths[:start])
        last = first + sum(self.lengths[start:end])
        width = max(self.lengths[start:end])
        return Batch(
            input_ids=self.input_ids[start:end, :width],
            mask=self.mask[start:end, :width],
            lengths=self.lengths[start:end],
            targets=self.targets[first:last],
            inputs={k: v[first:last] for k, v in self.inputs.items()},
            images=self.images[start:end],
        )


def _fail(i: int, what: str) -> InvalidRequestError:
    return InvalidRequestError(f"data[{i}]: {what}")


def collate(
    data: list[Datum],
    loss: LossSpec | None,
    loss_name: str,
    vocab_size: int,
    max_len: int,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    vision: Vision | None = None,
    base_name: str = "this model",
) -> Batch:
    """Inputs a loss does not read are ignored (a datum may carry keys for several losses,
    as the SDK's own examples do); `loss=None` is a custom loss, which reads none.
    `max_len`: the model's context, in tokens; `max_batch_tokens`: the most padded
    tokens (data x longest datum) a request may have. `vision`: a vision-language model's
    (image chunks are refused without one)."""
    if not data:
        raise InvalidRequestError("data is empty: pass at least one Datum")
    required = set(loss.required) if loss else set()
    read = required | set(loss.optional if loss else ())
    tokens_per_datum, targets, inputs = [], [], {k: [] for k in read}
    images: list[list[Image]] = []
    width = None
    for i, datum in enumerate(data):
        tokens, row_images = expand(datum.model_input, vision, base_name, f"data[{i}].")
        images.append(row_images)
        n = len(tokens)
        if n == 0:
            raise _fail(i, "model_input is empty")
        if n > max_len:
            raise _fail(i, f"model_input has {n} tokens; this model's limit is {max_len}")
        if min(tokens) < 0 or max(tokens) >= vocab_size:
            bad = next(t for t in tokens if not 0 <= t < vocab_size)
            raise _fail(
                i, f"model_input token id {bad} is outside the vocabulary [0, {vocab_size})"
            )
        given = set(datum.loss_fn_inputs)
        if missing := ({"target_tokens", *required} - given):
            raise _fail(i, f"{loss_name} needs loss_fn_inputs {sorted(missing)}")
        target = _tensor(datum, i, "target_tokens", "int64")
        if target.ndim == 2 and loss_name in ("cross_entropy", "custom"):
            width = width or target.shape[1]
            if target.shape[1] != width:
                raise _fail(i, "2-D target_tokens must have the same width in every datum")
        elif target.ndim != 1:
            raise _fail(i, f"target_tokens must be [seq_len], got shape {list(target.shape)}")
        if target.shape[0] != n:
            raise _fail(
                i, f"target_tokens has length {target.shape[0]} but model_input has {n} tokens"
            )
        if (width is None) != (target.ndim == 1):
            raise _fail(i, "target_tokens must be all 1-D or all 2-D across the batch")
        if target.numel() and (target.min() < 0 or target.max() >= vocab_size):
            raise _fail(i, f"target_tokens has ids outside the vocabulary [0, {vocab_size})")
        for key in inputs:
            if key not in datum.loss_fn_inputs:
                continue
            value = _tensor(datum, i, key, "float32")
            if value.shape != target.shape:
                raise _fail(
                    i,
                    f"loss_fn_inputs[{key!r}] has shape {list(value.shape)}, "
                    f"target_tokens has {list(target.shape)}",
                )
            if not torch.isfinite(value).all():
                raise _fail(i, f"loss_fn_inputs[{key!r}] contains NaN or inf")
            inputs[key].append(value)
        tokens_per_datum.append(tokens)
        targets.append(target)
    for key, parts in list(inputs.items()):
        if not parts:
            del inputs[key]
        elif len(parts) != len(data):
            raise InvalidRequestError(f"loss_fn_inputs[{key!r}] must be given for all data or none")
    lengths = [len(t) for t in tokens_per_datum]
    if len(data) * max(lengths) > max_batch_tokens:
        raise InvalidRequestError(
            f"batch too large: {len(data)} data x {max(lengths)} tokens is more than this "
            f"server's limit of {max_batch_tokens} padded tokens; split it"
        )
    input_ids = torch.zeros(len(data), max(lengths), dtype=torch.long)
    for row, tokens in enumerate(tokens_per_datum):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
    mask = torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]
    flat_inputs = {k: torch.cat(v) for k, v in inputs.items()}
    if loss is not None and loss.per_datum:  # e.g. gspo: a ratio per sequence
        flat_inputs["datum_index"] = datum_index(lengths)
    return Batch(
        input_ids=input_ids,
        mask=mask,
        lengths=lengths,
        targets=torch.cat(targets),
        inputs=flat_inputs,
        images=images,
    )


def _tensor(datum: Datum, i: int, key: str, dtype: str) -> Tensor:
    data = datum.loss_fn_inputs[key]
    if data.dtype != dtype and dtype == "int64":  # integer values are fine as floats
        raise _fail(i, f"loss_fn_inputs[{key!r}] must be {dtype}, got {data.dtype}")
    try:
        return data.to_torch().float() if dtype == "float32" else data.to_torch()
    except (ValueError, RuntimeError, IndexError) as e:
        raise _fail(i, f"loss_fn_inputs[{key!r}] is malformed: {e}") from None

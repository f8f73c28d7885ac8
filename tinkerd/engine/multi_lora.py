"""Multi-LoRA forward: one pass over the shared base serves rows of several adapters.

A packed batch lays the rows of K runs end to end: rows `[start, end)` belong to one
adapter. Each LoRA layer then computes the frozen base projection once for all rows and
adds each adapter's low-rank update to its own contiguous segment only:

    y = x @ W.T;   y[start:end] += (x[start:end] @ A_i.T @ B_i.T) * scale_i

so the expensive part (the base matmuls, attention, the unembedding) runs once at the
full batch size, and the adapters cost what they would cost alone. Segments are slices,
not gathers: no copy of the activations. An adapter's weights see only its own rows, so
its gradient is exactly the one a pass of its rows alone would give.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Segment:
    """Rows `[start, end)` of the packed batch go through adapter `adapter`."""

    adapter: str
    start: int
    end: int


def _lora_layers(peft_model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


def _routed_forward(layer: nn.Module, segments: list[Segment], rows: int):
    """A forward for `layer` that adds each segment's own adapter (or none, where the
    adapter does not adapt this layer: e.g. an attention-only run at an MLP layer)."""
    mine = [s for s in segments if s.adapter in layer.lora_A]
    if _uniform(layer, mine, rows):
        return types.MethodType(_batched_forward(layer, mine, rows), layer)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if x.shape[0] != rows:
            raise RuntimeError(f"multi-LoRA routing expects {rows} rows, got {x.shape[0]}")
        for seg in mine:
            lora_a, lora_b = self.lora_A[seg.adapter], self.lora_B[seg.adapter]
            part = x[seg.start : seg.end].to(lora_a.weight.dtype)
            delta = lora_b(lora_a(part)) * self.scaling[seg.adapter]
            result[seg.start : seg.end] += delta.to(result.dtype)  # autograd: CopySlices
        return result

    return types.MethodType(forward, layer)


def _uniform(layer: nn.Module, segments: list[Segment], rows: int) -> bool:
    """Whether the segments tile all rows in equal parts, each through an adapter of the
    same shape here: then one batched matmul serves them all."""
    sizes = {s.end - s.start for s in segments}
    shapes = {layer.lora_A[s.adapter].weight.shape for s in segments}
    tiled = all(s.start == i * (rows // len(segments)) for i, s in enumerate(segments))
    return (
        len(segments) > 1
        and len(sizes) == 1
        and len(shapes) == 1
        and tiled
        and (len(segments) * sizes.pop() == rows)
    )


def _batched_forward(layer: nn.Module, segments: list[Segment], rows: int):
    """The same sum as the per-segment loop, as two `bmm`s over the stacked adapters
    (`[K, rank, in]`, `[K, out, rank]`): a few kernels per layer however many runs."""
    weight = layer.lora_A[segments[0].adapter].weight
    scale = torch.tensor([layer.scaling[s.adapter] for s in segments], dtype=weight.dtype)
    scale = scale.to(weight.device)[:, None, None]
    k = len(segments)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if x.shape[0] != rows:
            raise RuntimeError(f"multi-LoRA routing expects {rows} rows, got {x.shape[0]}")
        a = torch.stack([self.lora_A[s.adapter].weight for s in segments])
        b = torch.stack([self.lora_B[s.adapter].weight for s in segments])
        xs = x.to(a.dtype).reshape(k, -1, x.shape[-1])  # segment i's rows, flattened
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)) * scale
        return result + delta.reshape(result.shape).to(result.dtype)

    return forward


@contextlib.contextmanager
def route_rows(peft_model: nn.Module, segments: list[Segment]) -> Iterator[None]:
    """Within this block, calling the base model (`peft_model.base_model.model`, the
    LoRA-injected module tree) routes rows `[s.start, s.end)` through adapter `s.adapter`
    for every segment. The caller holds the base's lock: the LoRA layers' forwards are
    swapped for the block and restored after."""
    rows = max(s.end for s in segments)
    layers = _lora_layers(peft_model)
    for layer in layers:
        vars(layer)["forward"] = _routed_forward(layer, segments, rows)  # instance attribute
    try:
        yield
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)


def trainable(params: list[nn.Parameter]) -> None:
    """Make a run's LoRA weights require grad (PEFT's `set_adapter` leaves only the
    active adapter's so; a packed pass trains several at once)."""
    for p in params:
        if not p.requires_grad:
            p.requires_grad_(True)


def packed_logits(peft_model: nn.Module, input_ids: Tensor, segments: list[Segment]) -> Tensor:
    """Logits `[rows, seq, vocab]` of the packed `input_ids`, each segment's rows through
    its own adapter."""
    model = peft_model.base_model.model  # the injected tree: skips PeftModel's own routing
    with route_rows(peft_model, segments):
        return model(input_ids=input_ids).logits


def pad_cat(tensors: list[Tensor], width: int) -> Tensor:
    """Right-pad each `[rows_i, len_i]` tensor with zeros to `width` columns, stack rows."""
    out = tensors[0].new_zeros((sum(t.shape[0] for t in tensors), width))
    row = 0
    for t in tensors:
        out[row : row + t.shape[0], : t.shape[1]] = t
        row += t.shape[0]
    return out

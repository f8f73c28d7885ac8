"""The built-in sampler's KV cache: transformers' dynamic cache whose layers grow in place
and whose rows can be merged in and dropped between decode steps.

Rows are left-padded to a common length (the mask says which columns are real tokens).
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import Tensor


@functools.cache
def _growing_layer() -> tuple[type, type]:
    """(DynamicLayer, GrowingLayer); made on first use, as transformers loads lazily."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer that appends each step's keys and values in place, into spare
        room at the end of a buffer, instead of concatenating (copying) the whole cache
        every step. `keys`/`values` are views of the buffer's filled part. Anything that
        assigns them instead (a merge, batch_select_indices) just makes the next update
        copy them into a fresh buffer."""

        _key_buffer = _value_buffer = _key_view = None

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
            if not self.is_initialized or self.keys.dim() != 4:
                return super().update(key_states, value_states, *args, **kwargs)
            length, new = self.keys.shape[-2], key_states.shape[-2]
            if self.keys is not self._key_view or length + new > self._key_buffer.shape[-2]:
                self._rebuffer(length + new)
            end = length + new
            self._key_buffer[:, :, length:end] = key_states
            self._value_buffer[:, :, length:end] = value_states
            self.keys = self._key_view = self._key_buffer[:, :, :end]
            self.values = self._value_buffer[:, :, :end]
            return self.keys, self.values

        def keep(self, rows: Tensor, first: int) -> None:
            """Keep cache rows `rows`, less the first `first` columns: one copy, taken
            from the buffer so that the room after the filled part stays."""
            if self.keys is not self._key_view:  # not buffered (merged this step)
                self.keys, self.values = self.keys[rows, :, first:], self.values[rows, :, first:]
                return
            length = self.keys.shape[-2] - first
            self._key_buffer = self._key_buffer[rows, :, first:]
            self._value_buffer = self._value_buffer[rows, :, first:]
            self.keys = self._key_view = self._key_buffer[:, :, :length]
            self.values = self._value_buffer[:, :, :length]

        def _rebuffer(self, needed: int) -> None:
            room = needed + max(16, needed // 4)  # a copy every ~length/4 steps, not every step
            self._key_buffer = _with_room(self.keys, room)
            self._value_buffer = _with_room(self.values, room)

    return DynamicLayer, GrowingLayer


def _with_room(states: Tensor, room: int) -> Tensor:
    """A `[batch, heads, room, dim]` buffer starting with `states`."""
    buffer = states.new_empty((*states.shape[:2], room, states.shape[3]))
    buffer[:, :, : states.shape[2]] = states
    return buffer


def plain():
    """An empty transformers cache of plain dynamic layers: every token's keys and values,
    also in a sliding-window layer (where the model's own cache keeps only the window, and
    rows could not be merged)."""
    from transformers import DynamicCache

    return DynamicCache()


def grow_in_place(cache) -> None:
    """Make the cache's plain dynamic layers GrowingLayers, keeping their contents."""
    plain, growing = _growing_layer()
    layers = getattr(cache, "layers", [])
    for i, layer in enumerate(layers):
        if type(layer) is plain:
            swapped = growing.__new__(growing)
            swapped.__dict__.update(layer.__dict__)
            layers[i] = swapped


def mergeable(cache) -> bool:
    """Whether rows can be merged into / cropped from the cache (plain dynamic layers)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in _growing_layer() for layer in layers)


def merge(cache, mask: Tensor, new_cache, new_mask: Tensor):
    """Stack two left-padded caches (and masks) along the batch, padding the shorter.
    `new_cache` is used up. Layer by layer, each layer's old tensors are let go as soon
    as the merged one is made, so that a merge costs one layer's copy beyond the result,
    not the whole cache's."""
    width = max(mask.shape[1], new_mask.shape[1])

    def stack(a: Tensor, b: Tensor) -> Tensor:
        out = a.new_zeros((a.shape[0] + b.shape[0], a.shape[1], width, a.shape[3]))
        out[: a.shape[0], :, width - a.shape[2] :] = a
        out[a.shape[0] :, :, width - b.shape[2] :] = b
        return out

    for layer, new_layer in zip(cache.layers, new_cache.layers):
        for name in ("_key_buffer", "_value_buffer", "_key_view"):
            layer.__dict__.pop(name, None)  # the buffer goes with the old tensors
        layer.keys = stack(layer.keys, new_layer.keys)
        layer.values = stack(layer.values, new_layer.values)
        new_layer.keys = new_layer.values = None

    def pad(m: Tensor) -> Tensor:
        return torch.cat([m.new_zeros((m.shape[0], width - m.shape[1])), m], 1)

    return cache, torch.cat([pad(mask), pad(new_mask)])


def keep_rows(cache, mask: Tensor, keep: Tensor) -> Tensor:
    """Keep only cache rows `keep` (indices), and drop the leading columns that are
    padding in all of them; returns their mask `[kept rows, columns left]`."""
    mask = mask[keep]
    if not mergeable(cache):
        cache.batch_select_indices(keep)
        return mask
    first = int(mask.any(0).nonzero()[0])
    for layer in cache.layers:
        if hasattr(layer, "keep"):
            layer.keep(keep, first)
        else:
            layer.keys, layer.values = layer.keys[keep, :, first:], layer.values[keep, :, first:]
    return mask[:, first:]


def take_rows(cache, mask: Tensor, rows: Tensor):
    """A new cache (and mask) holding copies of cache rows `rows` (indices), less the
    leading columns that are padding in all of them; `cache` is unchanged. For a
    mergeable cache: rows set aside, to be `merge`d back later."""
    mask = mask[rows]
    first = int(mask.any(0).nonzero()[0])
    taken = copy.copy(cache)
    taken.layers = []
    for layer in cache.layers:
        part = copy.copy(layer)
        for name in ("_key_buffer", "_value_buffer", "_key_view"):
            part.__dict__.pop(name, None)  # not the batch's buffer: it makes its own
        part.keys, part.values = layer.keys[rows, :, first:], layer.values[rows, :, first:]
        taken.layers.append(part)
    return taken, mask[:, first:]

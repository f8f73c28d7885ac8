"""The built-in sampler's KV cache: transformers' dynamic cache whose layers grow in place
and whose rows can be merged in and dropped between decode steps.

Rows are left-padded to a common length (the mask says which columns are real tokens).
"""

from __future__ import annotations

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
    """Stack two left-padded caches (and masks) along the batch, padding the shorter."""
    width = max(mask.shape[1], new_mask.shape[1])

    def pad(t: Tensor, dim: int) -> Tensor:
        missing = width - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim)

    for layer, new_layer in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([pad(layer.keys, 2), pad(new_layer.keys, 2)])
        layer.values = torch.cat([pad(layer.values, 2), pad(new_layer.values, 2)])
    return cache, torch.cat([pad(mask, 1), pad(new_mask, 1)])


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

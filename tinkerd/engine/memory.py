"""Activation memory: how much of a pass to compute at once within a byte budget.

A pass's memory beyond the weights is its activations, which grow with its tokens. Given
`EngineConfig.memory_budget_bytes` (`serve --memory-budget`), `plan` picks, per pass:

- the micro-batch size in padded tokens (the pass is cut into micro-batches whose
  gradients accumulate, `compute.micro_batches`),
- the logits chunk (positions whose logits are upcast to float32 at once), and
- whether each decoder layer recomputes its activations in the backward instead of
  keeping them (activation checkpointing, `checkpointed_layers`), which it does only
  when the budget would otherwise allow fewer tokens per micro-batch than the pass's
  longest row (or `MIN_MICRO_BATCH_TOKENS`).

The estimate, in bytes per token (e: bytes per element of the base dtype; H hidden size;
L layers; V vocabulary):

- a decoder layer keeps about `LAYER_ACTIVATIONS * H * e` for its backward (norm inputs,
  q/k/v, attention output, the MLP's gate/up/product, LoRA inputs; measured on Llama
  models with MLP 2.7-3 x H, all modules adapted: see benchmarks/memory.py);
- with checkpointing, each layer keeps only its input (`H * e`) and one layer at a time
  recomputes its `LAYER_ACTIVATIONS * H * e` in the backward;
- the unembedding: `LOGITS_COPIES * V * e` with a gradient (the logits, a LoRA'd
  unembedding's low-rank delta, its scaled copy and the sum, then their gradients:
  measured on SmolLM2-135M, float32, 1.39 MB a token with checkpointing where the layer
  terms are 0.15 MB), `FORWARD_LOGITS_COPIES * V * e` without (the float32 log-softmax
  of a chunk is on top, bounded by the chunk);
- a forward without gradient keeps nothing: one layer's transients and the logits.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

LAYER_ACTIVATIONS = 34
"""Elements kept per token per decoder layer for the backward, in units of the hidden
size (measured; see the module docstring)."""
LOGITS_COPIES = 6
"""`[tokens, vocab]` tensors alive at once at the peak of a backward (measured)."""
FORWARD_LOGITS_COPIES = 4
"""The same in a forward without gradient (logits, LoRA delta, scaled delta, sum)."""
MIN_MICRO_BATCH_TOKENS = 512
"""Checkpointing turns on rather than run micro-batches smaller than this (or than the
pass's longest row): tiny micro-batches waste more time than recomputation costs."""
LOGITS_SHARE = 8
"""A logits chunk's float32 work (upcast, log-softmax, gradient) gets 1/LOGITS_SHARE of
the budget."""
DEFAULT_FRACTION = 0.25
"""Default budget: this fraction of the memory available when the engine starts."""


@dataclass(frozen=True)
class Plan:
    """How one pass is computed (`plan`)."""

    micro_batch_tokens: int
    logits_chunk_tokens: int
    checkpoint: bool


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimate needs."""

    hidden: int
    layers: int
    vocab: int
    element_bytes: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        config = model.config.get_text_config()  # a vision-language model's language model
        return cls(
            hidden=int(config.hidden_size),
            layers=int(config.num_hidden_layers),
            vocab=int(model.get_input_embeddings().weight.shape[0]),
            element_bytes=model.get_input_embeddings().weight.element_size(),
        )

    def token_bytes(self, backward: bool, checkpoint: bool) -> int:
        """Estimated activation bytes per token of a pass (module docstring)."""
        layer = LAYER_ACTIVATIONS * self.hidden * self.element_bytes
        logits = self.vocab * self.element_bytes
        if not backward:
            return layer + FORWARD_LOGITS_COPIES * logits
        if checkpoint:
            inputs = self.layers * self.hidden * self.element_bytes
            return inputs + layer + LOGITS_COPIES * logits
        return self.layers * layer + LOGITS_COPIES * logits


def plan(shape: ModelShape, budget: int, longest_row: int, backward: bool) -> Plan:
    """The micro-batch size, logits chunk and checkpointing for a pass whose longest row
    has `longest_row` tokens, within `budget` bytes of activations. A row too long for
    the budget even with checkpointing is still one micro-batch (rows are never split)."""
    chunk = max(1, budget // LOGITS_SHARE // (3 * 4 * shape.vocab))
    rest = budget - min(chunk, longest_row) * 3 * 4 * shape.vocab
    plain = max(1, rest // shape.token_bytes(backward, checkpoint=False))
    if not backward or plain >= max(longest_row, MIN_MICRO_BATCH_TOKENS):
        return Plan(plain, chunk, checkpoint=False)
    return Plan(max(1, rest // shape.token_bytes(True, checkpoint=True)), chunk, checkpoint=True)


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module) -> Iterator[None]:
    """Within this block, every decoder layer of `model` keeps only its inputs for the
    backward and recomputes the rest there (`torch.utils.checkpoint`, non-reentrant).
    The caller holds the base's lock: the layers' forwards are swapped for the block."""
    layers = decoder_layers(model)
    for layer in layers:
        vars(layer)["forward"] = _checkpointed(layer)  # instance attribute
    try:
        yield
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the entries of its largest ModuleList (a vision-language
    model's vision tower aside: its activations are not kept for the backward)."""
    lists = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and ".visual." not in f".{name}."
    ]
    return list(max(lists, key=len)) if lists else []


def _checkpointed(layer: nn.Module):
    forward = type(layer).forward

    def run(*args, **kwargs):
        # A KV cache would be appended to twice (forward and recomputation); a training
        # pass needs none.
        if "past_key_values" in kwargs:
            kwargs["past_key_values"] = None
        kwargs.pop("use_cache", None)
        if not torch.is_grad_enabled():
            return forward(layer, *args, **kwargs)
        return checkpoint(forward, layer, *args, use_reentrant=False, **kwargs)

    return run


def default_budget(device: str | torch.device | None = None) -> int:
    """`DEFAULT_FRACTION` of the free memory of `device` (CUDA), else of the machine's
    MemAvailable (at least 256 MiB)."""
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        available = free
    else:
        available = _mem_available()
    return max(256 << 20, int(available * DEFAULT_FRACTION))


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS |= {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """`2GiB`, `1.5G`, `512MiB`, `1000000` -> bytes (G = 10^9, GiB = 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise ValueError(f"not a size in bytes: {text!r} (e.g. 2GiB, 1.5G, 512MiB)")
    value = float(match.group(1)) * _UNITS[match.group(2) or ""]
    if value < 1:
        raise ValueError(f"a memory budget must be positive: {text!r}")
    return int(value)

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
- the output layer: where it runs in chunks (`output_layer`, every model whose logits
  are `head(decoder(...))`), a token keeps only `STATE_COPIES * H * 4` (the last hidden
  state and its float32 gradient), and one window of positions at a time holds
  `(3 * 4 + LOGITS_COPIES * e) * V` each (the logits, a LoRA'd unembedding's delta,
  its scaled copy and the sum, their gradients, and the float32 log-softmax and its
  gradient); otherwise (whole logits) every token holds `LOGITS_COPIES * V * e` with a
  gradient (measured on SmolLM2-135M, float32: 1.39 MB a token with checkpointing where
  the layer terms are 0.15 MB), `FORWARD_LOGITS_COPIES * V * e` without, and the
  chunk of float32 log-softmax `3 * 4 * V` a position;
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

from tinkerd.engine.output_layer import output_layer

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
STATE_COPIES = 4
"""Per-token elements of hidden size kept by a chunked output layer (float32 units)."""
LOGITS_SHARE = 8
"""A logits chunk's work (the head's logits where chunked, the float32 upcast,
log-softmax and gradients) gets 1/LOGITS_SHARE of the budget."""
CPU_MICRO_BATCH_BYTES = 1 << 30
"""On a CPU, a micro-batch's estimated activations stay under this even where the budget
allows more (a row is never split): a pass over a few GB of fresh activations runs
slower than the same work in ~1 GB pieces that reuse the memory freed before them
(SmolLM2, 4 x 512: one micro-batch 16.9 s, four of a row 12.0 s; docs/benchmarks.md)."""
DEFAULT_FRACTION = 0.25
"""Default budget: this fraction of the memory available when the engine starts."""


@dataclass(frozen=True)
class Plan:
    """How one pass is computed (`plan`)."""

    micro_batch_tokens: int
    logits_chunk_tokens: int
    checkpoint: bool

    @property
    def micro_batch_rows(self) -> int:
        """Most rows a micro-batch may hold: the output layer's window spans every row
        of a micro-batch (at least one column of each), so more rows than
        `logits_chunk_tokens` would make the window larger than planned."""
        return self.logits_chunk_tokens


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimate needs."""

    hidden: int
    layers: int
    vocab: int
    element_bytes: int
    chunked_output: bool = False
    """Whether the output layer runs a window of positions at a time (`output_layer`)."""

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        config = model.config.get_text_config()  # a vision-language model's language model
        return cls(
            hidden=int(config.hidden_size),
            layers=int(config.num_hidden_layers),
            vocab=int(model.get_input_embeddings().weight.shape[0]),
            element_bytes=model.get_input_embeddings().weight.element_size(),
            chunked_output=output_layer(model) is not None,
        )

    def window_bytes(self) -> int:
        """Bytes a position of the output layer's window holds at once."""
        copies = LOGITS_COPIES * self.element_bytes if self.chunked_output else 0
        return (3 * 4 + copies) * self.vocab

    def token_bytes(self, backward: bool, checkpoint: bool) -> int:
        """Estimated activation bytes per token of a pass (module docstring)."""
        layer = LAYER_ACTIVATIONS * self.hidden * self.element_bytes
        logits = self.vocab * self.element_bytes
        if self.chunked_output:
            output = STATE_COPIES * self.hidden * 4
        else:
            output = (LOGITS_COPIES if backward else FORWARD_LOGITS_COPIES) * logits
        if not backward:
            return layer + output
        if checkpoint:
            inputs = self.layers * self.hidden * self.element_bytes
            return inputs + layer + output
        return self.layers * layer + output


def plan(
    shape: ModelShape, budget: int, longest_row: int, backward: bool, cpu: bool = False
) -> Plan:
    """The micro-batch size, logits chunk and checkpointing for a pass whose longest row
    has `longest_row` tokens, within `budget` bytes of activations (and, on a `cpu`, of
    `CPU_MICRO_BATCH_BYTES` a micro-batch). A row too long for the budget even with
    checkpointing is still one micro-batch (rows are never split)."""
    chunk = max(1, budget // LOGITS_SHARE // shape.window_bytes())
    rest = budget - chunk * shape.window_bytes()  # a window spans rows: up to `chunk`
    per_token = shape.token_bytes(backward, checkpoint=False)
    plain = max(1, rest // per_token)
    if not backward or plain >= max(longest_row, MIN_MICRO_BATCH_TOKENS):
        if cpu:
            plain = min(plain, max(CPU_MICRO_BATCH_BYTES // per_token, longest_row))
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


MIN_MMAP_THRESHOLD = 256 << 10
MAX_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for the threshold (64-bit)
MMAP_SHARE = 256
"""The mmap threshold is 1/MMAP_SHARE of the activation budget, within the two bounds
above (`bounded_heap`)."""


def mmap_threshold(budget_bytes: int) -> int:
    """Bytes from which glibc's malloc maps each block alone (`bounded_heap`)."""
    return min(MAX_MMAP_THRESHOLD, max(MIN_MMAP_THRESHOLD, budget_bytes // MMAP_SHARE))


def bounded_heap(budget_bytes: int) -> None:
    """Make glibc's malloc give large freed blocks back at once, in proportion to the
    activation budget. By default it raises its mmap threshold to the largest block
    freed so far (up to 32 MiB), after which blocks of that size come from the heap,
    which fragments and seldom shrinks: a chunked pass that holds 28 MB of tensors at
    once grew the process by 560 MB (16k vocabulary, 2048 tokens,
    `tests/unit/engine/test_output_layer.py`). A fixed threshold keeps the process's
    memory where the budget puts it.

    But a mapped block is new memory each time: the kernel zeroes and maps it page by
    page on first touch, and a pass of large tensors spends as long in those page
    faults as in its arithmetic (measured on tinkerd/tiny, one thread: 16 runs' 2 x 128
    packed in one pass, 0.9 s of 1.9 s CPU in the kernel with a 256 KiB threshold, 0.1
    s of 1.1 s with 32 MiB; docs/benchmarks.md). So the threshold is a share of the
    budget (`mmap_threshold`): a small budget keeps every large block mapped (its
    heap's slack would be a large part of it), the default budget (a quarter of the
    memory) lets a pass's tensors be reused from the heap, and the trim threshold
    follows at twice it (glibc's own rule, which a fixed mmap threshold switches off).
    No-op where malloc is not glibc's."""
    import ctypes
    import ctypes.util

    threshold = mmap_threshold(budget_bytes)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD: also ends the dynamic raising
        libc.mallopt(-1, 2 * threshold)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


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

"""The output layer in chunks: target logprobs from the last hidden states, never a
`[tokens, vocab]` tensor for the whole pass.

A training pass needs only one number per position (the log-probability of its target,
or of k targets), yet the model's output layer makes `vocab` of them, in the base dtype,
plus a LoRA'd unembedding's delta, the float32 upcast and the gradients of all of them:
on a 49k-152k vocabulary that dwarfs every decoder layer. So the pass stops at the
decoder's last hidden states (`[rows, seq, hidden]`) and `target_logprobs` applies the
output layer (`OutputLayer.head`: the unembedding, LoRA'd or not, and any final logit
scaling or soft-capping) to a window of columns at a time, takes the log-softmax and
gathers the targets. With a gradient, each window runs under `torch.utils.checkpoint`:
only its inputs (a view of the hidden states) are kept, and its logits are recomputed in
the backward, so at most one window's logits exist at once, forward or backward. This
is the technique of Liger Kernel's fused linear cross-entropy and Apple's Cut
Cross-Entropy, in plain PyTorch.

A window is all rows of the micro-batch times `chunk_tokens // rows` columns: rows stay
whole, so a packed pass's per-row LoRA routing (`lora.route_rows`, which routes by row)
applies to the unembedding unchanged.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tinkerd.engine.vision import is_vision_config

Head = Callable[[Tensor], Tensor]
"""Hidden states `[..., hidden]` -> logits `[..., vocab]` (the base dtype)."""


@dataclass(frozen=True)
class OutputLayer:
    """A causal LM cut in two: `decoder(input_ids=...)` gives the last hidden states
    (`.last_hidden_state`), `head` turns them into the logits the whole model gives."""

    decoder: nn.Module
    head: Head


_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def output_layer(model: nn.Module) -> OutputLayer | None:
    """`model` (a Hugging Face causal LM, possibly LoRA-injected) as decoder + head, or
    None if its logits are not `head(decoder(...))`: checked once per model on a short
    input against the model's own forward, so an architecture with an unusual output
    layer falls back to whole logits rather than compute wrong ones. A vision-language
    model keeps whole logits (its images go through its own forward)."""
    if is_vision_config(model.config):
        return None
    decoder = getattr(model, "get_decoder", lambda: None)()
    lm_head = model.get_output_embeddings() if decoder is not None else None
    if decoder is None or lm_head is None:
        return None
    layer = OutputLayer(decoder, _head(model.config, lm_head))
    if model not in _CHECKED:  # an FSDP-sharded base keeps whole logits: its root's
        # forward gathers the shards, and a check on one rank alone would stall the others
        _CHECKED[model] = not _sharded(model) and _same_logits(model, layer)
    return layer if _CHECKED[model] else None


def _head(config, lm_head: nn.Module) -> Head:
    """The unembedding and the final transforms some families apply to its output."""
    config = getattr(config, "get_text_config", lambda: config)()
    divide = getattr(config, "logits_scaling", None)  # Granite
    multiply = getattr(config, "logit_scale", None)  # Cohere
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 and 3

    def head(hidden: Tensor) -> Tensor:
        logits = lm_head(hidden)
        if divide:
            logits = logits / divide
        if multiply:
            logits = logits * multiply
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return head


def _sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _same_logits(model: nn.Module, layer: OutputLayer) -> bool:
    param = next(model.parameters())
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(5, device=param.device) * 7 + 1).remainder(vocab)[None]
    with torch.no_grad():
        whole = model(input_ids=ids, use_cache=False).logits
        hidden = layer.decoder(input_ids=ids, use_cache=False).last_hidden_state
        split = layer.head(hidden)
    return split.shape == whole.shape and torch.allclose(split.float(), whole.float(), atol=1e-4)


def target_logprobs(
    hidden: Tensor,
    mask: Tensor,
    targets: Tensor,
    chunk_tokens: int | None = None,
    head: Head | None = None,
) -> Tensor:
    """Log-probability (float32) of `targets` (`[n_tokens]` or `[n_tokens, k]`, the real
    positions of `mask` in row-major order) under `head(hidden)`, at the real positions
    of `mask` (`[rows, seq]`, bool). `hidden` is `[rows, seq, d]`: the last hidden states
    (then `head` is the output layer) or logits (`head` None: taken as they are).

    The head, log-softmax and gather run on windows of `chunk_tokens // rows` columns
    (None: one window); with a gradient, each window's logits are recomputed in the
    backward rather than kept."""
    rows, cols = mask.nonzero(as_tuple=True)
    width = mask.shape[1] if chunk_tokens is None else max(1, chunk_tokens // mask.shape[0])
    if width >= mask.shape[1]:
        return _window(hidden, rows, cols, targets, 0, mask.shape[1], head)
    remember = torch.is_grad_enabled() and hidden.requires_grad
    window = torch.div(cols, width, rounding_mode="floor")
    parts, order = [], []
    for w in window.unique().tolist():
        take = (window == w).nonzero().squeeze(1)
        args = (hidden, rows[take], cols[take], targets[take], w * width, width, head)
        parts.append(
            checkpoint(_window, *args, use_reentrant=False) if remember else _window(*args)
        )
        order.append(take)
    inverse = torch.empty_like(rows)
    inverse[torch.cat(order)] = torch.arange(rows.numel(), device=rows.device)
    return torch.cat(parts)[inverse]


def _window(
    hidden: Tensor,
    rows: Tensor,
    cols: Tensor,
    targets: Tensor,
    start: int,
    width: int,
    head: Head | None,
) -> Tensor:
    """Logprobs of `targets` at (`rows`, `cols`), all in columns [start, start + width)."""
    part = hidden[:, start : start + width]
    logits = part if head is None else head(part)
    real = logits[rows, cols - start].float()  # [positions, vocab]
    if targets.ndim == 1:
        return -F.cross_entropy(real, targets, reduction="none")
    return real.log_softmax(-1).gather(-1, targets)

"""One decode step of a Llama-architecture model, computed straight from its weights.

The sampler's decode steps feed one token per row. Running them through the Hugging Face
model costs more than the arithmetic: module calls and hooks per layer, a 4-D attention
mask and the rotary tables rebuilt every step, and (with a padding mask, which a batch
of mixed prompt lengths always has) the keys and values of every grouped-query head
copied per layer per step (`repeat_kv`) before attention. This module does the same
arithmetic as transformers' Llama in a few tensor ops per layer: rotary tables taken
from the model's own rotary module once, attention by `scaled_dot_product_attention`
with grouped-query heads, the keys and values written into the sampler's cache in place,
and each row's LoRA adapter applied as one extra low-rank product per projection.

Prefill stays on the Hugging Face model (once per prompt, with prompt logprobs); only
the per-token steps come here. `FastDecoder.build` returns None for a model it does not
reproduce exactly (another architecture, biases, a rotary scaling that depends on the
sequence length, LoRA variants such as DoRA): the sampler then uses the HF forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _weight(module: nn.Module) -> Tensor:
    """The frozen base weight of a Linear, whether or not PEFT wrapped it."""
    return getattr(module, "base_layer", module).weight


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fast path cannot reproduce this model's forward, or None if it can."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} is not llama"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "projection biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or not hasattr(inner, "layers"):
        return "not a LlamaForCausalLM layout"
    rope_type = getattr(rotary, "rope_type", "default")
    if "dynamic" in rope_type or rope_type == "longrope":
        return f"rope type {rope_type!r} depends on the sequence length"
    if hasattr(model.get_input_embeddings(), "base_layer"):
        return "adapted embeddings"
    return None


@dataclass
class LoraProjection:
    """The adapters of one projection for the current rows: delta = ((x A^T) * mask) B^T.

    `a` is `[R, in]`: the A matrices of every adapter in the batch stacked; `b` is
    `[out, R]`, their B matrices side by side, each times its adapter's scaling; `mask`
    is `[rows, R]`, 1 where a column belongs to that row's adapter (None: every row uses
    all columns, i.e. one adapter for the whole batch)."""

    a: Tensor
    b: Tensor
    mask: Tensor | None

    def delta(self, x: Tensor) -> Tensor:
        h = F.linear(x.to(self.a.dtype), self.a)
        if self.mask is not None:
            h = h * self.mask
        return F.linear(h, self.b)


class FastDecoder:
    """Decode steps for one Llama model. Weights are read from the model at every step
    (nothing is copied), so it always computes with the model's current weights."""

    def __init__(self, model: nn.Module):
        self.model = model
        inner = model.model
        config = model.config
        self.layers = list(inner.layers)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.eps = [
            (layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon)
            for layer in self.layers
        ]
        self.norm_eps = inner.norm.variance_epsilon
        self._rope: Tensor | None = None  # [positions, 2, head_dim]: cos, sin with sign

    @classmethod
    def build(cls, model: nn.Module) -> FastDecoder | None:
        return None if unsupported_reason(model) else cls(model)

    def rope_table(self) -> Tensor:
        """`[max positions, 2, head_dim]`: the rotary module's own cos and sin for every
        position (computed by it, so any static scaling type is reproduced), the sin with
        its first half negated so that rotate_half(x) * sin = swap_halves(x) * table."""
        if self._rope is None:
            inner = self.model.model
            weight = inner.embed_tokens.weight
            positions = torch.arange(self.model.config.max_position_embeddings, device=weight.device)
            probe = weight.new_empty(1)  # only its dtype and device are read
            cos, sin = inner.rotary_emb(probe, positions[None])
            half = self.head_dim // 2
            sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)
            self._rope = torch.stack([cos[0], sin], 1)
        return self._rope

    def lora(self, adapters: list[str], device: torch.device) -> list[dict] | None:
        """Per layer, the LoraProjection of each adapted projection for rows whose adapters
        are `adapters` (PEFT names; the base's name for none). None: some adapter uses a
        LoRA variant (e.g. DoRA) or bias this path does not compute."""
        names = list(dict.fromkeys(adapters))
        out = []
        for layer in self.layers:
            found = {}
            for name in PROJECTIONS:
                module = _module(layer, name)
                proj = _lora_projection(module, names, adapters, device)
                if proj is False:
                    return None
                if proj is not None:
                    found[name] = proj
            out.append(found)
        head = _lora_projection(self.model.lm_head, names, adapters, device)
        if head is False:
            return None
        out.append({"lm_head": head} if head is not None else {})
        return out

    def step(
        self, tokens: Tensor, positions: Tensor, mask: Tensor, cache, lora: list[dict] | None
    ) -> Tensor:
        """Logits `[rows, vocab]` (model dtype) for one new token per row.

        tokens: `[rows]` ids; positions: `[rows]` their position ids; mask: `[rows,
        cache_len + 1]` 1 where the cache (then the new token) holds a real token; cache:
        transformers cache whose layers append in place (`update`), left-padded like mask;
        lora: from `lora()` for these rows, or None (no adapters)."""
        rows = tokens.shape[0]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        rope = self.rope_table()[positions]  # [rows, 2, dim]
        cos, sin = rope[:, None, 0], rope[:, None, 1]  # [rows, 1, dim]
        attend = mask.bool()[:, None, None, :]  # [rows, 1, 1, len]: sdpa's True = attend
        x = self.model.model.embed_tokens(tokens)  # [rows, hidden]
        no_lora: dict = {}
        for i, layer in enumerate(self.layers):
            adapted = lora[i] if lora else no_lora
            eps_in, eps_post = self.eps[i]
            attn, mlp = layer.self_attn, layer.mlp
            h = F.rms_norm(x, x.shape[-1:], layer.input_layernorm.weight, eps_in)
            q = _linear(h, attn.q_proj, adapted.get("q_proj"))
            k = _linear(h, attn.k_proj, adapted.get("k_proj"))
            v = _linear(h, attn.v_proj, adapted.get("v_proj"))
            qk = torch.cat([q, k], 1).view(rows, heads + kv_heads, 2, dim // 2)
            # rotate_half(x) * sin == (x with its halves swapped) * sin with first half negated
            qk = qk.view(rows, -1, dim) * cos + qk.flip(2).view(rows, -1, dim) * sin
            keys, values = cache.layers[i].update(
                qk[:, heads:, None], v.view(rows, kv_heads, 1, dim)
            )
            out = F.scaled_dot_product_attention(
                qk[:, :heads, None],  # [rows, heads, 1, dim]
                keys,
                values,
                attn_mask=attend,
                scale=self.scaling,
                enable_gqa=heads != kv_heads,
            )
            x = x + _linear(out.view(rows, heads * dim), attn.o_proj, adapted.get("o_proj"))
            h = F.rms_norm(x, x.shape[-1:], layer.post_attention_layernorm.weight, eps_post)
            gate = _linear(h, mlp.gate_proj, adapted.get("gate_proj"))
            up = _linear(h, mlp.up_proj, adapted.get("up_proj"))
            x = x + _linear(F.silu(gate).mul_(up), mlp.down_proj, adapted.get("down_proj"))
        x = F.rms_norm(x, x.shape[-1:], self.model.model.norm.weight, self.norm_eps)
        head = lora[-1].get("lm_head") if lora else None
        return _linear(x, self.model.lm_head, head)


def _module(layer: nn.Module, name: str) -> nn.Module:
    return getattr(layer.mlp if name in ("gate_proj", "up_proj", "down_proj") else layer.self_attn, name)


def _linear(x: Tensor, module: nn.Module, lora: LoraProjection | None) -> Tensor:
    y = F.linear(x, _weight(module))
    if lora is None:
        return y
    return (y + lora.delta(x)).to(y.dtype)  # as PEFT: the LoRA term in its own dtype


def _lora_projection(
    module: nn.Module, names: list[str], adapters: list[str], device: torch.device
) -> LoraProjection | None | bool:
    """The stacked adapters of `module` for the batch; None if none of them adapts it;
    False if one does in a way not computed here."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None:
        return None
    used = [n for n in names if n in lora_a]
    if not used:
        return None
    if any(n in getattr(module, "lora_variant", {}) for n in used):
        return False
    if any(module.lora_B[n].bias is not None for n in used) or module.merged:
        return False
    a = torch.cat([lora_a[n].weight for n in used])
    b = torch.cat([module.lora_B[n].weight * module.scaling[n] for n in used], 1)
    if used == names and len(used) == 1:
        return LoraProjection(a, b, None)  # every row uses the one adapter
    owner = torch.cat(
        [torch.full((lora_a[n].weight.shape[0],), k, device=device) for k, n in enumerate(used)]
    )
    row_adapter = torch.tensor([used.index(n) if n in used else -1 for n in adapters], device=device)
    mask = (row_adapter[:, None] == owner[None, :]).to(a.dtype)
    return LoraProjection(a, b, mask)

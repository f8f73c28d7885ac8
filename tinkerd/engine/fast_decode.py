"""One decode step of a Llama-architecture model, computed straight from its weights.

The sampler's decode steps feed one token per row. Running them through the Hugging Face
model costs more than the arithmetic: module calls and hooks per layer, a 4-D attention
mask and the rotary tables rebuilt every step, and (with a padding mask, which a batch
of mixed prompt lengths always has) the keys and values of every grouped-query head
copied per layer per step (`repeat_kv`) before attention. This module does the same
arithmetic as transformers' Llama in a few tensor ops per layer: rotary tables taken
from the model's own rotary module once, attention by `scaled_dot_product_attention`
with grouped-query heads, the keys and values written into the sampler's cache in place,
and each row's LoRA adapter applied as one extra low-rank product per projection
(`tinkerd.engine.lora.stacked_projection`).

Prefill stays on the Hugging Face model (once per prompt, with prompt logprobs); only
the per-token steps come here. `FastDecoder.build` returns None for a model it does not
reproduce exactly (another architecture, biases, a rotary scaling that depends on the
sequence length, LoRA variants such as DoRA): the sampler then uses the HF forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinkerd.engine.lora import LoraProjection, stacked_projection

MAX_FUSED_BYTES = 1 << 30  # larger models multiply q/k/v and gate/up separately, uncopied


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


class FastDecoder:
    """Decode steps for one Llama model.

    The q/k/v and gate/up projections run as one matrix product each, on copies of
    their weights concatenated by `plan` (again whenever a weight changed; not for
    models over MAX_FUSED_BYTES, where the copies would cost more than they save). Everything
    else (norms, o/down projections, unembedding, embeddings) is read from the model at
    every step."""

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
            (
                layer.input_layernorm.variance_epsilon,
                layer.post_attention_layernorm.variance_epsilon,
            )
            for layer in self.layers
        ]
        self.norm_eps = inner.norm.variance_epsilon
        self._rope: Tensor | None = None  # [positions, 2, head_dim]: cos, sin with sign
        self._fused: list[tuple] = []  # per layer: (W_qkv, W_gate_up), each maybe a list
        self._fused_from: list = []  # (data_ptr, version) of each weight fused

    @classmethod
    def build(cls, model: nn.Module) -> FastDecoder | None:
        return None if unsupported_reason(model) else cls(model)

    def plan(self, adapters: list[str], device: torch.device) -> list[dict] | None:
        """Get ready to decode rows whose adapters are `adapters` (PEFT names; the base's
        name for none): refresh the fused weights if any changed, and return per layer
        (then for the unembedding) the LoraProjection of each adapted fused projection.
        None: some adapter uses a LoRA variant (e.g. DoRA) or bias not computed here."""
        self._refresh_fused()
        out = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups = {
                "qkv": [attn.q_proj, attn.k_proj, attn.v_proj],
                "o": [attn.o_proj],
                "gate_up": [mlp.gate_proj, mlp.up_proj],
                "down": [mlp.down_proj],
            }
            found = {}
            for key, modules in groups.items():
                proj = stacked_projection(modules, adapters, device)
                if proj is False:
                    return None
                if proj is not None:
                    found[key] = proj
            out.append(found)
        head = stacked_projection([self.model.lm_head], adapters, device)
        if head is False:
            return None
        out.append({"lm_head": head} if head is not None else {})
        return out

    def _refresh_fused(self) -> None:
        weights = [
            [_weight(m) for m in (a.q_proj, a.k_proj, a.v_proj, l.mlp.gate_proj, l.mlp.up_proj)]
            for l, a in ((layer, layer.self_attn) for layer in self.layers)  # noqa: E741
        ]
        stamp = [(w.data_ptr(), w._version) for ws in weights for w in ws]
        if stamp != self._fused_from:
            size = sum(w.numel() * w.element_size() for ws in weights for w in ws)
            if size <= MAX_FUSED_BYTES:
                self._fused = [(torch.cat(ws[:3]), torch.cat(ws[3:])) for ws in weights]
            else:  # a large model: the copies would cost more memory than they save time
                self._fused = [(ws[:3], ws[3:]) for ws in weights]
            self._fused_from = stamp

    def rope_table(self) -> Tensor:
        """`[max positions, 2, head_dim]`: the rotary module's own cos and sin for every
        position (computed by it, so any static scaling type is reproduced), the sin with
        its first half negated so that rotate_half(x) * sin = swap_halves(x) * table."""
        if self._rope is None:
            inner = self.model.model
            weight = inner.embed_tokens.weight
            positions = torch.arange(
                self.model.config.max_position_embeddings, device=weight.device
            )
            probe = weight.new_empty(1)  # only its dtype and device are read
            cos, sin = inner.rotary_emb(probe, positions[None])
            half = self.head_dim // 2
            sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)
            self._rope = torch.stack([cos[0], sin], 1)
        return self._rope

    def step(
        self, tokens: Tensor, positions: Tensor, mask: Tensor, cache, lora: list[dict] | None
    ) -> Tensor:
        """Logits `[rows, vocab]` (model dtype) for one new token per row.

        tokens: `[rows]` ids; positions: `[rows]` their position ids; mask: `[rows,
        cache_len + 1]` 1 where the cache (then the new token) holds a real token; cache:
        transformers cache whose layers append in place (`update`), left-padded like mask;
        lora: what `plan` returned for these rows (None: no adapters). Call `plan` first."""
        rows = tokens.shape[0]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        q_end, k_end = heads * dim, (heads + kv_heads) * dim
        rope = self.rope_table()[positions]  # [rows, 2, dim]
        cos, sin = rope[:, None, 0], rope[:, None, 1]  # [rows, 1, dim]
        x = self.model.model.embed_tokens(tokens)  # [rows, hidden]
        # additive attention mask [rows, 1, 1, len]: 0 to attend, -inf for padding
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill_(mask == 0, -math.inf)[:, None, None]
        no_lora: dict = {}
        for i, layer in enumerate(self.layers):
            adapted = lora[i] if lora else no_lora
            w_qkv, w_gate_up = self._fused[i]
            eps_in, eps_post = self.eps[i]
            attn, mlp = layer.self_attn, layer.mlp
            h = _rms_norm(x, layer.input_layernorm.weight, eps_in)
            qkv = _project(h, w_qkv, adapted.get("qkv"))
            qk = qkv[:, :k_end].view(rows, heads + kv_heads, 2, dim // 2)
            # rotate_half(x) * sin == (x with its halves swapped) * sin with first half negated
            qk = qk.view(rows, -1, dim) * cos + qk.flip(2).view(rows, -1, dim) * sin
            keys, values = cache.layers[i].update(
                qk[:, heads:, None], qkv[:, k_end:].view(rows, kv_heads, 1, dim)
            )
            out = F.scaled_dot_product_attention(
                qk[:, :heads, None],  # [rows, heads, 1, dim]
                keys,
                values,
                attn_mask=bias,
                scale=self.scaling,
                enable_gqa=heads != kv_heads,
            )
            x = _project(out.view(rows, q_end), _weight(attn.o_proj), adapted.get("o"), x)
            h = _rms_norm(x, layer.post_attention_layernorm.weight, eps_post)
            gate_up = _project(h, w_gate_up, adapted.get("gate_up"))
            half = gate_up.shape[1] // 2
            act = F.silu(gate_up[:, :half]).mul_(gate_up[:, half:])
            x = _project(act, _weight(mlp.down_proj), adapted.get("down"), x)
        x = _rms_norm(x, self.model.model.norm.weight, self.norm_eps)
        head = lora[-1].get("lm_head") if lora else None
        return _project(x, _weight(self.model.lm_head), head)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """LlamaRMSNorm: in float32, then back to x's dtype before the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add_(eps))
    return weight * h.to(x.dtype)


def _project(
    x: Tensor,
    weight: Tensor | list[Tensor],
    lora: LoraProjection | None,
    residual: Tensor | None = None,
) -> Tensor:
    """`residual + x W^T (+ the rows' LoRA terms)`; `[rows, out]`. A list of weights
    stands for their concatenation along the output."""
    if isinstance(weight, list):
        y = torch.cat([F.linear(x, w) for w in weight], -1)
    elif residual is None or lora is not None:
        y = F.linear(x, weight)
    else:
        return torch.addmm(residual, x, weight.t())
    if lora is not None:
        y = (y + lora.delta(x)).to(y.dtype)  # as PEFT: the LoRA term in its own dtype
    return y if residual is None else residual + y

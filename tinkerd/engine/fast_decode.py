"""One decode step of a Llama-like model (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3),
computed straight from its weights.

The sampler's decode steps feed one token per row. Running them through the Hugging Face
model costs more than the arithmetic: module calls and hooks per layer, a 4-D attention
mask and the rotary tables rebuilt every step, and (with a padding mask, which a batch
of mixed prompt lengths always has) the keys and values of every grouped-query head
copied per layer per step (`repeat_kv`) before attention. This module does the same
arithmetic as transformers in a few tensor ops per layer: rotary tables taken from the
model's own rotary module (grown as positions need them), attention by
`scaled_dot_product_attention` with grouped-query heads, the keys and values written into
the sampler's cache in place, and each row's LoRA adapter applied as one extra low-rank
product per projection (`tinkerd.engine.lora.stacked_projection`).

These families share one decoder layer up to the differences that `Family` lists; the
embedding and the MLP activation are the model's own modules (Gemma's scaled embeddings
and GELU-tanh need no code here), and RMSNorm is computed here in either form
(`_rms_norm`: a module call costs as much as the norm at decode sizes). A sliding window
is applied as a mask over the sampler's cache, which keeps every token
(`kv_cache.plain`).

Prefill stays on the Hugging Face model (once per prompt, with prompt logprobs); only
the per-token steps come here. `FastDecoder.build` returns None for a model it does not
reproduce exactly (another architecture, a rotary scaling that depends on the sequence
length, bidirectional attention, adapted embeddings): the sampler then uses the HF
forward, as `plan` makes it for LoRA variants such as DoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinkerd.engine.lora import LoraProjection, stacked_projection

MAX_FUSED_BYTES = 1 << 30  # larger models multiply q/k/v and gate/up separately, uncopied


@dataclass(frozen=True)
class Family:
    """How an architecture's decoder differs from Llama's, as far as decoding goes."""

    norm_plus_one: bool = False
    """RMSNorm scales by (1 + w), in float32 before the cast (Gemma), not by w after it."""
    qk_norm: bool = False
    """RMSNorm (`self_attn.q_norm`/`k_norm`) over each head's query and key before RoPE."""
    mlp_norm: str = "post_attention_layernorm"
    """The layer's norm in front of the MLP."""
    post_norms: tuple[str, str] | None = None
    """Norms of the attention's and the MLP's outputs before each residual add."""
    attn_softcap: bool = False
    """tanh soft-capping of attention scores (`self_attn.attn_logit_softcapping`)."""
    logit_softcap: bool = False
    """tanh soft-capping of the output logits (`config.final_logit_softcapping`)."""
    rope_by_layer_type: bool = False
    """One rotary table per layer type (local and global bases)."""
    window_from_config: bool = False
    """`config.sliding_window` on every layer (else each attention's `sliding_window`)."""


_GEMMA = dict(
    norm_plus_one=True,
    mlp_norm="pre_feedforward_layernorm",
    post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    logit_softcap=True,
)
FAMILIES = {
    "llama": Family(),
    "mistral": Family(window_from_config=True),
    "qwen2": Family(),
    "qwen3": Family(qk_norm=True),
    "gemma": Family(norm_plus_one=True),
    "gemma2": Family(**_GEMMA, attn_softcap=True),
    # Gemma 3 keeps attn_logit_softcapping in its config but transformers never applies it
    "gemma3_text": Family(**_GEMMA, qk_norm=True, rope_by_layer_type=True),
}
"""`config.model_type` -> its differences, for every family the fast path decodes."""


def _weight(module: nn.Module) -> Tensor:
    """The frozen base weight of a Linear, whether or not PEFT wrapped it."""
    return getattr(module, "base_layer", module).weight


def _bias(module: nn.Module) -> Tensor | None:
    return getattr(module, "base_layer", module).bias


def _rope_types(rotary: nn.Module) -> list[str]:
    kinds = getattr(rotary, "rope_type", "default")
    return list(kinds.values()) if isinstance(kinds, dict) else [kinds]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fast path cannot reproduce this model's forward, or None if it can."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        return f"model_type {model_type!r} is not one of {', '.join(FAMILIES)}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return f"not a {type(model).__name__} layout this path knows"
    names = ["input_layernorm", family.mlp_norm, *(family.post_norms or ())]
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        norms = [getattr(layer, n, None) for n in names]
        if family.qk_norm:
            norms += [getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)]
        if not all(type(n).__name__.endswith("RMSNorm") for n in norms):
            return "a decoder layer without the expected RMSNorms"
        if not hasattr(mlp, "act_fn"):
            return "an MLP without act_fn"
    for rope_type in _rope_types(rotary):
        if "dynamic" in rope_type or rope_type == "longrope":
            return f"rope type {rope_type!r} depends on the sequence length"
    if hasattr(model.get_input_embeddings(), "base_layer"):
        return "adapted embeddings"
    return None


Linear = list[tuple[Tensor, Tensor | None]]
"""(weight, bias) of one projection, or of several whose outputs are concatenated."""


class FastDecoder:
    """Decode steps for one model of a family in `FAMILIES`.

    The q/k/v and gate/up projections run as one matrix product each, on copies of
    their weights (and biases) concatenated by `plan` (again whenever a weight changed;
    not for models over MAX_FUSED_BYTES, where the copies would cost more than they save).
    Everything else (norms, o/down projections, unembedding, embeddings) is read from the
    model at every step."""

    def __init__(self, model: nn.Module):
        self.model = model
        config = model.config
        self.family = family = FAMILIES[config.model_type]
        self.layers = list(model.model.layers)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        types = getattr(config, "layer_types", None) or ["full_attention"] * len(self.layers)
        self.rope_of = [t if family.rope_by_layer_type else None for t in types]
        """Per layer: the key of its rotary table (a layer type, or None: the one table)."""
        self.window_of = [
            getattr(config, "sliding_window", None)
            if family.window_from_config
            else getattr(layer.self_attn, "sliding_window", None)
            for layer in self.layers
        ]
        """Per layer: how many tokens (the new one included) it attends to; None: all."""
        self.softcap_of = [
            layer.self_attn.attn_logit_softcapping if family.attn_softcap else None
            for layer in self.layers
        ]
        self.logit_softcap = config.final_logit_softcapping if family.logit_softcap else None
        act = self.layers[0].mlp.act_fn
        # the model's activation module, but SiLU's function: a call costs as much as the op
        self.act = F.silu if type(act).__name__ in ("SiLU", "SiLUActivation") else act
        self._rope: dict[str | None, Tensor] = {}  # [positions, 2, head_dim]: cos, signed sin
        self._fused: list[tuple[Linear, Linear]] = []  # per layer: qkv, gate_up
        self._fused_from: list = []  # (data_ptr, version) of each tensor fused

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
        groups = [
            ([a.q_proj, a.k_proj, a.v_proj], [m.gate_proj, m.up_proj])
            for a, m in ((layer.self_attn, layer.mlp) for layer in self.layers)
        ]
        tensors = [
            t
            for pair in groups
            for modules in pair
            for m in modules
            for t in (_weight(m), _bias(m))
            if t is not None
        ]
        stamp = [(t.data_ptr(), t._version) for t in tensors]
        if stamp != self._fused_from:
            fuse = sum(t.numel() * t.element_size() for t in tensors) <= MAX_FUSED_BYTES
            self._fused = [(_linear(qkv, fuse), _linear(gate_up, fuse)) for qkv, gate_up in groups]
            self._fused_from = stamp

    def rope_table(self, kind: str | None, length: int) -> Tensor:
        """`[at least length positions, 2, head_dim]`: the rotary module's own cos and sin
        (computed by it, so any static scaling type is reproduced; for layer type `kind`
        where the family has one table per type), the sin with its first half negated so
        that rotate_half(x) * sin = swap_halves(x) * table. Grown by doubling."""
        table = self._rope.get(kind)
        if table is None or table.shape[0] < length:
            inner = self.model.model
            weight = inner.embed_tokens.weight
            size = 1 << max(length - 1, 255).bit_length()
            positions = torch.arange(size, device=weight.device)[None]
            probe = weight.new_empty(1)  # only its dtype and device are read
            by_type = () if kind is None else (kind,)
            cos, sin = inner.rotary_emb(probe, positions, *by_type)
            half = self.head_dim // 2
            sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)
            table = self._rope[kind] = torch.stack([cos[0], sin], 1)
        return table

    def step(
        self, tokens: Tensor, positions: Tensor, mask: Tensor, cache, lora: list[dict] | None
    ) -> Tensor:
        """Logits `[rows, vocab]` (model dtype) for one new token per row.

        tokens: `[rows]` ids; positions: `[rows]` their position ids; mask: `[rows,
        cache_len + 1]` 1 where the cache (then the new token) holds a real token, each
        row's tokens contiguous at the right; cache: transformers cache of every token
        whose layers append in place (`update`), left-padded like mask; lora: what `plan`
        returned for these rows (None: no adapters). Call `plan` first."""
        rows = tokens.shape[0]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        q_end, k_end = heads * dim, (heads + kv_heads) * dim
        family, plus_one = self.family, self.family.norm_plus_one
        length = mask.shape[1]  # > every position: a row's position counts its real tokens
        # per table: cos, sin `[rows, 1, dim]`
        rope = {
            k: self.rope_table(k, length)[positions, :, None].unbind(1) for k in set(self.rope_of)
        }
        x = self.model.model.embed_tokens(tokens)  # [rows, hidden]
        # additive attention mask [rows, 1, 1, len]: 0 to attend, -inf for padding
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill_(mask == 0, -math.inf)[:, None, None]
        # a window of w tokens: the last w columns (each row's tokens are contiguous)
        biases = {w: _windowed(bias, w) for w in set(self.window_of)}
        no_lora: dict = {}
        for i, layer in enumerate(self.layers):
            adapted = lora[i] if lora else no_lora
            qkv_proj, gate_up_proj = self._fused[i]
            attn, mlp = layer.self_attn, layer.mlp
            h = _rms_norm(x, layer.input_layernorm, plus_one)
            qkv = _project(h, qkv_proj, adapted.get("qkv"))
            qk = qkv[:, :k_end].view(rows, heads + kv_heads, dim)
            if family.qk_norm:
                q, k = qk[:, :heads], qk[:, heads:]
                q, k = _rms_norm(q, attn.q_norm, plus_one), _rms_norm(k, attn.k_norm, plus_one)
                qk = torch.cat([q, k], 1)
            cos, sin = rope[self.rope_of[i]]
            # rotate_half(x) * sin == (x with its halves swapped) * sin with first half negated
            swapped = qk.view(rows, -1, 2, dim // 2).flip(2).view(rows, -1, dim)
            qk = qk * cos + swapped * sin
            keys, values = cache.layers[i].update(
                qk[:, heads:, None], qkv[:, k_end:].view(rows, kv_heads, 1, dim)
            )
            out = _attend(
                qk[:, :heads, None],  # [rows, heads, 1, dim]
                keys,
                values,
                biases[self.window_of[i]],
                attn.scaling,
                self.softcap_of[i],
            )
            o_proj = [(_weight(attn.o_proj), _bias(attn.o_proj))]
            down_proj = [(_weight(mlp.down_proj), _bias(mlp.down_proj))]
            if family.post_norms:  # normed sublayer outputs, then the residual adds
                after_attn, after_mlp = (getattr(layer, n) for n in family.post_norms)
                y = _project(out.view(rows, q_end), o_proj, adapted.get("o"))
                x = x + _rms_norm(y, after_attn, plus_one)
            else:
                x = _project(out.view(rows, q_end), o_proj, adapted.get("o"), x)
            h = _rms_norm(x, getattr(layer, family.mlp_norm), plus_one)
            gate_up = _project(h, gate_up_proj, adapted.get("gate_up"))
            half = gate_up.shape[1] // 2
            act = self.act(gate_up[:, :half]).mul_(gate_up[:, half:])
            if family.post_norms:
                y = _project(act, down_proj, adapted.get("down"))
                x = x + _rms_norm(y, after_mlp, plus_one)
            else:
                x = _project(act, down_proj, adapted.get("down"), x)
        x = _rms_norm(x, self.model.model.norm, plus_one)
        head = lora[-1].get("lm_head") if lora else None
        lm_head = self.model.lm_head
        logits = _project(x, [(_weight(lm_head), _bias(lm_head))], head)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


def _rms_norm(x: Tensor, norm: nn.Module, plus_one: bool) -> Tensor:
    """transformers' RMSNorm `norm` over x's last dim: in float32, then Llama's `w *
    normed.to(dtype)` or (plus_one) Gemma's `(normed * (1 + w)).to(dtype)`."""
    eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add_(eps))
    if plus_one:
        return (h * (1.0 + norm.weight.float())).to(x.dtype)
    return norm.weight * h.to(x.dtype)


def _linear(modules: list[nn.Module], fuse: bool) -> Linear:
    """The (weight, bias) of `modules`, as one concatenated pair if `fuse` (a missing
    bias among present ones as zeros), else one pair per module."""
    pairs = [(_weight(m), _bias(m)) for m in modules]
    if not fuse:
        return pairs
    biases = [b for _, b in pairs if b is not None]
    bias = None
    if biases:
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in pairs])
    return [(torch.cat([w for w, _ in pairs]), bias)]


def _windowed(bias: Tensor, window: int | None) -> Tensor:
    """`bias` `[rows, 1, 1, len]` that also hides all but the last `window` columns."""
    if window is None or window >= bias.shape[-1]:
        return bias
    bias = bias.clone()
    bias[..., : bias.shape[-1] - window] = -math.inf
    return bias


def _attend(
    q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float, softcap: float | None
) -> Tensor:
    """Attention of one query per row: q `[rows, heads, 1, dim]` over keys and values
    `[rows, kv_heads, len, dim]` (query head h reads kv head h // (heads / kv_heads));
    bias `[rows, 1, 1, len]` additive. With `softcap`, scores become softcap *
    tanh(scores / softcap) before the mask, as transformers' eager attention does."""
    rows, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=bias, scale=scale, enable_gqa=heads != kv_heads
        )
    q = q.view(rows, kv_heads, heads // kv_heads, dim)  # the query heads of each kv head
    scores = torch.matmul(q, keys.transpose(2, 3)) * scale  # [rows, kv_heads, group, len]
    scores = torch.tanh(scores / softcap) * softcap + bias
    weights = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, values).view(rows, heads, 1, dim)


def _project(
    x: Tensor, linear: Linear, lora: LoraProjection | None, residual: Tensor | None = None
) -> Tensor:
    """`residual + x W^T + b (+ the rows' LoRA terms)`; `[rows, out]`. Several (weight,
    bias) pairs stand for their concatenation along the output."""
    if len(linear) > 1:
        y = torch.cat([F.linear(x, w, b) for w, b in linear], -1)
    else:
        weight, b = linear[0]
        if residual is not None and lora is None and b is None:
            return torch.addmm(residual, x, weight.t())
        y = F.linear(x, weight, b)
    if lora is not None:
        y = (y + lora.delta(x)).to(y.dtype)  # as PEFT: the LoRA term in its own dtype
    return y if residual is None else residual + y

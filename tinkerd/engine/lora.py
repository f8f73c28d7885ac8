"""LoRA per row: one pass over the shared base serves rows of several adapters.

Every LoRA computation in the engine goes through here: training's packed multi-run pass,
the sampler's prefill and decode forwards (`route_rows`), and the fast decode path's
stacked low-rank products (`stacked_projection`). Both start from the same row->adapter
mapping: a list with each row's adapter name (`BASE_ADAPTER` for none).

`route_rows` lays the rows out in contiguous segments (`segments`) and swaps each LoRA
layer's forward for one that computes the frozen base projection once for all rows and
adds each adapter's low-rank update to its own segment only:

    y = x @ W.T;   y[start:end] += (x[start:end] @ A_i.T @ B_i.T) * scale_i

so the expensive part (the base matmuls, attention, the unembedding) runs once at the
full batch size, and the adapters cost what they would cost alone. Segments are slices,
not gathers: no copy of the activations. An adapter's weights see only its own rows, so
its gradient is exactly the one a pass of its rows alone would give. The sum is taken
as PEFT takes it (the update in the adapter's dtype, added before casting back), so a
row gives the same numbers as PEFT's single-adapter forward.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BASE_ADAPTER = "__base__"  # a row's adapter name for "no adapter": the base model alone


def adapter_params(peft_model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """Adapter `adapter`'s parameters by their full name in `peft_model` (PEFT writes the
    adapter's name as one dotted component: `...q_proj.lora_A.<adapter>.weight`)."""
    tag = f".{adapter}."
    return {n: p for n, p in peft_model.named_parameters() if tag in n}


def trainable(params: list[nn.Parameter]) -> None:
    """Make a run's LoRA weights require grad (PEFT's `set_adapter` leaves only the
    active adapter's so; a packed pass trains several at once)."""
    for p in params:
        if not p.requires_grad:
            p.requires_grad_(True)


# ---------------------------------------------------------------- rows and segments


@dataclass(frozen=True)
class Segment:
    """Rows `[start, end)` of the batch go through adapter `adapter`."""

    adapter: str
    start: int
    end: int


def segments(adapters: list[str]) -> list[Segment]:
    """The runs of equal consecutive names in `adapters` (one per row), as segments."""
    out: list[Segment] = []
    for row, name in enumerate(adapters):
        if out and out[-1].adapter == name:
            out[-1] = Segment(name, out[-1].start, row + 1)
        else:
            out.append(Segment(name, row, row + 1))
    return out


def row_owners(adapters: list[str]) -> tuple[list[str], list[int]]:
    """(the distinct adapter names in order of first use, each row's index into them)."""
    index: dict[str, int] = {}
    owners = [index.setdefault(a, len(index)) for a in adapters]
    return list(index), owners


@dataclass
class _Layers:
    key: tuple  # (adapter name, id of its config) of every adapter
    configs: list  # kept with the key so that their ids cannot be reused meanwhile
    layers: list[nn.Module]
    routes: dict[tuple[Segment, ...], list]  # the layers' routed forwards, by segments


_LAYERS: weakref.WeakKeyDictionary[nn.Module, _Layers] = weakref.WeakKeyDictionary()
MAX_ROUTES = 64  # routings kept per model (a decode loop reuses one until rows change)


def _layers_of(peft_model: nn.Module) -> _Layers:
    """The model's LoRA layers, found once per set of adapters (walking the module tree
    costs more than a decode step's routing)."""
    key = tuple((name, id(config)) for name, config in peft_model.peft_config.items())
    cached = _LAYERS.get(peft_model)
    if cached is None or cached.key != key:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import ParamWrapper

        layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        for layer in layers:  # PEFT nests one wrapper per parameter; the outer one routes
            if isinstance(layer, ParamWrapper) and isinstance(layer.base_layer, ParamWrapper):
                layer.base_layer._tinkerd_inner = True
        configs = list(peft_model.peft_config.values())
        cached = _LAYERS[peft_model] = _Layers(key, configs, layers, {})
    return cached


def lora_layers(peft_model: nn.Module) -> list[nn.Module]:
    """The model's LoRA layers (PEFT's `LoraLayer` modules)."""
    return _layers_of(peft_model).layers


def _is_plain(layer: nn.Module, adapter: str) -> bool:
    """Whether `adapter` is computed at `layer` as plain `B(A(x)) * scaling` (not a
    variant such as DoRA, and not merged into the base weight)."""
    return adapter not in getattr(layer, "lora_variant", {}) and not getattr(layer, "merged", False)


# ---------------------------------------------------------------- the HF forward


@contextlib.contextmanager
def route_rows(peft_model: nn.Module, segs: list[Segment]) -> Iterator[None]:
    """Within this block, calling the base model (`peft_model.base_model.model`, the
    LoRA-injected module tree) routes rows `[s.start, s.end)` through adapter `s.adapter`
    (none for `BASE_ADAPTER`, or where the adapter does not adapt a layer) for every
    segment. The caller holds the base's lock: the LoRA layers' forwards are swapped for
    the block and restored after (PEFT's active-adapter flags are never touched)."""
    cached = _layers_of(peft_model)
    layers, key = cached.layers, tuple(segs)
    forwards = cached.routes.get(key)
    if forwards is None:  # the same rows next time (a decode loop's steps) reuse these
        rows = max(s.end for s in segs)
        forwards = [_routed_forward(layer, segs, rows) for layer in layers]
        if len(cached.routes) >= MAX_ROUTES:
            cached.routes.clear()
        cached.routes[key] = forwards
    for layer, forward in zip(layers, forwards):
        vars(layer)["forward"] = forward  # an instance attribute shadows the class's
    try:
        yield
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)


def _routed_forward(layer: nn.Module, segs: list[Segment], rows: int):
    from peft.tuners.lora.layer import ParamWrapper

    if isinstance(layer, ParamWrapper):
        return types.MethodType(_expert_forward(layer, segs, rows), layer)
    embedded = getattr(layer, "lora_embedding_A", {})
    if any(s.adapter in embedded for s in segs):
        raise NotImplementedError("adapters of embedding layers are not supported")
    if getattr(layer, "merged", False):  # the engine never merges: the sum would count twice
        raise RuntimeError("per-row LoRA routing needs unmerged adapters")
    mine = [s for s in segs if s.adapter in layer.lora_A]
    if _uniform(layer, mine, rows):
        return types.MethodType(_batched_forward(layer, mine, rows), layer)
    if len(mine) == 1 and mine[0].end - mine[0].start == rows and _is_plain(layer, mine[0].adapter):
        return types.MethodType(_whole_forward(mine[0].adapter, rows), layer)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if x.shape[0] != rows:
            raise RuntimeError(f"per-row LoRA routing expects {rows} rows, got {x.shape[0]}")
        for seg in mine:
            name, part = seg.adapter, slice(seg.start, seg.end)
            lora_a = self.lora_A[name]
            xs = x[part].to(lora_a.weight.dtype)
            if name in self.lora_variant:  # e.g. DoRA: PEFT's own arithmetic for it
                result[part] = self.lora_variant[name].forward(
                    self, active_adapter=name, x=xs, result=result[part]
                )
                continue
            delta = self.lora_B[name](lora_a(self.lora_dropout[name](xs))) * self.scaling[name]
            if delta.dtype == result.dtype:
                result[part] += delta  # autograd: CopySlices
            else:  # summed in the wider dtype, then cast back, as PEFT does
                result[part] = result[part] + delta
        return result

    return types.MethodType(forward, layer)


def _expert_forward(layer: nn.Module, segs: list[Segment], rows: int):
    """Routing for PEFT's `ParamWrapper`s (LoRA on a fused `[experts, ., .]` parameter,
    `target_parameters`): the update is folded into the weight itself, so rows of
    different adapters cannot share one call. The outermost wrapper of a module (PEFT
    nests one wrapper per targeted parameter) calls the wrapped module once per segment,
    on that segment's tokens, with each wrapper's fold of that segment's adapter in place
    (PEFT's own `_activate_lora`, so a segment gets exactly what its adapter alone
    gives). The experts' work is the same as one call (each token still meets only its
    own experts); only the folds are per adapter. Inner wrappers are bypassed."""
    from peft.tuners.lora.layer import ParamWrapper

    if getattr(layer, "_tinkerd_inner", False):

        def bypassed(self, *args, **kwargs):
            raise RuntimeError("an inner LoRA parameter wrapper was called while routing rows")

        return bypassed
    chain = [layer]
    while isinstance(chain[-1].base_layer, ParamWrapper):
        chain.append(chain[-1].base_layer)
    if any(w.merged for w in chain):
        raise RuntimeError("per-row LoRA routing needs unmerged adapters")

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        module = self.get_base_layer()
        n = x.shape[0]
        if x.dim() != 2 or n % rows:
            raise NotImplementedError(
                f"per-row LoRA routing of {type(module).__name__} expects [tokens, hidden] "
                f"inputs for {rows} rows, got {tuple(x.shape)}"
            )
        per_row = n // rows

        def cut(value, part: slice):  # the per-token arguments (router choices, weights)
            return value[part] if isinstance(value, Tensor) and value.shape[:1] == (n,) else value

        outs = []
        for seg in segs:
            part = slice(seg.start * per_row, seg.end * per_row)
            with contextlib.ExitStack() as stack:
                for wrapper in chain:
                    if seg.adapter in wrapper.lora_A:
                        stack.enter_context(wrapper._activate_lora([seg.adapter]))
                outs.append(
                    module(
                        x[part],
                        *(cut(a, part) for a in args),
                        **{k: cut(v, part) for k, v in kwargs.items()},
                    )
                )
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    return forward


def _whole_forward(name: str, rows: int):
    """One adapter for every row: PEFT's single-adapter arithmetic, without slicing."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if x.shape[0] != rows:
            raise RuntimeError(f"per-row LoRA routing expects {rows} rows, got {x.shape[0]}")
        lora_a = self.lora_A[name]
        xs = self.lora_dropout[name](x.to(lora_a.weight.dtype))
        delta = self.lora_B[name](lora_a(xs)) * self.scaling[name]
        return (result + delta).to(result.dtype)

    return forward


def _uniform(layer: nn.Module, segs: list[Segment], rows: int) -> bool:
    """Whether the segments tile all rows in equal parts, each through a plain adapter of
    the same shape here: then one batched matmul serves them all."""
    if len(segs) < 2:
        return False
    sizes = {s.end - s.start for s in segs}
    shapes = {layer.lora_A[s.adapter].weight.shape for s in segs}
    tiled = all(s.start == i * (rows // len(segs)) for i, s in enumerate(segs))
    return (
        len(sizes) == 1
        and len(shapes) == 1
        and tiled
        and (len(segs) * sizes.pop() == rows)
        and all(_is_plain(layer, s.adapter) for s in segs)
        and all(layer.lora_B[s.adapter].bias is None for s in segs)
    )


def _batched_forward(layer: nn.Module, segs: list[Segment], rows: int):
    """The same sum as the per-segment loop, as two `bmm`s over the stacked adapters
    (`[K, rank, in]`, `[K, out, rank]`): a few kernels per layer however many runs.

    The scaling multiplies the `[K, n, rank]` product, not the `[K, n, out]` update, and
    the update is added to the base output by the second product itself (`baddbmm`,
    beta 1): on a packed pass of 16 runs these two elementwise passes over the full
    `[tokens, out]` output took as long as the adapters' products (tinkerd/tiny). Where
    every adapter has the same scaling it is the product's `alpha` (one rounding, as
    PEFT's `delta * scaling`); a bf16 base output is summed in float32, then cast
    back, as PEFT does."""
    weight = layer.lora_A[segs[0].adapter].weight
    scales = [float(layer.scaling[s.adapter]) for s in segs]
    alpha = scales[0] if len(set(scales)) == 1 else 1.0
    scale = None if len(set(scales)) == 1 else torch.tensor(scales, dtype=weight.dtype)
    scale = None if scale is None else scale.to(weight.device)[:, None, None]
    k = len(segs)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if x.shape[0] != rows:
            raise RuntimeError(f"per-row LoRA routing expects {rows} rows, got {x.shape[0]}")
        a = torch.stack([self.lora_A[s.adapter].weight for s in segs])
        b = torch.stack([self.lora_B[s.adapter].weight for s in segs])
        xs = x.to(a.dtype).reshape(k, -1, x.shape[-1])  # segment i's rows, flattened
        h = torch.bmm(xs, a.transpose(1, 2))  # [K, n, rank]
        if scale is not None:
            h = h * scale
        base = result.reshape(k, -1, result.shape[-1]).to(a.dtype)
        out = torch.baddbmm(base, h, b.transpose(1, 2), alpha=alpha)
        return out.reshape(result.shape).to(result.dtype)

    return forward


def packed_logits(peft_model: nn.Module, input_ids: Tensor, segs: list[Segment]) -> Tensor:
    """Logits `[rows, seq, vocab]` of the packed `input_ids`, each segment's rows through
    its own adapter."""
    model = peft_model.base_model.model  # the injected tree: skips PeftModel's own routing
    with route_rows(peft_model, segs):
        return model(input_ids=input_ids).logits


def pad_cat(tensors: list[Tensor], width: int) -> Tensor:
    """Right-pad each `[rows_i, len_i]` tensor with zeros to `width` columns, stack rows."""
    out = tensors[0].new_zeros((sum(t.shape[0] for t in tensors), width))
    row = 0
    for t in tensors:
        out[row : row + t.shape[0], : t.shape[1]] = t
        row += t.shape[0]
    return out


# ---------------------------------------------------------------- straight from the weights


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


def stacked_projection(
    modules: list[nn.Module], adapters: list[str], device: torch.device
) -> LoraProjection | None | bool:
    """The adapters of rows `adapters` (one name per row) for `modules` (whose outputs are
    concatenated, as in a fused projection), stacked; None if none of them adapts these;
    False if one does in a way not computed here (a LoRA variant, a bias, merged
    weights). B is block-diagonal across the modules' outputs: the zeros add exactly
    nothing."""
    names, owner_of_row = row_owners(adapters)
    blocks = []  # (adapter index, output offset, A, B * scaling)
    offset = 0
    for module in modules:
        lora_a = getattr(module, "lora_A", None) or {}
        for k, name in enumerate(names):
            if name not in lora_a:
                continue
            lora_b = module.lora_B[name]
            if not _is_plain(module, name) or lora_b.bias is not None:
                return False
            blocks.append((k, offset, lora_a[name].weight, lora_b.weight * module.scaling[name]))
        if getattr(module, "merged", False):
            return False
        offset += getattr(module, "base_layer", module).weight.shape[0]
    if not blocks:
        return None
    a = torch.cat([block[2] for block in blocks])
    b = a.new_zeros((offset, a.shape[0]))
    column = 0
    for _, start, _, scaled in blocks:
        b[start : start + scaled.shape[0], column : column + scaled.shape[1]] = scaled
        column += scaled.shape[1]
    if len(names) == 1:
        return LoraProjection(a, b, None)  # every row uses the one adapter
    owner = torch.cat([torch.full((block[2].shape[0],), block[0]) for block in blocks])
    mask = (torch.tensor(owner_of_row)[:, None] == owner[None, :]).to(a.dtype)
    return LoraProjection(a, b, mask.to(device))

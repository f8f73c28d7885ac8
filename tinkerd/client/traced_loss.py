"""Custom losses that run on the server: trace a per-datum loss with torch.fx.

`ServiceClient.create_custom_loss(fn, input_ranks)` returns a `LossHandle`: the traced
graph as plain data (the official SDK's `create_custom_loss` format), which the server
checks node by node against an allowlist before it runs it (`tinkerd.fx_loss`). A handle
is usable as a `loss_fn` or a `RegularizerSpec.fn`; when the base loss and every
regularizer are handles, `forward_backward_custom` runs entirely in the engine, in one
forward and one backward, gradient norms included.

`fn(logprobs, *inputs) -> (loss, {"custom/<name>:sum" | ":mean": value})` runs once per
datum; `input_ranks` names each parameter's rank (0 scalar, 1 `[T]`, 2 `[T, K]`), the
first being `logprobs`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.fx.node import _get_qualified_name

from tinkerd.errors import InvalidRequestError

GRAPH_FORMAT = 1
_CONSTANT_KINDS = {
    torch.dtype: "dtype",
    torch.device: "device",
    torch.layout: "layout",
    torch.memory_format: "memory_format",
}


@dataclass
class LossHandle:
    name: str
    inputs: list[tuple[str, int]]
    graph: dict[str, Any]
    loss_id: str | None = None
    """Set once uploaded to a server."""
    compiled: Any = field(default=None, repr=False)
    """The checked, runnable graph (`tinkerd.fx_loss.CompiledLoss`)."""

    def __call__(self, data: list, logprobs_list: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Run the checked graph here, as a plain loss_fn (summed over data)."""
        from tinkerd.custom_loss import graph_loss_fn

        return graph_loss_fn(self.compiled)(data, logprobs_list)

    def request(self) -> dict[str, Any]:
        """The body of create_custom_loss, without session fields."""
        return {
            "name": self.name,
            "inputs": [{"name": n, "rank": r} for n, r in self.inputs],
            "graph": self.graph,
            "type": "create_custom_loss",
        }


def trace(fn: Any, input_ranks: Mapping[str, int]) -> LossHandle:
    """Trace `fn` and check it with the same allowlist the server applies."""
    from tinkerd.fx_loss import compile_loss

    params = list(inspect.signature(fn).parameters)
    if not params or params[0] != "logprobs":
        raise InvalidRequestError("a custom loss's first parameter must be named 'logprobs'")
    if set(params) != set(input_ranks):
        raise InvalidRequestError(f"input_ranks must name exactly {params}")
    try:
        graph_module = torch.fx.symbolic_trace(fn)
    except Exception as e:  # noqa: BLE001 -- torch.fx raises many kinds
        raise InvalidRequestError(f"{fn.__name__} cannot be traced by torch.fx: {e}") from e
    nodes = [_encode_node(node) for node in graph_module.graph.nodes]
    handle = LossHandle(
        name=fn.__name__,
        inputs=[(p, int(input_ranks[p])) for p in params],
        graph={"format": GRAPH_FORMAT, "nodes": nodes},
    )
    handle.compiled = compile_loss(handle.request())
    return handle


def _encode_node(node: torch.fx.Node) -> dict[str, Any]:
    if node.op == "call_function":
        target = _get_qualified_name(node.target)
        if target.startswith("_operator."):
            target = "operator." + target.removeprefix("_operator.")
    else:
        target = str(node.target)
    return {
        "op": node.op,
        "name": node.name,
        "target": target,
        "args": [_encode_arg(a) for a in node.args],
        "kwargs": {k: _encode_arg(a) for k, a in node.kwargs.items()},
    }


def _encode_arg(arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        return {"ref": arg.name}
    if isinstance(arg, float) and not math.isfinite(arg):
        return {"float": str(arg)}
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    if isinstance(arg, list):
        return [_encode_arg(a) for a in arg]
    if isinstance(arg, tuple):
        return {"tuple": [_encode_arg(a) for a in arg]}
    if isinstance(arg, dict):
        return {"dict": {str(k): _encode_arg(a) for k, a in arg.items()}}
    if isinstance(arg, slice):
        return {"slice": [_encode_arg(a) for a in (arg.start, arg.stop, arg.step)]}
    if arg is Ellipsis:
        return {"ellipsis": True}
    if (kind := _CONSTANT_KINDS.get(type(arg))) is not None:
        return {kind: str(arg).removeprefix("torch.")}
    raise InvalidRequestError(f"a custom loss cannot pass a {type(arg).__name__} argument")

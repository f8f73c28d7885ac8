"""Run a custom loss uploaded as a torch.fx graph, and nothing else.

The official SDK's `create_custom_loss` traces a per-datum loss
`fn(logprobs, *inputs) -> (loss, {"custom/<name>:sum|mean": value})` with torch.fx and
sends its nodes as JSON: `{"op", "name", "target", "args", "kwargs"}`, args encoded as
JSON scalars and lists or one-key objects (`ref`, `tuple`, `dict`, `slice`, `ellipsis`,
`float`, `dtype`). `compile_loss` checks every node before anything runs:

- ops: placeholder, call_function, call_method, output (no get_attr, no call_module);
- functions: looked up by name in `FUNCTIONS`, an explicit table of pure tensor math;
  tensor methods: in `METHODS`; `getattr` only for shape-like attributes;
- no tensor factories (nothing allocates from a size the graph chooses), no `.item()`,
  `.numpy()`, `.tolist()`, no devices; references only to earlier nodes.

Strings from the request are only ever dictionary keys: nothing is imported, evaluated
or looked up by name outside these tables. At run time each intermediate tensor is
capped in size.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tinkerd.errors import InvalidRequestError

GRAPH_FORMAT = 1
MAX_NODES = 10_000
MAX_ELEMENTS = 1 << 26  # per intermediate tensor
METRIC_KEY = re.compile(r"^custom/[a-z0-9_./-]+:(sum|mean)$")

# Pure tensor math, by name; the same names are allowed as tensor methods.
_TORCH_MATH = """abs exp exp2 expm1 log log1p log2 log10 sqrt rsqrt square sigmoid tanh relu
    neg sign sin cos clamp clip clamp_min clamp_max minimum maximum where sum mean prod amax
    amin max min logsumexp softmax log_softmax cumsum mul add sub div true_divide pow
    matmul dot stack cat gather squeeze unsqueeze reshape flatten transpose
    eq ne gt lt ge le logical_and logical_or logical_not isfinite nan_to_num std var
    norm lerp""".split()  # noqa: SIM905
FUNCTIONS: dict[str, Callable[..., Any]] = {f"torch.{n}": getattr(torch, n) for n in _TORCH_MATH}
FUNCTIONS |= {
    f"torch.nn.functional.{n}": getattr(F, n)
    for n in "log_softmax softmax logsigmoid softplus relu sigmoid".split()  # noqa: SIM905
}
FUNCTIONS |= {
    f"operator.{n}": getattr(operator, n)
    for n in "add sub mul truediv floordiv neg pos pow getitem eq ne lt le gt ge".split()  # noqa: SIM905
}
FUNCTIONS |= {
    f"math.{n}": getattr(math, n) for n in ["log", "exp", "sqrt", "log1p", "expm1", "pow"]
}
_METHODS_ONLY = """float double detach view view_as size dim numel t contiguous clone type_as
    expand_as masked_fill all any to reciprocal""".split()  # noqa: SIM905
METHODS = set(_TORCH_MATH) | set(_METHODS_ONLY)
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "T"}
GETATTR = {"getattr", "builtins.getattr"}  # how torch.fx names the builtin
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


def _refuse(node: Mapping[str, Any], why: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"custom loss refused: node {node.get('name')!r} ({node.get('op')} "
        f"{node.get('target')!r}): {why}"
    )


@dataclass
class CompiledLoss:
    name: str
    inputs: list[tuple[str, int]]
    """(name, rank) of each graph input, `logprobs` first."""
    nodes: list[dict[str, Any]]

    def __call__(
        self, logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Evaluate the graph on one datum: (scalar loss, metrics)."""
        values = {"logprobs": logprobs, **inputs}
        env: dict[str, Any] = {}
        for node in self.nodes:
            op, target = node["op"], node["target"]
            if op == "placeholder":
                env[node["name"]] = values[target]
                continue
            args = [_decode(a, env) for a in node["args"]]
            kwargs = {k: _decode(a, env) for k, a in node["kwargs"].items()}
            if op == "output":
                return _check_output(self.name, args[0])
            if op == "call_method":
                if not isinstance(args[0], torch.Tensor):
                    raise _refuse(node, "methods may only be called on tensors")
                if target == "to" and any(not isinstance(a, torch.dtype) for a in args[1:]):
                    raise _refuse(node, ".to() may only change the dtype")
                result = getattr(args[0], target)(*args[1:], **kwargs)
            elif target in GETATTR:
                result = getattr(args[0], args[1])
            else:
                result = FUNCTIONS[target](*args, **kwargs)
            if isinstance(result, torch.Tensor) and result.numel() > MAX_ELEMENTS:
                raise _refuse(node, f"makes a tensor of {result.numel()} elements")
            env[node["name"]] = result
        raise InvalidRequestError(f"custom loss {self.name!r} has no output node")


def compile_loss(request: Mapping[str, Any]) -> CompiledLoss:
    """Check a create_custom_loss request completely; refuse anything outside the tables."""
    graph = request.get("graph")
    if not isinstance(graph, Mapping) or graph.get("format") != GRAPH_FORMAT:
        raise InvalidRequestError(f"custom loss graph must have format {GRAPH_FORMAT}")
    nodes = graph.get("nodes")
    if not isinstance(nodes, list) or not 0 < len(nodes) <= MAX_NODES:
        raise InvalidRequestError(f"custom loss graph needs 1 to {MAX_NODES} nodes")
    try:
        inputs = [(str(i["name"]), int(i["rank"])) for i in request.get("inputs", [])]
    except (KeyError, TypeError, ValueError, OverflowError):  # int(inf) overflows
        raise InvalidRequestError("custom loss inputs must be [{name, rank}]") from None
    if not inputs or inputs[0][0] != "logprobs" or any(r not in (0, 1, 2) for _, r in inputs):
        raise InvalidRequestError("custom loss inputs start with logprobs; ranks are 0, 1 or 2")
    seen: set[str] = set()
    placeholders: list[str] = []
    for node in nodes:
        _check_node(node, seen)
        if node["op"] == "placeholder":
            placeholders.append(node["target"])
        seen.add(node["name"])
    if placeholders != [name for name, _ in inputs]:
        raise InvalidRequestError(
            f"custom loss parameters {placeholders} do not match its inputs {inputs}"
        )
    if nodes[-1]["op"] != "output":
        raise InvalidRequestError("custom loss graph must end with its output node")
    return CompiledLoss(name=str(request.get("name") or "custom"), inputs=inputs, nodes=nodes)


def _check_node(node: Any, seen: set[str]) -> None:
    if not isinstance(node, Mapping) or not isinstance(node.get("name"), str):
        raise InvalidRequestError(f"custom loss node is malformed: {node!r:.200}")
    op, target = node.get("op"), node.get("target")
    if not isinstance(node.get("args", []), list) or not isinstance(node.get("kwargs", {}), dict):
        raise _refuse(node, "args must be a list and kwargs an object")
    node.setdefault("args", [])
    node.setdefault("kwargs", {})
    if node["name"] in seen:
        raise _refuse(node, "duplicate node name")
    if op == "placeholder":
        if node["args"] or node["kwargs"]:
            raise _refuse(node, "placeholders take no defaults")
    elif op == "call_function":
        if target in GETATTR:
            if len(node["args"]) != 2 or node["args"][1] not in SHAPE_ATTRIBUTES:
                raise _refuse(node, f"getattr is allowed for {sorted(SHAPE_ATTRIBUTES)} only")
        elif target not in FUNCTIONS:
            raise _refuse(node, "function not in the allowlist")
    elif op == "call_method":
        if target not in METHODS:
            raise _refuse(node, "tensor method not in the allowlist")
    elif op == "output":
        out = node["args"][0] if len(node["args"]) == 1 else None
        parts = out.get("tuple") if isinstance(out, Mapping) else None
        metrics = (
            parts[1].get("dict")
            if parts and len(parts) == 2 and isinstance(parts[1], Mapping)
            else None
        )
        if not isinstance(metrics, Mapping):
            raise _refuse(node, "the loss must return (loss, {metric: value})")
        for key in metrics:
            if not METRIC_KEY.match(key):
                raise _refuse(node, f"metric {key!r} must be custom/<name>:sum or :mean")
    else:
        raise _refuse(node, "op not allowed (get_attr and call_module are refused)")
    for arg in [*node["args"], *node["kwargs"].values()]:
        _check_arg(arg, node, seen)


def _check_arg(arg: Any, node: Mapping[str, Any], seen: set[str]) -> None:
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return
    if isinstance(arg, list):
        for a in arg:
            _check_arg(a, node, seen)
        return
    if not isinstance(arg, Mapping) or len(arg) != 1:
        raise _refuse(node, f"cannot decode argument {arg!r:.100}")
    kind, value = next(iter(arg.items()))
    if kind == "ref":
        if value not in seen:
            raise _refuse(node, f"refers to {value!r}, which is not an earlier node")
    elif kind in ("tuple", "slice") and isinstance(value, list):
        for a in value:
            _check_arg(a, node, seen)
    elif kind == "dict" and isinstance(value, Mapping):
        for a in value.values():
            _check_arg(a, node, seen)
    elif (
        kind == "float"
        and value in ("inf", "-inf", "nan")
        or kind == "dtype"
        and value in DTYPES
        or kind == "ellipsis"
        and value is True
    ):
        pass
    else:
        raise _refuse(node, f"argument kind {kind!r} is not allowed")


def _decode(arg: Any, env: Mapping[str, Any]) -> Any:
    if isinstance(arg, list):
        return [_decode(a, env) for a in arg]
    if not isinstance(arg, Mapping):
        return arg
    kind, value = next(iter(arg.items()))
    if kind == "ref":
        return env[value]
    if kind == "tuple":
        return tuple(_decode(a, env) for a in value)
    if kind == "dict":
        return {k: _decode(a, env) for k, a in value.items()}
    if kind == "slice":
        return slice(*(_decode(a, env) for a in value))
    if kind == "float":
        return float(value)
    if kind == "dtype":
        return DTYPES[value]
    return Ellipsis


def _check_output(name: str, out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, metrics = out
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise InvalidRequestError(f"custom loss {name!r} must return a scalar tensor loss")
    return loss.reshape(()), {k: torch.as_tensor(v) for k, v in metrics.items()}

"""Custom losses uploaded as torch.fx graphs (loss_fn="custom" over HTTP).

An SDK client uploads a traced per-datum loss once (`create_custom_loss`); its
forward_backward then names it by loss_id, with optional regularizers (tinkerd's client
sends `loss_fn_config["regularizers"]`: JSON [{name, weight, loss_id}]). Each graph is
compiled against an allowlist (fx_loss.py) and visible only to the key that uploaded it.
"""

from __future__ import annotations

import json
from typing import Any

from tinkerd.custom_loss import LossFn, RegularizerSpec, check_graph_inputs, graph_loss_fn
from tinkerd.errors import InvalidRequestError
from tinkerd.fx_loss import CompiledLoss, compile_loss
from tinkerd.types import Datum


class UploadedLosses:
    def __init__(self) -> None:
        self._compiled: dict[tuple[str | None, str], CompiledLoss] = {}  # (owner, loss_id)

    def add(self, owner: str | None, session_id: str, graph: dict) -> str:
        """Compile `graph` (refused outside the allowlist); its loss_id."""
        seq_id = graph.get("custom_loss_seq_id", 0)
        if type(seq_id) is not int or seq_id < 0:
            raise InvalidRequestError(
                f"custom_loss_seq_id must be an integer >= 0, got {str(seq_id)[:40]!r}"
            )
        compiled = compile_loss(graph)
        loss_id = f"{session_id}:loss:{seq_id}"
        self._compiled[(owner, loss_id)] = compiled
        return loss_id

    def _get(self, loss_id: Any, owner: str | None) -> CompiledLoss:
        compiled = self._compiled.get((owner, str(loss_id)))
        if compiled is None:
            raise InvalidRequestError(f"no custom loss {loss_id!r}: create it in this session")
        return compiled

    def terms(
        self, owner: str | None, config: dict, data: list[Datum]
    ) -> tuple[LossFn, list[RegularizerSpec], bool]:
        """(loss_fn, regularizers, track_grad_norms) named by a forward_backward's
        loss_fn_config, each graph checked against `data`'s loss_fn_inputs."""
        compiled = self._get(config.get("loss_id"), owner)
        try:
            specs = [
                (str(r["name"]), float(r["weight"]), self._get(r["loss_id"], owner))
                for r in json.loads(str(config.get("regularizers") or "[]"))
            ]
        except InvalidRequestError:
            raise
        except (ValueError, TypeError, KeyError) as e:
            raise InvalidRequestError(f"loss_fn_config['regularizers'] malformed: {e}") from None
        for graph in [compiled, *(c for _, _, c in specs)]:
            check_graph_inputs(graph, data)
        regs = [RegularizerSpec(fn=graph_loss_fn(c), weight=w, name=n) for n, w, c in specs]
        return graph_loss_fn(compiled), regs, bool(config.get("track_grad_norms", 0))

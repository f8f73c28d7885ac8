"""Custom losses uploaded as torch.fx graphs (loss_fn="custom" over HTTP).

An SDK client uploads a traced per-datum loss once (`create_custom_loss`); its
forward_backward then names it by loss_id, with optional regularizers (tinkerd's client
sends `loss_fn_config["regularizers"]`: JSON [{name, weight, loss_id}]). Each graph is
compiled against an allowlist (fx_loss.py) and visible only to the key that uploaded it.
A session's losses are freed when it ends; a key holds at most `max_count` losses and
`max_bytes` bytes of graphs (their JSON size) at once (403 beyond).
"""

from __future__ import annotations

import json
from typing import Any

from tinkerd.custom_loss import LossFn, RegularizerSpec, check_graph_inputs, graph_loss_fn
from tinkerd.errors import InvalidRequestError, QuotaExceededError
from tinkerd.fx_loss import CompiledLoss, compile_loss
from tinkerd.types import Datum


class UploadedLosses:
    def __init__(self, max_count: int | None = None, max_bytes: int | None = None) -> None:
        self._compiled: dict[tuple[str | None, str], CompiledLoss] = {}  # (owner, loss_id)
        self._sizes: dict[tuple[str | None, str], int] = {}
        self.max_count = max_count
        self.max_bytes = max_bytes

    def add(self, owner: str | None, session_id: str, graph: dict) -> str:
        """Compile `graph` (refused outside the allowlist); its loss_id."""
        seq_id = graph.get("custom_loss_seq_id", 0)
        if type(seq_id) is not int or seq_id < 0:
            raise InvalidRequestError(
                f"custom_loss_seq_id must be an integer >= 0, got {str(seq_id)[:40]!r}"
            )
        loss_id = f"{session_id}:loss:{seq_id}"
        size = len(json.dumps(graph, default=str))
        mine = [k for k in self._sizes if k[0] == owner and k != (owner, loss_id)]
        if owner is not None and self.max_count is not None and len(mine) >= self.max_count:
            raise QuotaExceededError(
                f"this API key holds {len(mine)} uploaded losses (limit --max-losses-per-key "
                f"{self.max_count}); end a session that holds some first"
            )
        held = sum(self._sizes[k] for k in mine)
        if owner is not None and self.max_bytes is not None and held + size > self.max_bytes:
            raise QuotaExceededError(
                f"this API key's uploaded losses would hold {held + size} bytes (limit "
                f"--max-loss-bytes-per-key {self.max_bytes}); end a session that holds some"
            )
        compiled = compile_loss(graph)
        self._compiled[(owner, loss_id)] = compiled
        self._sizes[(owner, loss_id)] = size
        return loss_id

    def drop_session(self, session_id: str) -> None:
        """Free the losses uploaded in a session (it ended)."""
        prefix = f"{session_id}:loss:"
        for key in [k for k in self._compiled if k[1].startswith(prefix)]:
            self._compiled.pop(key, None)
            self._sizes.pop(key, None)

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

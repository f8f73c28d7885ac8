"""forward_backward_custom over HTTP, as functions of plain wire requests.

Uploaded losses (every term a `LossHandle` from `ServiceClient.create_custom_loss`) run on
the server in one pass: a forward_backward with `loss_fn="custom"`. Plain Python functions
run here, between Tinker's two phases: a forward for the logprobs, then a cross_entropy
forward_backward whose weights are -d(loss)/d(logprobs), which gives the run exactly the
gradient of the custom loss.
"""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor

from tinkerd.client.traced_loss import LossHandle
from tinkerd.custom_loss import GradientFn, gradient_fn, output_from_metrics
from tinkerd.errors import InvalidRequestError
from tinkerd.futures import chained, failed_future
from tinkerd.requests import ForwardBackwardCustomRequest, ForwardBackwardRequest
from tinkerd.types import CustomLossOutput, Datum, ForwardBackwardOutput, TensorData


def custom_loss_over_http(transport: Any, req: ForwardBackwardCustomRequest) -> Future:
    """`req` through `transport` (an HttpTransport): a future of its CustomLossOutput."""
    terms = [req.loss_fn, *(r.fn for r in req.regularizers)]
    if all(isinstance(term, LossHandle) for term in terms):
        return _uploaded(transport, req)
    grads = gradient_fn(
        req.data, req.loss_fn, req.regularizers, req.track_grad_norms, req.run_sync_in_executor
    )
    future = _two_phases(transport, req.model_id, req.data, grads)
    return chained(future, lambda out: out[1].output(out[0]))


def _uploaded(transport: Any, req: ForwardBackwardCustomRequest) -> Future[CustomLossOutput]:
    """Uploaded losses run on the server, in one forward and one backward."""
    regularizers = [
        {"name": r.name, "weight": r.weight, "loss_id": r.fn.loss_id} for r in req.regularizers
    ]
    config = {
        "loss_id": req.loss_fn.loss_id,
        "regularizers": json.dumps(regularizers),
        "track_grad_norms": float(req.track_grad_norms),
    }
    request = ForwardBackwardRequest(
        model_id=req.model_id, data=req.data, loss_fn="custom", loss_fn_config=config
    )
    names = [r.name for r in req.regularizers]
    return chained(transport.submit(request), lambda out: output_from_metrics(out, names))


def _two_phases(
    transport: Any, model_id: str, data: list[Datum], gradient_fn: GradientFn
) -> Future[tuple[ForwardBackwardOutput, Any]]:
    """Both seq_ids are taken now, so requests made after this call still run after both
    phases."""
    targets = [d.loss_fn_inputs.get("target_tokens") for d in data]
    if not data or any(t is None for t in targets):
        return failed_future(
            InvalidRequestError("every datum needs loss_fn_inputs['target_tokens']")
        )
    forward_seq, backward_seq = transport.reserve_seq(model_id), transport.reserve_seq(model_id)

    def cross_entropy(seq_id: int, weights: list[Tensor], forward_only: bool) -> Future:
        weighted = [
            Datum(
                model_input=d.model_input,
                loss_fn_inputs={"target_tokens": t, "weights": TensorData.from_torch(w)},
            )
            for d, t, w in zip(data, targets, weights)
        ]
        request = ForwardBackwardRequest(
            model_id=model_id,
            seq_id=seq_id,
            data=weighted,
            loss_fn="cross_entropy",
            forward_only=forward_only,
        )
        return transport.submit(request)

    zeros = [torch.zeros(t.shape or [len(t.data)]) for t in targets]
    forward = cross_entropy(forward_seq, zeros, forward_only=True)

    def second_phase() -> tuple[ForwardBackwardOutput, Any]:
        try:
            first = forward.result()
            logprobs = [o["logprobs"].to_torch() for o in first.loss_fn_outputs]
            grads, extra = gradient_fn(logprobs)
        except BaseException:
            # Fill the reserved seq_id with a forward (no gradient is applied), then
            # report the original error; if the data itself was refused, so is this.
            with contextlib.suppress(Exception):
                cross_entropy(backward_seq, zeros, forward_only=True).result()
            raise
        return cross_entropy(backward_seq, [-g for g in grads], False).result(), extra

    return transport.background(second_phase)

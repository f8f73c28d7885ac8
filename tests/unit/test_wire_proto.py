"""Our protobuf codec against the official SDK's own encoder and decoder."""

import numpy as np
import pytest
import tinker
import torch
from tinker.proto import request_conv, response_conv
from tinker.types.forward_backward_input import ForwardBackwardInput
from tinker.types.forward_backward_request import ForwardBackwardRequest

from tinkerd import wire_proto
from tinkerd.types import Datum, ForwardBackwardOutput, ModelInput, TensorData


def sdk_request_bytes(data, loss_fn="cross_entropy", config=None, forward_only=False):
    request = ForwardBackwardRequest(
        forward_backward_input=ForwardBackwardInput(
            data=data, loss_fn=loss_fn, loss_fn_config=config
        ),
        model_id="s:train:0",
        seq_id=7,
    )
    msg = request_conv.forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def test_decodes_what_the_sdk_sends():
    top2 = torch.zeros(5, 8, dtype=torch.int64)
    top2[0, 0], top2[3, 1] = 9, 4  # mostly zero: the SDK sends it as sparse CSR
    sdk_data = [
        tinker.Datum(
            model_input=tinker.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [0.0, 1.0, -2.5]},
        ),
        tinker.Datum(
            model_input=tinker.ModelInput.from_ints([5, 6, 7, 8, 9]),
            loss_fn_inputs={"target_tokens": top2, "weights": np.ones((5, 8), "f4")},
        ),
    ]
    body = sdk_request_bytes(sdk_data, "ppo", {"clip_low_threshold": 0.7, "note": "x"}, True)
    req = wire_proto.decode_forward_backward_request(body)
    assert (req["model_id"], req["seq_id"], req["loss_fn"], req["forward_only"]) == (
        "s:train:0",
        7,
        "ppo",
        True,
    )
    assert req["loss_fn_config"] == {"clip_low_threshold": pytest.approx(0.7), "note": "x"}
    first, second = req["data"]
    assert first.model_input.to_ints() == [1, 2, 3]
    assert first.loss_fn_inputs["weights"].tolist() == [0.0, 1.0, -2.5]
    assert second.loss_fn_inputs["target_tokens"].sparse_crow_indices is not None
    assert torch.equal(second.loss_fn_inputs["target_tokens"].to_torch(), top2)


def test_round_trip_of_our_encoding():
    data = [
        Datum(
            model_input=ModelInput.from_ints([4, 5]),
            loss_fn_inputs={"target_tokens": [5, 6], "advantages": [0.5, -1.0]},
        )
    ]
    body = wire_proto.encode_forward_backward_request(
        "m", 3, data, "importance_sampling", {"x": 1.0}, False
    )
    req = wire_proto.decode_forward_backward_request(body)
    assert req["data"] == data and req["loss_fn_config"] == {"x": 1.0} and req["seq_id"] == 3


def test_sdk_decodes_our_forward_backward_output():
    out = ForwardBackwardOutput(
        loss_fn_output_type="TorchLossReturn",
        loss_fn_outputs=[
            {
                "logprobs": TensorData(data=[-1.0, -2.0, -0.5], dtype="float32", shape=[3]),
                "elementwise_loss": TensorData(data=[1.0, 0.0, 0.5], dtype="float32", shape=[3]),
            },
            {
                "logprobs": TensorData(data=[-3.0, -4.0], dtype="float32", shape=[2]),
                "elementwise_loss": TensorData(data=[3.0, 4.0], dtype="float32", shape=[2]),
            },
        ],
        metrics={"loss:sum": 8.5},
    )
    body = wire_proto.encode_forward_backward_output(out)
    sdk = response_conv.deserialize_forward_backward_output(body)
    assert sdk.metrics == {"loss:sum": 8.5}
    assert [o["logprobs"].tolist() for o in sdk.loss_fn_outputs] == [
        [-1.0, -2.0, -0.5],
        [-3.0, -4.0],
    ]
    assert wire_proto.decode_forward_backward_output(body) == out


def test_garbage_is_a_clear_error():
    with pytest.raises(wire_proto.ProtoDecodeError, match="not a ForwardBackwardRequest"):
        wire_proto.decode_forward_backward_request(b"\xff\xff\xff\xff")

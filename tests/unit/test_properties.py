"""Property-based tests (hypothesis) of the wire types, the protobuf codec and the losses."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tinkerd import losses, wire_proto
from tinkerd.errors import InvalidRequestError
from tinkerd.types import Datum, ForwardBackwardOutput, ModelInput, SampleResponse, TensorData

settings.register_profile("tinkerd", max_examples=60, deadline=None)
settings.load_profile("tinkerd")

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3)


@given(st.one_of(arrays(np.float32, shapes, elements=finite), arrays(np.int64, shapes)))
def test_tensor_data_round_trips_through_numpy_and_torch(array):
    data = TensorData.from_numpy(array)
    assert data.shape == list(array.shape)
    assert np.array_equal(data.to_numpy(), array)
    assert torch.equal(TensorData.from_torch(torch.from_numpy(array)).to_torch(), data.to_torch())
    assert TensorData.model_validate_json(data.model_dump_json()) == data


token_lists = st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=20)


@st.composite
def datums(draw) -> Datum:
    tokens = draw(token_lists)
    n = len(tokens)
    weights = draw(st.lists(finite, min_size=n, max_size=n))
    targets = draw(st.lists(st.integers(0, 2**40), min_size=n, max_size=n))
    return Datum(
        model_input=ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )


@given(
    st.lists(datums(), min_size=1, max_size=4),
    st.sampled_from(sorted(losses.LOSSES)),
    st.integers(1, 2**31 - 1),
    st.booleans(),
)
def test_forward_backward_requests_round_trip_through_protobuf(data, loss_fn, seq_id, forward):
    body = wire_proto.encode_forward_backward_request(
        "session-x:train:0", seq_id, data, loss_fn, {"beta": 0.5}, forward
    )
    got = wire_proto.decode_forward_backward_request(body)
    assert (got["model_id"], got["seq_id"], got["loss_fn"]) == (
        "session-x:train:0",
        seq_id,
        loss_fn,
    )
    assert got["forward_only"] == forward and got["loss_fn_config"] == {"beta": 0.5}
    for sent, received in zip(data, got["data"], strict=True):
        assert received.model_input.to_ints() == sent.model_input.to_ints()
        for key, tensor in sent.loss_fn_inputs.items():
            assert np.array_equal(received.loss_fn_inputs[key].to_numpy(), tensor.to_numpy())


@given(st.lists(arrays(np.float32, st.integers(1, 8), elements=finite), min_size=1, max_size=3))
def test_forward_backward_outputs_round_trip_through_protobuf(per_datum):
    out = ForwardBackwardOutput(
        loss_fn_output_type="TorchLossReturn",
        loss_fn_outputs=[{"logprobs": TensorData.from_numpy(a)} for a in per_datum],
        metrics={"loss:sum": float(sum(a.sum() for a in per_datum))},
    )
    got = wire_proto.decode_forward_backward_output(wire_proto.encode_forward_backward_output(out))
    assert got.metrics == pytest.approx(out.metrics)
    for a, b in zip(out.loss_fn_outputs, got.loss_fn_outputs, strict=True):
        assert np.array_equal(a["logprobs"].to_numpy(), b["logprobs"].to_numpy())


@given(st.lists(st.one_of(st.none(), finite), min_size=1, max_size=10))
def test_prompt_logprobs_keep_their_gaps_through_protobuf(prompt_logprobs):
    response = SampleResponse(sequences=[], prompt_logprobs=prompt_logprobs)
    got = wire_proto.decode_sample_response(wire_proto.encode_sample_response(response))
    assert len(got.prompt_logprobs) == len(prompt_logprobs)
    for a, b in zip(prompt_logprobs, got.prompt_logprobs):
        assert (a is None and b is None) or b == pytest.approx(a, rel=1e-6, abs=1e-6)


# ---------------------------------------------------------------- losses

per_token = st.integers(1, 16).flatmap(
    lambda n: (
        st.tuples(*[arrays(np.float32, n, elements=st.floats(-4, 0, width=32))] * 2)
        .map(lambda pair: pair + (n,))
        .flatmap(
            lambda t: st.tuples(
                st.just(t[0]), st.just(t[1]), arrays(np.float32, t[2], elements=finite)
            )
        )
    )
)


def loss_and_grad(name: str, logprobs, sampling_logprobs, advantages, datum_index=None):
    """`datum_index`: each token's datum (default: one datum), for per-datum losses (gspo)."""
    lp = torch.tensor(logprobs, dtype=torch.float64, requires_grad=True)
    inputs = {
        "weights": torch.tensor(advantages, dtype=torch.float64),
        "advantages": torch.tensor(advantages, dtype=torch.float64),
        "logprobs": torch.tensor(sampling_logprobs, dtype=torch.float64),
        "sequence_ratio_mask": torch.ones(len(logprobs), dtype=torch.float64),
        "datum_index": torch.tensor(
            [0] * len(logprobs) if datum_index is None else datum_index, dtype=torch.float64
        ),
    }
    config = losses.resolve_config(name, None)
    loss = losses.get_loss(name).fn(lp, inputs, config)
    loss.sum().backward()
    return loss.detach().numpy(), lp.grad.numpy()


@given(per_token)
def test_cross_entropy_is_the_weighted_sum_and_its_gradient_is_minus_the_weights(t):
    logprobs, _, weights = t
    loss, grad = loss_and_grad("cross_entropy", logprobs, logprobs, weights)
    assert np.allclose(loss, -weights * logprobs, atol=1e-3)
    assert np.allclose(grad, -weights)


@given(per_token)
def test_importance_sampling_gradient_is_minus_ratio_times_advantage(t):
    logprobs, sampling, advantages = t
    loss, grad = loss_and_grad("importance_sampling", logprobs, sampling, advantages)
    ratio = np.exp(logprobs.astype(np.float64) - sampling)
    assert np.allclose(loss, -ratio * advantages, rtol=1e-6, atol=1e-6)
    assert np.allclose(grad, -ratio * advantages, rtol=1e-6, atol=1e-6)


@given(per_token)
def test_ppo_never_rewards_moving_the_ratio_past_the_clip(t):
    logprobs, sampling, advantages = t
    loss, grad = loss_and_grad("ppo", logprobs, sampling, advantages)
    ratio = np.exp(logprobs.astype(np.float64) - sampling)
    unclipped = -ratio * advantages
    assert np.all(loss >= unclipped - 1e-9)  # pessimistic: min of the two objectives
    beyond = ((ratio > 1.2) & (advantages > 0)) | ((ratio < 0.8) & (advantages < 0))
    assert np.all(grad[beyond] == 0)  # no push further once clipped
    inside = (ratio > 0.8) & (ratio < 1.2)
    assert np.allclose(grad[inside], unclipped[inside])


@given(per_token, st.sampled_from(sorted(losses.LOSSES)))
def test_losses_are_finite_and_additive_over_data(t, name):
    """Two data in one request lose what each loses alone; a per-token loss is additive
    over tokens too (per-datum losses such as gspo see the cut as a datum boundary)."""
    logprobs, sampling, advantages = t
    k = len(logprobs) // 2
    two_data = [0] * k + [1] * (len(logprobs) - k)
    whole, _ = loss_and_grad(name, logprobs, sampling, advantages, two_data)
    assert np.all(np.isfinite(whole))
    head, _ = loss_and_grad(name, logprobs[:k], sampling[:k], advantages[:k])
    tail, _ = loss_and_grad(name, logprobs[k:], sampling[k:], advantages[k:])
    assert np.allclose(np.concatenate([head, tail]), whole)


@given(
    st.sampled_from(sorted(losses.LOSSES)),
    st.dictionaries(st.text(min_size=1, max_size=8), st.floats(allow_nan=True), max_size=3),
)
def test_loss_configs_accept_known_finite_keys_only(name, config):
    known = losses.get_loss(name).config_defaults
    ok = all(k in known and math.isfinite(v) for k, v in config.items())
    if ok and "clip_low_threshold" in known:
        merged = {**known, **config}
        ok = 0 <= merged["clip_low_threshold"] <= merged["clip_high_threshold"]
    if ok:
        assert set(losses.resolve_config(name, config)) == set(known)
    else:
        with pytest.raises(InvalidRequestError):
            losses.resolve_config(name, config)

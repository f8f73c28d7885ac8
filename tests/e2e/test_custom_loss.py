"""forward_backward_custom with regularizers, gradient norms, async and executor runs."""

import asyncio
import math
import time

import pytest
import torch
from helpers import KEYS, TINY, make_datum

from tinkerd import AdamParams, Datum, ModelInput, RegularizerSpec, ServiceClient, regularizers
from tinkerd.client.transport import InProcessTransport
from tinkerd.custom_loss import evaluate
from tinkerd.errors import InvalidRequestError

ADAM = AdamParams(learning_rate=3e-3)


def data():
    return [make_datum([256, *b"regularized"]), make_datum([256, *b"loss"], [0.0, 1.0, 1.0, 1.0])]


N_TOKENS = 11 + 4  # target tokens in data()


def sum_logprobs(data, logprobs_list):
    return sum(lp.sum() for lp in logprobs_list)


def nll(data, logprobs_list):
    loss = sum(
        (-d.loss_fn_inputs["weights"].to_torch() * lp).sum() for d, lp in zip(data, logprobs_list)
    )
    return loss, {"tokens:sum": float(sum(lp.numel() for lp in logprobs_list))}


def run(service, seed=0):
    return service.create_lora_training_client(TINY, rank=8, seed=seed)


# ---------------------------------------------------------------- hand-checkable facts


def test_sum_of_logprobs_has_grad_norm_sqrt_n(service):
    weight = -0.3
    out = (
        run(service)
        .forward_backward_custom(
            data(),
            None,
            regularizers=[RegularizerSpec(fn=sum_logprobs, weight=weight, name="s")],
            track_grad_norms=True,
        )
        .result()
    )
    reg = out.regularizers["s"]
    assert reg.grad_norm == pytest.approx(math.sqrt(N_TOKENS), rel=1e-6)
    assert reg.contribution == pytest.approx(weight * reg.value)
    assert reg.grad_norm_weighted == pytest.approx(abs(weight) * reg.grad_norm)
    assert out.loss_total == pytest.approx(reg.contribution)
    assert out.metrics["s/grad_norm:mean"] == reg.grad_norm
    assert out.metrics["loss:sum"] == out.loss_total


def test_total_grad_norm_is_the_norm_of_the_full_gradient(service):
    regs = [
        RegularizerSpec(fn=regularizers.l2_logprobs, weight=0.05, name="l2"),
        RegularizerSpec(fn=regularizers.entropy_proxy, weight=-0.5, name="entropy"),
    ]
    client = run(service, seed=3)
    out = client.forward_backward_custom(
        data(), nll, regularizers=regs, track_grad_norms=True
    ).result()
    # Recompute by hand from the logprobs the model gives (they have not changed: no step).
    logprobs = [
        o["logprobs"].to_torch().requires_grad_()
        for o in client.forward(data()).result().loss_fn_outputs
    ]
    total = nll(data(), logprobs)[0] + sum(r.weight * r.fn(data(), logprobs) for r in regs)
    grads = torch.autograd.grad(total, logprobs)
    expected = math.sqrt(sum(float((g**2).sum()) for g in grads))
    assert out.total_grad_norm == pytest.approx(expected, rel=1e-4)
    assert out.loss_total == pytest.approx(total.item(), rel=1e-4)
    assert out.regularizer_total == pytest.approx(
        sum(r.contribution for r in out.regularizers.values())
    )
    assert out.base_loss.custom == {"tokens:sum": N_TOKENS}
    assert out.metrics["tokens:sum"] == N_TOKENS  # the loss_fn's own metrics, as in the SDK


def test_two_argument_form_trains_like_the_built_in_loss(service):
    custom, builtin = run(service, seed=5), run(service, seed=5)
    out = custom.forward_backward_custom(data(), nll).result()
    ref = builtin.forward_backward(data(), "cross_entropy").result()
    assert out.metrics["loss:sum"] == pytest.approx(ref.metrics["loss:sum"], rel=1e-5)
    assert custom.optim_step(ADAM).result().metrics["grad_norm"] == pytest.approx(
        builtin.optim_step(ADAM).result().metrics["grad_norm"], rel=1e-5
    )


def test_embedded_and_http_apply_the_same_gradient(engine, server):
    """One pass on the live graph (embedded) and Tinker's two phases (HTTP) agree."""
    regs = [
        RegularizerSpec(fn=regularizers.l1_logprobs, weight=0.1, name="l1"),
        RegularizerSpec(fn=regularizers.length_normalized_nll, weight=2.0, name="lnll"),
    ]
    results = []
    for service in (
        ServiceClient(transport=InProcessTransport(engine=engine)),
        ServiceClient(base_url=server.url, api_key=KEYS[0]),
    ):
        client = run(service, seed=9)
        out = client.forward_backward_custom(data(), nll, regularizers=regs).result()
        step = client.optim_step(ADAM).result()
        after = client.forward(data()).result().loss_fn_outputs[0]["logprobs"].tolist()
        results.append((out.loss_total, step.metrics["grad_norm"], after))
    (loss_a, norm_a, after_a), (loss_b, norm_b, after_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert norm_a == pytest.approx(norm_b, rel=1e-5)
    assert after_a == pytest.approx(after_b, abs=1e-5)


def test_one_pass_gradient_equals_the_two_phase_surrogate(engine):
    """Engine level: the LoRA gradient of the one-pass path equals that of cross_entropy
    with weights = -d(total)/d(logprobs), parameter by parameter."""
    from tinkerd.types import LoraConfig

    regs = [RegularizerSpec(fn=regularizers.l2_logprobs, weight=0.1, name="l2")]
    one = engine.create_model(TINY, LoraConfig(rank=4, seed=2))
    captured = {}

    def gradient_fn(logprobs):
        result = evaluate(data(), logprobs, nll, regs)
        captured["grads"] = result.grads
        return result.grads, result

    engine.forward_backward_custom(one, data(), gradient_fn)
    two = engine.create_model(TINY, LoraConfig(rank=4, seed=2))
    surrogate = [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"], "weights": -g},
        )
        for d, g in zip(data(), captured["grads"])
    ]
    engine.forward_backward(two, surrogate)
    for p1, p2 in zip(engine.run(one).params, engine.run(two).params):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- execution


def sleeper(seconds):
    def fn(data, logprobs_list):
        time.sleep(seconds)
        return sum_logprobs(data, logprobs_list)

    return fn


def async_sleeper(seconds):
    async def fn(data, logprobs_list):
        await asyncio.sleep(seconds)
        return sum_logprobs(data, logprobs_list)

    return fn


class AsyncCallable:
    async def __call__(self, data, logprobs_list):
        await asyncio.sleep(0.3)
        return sum_logprobs(data, logprobs_list)


def timed(client, regs, **kwargs):
    start = time.perf_counter()
    client.forward_backward_custom(data(), None, regularizers=regs, **kwargs).result()
    return time.perf_counter() - start


def test_async_and_executor_regularizers_run_in_parallel(engine):
    client = run(ServiceClient(transport=InProcessTransport(engine=engine)))
    timed(client, [RegularizerSpec(fn=sum_logprobs, weight=1.0, name="warm")])
    specs = lambda make: [RegularizerSpec(fn=make(0.3), weight=1.0, name=f"r{i}") for i in range(4)]
    assert timed(client, specs(async_sleeper)) < 0.8  # 4 x 0.3 s would be 1.2 s
    assert timed(client, specs(sleeper), run_sync_in_executor=True) < 0.8
    assert timed(client, specs(sleeper)) >= 1.2  # inline: one after another
    objects = [RegularizerSpec(fn=AsyncCallable(), weight=1.0, name=f"o{i}") for i in range(4)]
    assert timed(client, objects) < 0.8  # async __call__ is detected too


# ---------------------------------------------------------------- errors


def raises(data, logprobs_list):
    raise RuntimeError("boom")


def not_scalar(data, logprobs_list):
    return torch.cat(logprobs_list)


def nan(data, logprobs_list):
    return sum_logprobs(data, logprobs_list) * float("nan")


def inf(data, logprobs_list):
    return sum_logprobs(data, logprobs_list) + float("inf")


@pytest.mark.parametrize(
    "regs, message",
    [
        (
            [RegularizerSpec(fn=raises, weight=1.0, name="bad")],
            "regularizer 'bad' raised RuntimeError",
        ),
        (
            [RegularizerSpec(fn=not_scalar, weight=1.0, name="vec")],
            "'vec' returned a tensor of shape",
        ),
        ([RegularizerSpec(fn=nan, weight=1.0, name="nan")], "regularizer 'nan' returned nan"),
        ([RegularizerSpec(fn=inf, weight=1.0, name="inf")], "regularizer 'inf' returned inf"),
        (
            [RegularizerSpec(fn=sum_logprobs, weight=1.0, name="x")] * 2,
            "duplicate regularizer name 'x'",
        ),
        ([RegularizerSpec(fn=sum_logprobs, weight=1.0, name="")], "name '' is empty"),
        ([RegularizerSpec(fn=sum_logprobs, weight=math.inf, name="w")], "'w' has weight inf"),
    ],
)
def test_a_failing_regularizer_fails_the_call_and_applies_no_gradient(service, regs, message):
    client = run(service, seed=7)
    before = client.forward(data()).result().loss_fn_outputs[0]["logprobs"].tolist()
    good = RegularizerSpec(fn=regularizers.l1_logprobs, weight=1.0, name="good")
    with pytest.raises(InvalidRequestError, match=message):
        client.forward_backward_custom(data(), nll, regularizers=[good, *regs]).result()
    client.optim_step(ADAM).result()
    after = client.forward(data()).result().loss_fn_outputs[0]["logprobs"].tolist()
    assert after == before  # the step found no gradient to apply
    # ... and the run carries on normally.
    assert client.forward_backward_custom(data(), nll).result().loss_total > 0


# ---------------------------------------------------------------- the library, by hand


def tiny_batch():
    a = Datum(
        model_input=ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": [2, 3, 4],
            "weights": [0.0, 1.0, 1.0],
            "reference_logprobs": [-1.0, -0.5, -2.0],
        },
    )
    b = Datum(
        model_input=ModelInput.from_ints([5, 6]),
        loss_fn_inputs={"target_tokens": [6, 7], "reference_logprobs": [-0.1, -3.0]},
    )
    return [a, b], [torch.tensor([-9.0, -1.0, -2.0]), torch.tensor([-0.5, -1.5])]


# Scored tokens: datum a's last two (weight 0 on the first), both of b's.
SCORED = [-1.0, -2.0, -0.5, -1.5]


@pytest.mark.parametrize(
    "fn, expected",
    [
        (regularizers.l1_logprobs, sum(abs(x) for x in SCORED)),
        (regularizers.l2_logprobs, sum(x * x for x in SCORED)),
        (regularizers.entropy_proxy, -sum(math.exp(x) * x for x in SCORED)),
        (regularizers.length_normalized_nll, (1.0 + 2.0) / 2 + (0.5 + 1.5) / 2),
        (
            regularizers.kl_to_reference(),
            sum(
                math.exp(r - x) - (r - x) - 1
                for x, r in [(-1.0, -0.5), (-2.0, -2.0), (-0.5, -0.1), (-1.5, -3.0)]
            ),
        ),
    ],
)
def test_library_regularizers_match_hand_computation(fn, expected):
    batch, logprobs = tiny_batch()
    assert fn(batch, logprobs).item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_at_the_reference_and_its_gradient_points_there():
    batch, _ = tiny_batch()
    at_ref = [d.loss_fn_inputs["reference_logprobs"].to_torch().requires_grad_() for d in batch]
    kl = regularizers.kl_to_reference()(batch, at_ref)
    assert kl.item() == 0.0
    (grad,) = torch.autograd.grad(kl, at_ref[1])
    assert grad.tolist() == [0.0, 0.0]

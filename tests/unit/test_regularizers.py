"""Every library regularizer: value and gradient against a hand computation, and a run on
the embedded engine that trains with it alone (forward_backward_custom, then optim_step)
moves the adapter's weights."""

import math

import pytest
import torch
from helpers import TINY

from tinkerd import AdamParams, Datum, ModelInput, RegularizerSpec, ServiceClient, regularizers
from tinkerd.client.transport import InProcessTransport

# Two data. a: 3 targets, the first unscored (weight 0); b: 2 targets, no weights.
LP_A, LP_B = [-9.0, -1.0, -2.0], [-0.5, -1.5]
REF_A, REF_B = [-1.0, -0.5, -2.0], [-0.1, -3.0]
VIEW_A, VIEW_B = [-3.0, -1.5, -1.0], [-0.5, -1.0]


def batch():
    a = Datum(
        model_input=ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": [2, 3, 4],
            "weights": [0.0, 1.0, 1.0],
            "reference_logprobs": REF_A,
            "original_logprobs": VIEW_A,
        },
    )
    b = Datum(
        model_input=ModelInput.from_ints([5, 6]),
        loss_fn_inputs={
            "target_tokens": [6, 7],
            "reference_logprobs": REF_B,
            "original_logprobs": VIEW_B,
        },
    )
    return [a, b]


def evaluate(fn):
    """fn's value and d fn / d logprobs (per datum, float64)."""
    lps = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (LP_A, LP_B)]
    value = fn(batch(), lps)
    if not value.requires_grad:  # a constant (as custom_loss treats it): zero gradient
        return value.item(), [[0.0] * len(x) for x in lps]
    grads = torch.autograd.grad(value, lps, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, lps)]
    return value.item(), [g.tolist() for g in grads]


def close(a, b):
    if isinstance(a, list) and a and isinstance(a[0], list):  # per-datum gradients
        assert len(a) == len(b)
        for x, y in zip(a, b):
            close(x, y)
        return
    assert a == pytest.approx(b, rel=1e-6, abs=1e-9)  # loss_fn_inputs arrive as float32


def per_token(f):
    """Apply f(lp, index into datum list, position) to scored tokens, 0 on the unscored."""
    return [
        [0.0] + [f(LP_A[i], 0, i) for i in (1, 2)],
        [f(LP_B[i], 1, i) for i in (0, 1)],
    ]


SCORED = [(LP_A[1], 0, 1), (LP_A[2], 0, 2), (LP_B[0], 1, 0), (LP_B[1], 1, 1)]
REF = (REF_A, REF_B)
VIEW = (VIEW_A, VIEW_B)


def sign(x):
    return math.copysign(1.0, x)


def test_l1_and_l2():
    value, grad = evaluate(regularizers.l1_logprobs)
    close(value, sum(abs(x) for x, *_ in SCORED))  # 1 + 2 + 0.5 + 1.5
    close(grad, per_token(lambda x, d, i: sign(x)))
    value, grad = evaluate(regularizers.l2_logprobs)
    close(value, 1 + 4 + 0.25 + 2.25)
    close(grad, per_token(lambda x, d, i: 2 * x))


def test_elastic_net_is_a_weighted_sum_of_l1_and_l2():
    value, grad = evaluate(regularizers.elastic_net(0.3, 2.0))
    close(value, 0.3 * 5.0 + 2.0 * 7.5)
    close(grad, per_token(lambda x, d, i: 0.3 * sign(x) + 2.0 * 2 * x))
    with pytest.raises(ValueError, match="finite"):
        regularizers.elastic_net(math.nan, 1.0)


def test_entropy_proxy():
    value, grad = evaluate(regularizers.entropy_proxy)
    close(value, -sum(math.exp(x) * x for x, *_ in SCORED))
    close(grad, per_token(lambda x, d, i: -math.exp(x) * (x + 1)))


def test_kl_to_reference_k3():
    value, grad = evaluate(regularizers.kl_to_reference())
    close(value, sum(math.exp(REF[d][i] - x) - (REF[d][i] - x) - 1 for x, d, i in SCORED))
    close(grad, per_token(lambda x, d, i: 1 - math.exp(REF[d][i] - x)))


@pytest.mark.parametrize("metric", ["squared", "absolute"])
def test_consistency_between_two_views(metric):
    value, grad = evaluate(regularizers.consistency("original_logprobs", metric))
    if metric == "squared":
        close(value, sum((x - VIEW[d][i]) ** 2 for x, d, i in SCORED))  # 0.25+1+0+0.25
        close(value, 1.5)
        close(grad, per_token(lambda x, d, i: 2 * (x - VIEW[d][i])))
    else:
        close(value, 0.5 + 1.0 + 0.0 + 0.5)
        # |x - v| at x == v: torch's subgradient is 0
        close(grad, per_token(lambda x, d, i: 0.0 if x == VIEW[d][i] else sign(x - VIEW[d][i])))
    with pytest.raises(KeyError, match="'view2'"):
        evaluate(regularizers.consistency("view2"))
    with pytest.raises(ValueError, match="metric"):
        regularizers.consistency(metric="cosine")


def test_orthogonality_value_by_hand_and_gradient_by_finite_differences():
    # centred scored rows: a = (-1, -2) - (-1.5) = (0.5, -0.5); b = (-0.5, -1.5) + 1 = (0.5, -0.5)
    # identical directions: cos = 1, penalty 1.
    value, grad = evaluate(regularizers.orthogonality)
    close(value, 1.0)

    def ortho(a, b):
        ca = [x - sum(a) / len(a) for x in a]
        cb = [x - sum(b) / len(b) for x in b]
        dot = sum(x * y for x, y in zip(ca, cb))
        na, nb = math.hypot(*ca), math.hypot(*cb)
        return (dot / ((na + 1e-12) * (nb + 1e-12))) ** 2

    # a point where the gradient is not zero: another b
    lps = [
        torch.tensor(LP_A, dtype=torch.float64, requires_grad=True),
        torch.tensor([-0.5, -0.2], dtype=torch.float64, requires_grad=True),
    ]
    value = regularizers.orthogonality(batch(), lps)
    a, b = [LP_A[1], LP_A[2]], [-0.5, -0.2]
    close(value.item(), ortho(a, b))
    grads = torch.autograd.grad(value, lps)
    h = 1e-6
    for d in (0, 1):
        for j in range(2):
            up = [list(a), list(b)]
            down = [list(a), list(b)]
            up[d][j] += h
            down[d][j] -= h
            numeric = (ortho(*up) - ortho(*down)) / (2 * h)
            index = j + 1 if d == 0 else j  # datum a's first token is unscored
            assert grads[d][index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    assert grads[0][0].item() == 0.0
    one = regularizers.orthogonality(batch()[:1], lps[:1])
    assert one.item() == 0.0


def exp_loss(data, logprobs_list):
    """A base loss whose gradient depends on the logprobs: sum_t exp(lp_t)."""
    return sum(lp.exp().sum() for lp in logprobs_list)


def test_gradient_penalty_differentiates_through_the_gradient():
    # g_t = exp(lp_t) on every token; |g| = sqrt(sum exp(2 lp)); d|g|/dlp_t = exp(2 lp_t)/|g|
    everything = LP_A + LP_B
    norm = math.sqrt(sum(math.exp(2 * x) for x in everything))
    value, grad = evaluate(regularizers.gradient_penalty(exp_loss))
    close(value, norm)
    close(grad, [[math.exp(2 * x) / norm for x in LP_A], [math.exp(2 * x) / norm for x in LP_B]])
    value, grad = evaluate(regularizers.gradient_penalty(exp_loss, target_norm=2.0))
    close(value, (norm - 2.0) ** 2)
    scale = 2 * (norm - 2.0) / norm
    close(grad, [[scale * math.exp(2 * x) for x in LP_A], [scale * math.exp(2 * x) for x in LP_B]])

    def with_metrics(data, lps):
        return exp_loss(data, lps), {"n": 1.0}

    assert evaluate(regularizers.gradient_penalty(with_metrics))[0] == pytest.approx(norm)
    # l2's gradient 2 lp varies with lp, so the penalty trains; a linear loss's gradient
    # is constant, so its penalty is a constant with gradient 0
    _, grad = evaluate(regularizers.gradient_penalty(regularizers.l2_logprobs))
    assert any(g != 0 for row in grad for g in row)
    _, grad = evaluate(regularizers.gradient_penalty(lambda d, lps: sum(-lp.sum() for lp in lps)))
    assert all(g == 0 for row in grad for g in row)


def test_length_normalized_nll():
    value, grad = evaluate(regularizers.length_normalized_nll)
    close(value, (1.0 + 2.0) / 2 + (0.5 + 1.5) / 2)
    close(grad, per_token(lambda x, d, i: -0.5))


# ---------------------------------------------------------------- each one trains


def train_data():
    """Two data on the tiny model's byte vocabulary, with every input a regularizer reads."""

    def datum(tokens, weights):
        n = len(tokens) - 1
        return Datum(
            model_input=ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": tokens[1:],
                "weights": weights,
                "reference_logprobs": [-1.0 - 0.1 * i for i in range(n)],
                "original_logprobs": [-2.0 + 0.05 * i for i in range(n)],
            },
        )

    return [datum([256, *b"orthogonal"], [1.0] * 10), datum([256, *b"views"], [0, 1, 1, 1, 1])]


@pytest.mark.parametrize(
    "name, fn",
    [
        ("l1", regularizers.l1_logprobs),
        ("l2", regularizers.l2_logprobs),
        ("elastic_net", regularizers.elastic_net(0.5, 0.5)),
        ("entropy", regularizers.entropy_proxy),
        ("kl", regularizers.kl_to_reference()),
        ("consistency", regularizers.consistency()),
        ("orthogonality", regularizers.orthogonality),
        ("gradient_penalty", regularizers.gradient_penalty(exp_loss)),
        ("length_normalized_nll", regularizers.length_normalized_nll),
    ],
)
def test_a_run_trained_by_the_regularizer_alone_moves(engine, name, fn):
    client = ServiceClient(transport=InProcessTransport(engine=engine))
    try:
        training = client.create_lora_training_client(TINY, rank=4, seed=0)
        run = engine.run(training.model_id)
        before = {n: p.clone() for n, p in run.adapter_state().items()}
        out = training.forward_backward_custom(
            train_data(),
            None,
            regularizers=[RegularizerSpec(fn=fn, weight=1.0, name=name)],
            track_grad_norms=True,
        ).result()
        assert out.regularizers[name].grad_norm > 0
        training.optim_step(AdamParams(learning_rate=1e-2)).result()
        after = run.adapter_state()
        moved = sum(float((after[n] - before[n]).abs().sum()) for n in before)
        assert moved > 0, name
    finally:
        client.close()

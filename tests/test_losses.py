"""Each built-in loss and its gradient against a hand computation on small tensors."""

import math

import pytest
import torch

from tinkerd import losses
from tinkerd.errors import InvalidRequestError

LP = [-0.5, -1.0, -2.0, -0.1]  # learner logprobs
Q = [-0.7, -0.9, -2.5, -0.1]  # sampler logprobs
A = [1.0, -2.0, 0.5, 3.0]  # advantages


def run(name, inputs, config=None, lp=LP):
    logprobs = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in inputs.items()}
    elementwise = losses.get_loss(name).fn(logprobs, tensors, losses.resolve_config(name, config))
    total = elementwise.sum()
    total.backward()
    return total.item(), logprobs.grad.tolist()


def close(a, b):
    assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_cross_entropy_sums_any_real_weights():
    weights = [1.0, 0.0, -0.5, 2.0]  # negative weights allowed, never normalised
    loss, grad = run("cross_entropy", {"weights": weights})
    close(loss, sum(-w * lp for w, lp in zip(weights, LP)))  # = 0.5 - 1.0 + 0.2 = -0.3
    close(loss, -0.3)
    close(grad, [-w for w in weights])


def test_importance_sampling():
    loss, grad = run("importance_sampling", {"logprobs": Q, "advantages": A})
    ratios = [math.exp(lp - q) for lp, q in zip(LP, Q)]
    close(loss, sum(-r * a for r, a in zip(ratios, A)))
    close(grad, [-r * a for r, a in zip(ratios, A)])  # d/dlp exp(lp - q) = exp(lp - q)


def test_ppo_clips_the_ratio_where_it_helps():
    # ratios: e^0.2=1.221 (A>0: clipped to 1.2, no grad), e^-0.1=0.905 (A<0: unclipped),
    #         e^0.5=1.649 (A>0: clipped), e^0=1 (inside)
    loss, grad = run("ppo", {"logprobs": Q, "advantages": A})
    r = [math.exp(lp - q) for lp, q in zip(LP, Q)]
    expected = [-min(ri * a, min(max(ri, 0.8), 1.2) * a) for ri, a in zip(r, A)]
    close(loss, sum(expected))
    close(loss, -(1.2 * 1.0) + r[1] * 2.0 - 1.2 * 0.5 - 3.0)
    close(grad, [0.0, -r[1] * -2.0, 0.0, -1.0 * 3.0])


def test_ppo_thresholds_from_config_and_per_token_inputs():
    loss_cfg, _ = run(
        "ppo",
        {"logprobs": Q, "advantages": A},
        {"clip_low_threshold": 0.5, "clip_high_threshold": 1.1},
    )
    loss_tok, _ = run(
        "ppo",
        {
            "logprobs": Q,
            "advantages": A,
            "clip_low_threshold": [0.5] * 4,
            "clip_high_threshold": [1.1] * 4,
        },
    )
    r = [math.exp(lp - q) for lp, q in zip(LP, Q)]
    expected = sum(-min(ri * a, min(max(ri, 0.5), 1.1) * a) for ri, a in zip(r, A))
    close(loss_cfg, expected)
    close(loss_tok, expected)


def test_cispo_uses_stopgrad_clipped_ratio_as_coefficient():
    loss, grad = run("cispo", {"logprobs": Q, "advantages": A})
    c = [min(max(math.exp(lp - q), 0.8), 1.2) for lp, q in zip(LP, Q)]
    close(loss, sum(-ci * lp * a for ci, lp, a in zip(c, LP, A)))
    close(grad, [-ci * a for ci, a in zip(c, A)])  # no gradient through the coefficient


def test_dro_quadratic_penalty():
    beta = 0.3
    loss, grad = run("dro", {"logprobs": Q, "advantages": A}, {"beta": beta})
    close(loss, sum(-(lp * a - 0.5 * beta * (lp - q) ** 2) for lp, q, a in zip(LP, Q, A)))
    close(grad, [-(a - beta * (lp - q)) for lp, q, a in zip(LP, Q, A)])


def test_defaults():
    assert losses.resolve_config("ppo", None) == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 1.2,
    }
    assert losses.resolve_config("dro", None) == {"beta": 0.05}
    assert losses.resolve_config("cross_entropy", {}) == {}


@pytest.mark.parametrize(
    "name, config, message",
    [
        ("nope", None, "unknown loss_fn 'nope'"),
        ("cross_entropy", {"beta": 1.0}, "not used by 'cross_entropy'"),
        ("ppo", {"clip_low": 0.5}, "not used by 'ppo'"),
        ("dro", {"beta": float("nan")}, "must be finite"),
        ("dro", {"beta": "x"}, "must be a number"),
        ("ppo", {"clip_low_threshold": 1.5}, "clip_low_threshold <= clip_high_threshold"),
    ],
)
def test_bad_names_and_config(name, config, message):
    with pytest.raises(InvalidRequestError, match=message):
        losses.resolve_config(name, config)

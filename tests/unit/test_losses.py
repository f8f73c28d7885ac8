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


# ---------------------------------------------------------------- gspo (GSPO-token)

# Two data laid end to end: datum 0 = tokens 0..2, datum 1 = tokens 3..4.
G_LP = [-0.5, -1.0, -2.0, -0.3, -1.2]
G_Q = [-0.6, -0.8, -2.4, -0.3, -1.0]
G_A = [1.0, 1.0, -0.5, 2.0, -1.0]
G_MASK = [1.0, 1.0, 0.0, 1.0, 1.0]  # token 2 is outside datum 0's ratio
G_INDEX = [0.0, 0.0, 0.0, 1.0, 1.0]


def gspo_inputs(mask=G_MASK, **extra):
    return {
        "logprobs": G_Q,
        "advantages": G_A,
        "sequence_ratio_mask": mask,
        "datum_index": G_INDEX,
        **extra,
    }


def hand_gspo(low, high, mask=G_MASK):
    """Per datum: s = exp(mean masked log ratio); each token: value s, d/dlp = s."""
    s = []
    for d in (0, 1):
        tokens = [t for t in range(5) if G_INDEX[t] == d and mask[t] != 0]
        mean = sum(G_LP[t] - G_Q[t] for t in tokens) / len(tokens) if tokens else 0.0
        s.append(math.exp(mean))
    loss, grad = 0.0, []
    for t in range(5):
        r, a = s[int(G_INDEX[t])], G_A[t]
        clipped = min(max(r, low), high)
        loss += -min(r * a, clipped * a)
        grad.append(-r * a if r * a <= clipped * a else 0.0)  # the clipped branch is flat
    return loss, grad, s


def test_gspo_sequence_ratio_per_datum_and_token_gradient():
    loss, grad = run("gspo", gspo_inputs(), lp=G_LP)
    exp_loss, exp_grad, s = hand_gspo(0.8, 1.2)
    # datum 0: mean(0.1, -0.2) = -0.05; datum 1: mean(0.0, -0.2) = -0.1
    close(s, [math.exp(-0.05), math.exp(-0.1)])
    close(loss, exp_loss)
    close(grad, exp_grad)
    # nothing clipped at 0.8/1.2, so every token's gradient is -s_d * A_t
    close(grad, [-s[0] * 1.0, -s[0] * 1.0, -s[0] * -0.5, -s[1] * 2.0, -s[1] * -1.0])


def test_gspo_clips_the_whole_sequence():
    # high = 0.95 < s_0 = 0.951 (A > 0 on tokens 0, 1: clipped, no gradient; token 2 has
    # A < 0 so the unclipped branch is the min); s_1 = 0.905 is inside [0.5, 0.95].
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 0.95}
    loss, grad = run("gspo", gspo_inputs(), config, lp=G_LP)
    exp_loss, exp_grad, s = hand_gspo(0.5, 0.95)
    close(loss, exp_loss)
    close(grad, exp_grad)
    assert grad[0] == 0.0 and grad[1] == 0.0 and grad[2] != 0.0
    # per-token thresholds in loss_fn_inputs win over the config, as for ppo
    loss_tok, grad_tok = run(
        "gspo",
        gspo_inputs(clip_low_threshold=[0.5] * 5, clip_high_threshold=[0.95] * 5),
        lp=G_LP,
    )
    close(loss_tok, exp_loss)
    close(grad_tok, exp_grad)


def test_gspo_mask_excludes_tokens_and_empty_mask_means_ratio_one():
    mask = [1.0, 0.0, 0.0, 0.0, 0.0]  # datum 1 has no masked token
    loss, grad = run("gspo", gspo_inputs(mask), lp=G_LP)
    exp_loss, exp_grad, s = hand_gspo(0.8, 1.2, mask)
    close(s, [math.exp(0.1), 1.0])
    close(loss, exp_loss)
    close(grad, exp_grad)


def test_gspo_mean_never_crosses_data():
    """The same tokens as one datum give another ratio: the mean is per datum."""
    one = gspo_inputs(datum_index=[0.0] * 5)
    loss_one, _ = run("gspo", one, lp=G_LP)
    loss_two, _ = run("gspo", gspo_inputs(), lp=G_LP)
    assert loss_one != pytest.approx(loss_two)
    assert losses.get_loss("gspo").per_datum
    assert losses.datum_index([3, 2]).tolist() == G_INDEX


def test_gspo_without_datum_index_is_refused():
    inputs = gspo_inputs()
    del inputs["datum_index"]
    with pytest.raises(InvalidRequestError, match="datum_index"):
        run("gspo", inputs, lp=G_LP)


def test_stable_reinforce_is_refused_by_name_with_what_to_use():
    with pytest.raises(InvalidRequestError, match="'stable_reinforce' is not supported.*ppo"):
        losses.get_loss("stable_reinforce")


def test_gspo_config_keys_and_required_inputs():
    assert losses.resolve_config("gspo", None) == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 1.2,
    }
    spec = losses.get_loss("gspo")
    assert spec.required == ("logprobs", "advantages", "sequence_ratio_mask")
    with pytest.raises(InvalidRequestError, match="not used by 'gspo'"):
        losses.resolve_config("gspo", {"epsilon_low": 0.2})

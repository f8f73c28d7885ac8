"""Dimuon and AdamW behind the Optimizer interface: Dimuon's step against a NumPy
computation of its documented formula, its properties, state round trips bit for bit, and
AdamW equal to the engine's former adam_step (torch.optim.AdamW, kept here as the reference)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tinkerd.engine import optimizers
from tinkerd.engine.optimizers import AdamW, Dimuon, DimuonHyper
from tinkerd.errors import InvalidRequestError
from tinkerd.types import AdamParams


def numpy_dimuon_step(w, g, m, lr, rank, beta1=0.9, damping=1e-4, exponent=0.175, clip=1.0):
    """The module docstring's formula, written again in NumPy (float64)."""
    m = beta1 * m + (1 - beta1) * g * clip
    sq = m**2
    rho = sq.mean(axis=1) / sq.mean()
    gam = sq.mean(axis=0) / sq.mean()
    x = (rho + damping)[:, None] ** -0.25 * m * (gam + damping)[None, :] ** -0.25
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    o = u @ vh  # full rank here
    d = math.sqrt(rank) * o / np.linalg.norm(o)
    return w - lr * (32 / rank) ** exponent * d, m


def param(values):
    p = torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))
    return p


def test_one_step_matches_numpy_on_a_small_matrix():
    rng = np.random.default_rng(0)
    w0, g0 = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    g0[1] *= 10  # rows and columns of very different size: the preconditioner matters
    g0[:, 2] *= 0.01
    p = param(w0)
    p.grad = torch.tensor(g0, dtype=torch.float32)
    metrics = Dimuon().step([p], DimuonHyper(learning_rate=0.1))
    expected, _ = numpy_dimuon_step(w0, g0, np.zeros_like(g0), lr=0.1, rank=3)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert metrics == {
        "grad_norm": pytest.approx(float(np.linalg.norm(g0)), rel=1e-6),
        "learning_rate": 0.1,
        "optim/step": 1.0,
    }


def test_second_step_uses_momentum_and_clipping_scales_the_gradient():
    rng = np.random.default_rng(1)
    w, g1, g2 = (rng.normal(size=(4, 2)) for _ in range(3))
    p, opt = param(w), Dimuon()
    hyper = DimuonHyper(learning_rate=0.05, beta1=0.8, grad_clip_norm=0.5, damping=0.1)
    m = np.zeros_like(w)
    for g in (g1, g2):
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step([p], hyper)
        clip = min(1.0, 0.5 / np.linalg.norm(g))
        w, m = numpy_dimuon_step(w, g, m, 0.05, rank=2, beta1=0.8, damping=0.1, clip=clip)
    np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(opt.momentum[0].numpy(), m, rtol=1e-5, atol=1e-7)


def test_direction_has_frobenius_norm_sqrt_rank_and_the_rank_correction():
    torch.manual_seed(0)
    for rank, exponent in [(8, 0.0), (32, 0.175), (64, 0.175), (4, 0.5)]:
        p = torch.nn.Parameter(torch.randn(rank, 40))  # a LoRA A: [rank, in]
        p.grad = torch.randn(rank, 40)
        before = p.detach().clone()
        hyper = DimuonHyper(learning_rate=1e-2, rank_lr_correction_exponent=exponent)
        Dimuon(rank=rank).step([p], hyper)
        step_norm = torch.linalg.matrix_norm(before - p.detach()).item()
        expected = 1e-2 * (32 / rank) ** exponent * math.sqrt(rank)
        assert step_norm == pytest.approx(expected, rel=1e-4)
    assert optimizers.rank_correction(32, 0.175) == 1.0
    assert optimizers.rank_correction(128, 0.175) == pytest.approx(4**-0.175)


def test_large_damping_is_plain_muon_orthogonal_direction():
    """With damping >> 1 the preconditioner is flat, and D = msign(M): D D^T = I (wide)."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.zeros(3, 7))
    p.grad = torch.randn(3, 7) * torch.tensor([1.0, 100.0, 0.01])[:, None]
    Dimuon().step(
        [p], DimuonHyper(learning_rate=1.0, damping=1e8, beta1=0.0, rank_lr_correction_exponent=0.0)
    )
    d = -p.detach()
    torch.testing.assert_close(d @ d.T, torch.eye(3), atol=1e-4, rtol=0)
    u, _, vh = torch.linalg.svd(p.grad, full_matrices=False)
    torch.testing.assert_close(d, u @ vh, atol=1e-4, rtol=0)


def test_small_damping_equalises_rows_a_row_of_tiny_gradients_still_moves():
    p = torch.nn.Parameter(torch.zeros(2, 6))
    p.grad = torch.tensor([[1.0, -2.0, 0.5, 1.0, 3.0, -1.0], [1e-4, 2e-4, -1e-4, 0, 1e-4, 0]])
    Dimuon().step([p], DimuonHyper(learning_rate=1.0, rank_lr_correction_exponent=0.0))
    rows = p.detach().norm(dim=1)
    assert rows[1] > 0.3 * rows[0]  # plain gradient descent would move row 1 1e-4 as far


def test_zero_and_missing_gradients_do_not_move_and_bad_input_is_refused():
    a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(3, 2))
    a.grad = torch.zeros(2, 3)  # LoRA A's first gradient is 0 (B starts at 0)
    opt = Dimuon()
    opt.step([a, b], DimuonHyper(learning_rate=0.1))
    assert torch.equal(a.detach(), torch.ones(2, 3)) and torch.equal(b.detach(), torch.ones(3, 2))
    a.grad = torch.full((2, 3), float("nan"))
    with pytest.raises(InvalidRequestError, match="gradient norm is nan"):
        opt.step([a, b], DimuonHyper(learning_rate=0.1))
    a.grad = torch.ones(2, 3)
    for bad, message in [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": 0.1, "beta1": 1.0}, "beta1"),
        ({"learning_rate": 0.1, "damping": 0.0}, "damping"),
        ({"learning_rate": 0.1, "rank_lr_correction_exponent": math.inf}, "exponent"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            opt.step([a, b], bad)
    with pytest.raises(InvalidRequestError, match="2-D"):
        opt.step([torch.nn.Parameter(torch.ones(3))], {"learning_rate": 0.1})
    with pytest.raises(InvalidRequestError, match="shape"):
        opt.step([b, a], {"learning_rate": 0.1})  # state #0 is [2, 3]
    assert torch.equal(a.detach(), torch.ones(2, 3))  # nothing refused moved anything


def test_hyper_from_sdk_params_fills_the_fields_sdk_0_38_lacks():
    import tinker

    sdk = tinker.types.DimuonParams(learning_rate=3e-4, beta1=0.5, grad_clip_norm=1.0)
    assert DimuonHyper.from_params(sdk) == DimuonHyper(
        learning_rate=3e-4,
        grad_clip_norm=1.0,
        beta1=0.5,
        damping=1e-4,
        rank_lr_correction_exponent=0.175,
    )
    wire = {"type": "dimuon", "learning_rate": 1e-3, "damping": 0.01}
    assert DimuonHyper.from_params(wire).damping == 0.01
    with pytest.raises(InvalidRequestError, match="learning_rate is required"):
        DimuonHyper.from_params({"type": "dimuon"})


def lora_problem(seed=0, rank=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 16, generator=g)
    target = torch.randn(16, rank, generator=g) @ torch.randn(rank, 12, generator=g)
    a = torch.nn.Parameter(torch.randn(rank, 16, generator=g) / 4)  # LoRA A: [rank, in]
    b = torch.nn.Parameter(torch.zeros(12, rank))  # LoRA B: [out, rank], starts at 0
    return x, target, a, b


def lsq(x, target, a, b):
    return ((x @ a.T @ b.T - x @ target) ** 2).mean()


def run_steps(opt, x, target, a, b, steps, lr):
    for i in range(steps):
        a.grad = b.grad = None
        lsq(x, target, a, b).backward()
        opt.step([a, b], DimuonHyper(learning_rate=lr * (1 - i / steps)))


def test_toy_least_squares_falls():
    x, target, a, b = lora_problem()
    start = lsq(x, target, a, b).item()
    run_steps(Dimuon(rank=4), x, target, a, b, steps=300, lr=0.05)
    end = lsq(x, target, a, b).item()
    assert end < 0.02 * start, (start, end)


def test_state_dict_round_trip_is_bit_for_bit():
    x, target, a, b = lora_problem(seed=3)
    opt = Dimuon(rank=4)
    run_steps(opt, x, target, a, b, steps=5, lr=0.05)
    state = opt.state_dict()
    a2 = torch.nn.Parameter(a.detach().clone())
    b2 = torch.nn.Parameter(b.detach().clone())
    resumed = Dimuon()
    resumed.load_state_dict(state)
    run_steps(opt, x, target, a, b, steps=3, lr=0.05)
    run_steps(resumed, x, target, a2, b2, steps=3, lr=0.05)
    assert torch.equal(a.detach(), a2.detach()) and torch.equal(b.detach(), b2.detach())
    assert resumed.steps == opt.steps == 8
    for i in (0, 1):
        assert torch.equal(resumed.momentum[i], opt.momentum[i])
    state["momentum"][0].zero_()  # state_dict is a copy: editing it leaves the optimizer
    assert opt.momentum[0].abs().sum() > 0
    with pytest.raises(InvalidRequestError, match="not a Dimuon v1"):
        resumed.load_state_dict({"type": "adamw"})


def adam_step(run, adam: AdamParams) -> dict[str, float]:
    """The engine's adam_step before the Optimizer interface: torch.optim.AdamW with
    Tinker's AdamParams, global-norm clipping first."""
    grads = [p.grad for p in run.params if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
    if adam.grad_clip_norm > 0 and grad_norm > adam.grad_clip_norm:
        torch.nn.utils.clip_grads_with_norm_(
            run.params, adam.grad_clip_norm, torch.tensor(grad_norm)
        )
    for group in run.optimizer.param_groups:
        group.update(
            lr=adam.learning_rate,
            betas=(adam.beta1, adam.beta2),
            eps=adam.eps,
            weight_decay=adam.weight_decay,
        )
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return {
        "grad_norm": grad_norm,
        "learning_rate": adam.learning_rate,
        "optim/step": float(run.step),
    }


def test_adamw_equals_adam_step_and_round_trips():
    hyper = AdamParams(learning_rate=0.01, weight_decay=0.1, grad_clip_norm=0.5)
    x, target, a, b = lora_problem(seed=5)
    a2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    run = SimpleNamespace(
        params=[a2, b2], optimizer=torch.optim.AdamW([a2, b2], lr=0.0, foreach=True), step=0
    )
    opt = AdamW([a, b])
    for _ in range(3):
        for params in ([a, b], [a2, b2]):
            for p in params:
                p.grad = None
            lsq(x, target, *params).backward()
        metrics = opt.step([a, b], hyper)
        assert metrics == adam_step(run, hyper)
    assert torch.equal(a.detach(), a2.detach()) and torch.equal(b.detach(), b2.detach())
    state = opt.state_dict()
    c, d = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    resumed = AdamW([c, d])
    resumed.load_state_dict(state)
    for o, params in ((opt, [a, b]), (resumed, [c, d])):
        for p in params:
            p.grad = None
        lsq(x, target, *params).backward()
        o.step(params, hyper)
    assert torch.equal(a.detach(), c.detach()) and torch.equal(b.detach(), d.detach())


def test_make_optimizer():
    p = torch.nn.Parameter(torch.ones(2, 2))
    assert isinstance(optimizers.make_optimizer("adamw", [p]), AdamW)
    assert optimizers.make_optimizer("dimuon", [p], rank=2).rank == 2
    with pytest.raises(InvalidRequestError, match="unknown optimizer type 'sgd'"):
        optimizers.make_optimizer("sgd", [p])


def test_matrix_sign_is_the_svd_polar_factor_also_rank_deficient():
    torch.manual_seed(2)
    for shape in [(4, 50), (50, 4), (6, 6)]:
        x = torch.randn(*shape)
        u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
        torch.testing.assert_close(optimizers.matrix_sign(x), (u @ vh).float(), atol=1e-5, rtol=0)
    low = torch.randn(5, 2) @ torch.randn(2, 30)  # rank 2: three zero singular values
    sign = optimizers.matrix_sign(low)
    assert torch.linalg.svdvals(sign.double()).round(decimals=5).tolist() == [1, 1, 0, 0, 0]
    u, _, vh = torch.linalg.svd(low.double(), full_matrices=False)
    torch.testing.assert_close(sign, (u[:, :2] @ vh[:2]).float(), atol=1e-5, rtol=0)
    assert torch.equal(optimizers.matrix_sign(torch.zeros(3, 4)), torch.zeros(3, 4))

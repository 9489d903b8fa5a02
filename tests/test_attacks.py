"""Tests of ntk_theory.attacks: analytic optima, exact constraints, determinism, model state, reference PGDs.

Independent references: closed-form optima of linear models, vertex enumeration of the feasible
box (exact worst case for linear models), an explicit PGD loop and torchattacks (PGD/FGSM/PGDL2
without random start). Tests marked ``# Was:`` are regressions: each names a defect a review found
(fixed since) and fails if it comes back.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from ntk_theory.attacks import fgsm, per_sample_loss, pgd
from ntk_theory.dynamics import linearize
from ntk_theory.layers import finite_mlp

DT = torch.float64
f64 = DT


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _neg_margin(out, y):
    """Loss of a binary margin model f(x) = <w, x> + b, y in {-1, +1}: maximising it minimises the margin."""
    return -y * out


def _linear(w, b=0.0):
    return lambda x: x.reshape(x.shape[0], -1) @ w + b


# --------------------------------------------------------------------------------------------- analytic optima
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_margin_reaches_analytic_optimum_without_box(seed):
    g = torch.Generator().manual_seed(seed)
    d, n, eps = 7, 5, 0.3
    w = torch.randn(d, generator=g, dtype=DT)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.where(torch.rand(n, generator=g, dtype=DT) < 0.5, -1.0, 1.0).to(DT)
    f = _linear(w, 0.2)
    m0 = y * f(x)
    l1, l2 = float(w.abs().sum()), float(w.norm())
    for attack in ("fgsm", "pgd"):
        if attack == "fgsm":
            a_inf = fgsm(f, x, y, eps=eps, norm="linf", loss=_neg_margin, clamp=None)
            a_2 = fgsm(f, x, y, eps=eps, norm="l2", loss=_neg_margin, clamp=None)
            tol = 1e-12
        else:
            a_inf = pgd(f, x, y, eps=eps, norm="linf", loss=_neg_margin, clamp=None, generator=g)
            a_2 = pgd(f, x, y, eps=eps, alpha=eps / 2, steps=60, norm="l2", loss=_neg_margin, clamp=None, generator=g)
            tol = 1e-9
        torch.testing.assert_close(m0 - y * f(a_inf), torch.full((n,), eps * l1, dtype=DT), rtol=tol, atol=tol)
        torch.testing.assert_close(m0 - y * f(a_2), torch.full((n,), eps * l2, dtype=DT), rtol=tol, atol=tol)


def test_linear_logits_ce_reaches_analytic_optimum():
    """Two linear logits: CE is decreasing in the margin (W_y - W_o)·x, so the optimum moves it by eps·||W_y - W_o||_*."""
    g = torch.Generator().manual_seed(5)
    d, n, eps = 6, 8, 0.1
    W = torch.randn(2, d, generator=g, dtype=DT)
    f = lambda x: x @ W.T  # noqa: E731
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, 2, (n,), generator=g)
    dw = W[y] - W[1 - y]
    margin = lambda z: (dw * z).sum(1)  # noqa: E731
    for norm, dual in (("linf", dw.abs().sum(1)), ("l2", dw.norm(dim=1))):
        for xa in (fgsm(f, x, y, eps=eps, norm=norm, clamp=None),
                   pgd(f, x, y, eps=eps, norm=norm, steps=40, alpha=eps / 2, clamp=None, generator=g)):
            torch.testing.assert_close(margin(x) - margin(xa), eps * dual, rtol=1e-9, atol=1e-10)


def test_linear_margin_with_box_is_coordinatewise_optimal():
    g = torch.Generator().manual_seed(7)
    d, n, eps = 9, 6, 0.25
    w = torch.randn(d, generator=g, dtype=DT)
    x = torch.rand(n, d, generator=g, dtype=DT)
    x[0, :3] = torch.tensor([0.0, 1.0, 0.5], dtype=DT)  # points on the box faces
    y = torch.ones(n, dtype=DT)
    f = _linear(w)
    # maximise -<w, δ> coordinate-wise inside [-eps, eps] ∩ [-x, 1 - x]
    room = torch.where(w < 0, torch.clamp(1 - x, max=eps), torch.clamp(x, max=eps))
    best = (w.abs() * room).sum(1)
    for xa in (fgsm(f, x, y, eps=eps, loss=_neg_margin), pgd(f, x, y, eps=eps, loss=_neg_margin, generator=g)):
        torch.testing.assert_close(f(x) - f(xa), best, rtol=1e-12, atol=1e-12)


def test_fgm_mse_direction_is_normalised_input_gradient():
    g = torch.Generator().manual_seed(8)
    W = torch.randn(3, 5, generator=g, dtype=DT)
    x = torch.randn(4, 5, generator=g, dtype=DT)
    y = torch.randn(4, 3, generator=g, dtype=DT)
    grad = (x @ W.T - y) @ W  # ∇_x ½||Wx - y||² = W^T (Wx - y)
    xa = fgsm(lambda z: z @ W.T, x, y, eps=0.2, norm="l2", loss="mse", clamp=None)
    torch.testing.assert_close(xa - x, 0.2 * grad / grad.norm(dim=1, keepdim=True), rtol=1e-12, atol=1e-13)
    xs = fgsm(lambda z: z @ W.T, x, y, eps=0.2, norm="linf", loss="mse", clamp=None)
    torch.testing.assert_close(xs - x, 0.2 * grad.sign())


def test_per_sample_loss_conventions():
    g = torch.Generator().manual_seed(9)
    out = torch.randn(5, 4, generator=g, dtype=DT)
    y = torch.randint(0, 4, (5,), generator=g)
    torch.testing.assert_close(per_sample_loss(out, y, "ce"), F.cross_entropy(out, y, reduction="none"))
    oh = F.one_hot(y, 4).to(DT)
    torch.testing.assert_close(per_sample_loss(out, y, "mse"), 0.5 * ((out - oh) ** 2).sum(1))
    torch.testing.assert_close(per_sample_loss(out, oh, "mse"), 0.5 * ((out - oh) ** 2).sum(1))
    torch.testing.assert_close(per_sample_loss(out[:, :1], oh[:, 0], "mse"), 0.5 * (out[:, 0] - oh[:, 0]) ** 2)
    probs = torch.softmax(torch.randn(5, 4, generator=g, dtype=DT), 1)
    torch.testing.assert_close(per_sample_loss(out, probs, "ce"), -(probs * torch.log_softmax(out, 1)).sum(1))


# --------------------------------------------------------------------------------------------- exact constraints
@st.composite
def attack_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n = draw(st.integers(1, 4))
    d = draw(st.integers(1, 12))
    norm = draw(st.sampled_from(["linf", "l2"]))
    box = draw(st.sampled_from([(0.0, 1.0), (-1.0, 1.0), (0.1, 0.7), None]))
    lo, hi = box if box is not None else (-2.0, 2.0)
    limit = (hi - lo) * (1.0 if norm == "linf" else math.sqrt(d))
    eps = draw(st.one_of(st.floats(0.0, limit), st.sampled_from([1e-9, 1e-6, 8 / 255, 0.3, limit])))
    eps = min(eps, limit)
    seed = draw(st.integers(0, 2**31 - 1))
    steps = draw(st.integers(0, 4))
    random_start = draw(st.booleans())
    edge = draw(st.booleans())
    return dtype, n, d, norm, box, lo, hi, eps, seed, steps, random_start, edge


@given(attack_cases())
def test_constraints_hold_exactly(case):
    dtype, n, d, norm, box, lo, hi, eps, seed, steps, random_start, edge = case
    g = torch.Generator().manual_seed(seed)
    x = (lo + (hi - lo) * torch.rand(n, d, generator=g, dtype=torch.float64))
    if edge:  # points on the faces and corners of the box
        x[:, ::2] = lo
        x[:, 1::3] = hi
    x = x.to(dtype)
    if box is not None:  # rounding to float32 may step outside a non-representable box
        x = torch.clamp(x, lo, hi)
        x = torch.where(x.double() > hi, torch.nextafter(x, torch.tensor(-math.inf, dtype=dtype)), x)
        x = torch.where(x.double() < lo, torch.nextafter(x, torch.tensor(math.inf, dtype=dtype)), x)
    model = finite_mlp(d, 8, 1, out_features=3, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    outs = [pgd(model, x, y, eps=eps, steps=steps, norm=norm, random_start=random_start, clamp=box, generator=g),
            fgsm(model, x, y, eps=eps, norm=norm, clamp=box)]
    for xa in outs:
        assert xa.dtype == dtype and xa.shape == x.shape and not xa.requires_grad
        delta = xa.double() - x.double()
        if norm == "linf":
            assert float(delta.abs().max()) <= eps
        else:
            assert float(torch.linalg.vector_norm(delta, dim=1).max()) <= eps
        if box is not None:
            assert float(xa.double().min()) >= lo and float(xa.double().max()) <= hi


def test_l2_random_start_is_in_ball_and_steps_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 10, generator=g, dtype=DT)
    y = torch.randint(0, 3, (64,), generator=g)
    model = finite_mlp(10, 8, 1, out_features=3, generator=g)
    xa = pgd(model, x, y, eps=0.5, steps=0, norm="l2", clamp=None, generator=g)
    r = (xa - x).norm(dim=1)
    assert float(r.max()) <= 0.5 and float(r.min()) > 0.2  # uniform in a 10-d ball: radius eps·U^{1/10}
    assert torch.equal(pgd(model, x, y, eps=0.5, steps=0, random_start=False), x)
    assert torch.equal(pgd(model, x, y, eps=0.0), x)
    assert torch.equal(fgsm(model, x, y, eps=0.0), x)


# --------------------------------------------------------------------------------------------- determinism and state
def test_deterministic_with_generator():
    g = torch.Generator().manual_seed(1)
    model = finite_mlp(6, 16, 1, out_features=4, generator=g)
    x = torch.rand(10, 6, generator=g, dtype=DT)
    y = torch.randint(0, 4, (10,), generator=g)
    for norm in ("linf", "l2"):
        a = pgd(model, x, y, eps=0.1, norm=norm, generator=torch.Generator().manual_seed(3))
        b = pgd(model, x, y, eps=0.1, norm=norm, generator=torch.Generator().manual_seed(3))
        c = pgd(model, x, y, eps=0.1, norm=norm, generator=torch.Generator().manual_seed(4))
        assert torch.equal(a, b) and not torch.equal(a, c)


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_state_is_untouched(mode):
    torch.manual_seed(0)
    model = _BNNet().train(mode == "train")
    model.fc1.bias.requires_grad_(False)
    model.fc2.weight.grad = torch.full_like(model.fc2.weight, 7.0)
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    bufs = {k: b.clone() for k, b in model.named_buffers()}
    modes = {k: m.training for k, m in model.named_modules()}
    x = torch.rand(12, 8, requires_grad=True)
    y = torch.randint(0, 3, (12,))
    outs = [pgd(model, x, y, eps=0.1, steps=3, norm="l2"), fgsm(model, x, y, eps=0.1)]
    with torch.no_grad():  # attacks work under no_grad too
        outs.append(pgd(model, x, y, eps=0.1, steps=2))
    for xa in outs:
        assert not xa.requires_grad and xa.grad_fn is None
        assert float((xa - x.detach()).abs().max()) > 0
    assert x.grad is None
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert {k: m.training for k, m in model.named_modules()} == modes
    for k, p in model.named_parameters():
        assert torch.equal(p, params[k])
        if k == "fc2.weight":
            assert torch.equal(p.grad, torch.full_like(p, 7.0))
        else:
            assert p.grad is None
    for k, b in model.named_buffers():
        assert torch.equal(b, bufs[k]), k


# --------------------------------------------------------------------------------------------- any callable
def test_works_on_closures_linearised_nets_and_kernel_predictors():
    g = torch.Generator().manual_seed(2)
    model = finite_mlp(5, 32, 2, out_features=3, generator=g)
    x = torch.rand(16, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (16,), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs = torch.rand(20, 5, generator=g, dtype=DT)
    alpha = torch.randn(20, 3, generator=g, dtype=DT)

    def kernel_predictor(z):  # an RBF-kernel expansion, differentiable in z
        return torch.exp(-torch.cdist(z, xs) ** 2) @ alpha

    fs = [lambda z: functional_call(model, params, (z,)), linearize(model), kernel_predictor]
    for f in fs:
        for norm, loss in (("linf", "ce"), ("l2", "mse")):
            xa = pgd(f, x, y, eps=0.2, norm=norm, loss=loss, generator=g)
            with torch.no_grad():
                assert float(per_sample_loss(f(xa), y, loss).sum()) > float(per_sample_loss(f(x), y, loss).sum())
    # a scalar-returning callable loss is differentiated as is
    xa = fgsm(model, x, y, eps=0.1, loss=lambda out, t: F.cross_entropy(out, t))
    torch.testing.assert_close(xa, fgsm(model, x, y, eps=0.1))


# --------------------------------------------------------------------------------------------- reference PGDs
def _reference_pgd_linf(model, x, y, eps, alpha, steps, delta0=None):
    """Minimal Madry-style PGD written independently (mean CE, sign step, clamp to ball then [0, 1])."""
    xa = x.clone() if delta0 is None else torch.clamp(x + delta0, 0, 1)
    for _ in range(steps):
        xa = xa.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xa), y)
        (gr,) = torch.autograd.grad(loss, xa)
        xa = xa.detach() + alpha * gr.sign()
        xa = torch.clamp(x + torch.clamp(xa - x, -eps, eps), 0, 1)
    return xa.detach()


@pytest.fixture(scope="module")
def trained_net():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, c = 512, 3
    centers = torch.rand(c, 16, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.clamp(centers[y] + 0.15 * torch.randn(n, 16, generator=g), 0, 1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, c))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    xt, yt = x[:200].reshape(200, 1, 4, 4).contiguous(), y[:200]
    assert float((model(xt).argmax(1) == yt).float().mean()) > 0.9
    return model, xt, yt


def _mean_ce(model, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def test_matches_independent_reference_pgd(trained_net):
    model, x, y = trained_net
    eps, alpha, steps = 0.1, 0.02, 10
    ours = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=False)
    ref = _reference_pgd_linf(model, x, y, eps, alpha, steps)
    # the same iteration up to float32 rounding of where the clip lands
    assert float((ours - ref).abs().max()) <= 1e-6
    # same random start -> same result
    g = torch.Generator().manual_seed(0)
    u = torch.rand(x.shape, generator=g, dtype=x.dtype)
    ours_rs = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, generator=torch.Generator().manual_seed(0))
    ref_rs = _reference_pgd_linf(model, x, y, eps, alpha, steps, delta0=(2 * u - 1) * eps)
    assert float((ours_rs - ref_rs).abs().max()) <= 1e-6
    assert _mean_ce(model, ours, y) > 2 * _mean_ce(model, x, y)


def test_at_least_as_strong_as_torchattacks(trained_net):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained_net
    eps, alpha, steps = 0.1, 0.02, 10
    ours = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=False)
    theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    assert float((ours - theirs).abs().max()) <= 1e-6
    # random starts: average over seeds, awt's loss at least torchattacks' (within 1%)
    ours_l, theirs_l = [], []
    with torch.random.fork_rng():
        for seed in range(3):
            torch.manual_seed(seed)
            ours_l.append(_mean_ce(model, pgd(model, x, y, eps=eps, alpha=alpha, steps=steps,
                                              generator=torch.Generator().manual_seed(seed)), y))
            theirs_l.append(_mean_ce(model, torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps)(x, y), y))
    assert np.mean(ours_l) >= 0.99 * np.mean(theirs_l), (ours_l, theirs_l)
    # l2 (torchattacks.PGDL2 needs (N, C, H, W) images)
    eps2, alpha2 = 0.5, 0.1
    ours2 = pgd(model, x, y, eps=eps2, alpha=alpha2, steps=steps, norm="l2", random_start=False)
    theirs2 = torchattacks.PGDL2(model, eps=eps2, alpha=alpha2, steps=steps, random_start=False)(x, y)
    assert _mean_ce(model, ours2, y) >= 0.99 * _mean_ce(model, theirs2, y)
    assert float((ours2 - theirs2).abs().max()) <= 1e-4


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, arg", [
    (dict(eps=-0.1), "eps"),
    (dict(eps=1.5), "eps"),  # beyond the box width
    (dict(eps=2.5, norm="l2"), "eps"),  # beyond the box diameter sqrt(4)
    (dict(steps=-1), "steps"),
    (dict(alpha=0.0), "alpha"),
    (dict(norm="l1"), "norm"),
    (dict(loss="hinge"), "loss"),
    (dict(clamp=(1.0, 0.0)), "clamp"),
    (dict(clamp=(0.0,)), "clamp"),
    (dict(y=torch.zeros(3, dtype=torch.long)), "y"),
    (dict(y=torch.full((5,), 7)), "y"),
    (dict(y=torch.zeros(5, 2), loss="mse"), "y"),
    (dict(x=torch.full((5, 4), float("nan"))), "x"),
    (dict(x=torch.full((5, 4), 1.5)), "x"),
    (dict(f=lambda z: torch.zeros(z.shape[0], 3)), "f"),
    (dict(f=lambda z: z.sum(1)), "loss"),  # 'ce' needs (N, C) outputs
])
def test_validation(kwargs, arg):
    base = dict(f=nn.Linear(4, 3), x=torch.rand(5, 4), y=torch.zeros(5, dtype=torch.long), eps=0.1)
    base.update(kwargs)
    f, x, y = base.pop("f"), base.pop("x"), base.pop("y")
    with pytest.raises(ValueError, match=arg):
        pgd(f, x, y, **base)
    if "steps" not in base and "alpha" not in base:
        with pytest.raises(ValueError, match=arg):
            fgsm(f, x, y, **base)


def test_type_errors():
    with pytest.raises(TypeError, match="f"):
        pgd("model", torch.rand(2, 2), torch.zeros(2, dtype=torch.long), eps=0.1)
    with pytest.raises(TypeError, match="x"):
        pgd(nn.Linear(2, 2), torch.ones(2, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long), eps=0.1)
    with pytest.raises(TypeError, match="steps"):
        pgd(nn.Linear(2, 2), torch.rand(2, 2), torch.zeros(2, dtype=torch.long), eps=0.1, steps=2.5)
    with pytest.raises(TypeError, match="generator"):
        pgd(nn.Linear(2, 2), torch.rand(2, 2), torch.zeros(2, dtype=torch.long), eps=0.1, generator="3")
    with pytest.raises(ValueError, match="generator"):
        pgd(nn.Linear(2, 2), torch.rand(2, 2), torch.zeros(2, dtype=torch.long), eps=0.1, generator=-1)


# ============================================================================ attacks: exact optima
def _vertices(lower, upper):
    """All vertices of the box prod_i [lower_i, upper_i] (one sample, d small)."""
    return torch.stack([torch.stack([(upper if b else lower)[i] for i, b in enumerate(bits)])
                        for bits in itertools.product([0, 1], repeat=lower.numel())])


def test_fgsm_and_pgd_reach_bruteforce_optimum_linear_scalar_mse_with_box():
    # f(x) = <w, x> + b, MSE with a residual large enough that its sign cannot flip inside the ball:
    # the worst case over B_inf(x, eps) ∩ [0,1]^d is a vertex, found here by enumeration.
    g = _gen(11)
    d, n, eps = 4, 5, 0.2
    w = torch.randn(d, generator=g, dtype=f64)
    x = torch.rand(n, d, generator=g, dtype=f64)
    x[0, :2] = torch.tensor([0.0, 1.0], dtype=f64)      # on the box faces
    x[1] = 1.0                                           # a corner
    f = lambda z: z @ w + 0.3                            # noqa: E731
    y = f(x) + torch.where(torch.rand(n, generator=g, dtype=f64) < 0.5, -5.0, 5.0)
    loss = lambda z, i: 0.5 * float((f(z[None]) - y[i]) ** 2)  # noqa: E731
    best = []
    for i in range(n):
        lo, hi = torch.clamp(x[i] - eps, min=0.0), torch.clamp(x[i] + eps, max=1.0)
        best.append(max(loss(v, i) for v in _vertices(lo, hi)))
    best = torch.tensor(best, dtype=f64)
    for xa in (fgsm(f, x, y, eps=eps, loss="mse"), pgd(f, x, y, eps=eps, loss="mse", random_start=False, steps=3)):
        got = torch.tensor([loss(xa[i], i) for i in range(n)], dtype=f64)
        torch.testing.assert_close(got, best, rtol=1e-13, atol=1e-13)


def test_attacks_never_beat_the_bruteforce_maximum_of_a_convex_loss():
    # 0.5||Wx - y||^2 is convex: its maximum over the feasible box is at a vertex. No feasible
    # point may exceed it (a violated constraint would show up here).
    g = _gen(12)
    d, n, eps = 3, 8, 0.15
    W = torch.randn(2, d, generator=g, dtype=f64)
    x = torch.rand(n, d, generator=g, dtype=f64)
    y = torch.randn(n, 2, generator=g, dtype=f64)
    f = lambda z: z @ W.T  # noqa: E731
    attacks = [fgsm(f, x, y, eps=eps, loss="mse"),
               pgd(f, x, y, eps=eps, loss="mse", steps=20, alpha=0.05, generator=_gen(1))]
    for i in range(n):
        lo, hi = torch.clamp(x[i] - eps, min=0.0), torch.clamp(x[i] + eps, max=1.0)
        vmax = float((0.5 * ((f(_vertices(lo, hi)) - y[i]) ** 2).sum(1)).max())
        for xa in attacks:
            assert float(0.5 * ((f(xa[i:i + 1]) - y[i]) ** 2).sum()) <= vmax + 1e-12


def test_fgm_l2_linear_exact_step_and_loss_gain():
    g = _gen(13)
    w = torch.randn(5, generator=g, dtype=f64)
    x = torch.randn(4, 5, generator=g, dtype=f64)
    y = torch.zeros(4, dtype=f64)
    xa = fgsm(lambda z: z @ w, x, y, eps=0.3, norm="l2", loss=lambda o, t: o, clamp=None)
    torch.testing.assert_close(xa - x, (0.3 * w / w.norm()).expand(4, 5), rtol=1e-14, atol=1e-15)


# ============================================================================ attacks: constraints
@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]), st.integers(1, 3),
       st.integers(1, 9), st.sampled_from(["linf", "l2"]), st.sampled_from([(0.0, 1.0), (0.1, 0.7), None]),
       st.floats(0.0, 1.0), st.sampled_from(["frac", "tiny", "limit", "subnormal"]), st.integers(0, 10**6),
       st.integers(0, 3), st.booleans(), st.booleans(), st.sampled_from(["ce", "mse"]))
def test_exact_ball_and_box_constraints_all_dtypes(dtype, n, d, norm, box, fr, kind, seed, steps, rs, edge, loss):
    lo, hi = box if box else (-2.0, 2.0)
    limit = (hi - lo) * (1.0 if norm == "linf" else math.sqrt(d))
    eps = min(limit, {"frac": fr * limit, "tiny": fr * 1e-6, "limit": limit, "subnormal": 5e-324}[kind])
    g = _gen(seed)
    x = lo + (hi - lo) * torch.rand(n, d, generator=g, dtype=f64)
    if edge:
        x[:, ::2] = lo
        x[:, 1::3] = hi
    x = x.to(dtype)
    if box is not None:  # keep only samples whose rounded values stay inside the (non-representable) box
        x = torch.where((x.double() < lo) | (x.double() > hi), torch.tensor(0.5 * (lo + hi), dtype=dtype), x)
    w1 = torch.randn(d, 5, generator=g, dtype=f64)
    w2 = torch.randn(5, 3, generator=g, dtype=f64)
    f = lambda z: torch.tanh(z.double() @ w1) @ w2  # noqa: E731
    y = torch.randint(0, 3, (n,), generator=g)
    for xa in (pgd(f, x, y, eps=eps, steps=steps, norm=norm, random_start=rs, clamp=box, generator=g, loss=loss),
               fgsm(f, x, y, eps=eps, norm=norm, clamp=box, loss=loss)):
        assert xa.dtype == dtype and xa.shape == x.shape and bool(torch.isfinite(xa).all())
        delta = xa.double() - x.double()
        if norm == "linf":
            assert float(delta.abs().max()) <= eps
            assert float((xa - x).double().abs().max()) <= eps
        else:
            assert float(torch.linalg.vector_norm(delta, dim=1).max()) <= eps
        if box is not None:
            assert float(xa.double().min()) >= lo and float(xa.double().max()) <= hi


# ============================================================================ attacks: references
@pytest.fixture(scope="module")
def tanh_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4)).eval()
    g = _gen(0)
    x = torch.rand(20, 1, 3, 4, generator=g)
    x[:3] = 0.0
    x[3:5] = 1.0  # inputs on the box boundary
    y = torch.randint(0, 4, (20,), generator=g)
    return net, x, y


@pytest.mark.parametrize("eps,alpha,steps", [(0.1, 0.02, 10), (8 / 255, 2 / 255, 7), (1.0, 0.5, 3)])
def test_pgd_and_fgsm_match_torchattacks(tanh_net, eps, alpha, steps):
    import torchattacks
    net, x, y = tanh_net
    a = pgd(net, x, y, eps=eps, alpha=alpha, steps=steps, random_start=False)
    b = torchattacks.PGD(net, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    assert float((a - b).abs().max()) <= 2e-7
    assert float((fgsm(net, x, y, eps=eps) - torchattacks.FGSM(net, eps=eps)(x, y)).abs().max()) <= 2e-7
    e2 = min(4 * eps, 2.0)
    a2 = pgd(net, x, y, eps=e2, alpha=alpha, steps=steps, random_start=False, norm="l2")
    b2 = torchattacks.PGDL2(net, eps=e2, alpha=alpha, steps=steps, random_start=False)(x, y)
    assert float((a2 - b2).abs().max()) <= 1e-5


def test_zero_gradient_gives_zero_step_in_both_norms(tanh_net):
    _, x, y = tanh_net
    const = lambda z: z.reshape(z.shape[0], -1)[:, :4] * 0.0 + torch.arange(4.0)  # noqa: E731
    for norm in ("linf", "l2"):
        assert torch.equal(fgsm(const, x, y, eps=0.1, norm=norm), x)
        assert torch.equal(pgd(const, x, y, eps=0.1, norm=norm, random_start=False), x)
    # half the batch with a zero gradient: the other half still moves, nothing is NaN
    w = torch.randn(12)
    half = lambda z: (z.reshape(z.shape[0], -1) @ w) * (torch.arange(z.shape[0]) % 2)  # noqa: E731
    xa = fgsm(half, x, torch.ones(20), eps=0.2, norm="l2", loss="mse", clamp=None)
    assert bool(torch.isfinite(xa).all())
    assert torch.equal(xa[0::2], x[0::2]) and bool(((xa[1::2] - x[1::2]).abs().sum((1, 2, 3)) > 0).all())


def test_samples_are_attacked_independently_of_the_batch(tanh_net):
    net, x, y = tanh_net
    for norm in ("linf", "l2"):
        full = pgd(net, x, y, eps=0.1, steps=5, random_start=False, norm=norm)
        single = torch.cat([pgd(net, x[i:i + 1], y[i:i + 1], eps=0.1, steps=5, random_start=False, norm=norm)
                            for i in range(x.shape[0])])
        assert float((full - single).abs().max()) <= 1e-6


def test_label_and_output_shape_conventions(tanh_net):
    net, x, y = tanh_net
    oh = F.one_hot(y, 4).float()
    assert torch.equal(pgd(net, x, y, eps=0.1, random_start=False), pgd(net, x, oh, eps=0.1, random_start=False))
    net1 = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))
    yy = torch.randn(20)
    a = fgsm(net1, x, yy, eps=0.1, loss="mse", norm="l2")
    assert torch.equal(a, fgsm(lambda z: net1(z)[:, 0], x, yy, eps=0.1, loss="mse", norm="l2"))
    assert torch.equal(a, fgsm(net1, x, yy[:, None], eps=0.1, loss="mse", norm="l2"))


def test_generator_determinism_and_global_rng(tanh_net):
    net, x, y = tanh_net
    for norm in ("linf", "l2"):
        s = torch.get_rng_state().clone()
        a = pgd(net, x, y, eps=0.1, norm=norm, generator=_gen(3))
        assert torch.equal(s, torch.get_rng_state())           # the global RNG is not touched
        assert torch.equal(a, pgd(net, x, y, eps=0.1, norm=norm, generator=_gen(3)))
    g = _gen(5)
    state = g.get_state().clone()
    pgd(net, x, y, eps=0.1, random_start=False, generator=g)
    assert torch.equal(state, g.get_state())                   # no random start, no draw


def test_inputs_are_not_mutated_and_result_is_detached(tanh_net):
    net, x, y = tanh_net
    xr = x.clone().requires_grad_(True)
    x0, y0 = x.clone(), y.clone()
    for norm in ("linf", "l2"):
        for xa in (pgd(net, xr, y, eps=0.1, norm=norm, steps=3, generator=_gen(0)), fgsm(net, xr, y, eps=0.1, norm=norm)):
            assert not xa.requires_grad and xa.grad_fn is None
            assert xa.data_ptr() != xr.data_ptr()
    assert torch.equal(xr.detach(), x0) and torch.equal(y, y0) and xr.grad is None


class _BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.bn = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def test_state_restored_even_when_the_attack_raises_after_a_forward():
    torch.manual_seed(0)
    net = _BNDropNet().train()
    bufs = {k: b.clone() for k, b in net.named_buffers()}
    x = torch.rand(8, 6)
    with pytest.raises(ValueError, match="y"):  # labels out of range: detected after the first forward
        pgd(net, x, torch.full((8,), 7), eps=0.1, steps=2)
    for k, b in net.named_buffers():
        assert torch.equal(b, bufs[k]), k
    assert net.training and net.bn.training


@pytest.mark.parametrize("kwargs,arg,exc", [
    (dict(eps=float("nan")), "eps", ValueError),
    (dict(eps=math.inf, clamp=None), "eps", ValueError),
    (dict(alpha=float("nan")), "alpha", ValueError),
    (dict(alpha=math.inf), "alpha", ValueError),
    (dict(alpha=-0.1), "alpha", ValueError),
    (dict(steps=True), "steps", TypeError),
    (dict(clamp=(float("nan"), 1.0)), "clamp", ValueError),
    (dict(x=torch.rand(5, 4, dtype=torch.complex64)), "x", TypeError),
    (dict(x=torch.rand(0, 4)), "x", ValueError),
    (dict(y=torch.zeros(4, 3, dtype=torch.long)), "y", ValueError),
    (dict(y=torch.full((5,), -1)), "y", ValueError),
    (dict(x=torch.full((5, 4), math.inf), clamp=None), "x", ValueError),
])
def test_more_validation(kwargs, arg, exc):
    base = dict(x=torch.rand(5, 4), y=torch.zeros(5, dtype=torch.long), eps=0.1)
    base.update(kwargs)
    x, y = base.pop("x"), base.pop("y")
    with pytest.raises(exc, match=arg):
        pgd(nn.Linear(4, 3), x, y, **base)


# ---------------------------------------------------------------------------- attack regressions
def test_nan_outputs_raise_instead_of_returning_unperturbed_points():
    # Was: torch.sign(nan) == 0, so a NaN loss/gradient gives a zero linf step and the attack silently returns x
    # (or the random start) as if it were adversarial; the gradient is never checked for finiteness.
    x = torch.rand(3, 4)
    f = lambda z: z.sum(1) * float("nan")  # noqa: E731
    with pytest.raises(ValueError, match="f"):
        fgsm(f, x, torch.zeros(3), eps=0.1, loss="mse")
    with pytest.raises(ValueError, match="f"):
        pgd(f, x, torch.zeros(3), eps=0.1, loss="mse", generator=_gen(0))


def test_l2_attack_with_infinite_gradient_does_not_return_nan():
    # Was: an infinite input gradient (sqrt at the box face 0) gives g/||g|| = inf/inf = NaN: fgsm(norm="l2")
    # silently returns NaN points (expected: a clear ValueError, or a finite point of the ball).
    x = torch.zeros(3, 4)
    x[:, 0] = 0.5
    try:
        xa = fgsm(lambda z: torch.sqrt(z).sum(1), x, torch.full((3,), 2.0), eps=0.1, loss="mse", norm="l2")
    except ValueError as exc:
        assert "f" in str(exc)
    else:
        assert bool(torch.isfinite(xa).all()), xa


@pytest.mark.parametrize("scale", [1e-40, 1e20])
def test_fgm_l2_step_has_length_eps_for_tiny_and_huge_gradients(scale):
    # Was: _step divides by max(||g||_2, finfo.tiny) computed on the raw gradient: a subnormal norm (float32,
    # e.g. CE of a very confident sample, margin ~90) gives a step far shorter than eps, and an overflowing
    # norm (||g|| = inf) gives a zero step. FGM's step x + eps*g/||g|| has length eps whenever g != 0.
    x = torch.rand(2, 10)
    w = torch.full((10,), scale, dtype=torch.float32)
    xa = fgsm(lambda z: z @ w, x, torch.zeros(2), eps=0.1, norm="l2", loss=lambda o, t: o, clamp=None)
    torch.testing.assert_close((xa - x).norm(dim=1), torch.full((2,), 0.1), rtol=1e-5, atol=0.0)


def test_buffers_reassigned_in_forward_are_restored():
    # Was: _ModuleStateGuard keeps references to the buffer *objects*; a forward that reassigns a buffer
    # (self.b = self.b + 1, common in custom running statistics) is not undone, contrary to the docstring.
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, z):
            self.calls = self.calls + 1
            return self.lin(z)

    m = Counter()
    pgd(m, torch.rand(5, 4), torch.zeros(5, dtype=torch.long), eps=0.1, steps=3, generator=_gen(0))
    assert float(m.calls) == 0.0


def test_ce_soft_labels_must_be_probabilities():
    # Was: float 'ce' targets are documented as class probabilities, but negative entries / rows not summing
    # to one are accepted silently (the maximised objective is then not a cross-entropy).
    bad = torch.tensor([[2.0, -1.0, 0.0]] * 3)
    with pytest.raises(ValueError, match="y"):
        fgsm(nn.Linear(4, 3), torch.rand(3, 4), bad, eps=0.1)


# ---------------------------------------------------------------------------- issue 13: the dtype/device rule
def test_attacks_cast_inputs_to_the_models_dtype_and_device():
    # Was: pgd / fgsm with float64 or numpy inputs on a float32 model failed ten frames deep
    # ("mat1 and mat2 must have the same dtype"); the rule now: inputs take the model's dtype and device
    net = finite_mlp(4, 16, 1, 3, generator=_gen(0), dtype=torch.float32)
    x64 = torch.rand(5, 4, generator=_gen(1), dtype=f64)
    y = torch.tensor([0, 1, 2, 0, 1])
    for xin in (x64, x64.numpy(), x64.tolist()):
        for atk in (lambda z: pgd(net, z, y, eps=0.1, steps=3, generator=3),
                    lambda z: fgsm(net, z, y.numpy(), eps=0.1)):
            xa = atk(xin)
            assert xa.dtype == torch.float32
            x32 = x64.float()
            assert float((xa.double() - x32.double()).abs().max()) <= 0.1
    ref = pgd(net, x64.float(), y, eps=0.1, steps=3, generator=3)
    torch.testing.assert_close(pgd(net, x64, y, eps=0.1, steps=3, generator=3), ref, rtol=0, atol=0)
    # a closure has no dtype: x keeps its own
    assert pgd(lambda z: z @ torch.ones(4, 3, dtype=f64), x64, y, eps=0.1, steps=1).dtype == f64
    with pytest.raises(TypeError, match="y: expected real values"):
        pgd(net, x64, y.to(torch.complex64), eps=0.1)

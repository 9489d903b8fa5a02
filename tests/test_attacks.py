"""Tests of ntk_theory.attacks: analytic optima, exact constraints, determinism, model state, reference PGDs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from ntk_theory.attacks import fgsm, per_sample_loss, pgd
from ntk_theory.dynamics import linearize
from ntk_theory.layers import finite_mlp

DT = torch.float64


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
        pgd(nn.Linear(2, 2), torch.rand(2, 2), torch.zeros(2, dtype=torch.long), eps=0.1, generator=3)

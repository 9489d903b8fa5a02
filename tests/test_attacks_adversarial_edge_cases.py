"""Adversarial review of ntk_theory.attacks and ntk_theory.adversarial.

Independent references: vertex enumeration of the feasible box for linear models
(exact worst case), torchattacks (PGD/FGSM/PGDL2 without random start), numpy/scipy
(pinv, expm) for the kernel predictors, gradient_descent_mse for AT-2 at eps = 0, and
explicit loops that rebuild AT-2 from kernels (infinite width) or from an independent
jvp linearisation (finite width) at the recorded adversarial points.

Tests marked ``# Was:`` are regressions: each names a defect the review found (fixed since)
and fails if it comes back.
"""
from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jvp, vjp

from ntk_theory import adversarial as adv_mod
from ntk_theory.adversarial import AdvNTKPredictor, KernelRegressor, adversarial_kernel_training, adversarial_ntk
from ntk_theory.attacks import fgsm, pgd
from ntk_theory.dynamics import gradient_descent_mse
from ntk_theory.empirical import empirical_ntk
from ntk_theory.infinite import mlp
from ntk_theory.layers import finite_mlp

f64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _data(n=6, d=3, o=None, seed=0):
    g = _gen(seed)
    x = torch.rand(n, d, generator=g, dtype=f64) * 0.8 + 0.1
    y = torch.randn((n,) if o is None else (n, o), generator=g, dtype=f64)
    return x, y, g


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


# ============================================================================ kernel predictors
def test_kernel_regressor_singular_kernel_is_the_pseudo_inverse_limit():
    g = _gen(0)
    x = torch.rand(4, 3, generator=g, dtype=f64)
    xd = torch.cat([x, x[:2]])                           # duplicated points: Theta is singular
    yd = torch.randn(6, generator=g, dtype=f64)
    xt = torch.rand(5, 3, generator=g, dtype=f64)
    k = mlp(2, sigma_b=0.1)
    K, Kt = k(xd).ntk.numpy(), k(xt, xd).ntk.numpy()
    Kp = np.linalg.pinv(K, rcond=1e-10)
    got = KernelRegressor(k, xd, yd, t=math.inf, diag_reg=0.0)(xt).detach().numpy()
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, Kt @ Kp @ yd.numpy(), rtol=1e-9, atol=1e-12)
    t, c = 3.0, 6.0
    ref = Kt @ Kp @ (np.eye(6) - scipy.linalg.expm(-K * t / c)) @ yd.numpy()
    np.testing.assert_allclose(KernelRegressor(k, xd, yd, t=t)(xt).detach().numpy(), ref, rtol=1e-9, atol=1e-12)
    # Adv-NTK with equal times t/c on the same singular kernel (it never inverts Theta)
    np.testing.assert_allclose(AdvNTKPredictor(k, xd, yd, init=t / c)(xt).detach().numpy(), ref, rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("big", [1.0, 100.0, 1e4])
def test_adv_ntk_per_class_times_against_scipy_expm(big):
    x, _, g = _data(6, 3)
    Y = torch.randn(6, 3, generator=g, dtype=f64)
    xt = torch.rand(4, 3, generator=g, dtype=f64)
    k = mlp(2, sigma_b=0.1)
    f = AdvNTKPredictor(k, x, Y, per_class=True)
    with torch.no_grad():
        f.varpi.copy_((torch.rand(6, 3, generator=g, dtype=f64) - 0.3) * big)  # some negative: |varpi| is used
    K, Kt = k(x).ntk.numpy(), k(xt, x).ntk.numpy()
    cols = []
    for j in range(3):
        D = np.diag(np.abs(f.varpi[:, j].detach().numpy()))
        cols.append(Kt @ np.linalg.solve(K, (np.eye(6) - scipy.linalg.expm(-K @ D)) @ Y[:, j].numpy()))
    np.testing.assert_allclose(f(xt).detach().numpy(), np.stack(cols, 1), rtol=1e-8, atol=1e-11)


def test_adv_ntk_trainable_from_its_default_zero_init():
    # Was: varpi.abs() has derivative 0 at 0 in torch, so from init=0 (the default and Fu & Wang's init,
    # aug = zeros) every gradient w.r.t. varpi is exactly 0 and Adv-NTK training never moves. The reference
    # (fshp971/adv-ntk, JAX) differentiates |.| with select(x >= 0, g, -g), i.e. +1 at 0; here
    # d f(x)/d varpi_i at 0 is Theta(x, x_i) y_i != 0.
    x, y, g = _data(6, 3)
    k = mlp(2, sigma_b=0.1)
    for per_class in (False, True):
        f = AdvNTKPredictor(k, x, y, per_class=per_class)
        xt = torch.rand(4, 3, generator=g, dtype=f64)
        (0.5 * (f(xt) - 1.0).pow(2).sum()).backward()
        expected = -(k(xt, x).ntk * y[None, :]).sum(0) if not per_class else None
        assert float(f.varpi.grad.abs().max()) > 0.0
        if expected is not None:  # at varpi = 0: f = 0, dL/dvarpi_i = sum_x (f - 1) Theta(x, x_i) y_i
            torch.testing.assert_close(f.varpi.grad, expected, rtol=1e-10, atol=1e-12)


# ============================================================================ adversarial_ntk
def test_adversarial_ntk_infinite_equals_pgd_on_the_kernel_regressor():
    x, y, _ = _data(7, 3)
    k = mlp(2, sigma_b=0.1)
    a = adversarial_ntk(k, x, y, eps=0.05, steps=4, t=20.0, diag_reg=1e-6, generator=_gen(4))
    ref = pgd(KernelRegressor(k, x, y, t=20.0, diag_reg=1e-6), x, y, eps=0.05, steps=4, loss="mse",
              generator=_gen(4))
    assert torch.equal(a.x_adv, ref)
    torch.testing.assert_close(a.k_adv_clean, k(ref, x, get="ntk"), rtol=0, atol=0)
    torch.testing.assert_close(a.k_clean_clean, k(x, get="ntk"), rtol=0, atol=0)


@pytest.mark.parametrize("mask_mode", ["subnetwork", "ntt"])
def test_adversarial_ntk_masks_in_both_modes(mask_mode):
    from ntk_theory.masks import random_mask
    x, y, g = _data(6, 4)
    net = finite_mlp(4, 16, 2, 1, sigma_b=0.1, generator=_gen(2), dtype=f64)
    mask = random_mask(net, 0.4, generator=_gen(3))
    a = adversarial_ntk(net, x, y[:, None], eps=0.05, steps=3, generator=_gen(5), mask=mask, mask_mode=mask_mode,
                        mode="full")
    # the attack is on the masked network, whatever the kernel mode
    masked = {k_: (torch.where(mask[k_], p, 0.0) if k_ in mask else p).detach() for k_, p in net.named_parameters()}
    ref = pgd(lambda z: functional_call(net, masked, (z,)), x, y[:, None], eps=0.05, steps=3, loss="mse",
              generator=_gen(5))
    assert torch.equal(a.x_adv, ref)
    torch.testing.assert_close(a.k_adv_adv, empirical_ntk(net, ref, mask=mask, mask_mode=mask_mode, mode="full"))
    torch.testing.assert_close(a.k_adv_clean, empirical_ntk(net, ref, x, mask=mask, mask_mode=mask_mode, mode="full"))


def test_adversarial_ntk_masked_attack_leaves_batchnorm_statistics_alone(monkeypatch):
    # Was: with a mask the attack runs on a functional_call closure, which _ModuleStateGuard does not cover:
    # a model in train mode gets its BatchNorm running statistics updated by every PGD forward
    # (the unmasked path restores them). The kernel stage is stubbed out to isolate the attack.
    monkeypatch.setattr(adv_mod, "empirical_ntk", lambda model, a, b=None, **kw: torch.zeros(a.shape[0], a.shape[0]))

    class BNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.bn, self.l2 = nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Linear(16, 1)

        def forward(self, z):
            return self.l2(torch.relu(self.bn(self.l1(z))))

    x, y, _ = _data(6, 3)
    for masked in (False, True):
        torch.manual_seed(0)
        net = BNNet().double().train()
        before = {k: b.clone() for k, b in net.named_buffers()}
        mask = {"l2.weight": torch.arange(16)[None, :] % 2 == 0} if masked else None
        adversarial_ntk(net, x, y[:, None], eps=0.1, steps=2, generator=_gen(0), mask=mask)
        for k, b in net.named_buffers():
            assert torch.equal(b, before[k]), (masked, k)


def test_adversarial_ntk_checks_the_custom_attack_output():
    # Was: the output of a custom ``attack`` is not checked: one returning the wrong number of points gives
    # kernels of the wrong shape (here 2x2 for 6 inputs) without any error.
    x, y, _ = _data(6, 3)
    with pytest.raises(ValueError, match="attack"):
        adversarial_ntk(mlp(1), x, y, eps=0.1, attack=lambda f, a, b: a[:2])


def test_adversarial_ntk_scalar_y_is_a_value_error():
    # Was: y of shape () reaches ``y.shape[0]`` unchecked: IndexError instead of a ValueError naming y.
    x, _, _ = _data(6, 3)
    with pytest.raises(ValueError, match="y"):
        adversarial_ntk(mlp(1), x, torch.tensor(1.0, dtype=f64), eps=0.1)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(alpha=-1.0), "alpha"),
    (dict(clamp=(1.0, 0.0)), "clamp"),
    (dict(loss="hinge"), "loss"),
    (dict(generator=3), "generator"),
])
def test_eps_zero_does_not_bypass_attack_validation(kwargs, arg):
    # Was: _attack_fn's eps == 0 shortcut returns x before pgd validates alpha/clamp/loss/generator (pgd itself
    # validates first and then returns x for eps = 0), so bad arguments pass silently when eps = 0.
    x, y, _ = _data(6, 3)
    with pytest.raises((ValueError, TypeError), match=arg):
        adversarial_ntk(mlp(1), x, y, eps=0.0, **kwargs)
    if "loss" not in kwargs:  # adversarial_kernel_training always attacks the MSE
        with pytest.raises((ValueError, TypeError), match=arg):
            adversarial_kernel_training(mlp(1), x, y, steps=2, lr=1.0, eps=0.0, **kwargs)


# ============================================================================ AT-2
@pytest.mark.parametrize("normalization", ["size", "none"])
def test_at2_eps_zero_is_gradient_descent_steps_and_stability_edge(normalization):
    x, Y, g = _data(7, 3, o=2)
    xt = torch.rand(3, 3, generator=g, dtype=f64)
    k = mlp(2, sigma_b=0.1)
    K, Kt = k(x).ntk, k(xt, x).ntk
    c = Y.numel() if normalization == "size" else 1.0
    edge = 2 * c / float(torch.linalg.eigvalsh(K).max())
    for lr in (0.999 * edge, 1.001 * edge, 0.25 * edge):
        for steps in (0, 1, 6):
            tr = adversarial_kernel_training(k, x, Y, steps=steps, lr=lr, eps=0.0, x_test=xt,
                                             normalization=normalization)
            ref = gradient_descent_mse(K, Y, list(range(steps + 1)), k_test_train=Kt, lr=lr,
                                       normalization=normalization)
            torch.testing.assert_close(tr.f_train, ref.f_train, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(tr.f_test, ref.f_test, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(tr.tau, ref.tau, rtol=1e-15, atol=0)


def test_at2_finite_eps_zero_multi_output_at_the_stability_edge():
    x, Y, g = _data(7, 3, o=2)
    xt = torch.rand(3, 3, generator=g, dtype=f64)
    net = finite_mlp(3, 32, 2, 2, sigma_b=0.1, generator=_gen(1), dtype=f64)
    with torch.no_grad():
        K, Kt, f0, f0t = empirical_ntk(net, x), empirical_ntk(net, xt, x), net(x), net(xt)
    lmax = float(torch.linalg.eigvalsh(K.permute(0, 2, 1, 3).reshape(14, 14)).max())
    for lr, steps in ((0.999 * 2 * 14 / lmax, 5), (1.0, 1)):
        tr = adversarial_kernel_training(net, x, Y, steps=steps, lr=lr, eps=0.0, x_test=xt)
        ref = gradient_descent_mse(K, Y, list(range(steps + 1)), f0=f0, k_test_train=Kt, f0_test=f0t, lr=lr)
        torch.testing.assert_close(tr.f_train, ref.f_train, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(tr.f_test, ref.f_test, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_at2_infinite_matches_an_explicit_loop(norm):
    """Rebuild f_k = -(lr/c) sum_s Theta(., X~_s) r_s and attack it with the same PGD and generator stream."""
    x, Y, g = _data(6, 3, o=2)
    xt = torch.rand(3, 3, generator=g, dtype=f64)
    k = mlp(2, sigma_b=0.1)
    lr, steps, eps, c = 0.1, 4, (0.05 if norm == "linf" else 0.1), 1.0
    tr = adversarial_kernel_training(k, x, Y, steps=steps, lr=lr, eps=eps, norm=norm, attack_steps=3,
                                     generator=_gen(7), x_test=xt, normalization="none")
    gen = _gen(7)
    centres, res = [], []

    def fk(z):
        out = torch.zeros(z.shape[0], 2, dtype=f64)
        for xs, r in zip(centres, res):
            out = out - (lr / c) * k(z, xs, get="ntk") @ r
        return out

    for step in range(steps + 1):
        xa = x.clone() if step == 0 else pgd(fk, x, Y, eps=eps, steps=3, norm=norm, loss="mse", generator=gen)
        torch.testing.assert_close(tr.x_adv[step], xa, rtol=0, atol=1e-12)
        with torch.no_grad():
            r = fk(xa) - Y
            torch.testing.assert_close(tr.f_adv[step], fk(xa), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(tr.f_train[step], fk(x), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(tr.f_test[step], fk(xt), rtol=1e-10, atol=1e-12)
            assert abs(float(tr.robust_loss[step]) - float((r ** 2).sum() / (2 * c))) <= 1e-6 * float((r ** 2).sum())
        centres.append(xa)
        res.append(r)
    assert tr.robust_loss[-1] < tr.robust_loss[0]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_at2_finite_matches_an_independent_linearisation(norm):
    """Own linearisation f0 + J0 u (torch.func.jvp), GD on u with vjp, attacked by the same PGD stream."""
    x, Y, g = _data(6, 3, o=2)
    xt = torch.rand(3, 3, generator=g, dtype=f64)
    model = finite_mlp(3, 24, 1, 2, sigma_b=0.1, generator=_gen(1), dtype=f64)
    p0 = {k_: v.detach().clone() for k_, v in model.named_parameters()}
    lr, steps, eps, c = 1.0, 3, 0.05, 12.0
    tr = adversarial_kernel_training(model, x, Y, steps=steps, lr=lr, eps=eps, norm=norm, attack_steps=3,
                                     generator=_gen(7), x_test=xt)
    u = {k_: torch.zeros_like(v) for k_, v in p0.items()}

    def flin(z):
        out, tan = jvp(lambda p: functional_call(model, p, (z,)), (p0,), (u,))
        return out + tan

    gen = _gen(7)
    for step in range(steps + 1):
        xa = pgd(flin, x, Y, eps=eps, steps=3, norm=norm, loss="mse", generator=gen)
        torch.testing.assert_close(tr.x_adv[step], xa, rtol=0, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(tr.f_train[step], flin(x), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(tr.f_test[step], flin(xt), rtol=1e-10, atol=1e-12)
            r = flin(xa) - Y
        _, pull = vjp(lambda p: functional_call(model, p, (xa,)), p0)
        (gr,) = pull(r)
        u = {k_: u[k_] - lr / c * gr[k_] for k_ in u}
    for k_, v in model.named_parameters():  # the caller's model is untouched
        assert torch.equal(v, p0[k_]) and v.grad is None and v.requires_grad


def test_at2_does_not_mutate_inputs():
    x, Y, g = _data(6, 3, o=2)
    xt = torch.rand(3, 3, generator=g, dtype=f64)
    copies = [t.clone() for t in (x, Y, xt)]
    for model in (mlp(1), finite_mlp(3, 8, 1, 2, generator=_gen(0), dtype=f64)):
        adversarial_kernel_training(model, x, Y, steps=2, lr=0.5, eps=0.05, attack_steps=2, generator=_gen(0),
                                    x_test=xt, y_test=Y[:3])
        for a, b in zip((x, Y, xt), copies):
            assert torch.equal(a, b)


def test_at2_losses_are_recorded_in_float64():
    # Was: robust_loss / clean_loss / test_loss are built with torch.tensor(list_of_python_floats), i.e. float32,
    # although computed in float64: ~1e-7 relative error, enough to hide robust-vs-clean gaps at small eps.
    x, Y, _ = _data(6, 3, o=2)
    tr = adversarial_kernel_training(mlp(1), x, Y, steps=2, lr=1.0, eps=0.05, x_test=x[:2], y_test=Y[:2])
    assert tr.robust_loss.dtype == f64 and tr.clean_loss.dtype == f64 and tr.test_loss.dtype == f64
    assert float(tr.robust_loss[0]) == float((Y ** 2).sum() / (2 * Y.numel()))

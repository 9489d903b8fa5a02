"""Tests of ntk_theory.infinite against independent references.

References: mpmath quadrature of the Gaussian expectations; Monte-Carlo over random
finite networks (empirical NTK from a float64 torch.func Jacobian written here, not the
library's); finite differences for input gradients; algebraic identities.
"""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torch.func import functional_call, jacrev, vmap

from ntk_theory.infinite import (ABRelu, Conv, Dense, Erf, Flatten, GlobalAvgPool, Identity, Kernels, LeakyRelu, Relu,
                                 erf_expectations, mlp, relu_expectations, serial)

f64 = torch.float64


# ----------------------------------------------------------------------------- references
mpmath.mp.dps = 25
SQ2 = mpmath.sqrt(2)
Phi = lambda z: (1 + mpmath.erf(z / SQ2)) / 2
phi_pdf = lambda z: mpmath.exp(-z * z / 2) / mpmath.sqrt(2 * mpmath.pi)


def _quad(s11, s12, s22, inner):
    """E_u[inner(u, m(u), sd)] for u ~ N(0, s11), v | u ~ N(m(u) = s12/s11 u, sd^2 = s22 - s12^2/s11).

    ``inner`` gives the conditional expectation over v in closed form (Gaussian identities
    independent of the arc-cosine / arcsin formulas under test); the outer integral is
    mpmath quadrature, split at the kink u = 0.
    """
    sd = mpmath.sqrt(s22 - s12 * s12 / s11)
    pdf = lambda u: mpmath.exp(-u * u / (2 * s11)) / mpmath.sqrt(2 * mpmath.pi * s11)
    return float(mpmath.quad(lambda u: inner(u, s12 / s11 * u, sd) * pdf(u), [-mpmath.inf, 0, mpmath.inf]))


def _leaky_refs(a, s11, s12, s22):
    phi = lambda z: z if z > 0 else a * z
    dphi = lambda z: 1 if z > 0 else a
    relu_mean = lambda m, sd: m * Phi(m / sd) + sd * phi_pdf(m / sd)       # E[max(v, 0)]
    e = _quad(s11, s12, s22, lambda u, m, sd: phi(u) * (relu_mean(m, sd) + a * (m - relu_mean(m, sd))))
    ed = _quad(s11, s12, s22, lambda u, m, sd: dphi(u) * (Phi(m / sd) + a * (1 - Phi(m / sd))))
    return e, ed


COVS = [(1.0, 0.3, 2.0), (0.5, -0.4, 0.7), (2.0, 1.7, 1.9), (1.3, 0.0, 0.4), (0.8, -0.75, 1.1), (1.0, 0.999, 1.0)]


@pytest.mark.parametrize("s11,s12,s22", COVS)
@pytest.mark.parametrize("a", [0.0, 0.2, -0.5])
def test_relu_family_expectations_match_quadrature(s11, s12, s22, a):
    e_ref, ed_ref = _leaky_refs(a, s11, s12, s22)
    e, ed = relu_expectations(*(torch.tensor(v, dtype=f64) for v in (s12, s11, s22)), a, 1.0)
    assert abs(e.item() - e_ref) < 1e-11 * max(1, abs(e_ref))
    assert abs(ed.item() - ed_ref) < 1e-11


@pytest.mark.parametrize("s11,s12,s22", COVS)
def test_erf_expectations_match_quadrature(s11, s12, s22):
    # E[erf(m + sd Z)] = erf(m / sqrt(1 + 2 sd^2));  E[exp(-(m + sd Z)^2)] = exp(-m^2/(1+2sd^2)) / sqrt(1+2sd^2)
    e_ref = _quad(s11, s12, s22, lambda u, m, sd: mpmath.erf(u) * mpmath.erf(m / mpmath.sqrt(1 + 2 * sd * sd)))
    g = lambda u, m, sd: mpmath.exp(-u * u) * mpmath.exp(-m * m / (1 + 2 * sd * sd)) / mpmath.sqrt(1 + 2 * sd * sd)
    ed_ref = 4 / float(mpmath.pi) * _quad(s11, s12, s22, g)
    e, ed = erf_expectations(*(torch.tensor(v, dtype=f64) for v in (s12, s11, s22)))
    assert abs(e.item() - e_ref) < 1e-12
    assert abs(ed.item() - ed_ref) < 1e-12


def test_relu_diagonal_closed_form():
    # sigma_w^2 = 2, sigma_b = 0, ||x||^2 = d: every Sigma(x, x) = 2 and Theta(x, x) = 2 (L + 1)
    x = torch.randn(5, 9, dtype=f64)
    x = x / x.norm(dim=1, keepdim=True) * 3
    for depth in (0, 1, 3):
        k = mlp(depth)(x)
        assert torch.allclose(k.nngp.diagonal(), torch.full((5,), 2.0, dtype=f64), rtol=1e-13)
        assert torch.allclose(k.ntk.diagonal(), torch.full((5,), 2.0 * (depth + 1), dtype=f64), rtol=1e-13)


def test_linear_network_kernels_are_closed_form():
    # identity activations: NNGP = sw^(2(L+1)) x.x'/d + sb^2 sum_l sw^(2l); NTK = (L+1) * that for sb = 0
    x = torch.randn(4, 6, dtype=f64)
    sw, L = 1.3, 2
    k = mlp(L, "identity", sigma_w=sw)(x)
    gram = x @ x.T / 6
    assert torch.allclose(k.nngp, sw ** (2 * (L + 1)) * gram, rtol=1e-13)
    assert torch.allclose(k.ntk, (L + 1) * sw ** (2 * (L + 1)) * gram, rtol=1e-13)


# ----------------------------------------------------------------------------- Monte Carlo
def _jacobian_ntk(model, x):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],))[0, 0]

    jac = vmap(jacrev(f), (None, 0))(params, x)
    return sum(j.reshape(len(x), -1) @ j.reshape(len(x), -1).T for j in jac.values())


def _mc_agreement(kernel_fn, x, width, n_seeds, z=5.0):
    """Mean empirical NTK / NNGP over seeds within z standard errors (+ O(1/width) bias) of the limit."""
    thetas, nngps = [], []
    for s in range(n_seeds):
        net = kernel_fn.finite(x.shape[1:], width, generator=torch.Generator().manual_seed(1000 + s))
        thetas.append(_jacobian_ntk(net, x))
        readout = net[-1]
        with torch.no_grad():
            feats = net[:-1](x)
        nngps.append(readout.sigma_w ** 2 * feats @ feats.T / feats.shape[1] + readout.sigma_b ** 2)
    limit = kernel_fn(x)
    for samples, ref in ((torch.stack(thetas), limit.ntk), (torch.stack(nngps), limit.nngp)):
        mean, se = samples.mean(0), samples.std(0) / math.sqrt(n_seeds)
        bias = 2.0 * ref.abs().max() / width      # finite-width bias is O(1/width)
        excess = (mean - ref).abs() - z * se - bias
        assert excess.max() <= 0, f"MC disagreement: max excess {excess.max():.3g}, se max {se.max():.3g}"
        # and the test has power: the standard error is small against the kernel itself
        assert se.max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("kernel_fn", [
    mlp(2, "relu", sigma_b=0.3),
    mlp(1, "erf", sigma_w=1.5, sigma_b=0.2),
    mlp(2, "leaky_relu", alpha=0.1),
], ids=["relu", "erf", "leaky"])
def test_mlp_kernels_match_monte_carlo(kernel_fn):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 8, generator=g, dtype=f64)
    _mc_agreement(kernel_fn, x, width=512, n_seeds=16)


@pytest.mark.parametrize("readout", [Flatten, GlobalAvgPool])
def test_cnn_kernels_match_monte_carlo(readout):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 5, 5, generator=g, dtype=f64)
    k = serial(Conv(3, sigma_b=0.2), Relu(), Conv(3), Relu(), readout(), Dense(sigma_b=0.1))
    _mc_agreement(k, x, width=96, n_seeds=12)


def test_wrong_kernel_fails_monte_carlo():
    # the MC test must be able to fail: a kernel with sigma_w off by 10% is rejected
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 8, generator=g, dtype=f64)
    right, wrong = mlp(2, sigma_b=0.3), mlp(2, sigma_w=1.1 * 2 ** 0.5, sigma_b=0.3)
    wrong.finite = right.finite
    with pytest.raises(AssertionError, match="MC disagreement"):
        _mc_agreement(wrong, x, width=512, n_seeds=16)


# ----------------------------------------------------------------------------- properties
finite_floats = st.floats(-3, 3, allow_nan=False, width=64)


def _inputs(seed, n, d):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=f64)


@given(seed=st.integers(0, 10_000), depth=st.integers(0, 3), act=st.sampled_from(["relu", "erf", "leaky_relu"]),
       sb=st.floats(0, 1))
def test_symmetry_and_psd(seed, depth, act, sb):
    x1, x2 = _inputs(seed, 6, 4), _inputs(seed + 1, 3, 4)
    k = mlp(depth, act, sigma_b=sb)
    a, b = k(x1, x2), k(x2, x1)
    assert torch.allclose(a.ntk, b.ntk.T, rtol=1e-12, atol=1e-12)
    assert torch.allclose(a.nngp, b.nngp.T, rtol=1e-12, atol=1e-12)
    kk = k(x1)
    for m in (kk.ntk, kk.nngp):
        assert torch.equal(m, m.T)
        ev = torch.linalg.eigvalsh(m)
        assert ev.min() >= -1e-10 * ev.abs().max()
        # Cauchy-Schwarz
        d = m.diagonal()
        assert (m.abs() <= torch.sqrt(d[:, None] * d[None, :]) * (1 + 1e-12)).all()


@given(seed=st.integers(0, 10_000), depth=st.integers(0, 3), a=st.floats(0.1, 5), b=st.floats(0.1, 5))
def test_relu_positive_homogeneity(seed, depth, a, b):
    # sigma_b = 0: Theta(a x, b x') = a b Theta(x, x') and likewise for the NNGP
    x1, x2 = _inputs(seed, 3, 5), _inputs(seed + 7, 4, 5)
    k = mlp(depth)
    base, scaled = k(x1, x2), k(a * x1, b * x2)
    assert torch.allclose(scaled.ntk, a * b * base.ntk, rtol=1e-10)
    assert torch.allclose(scaled.nngp, a * b * base.nngp, rtol=1e-10)


@given(seed=st.integers(0, 10_000), depth=st.integers(1, 3), q=st.floats(0.01, 1.0))
def test_masked_limit_scaling(seed, depth, q):
    # THEORY.md B.7 / C3: without rescaling, ReLU, sigma_b = 0: Theta_mask = q^depth Theta; with rescaling: Theta
    x = _inputs(seed, 5, 6)
    dense = mlp(depth)(x)
    unres = mlp(depth, density=q, rescale=False)(x)
    res = mlp(depth, density=q, rescale=True)(x)
    assert torch.allclose(unres.ntk, q ** depth * dense.ntk, rtol=1e-10)
    assert torch.allclose(unres.nngp, q ** depth * dense.nngp, rtol=1e-10)
    assert torch.allclose(res.ntk, dense.ntk, rtol=1e-13)
    first = mlp(depth, density=q, rescale=False, mask_first_layer=True)(x)
    assert torch.allclose(first.ntk, q ** (depth + 1) * dense.ntk, rtol=1e-10)


@given(seed=st.integers(0, 1000), bs=st.integers(1, 7))
def test_blocking_does_not_change_the_result(seed, bs):
    x1, x2 = _inputs(seed, 9, 3), _inputs(seed + 1, 5, 3)
    k = mlp(2, sigma_b=0.4)
    full, blocked = k(x1, x2), k(x1, x2, batch_size=bs)
    assert torch.allclose(full.ntk, blocked.ntk, rtol=1e-14, atol=0)
    sym_full, sym_blocked = k(x1), k(x1, batch_size=bs)
    assert torch.allclose(sym_full.ntk, sym_blocked.ntk, rtol=1e-14, atol=0)
    assert torch.allclose(sym_blocked.nngp, k(x1, x1.clone()).nngp, rtol=1e-14, atol=0)


def test_cnn_blocking_and_readouts():
    x = _inputs(0, 5 * 2 * 4 * 4, 1).reshape(5, 2, 4, 4)
    for ro in (Flatten, GlobalAvgPool):
        k = serial(Conv(3, sigma_b=0.1), Relu(), Conv(1), Erf(), ro(), Dense())
        a, b = k(x), k(x, batch_size=2)
        assert torch.allclose(a.ntk, b.ntk, rtol=1e-13)
        assert torch.allclose(a.ntk, a.ntk.T, rtol=1e-13)


def test_flatten_cnn_equals_full_spatial_route():
    # The pixel-diagonal shortcut (Flatten readout) equals the full-spatial computation.
    x = _inputs(1, 4 * 2 * 5 * 5, 1).reshape(4, 2, 5, 5)
    k = serial(Conv(3, sigma_b=0.2), Relu(), Conv(3), Relu(), Flatten(), Dense())
    kf = serial(Conv(3, sigma_b=0.2), Relu(), Conv(3), Relu(), Flatten(), Dense())
    kf.spatial = "full"
    a, b = k(x), kf(x)
    assert torch.allclose(a.ntk, b.ntk, rtol=1e-12)
    assert torch.allclose(a.nngp, b.nngp, rtol=1e-12)


def test_conv_1x1_on_1x1_images_is_dense():
    x = _inputs(3, 6, 4)
    img = x.reshape(6, 4, 1, 1)
    dense = serial(Dense(1.2, 0.3), Relu(), Dense(1.2, 0.3), Erf(), Dense(1.2, 0.3))(x)
    conv = serial(Conv(1, 1.2, 0.3), Relu(), Conv(1, 1.2, 0.3), Erf(), Flatten(), Dense(1.2, 0.3))(img)
    assert torch.allclose(dense.ntk, conv.ntk, rtol=1e-13)
    conv3 = serial(Conv(3, 1.2, 0.3), Relu(), Conv(3, 1.2, 0.3), Erf(), GlobalAvgPool(), Dense(1.2, 0.3))(img)
    # 3x3 kernels on 1x1 images see only the centre tap: a factor 1/9 on every weight variance
    ref = serial(Dense(0.4, 0.3), Relu(), Dense(0.4, 0.3), Erf(), Dense(1.2, 0.3))(x)
    assert torch.allclose(conv3.ntk, ref.ntk, rtol=1e-13)


def test_get_options_and_types():
    x = _inputs(0, 4, 3)
    k = mlp(1)
    out = k(x)
    assert isinstance(out, Kernels) and out.nngp.dtype == f64 and out.nngp.shape == (4, 4)
    assert torch.equal(k(x, get="ntk"), out.ntk)
    only = k(x, get=("nngp",))
    assert only.ntk is None and torch.equal(only.nngp, out.nngp)
    k32 = k(x.float(), dtype=torch.float32)
    assert k32.ntk.dtype == torch.float32
    assert torch.allclose(k32.ntk.double(), out.ntk, rtol=1e-5)
    assert torch.allclose(k(x.numpy()).ntk, out.ntk)


def test_identity_and_abrelu_agree_with_named_layers():
    x = _inputs(2, 4, 3)
    a = serial(Dense(), Relu(), Dense())(x)
    b = serial(Dense(), ABRelu(0.0, 1.0), Dense())(x)
    assert torch.allclose(a.ntk, b.ntk, rtol=1e-14)
    lin = serial(Dense(), Identity(), Dense())(x)
    ab = serial(Dense(), ABRelu(1.0, 1.0), Dense())(x)
    assert torch.allclose(lin.ntk, ab.ntk, rtol=1e-13)
    lk = serial(Dense(), LeakyRelu(0.3), Dense())(x)
    ab = serial(Dense(), ABRelu(0.3, 1.0), Dense())(x)
    assert torch.allclose(lk.ntk, ab.ntk, rtol=1e-14)


# ----------------------------------------------------------------------------- gradients
def test_relu_expectations_gradcheck():
    g = torch.Generator().manual_seed(0)
    va = (torch.rand(4, 1, generator=g, dtype=f64) + 0.5).requires_grad_()
    vb = (torch.rand(1, 3, generator=g, dtype=f64) + 0.5).requires_grad_()
    rho = torch.rand(4, 3, generator=g, dtype=f64) * 1.6 - 0.8
    c = (rho * torch.sqrt(va * vb)).detach().requires_grad_()
    for a, b in ((0.0, 1.0), (0.2, 1.0), (-0.5, 2.0)):
        assert torch.autograd.gradcheck(lambda c, va, vb: relu_expectations(c, va, vb, a, b), (c, va, vb))


@pytest.mark.parametrize("act", ["relu", "erf", "leaky_relu"])
def test_input_gradient_matches_finite_differences(act):
    x1 = _inputs(0, 3, 4).requires_grad_()
    x2 = _inputs(1, 2, 4)
    k = mlp(2, act, sigma_b=0.2)
    assert torch.autograd.gradcheck(lambda a: k(a, x2).ntk, (x1,))
    assert torch.autograd.gradcheck(lambda a: k(a, x2).nngp, (x1,))


def test_cnn_input_gradient_matches_finite_differences():
    x1 = _inputs(0, 2 * 1 * 3 * 3, 1).reshape(2, 1, 3, 3).requires_grad_()
    x2 = _inputs(1, 1 * 1 * 3 * 3, 1).reshape(1, 1, 3, 3)
    for ro in (Flatten, GlobalAvgPool):
        k = serial(Conv(3, sigma_b=0.1), Relu(), Conv(3), Relu(), ro(), Dense())
        assert torch.autograd.gradcheck(lambda a: k(a, x2).ntk, (x1,))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradient_finite_at_coincident_and_antipodal_points(sign):
    # rho = +-1: the ReLU NTK has a cone-shaped kink |x - x'|; the returned gradient is the
    # symmetric subgradient, which equals the central finite difference (the kink cancels).
    x = _inputs(5, 1, 6)
    k = mlp(3, sigma_b=0.1)
    xv = x.clone().requires_grad_()
    val = k(xv, sign * x).ntk.sum()
    (grad,) = torch.autograd.grad(val, xv)
    assert torch.isfinite(grad).all()
    h = 1e-5
    fd = torch.zeros_like(x)
    for i in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[0, i] = h
        fd[0, i] = (k(x + e, sign * x).ntk.sum() - k(x - e, sign * x).ntk.sum()) / (2 * h)
    assert torch.allclose(grad, fd, rtol=1e-4, atol=1e-6)
    # the symmetric kernel k(x) (x2 = None) is differentiable too
    xs = x.clone().requires_grad_()
    (g2,) = torch.autograd.grad(k(xs).ntk.sum(), xs)
    assert torch.isfinite(g2).all()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,match", [
    (lambda: mlp(2)(torch.tensor([[float("nan"), 1.0]])), "x1"),
    (lambda: mlp(2)(torch.ones(2, 3), torch.tensor([[1.0, float("inf"), 0.0]])), "x2"),
    (lambda: mlp(2)(torch.ones(2, 3), torch.ones(2, 4)), "x2"),
    (lambda: mlp(2)(torch.ones(3)), "x1"),
    (lambda: mlp(2, activation="tanh"), "activation"),
    (lambda: mlp(2, density=0.0), "density"),
    (lambda: mlp(2, density=1.5), "density"),
    (lambda: mlp(-1), "depth"),
    (lambda: Dense(sigma_w=-1.0), "sigma_w"),
    (lambda: Dense(sigma_b=float("nan")), "sigma_b"),
    (lambda: Conv(2), "kernel_size"),
    (lambda: serial(Conv(3), Relu(), Flatten(), Dense())(torch.ones(2, 4)), "x1"),
    (lambda: serial(Relu(), Dense())(torch.ones(2, 4)), "layers"),
    (lambda: serial(Dense(), Relu())(torch.ones(2, 4), batch_size=0), "batch_size"),
    (lambda: mlp(1)(torch.ones(2, 4), get="foo"), "get"),
    (lambda: serial(Conv(3), Relu(), Dense())(torch.ones(2, 1, 3, 3)), "layers"),
    (lambda: serial(), "layers"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_finite_builder_matches_architecture():
    k = serial(Conv(3), Relu(), Conv(3), Relu(), GlobalAvgPool(), Dense(sigma_b=0.1))
    net = k.finite((2, 6, 6), 8, out_features=3, generator=torch.Generator().manual_seed(0))
    assert net(torch.randn(4, 2, 6, 6, dtype=f64)).shape == (4, 3)
    assert net[-1].sigma_b == pytest.approx(0.1)


# ----------------------------------------------------------------------------- neural-tangents
# Values computed on this project's CPU with neural-tangents 0.6.5 / jax 0.4.30 (float64,
# stax with parameterization='ntk', W_std=sqrt(2), b_std=0), inputs from numpy's
# default_rng(0)/default_rng(1); an external implementation of the same conventions.
NT_MLP_NTK = [[8.36160174, 2.35842025488, 2.40231942137], [2.35842025488, 9.80923701637, 2.55063759634],
              [2.40231942137, 2.55063759634, 9.6885429507]]
NT_MLP_NNGP = [[1.67232035145, 1.19451468221, 1.19715516373], [1.19451468221, 1.96184742979, 1.28787240519],
               [1.19715516373, 1.28787240519, 1.93770859014]]
NT_MLP_NTK_X2 = [[2.20329220961, 2.55782664244, 2.3506278852], [2.35705537445, 2.57628040426, 2.8016138609],
                 [2.55737336146, 3.02969236888, 2.35557433927]]
NT_CNTK = {
    "flatten": ([[5.63253813946, 1.60484604645, 1.46215932958], [1.60484604645, 7.58917346318, 2.01257944936],
                 [1.46215932958, 2.01257944936, 5.77559436987]],
                [[1.40813453691, 0.946434536166, 0.837381706476], [0.946434536166, 1.89729336866, 1.02690632876],
                 [0.837381706476, 1.02690632876, 1.44389859518]]),
    "gap": ([[1.3631690156, 1.52364306735, 1.32989490632], [1.52364306735, 1.79078091306, 1.53575249511],
             [1.32989490632, 1.53575249511, 1.35642210096]],
            [[0.775644106177, 0.883805991546, 0.771682584385], [0.883805991546, 1.02064485093, 0.887596068285],
             [0.771682584385, 0.887596068285, 0.776043197162]]),
}


def _agree_with_nt(ours: torch.Tensor, nt) -> None:
    # Off the diagonal: agreement to 1e-10. On it NT computes rho = 1 through sqrt(1 - rho^2) of
    # rounded values and is only sqrt(eps)-accurate (its own nngp/ntk calls differ by ~4e-8);
    # awt's self-pairs are exact, so the diagonal is compared at 1e-7.
    nt = np.asarray(nt)
    off = ~np.eye(3, dtype=bool)
    assert np.allclose(ours.numpy()[off], nt[off], rtol=1e-10, atol=0)
    assert np.allclose(ours.numpy().diagonal(), nt.diagonal(), rtol=1e-7, atol=0)


def test_mlp_matches_neural_tangents():
    x = torch.tensor(np.random.default_rng(0).standard_normal((3, 64)))
    x2 = torch.tensor(np.random.default_rng(1).standard_normal((3, 64)))
    k = mlp(4)
    out = k(x)
    _agree_with_nt(out.ntk, NT_MLP_NTK)
    _agree_with_nt(out.nngp, NT_MLP_NNGP)
    # the exact diagonal: ReLU, sigma_w^2 = 2, sigma_b = 0 -> Theta(x, x) = (L + 1) * 2 ||x||^2 / d
    exact = 5 * 2 * (x * x).sum(1) / 64
    assert torch.allclose(out.ntk.diagonal(), exact, rtol=1e-14)
    assert np.allclose(k(x, x2).ntk.numpy(), NT_MLP_NTK_X2, rtol=1e-10, atol=0)


# NTK diagonals of the same CNTKs from an independent float64 numpy implementation of the
# Arora et al. recursions with exact self-pairs (written for this cross-check, outside awt):
EXACT_CNTK_DIAG = {"flatten": [5.63253814764, 7.58917347466, 5.77559438071],
                   "gap": [1.36316901565, 1.79078091314, 1.35642210102]}


@pytest.mark.parametrize("name,readout", [("flatten", Flatten), ("gap", GlobalAvgPool)])
def test_cntk_matches_neural_tangents(name, readout):
    nhwc = np.random.default_rng(0).standard_normal((64, 12, 12, 1))[:3]
    x = torch.tensor(nhwc).permute(0, 3, 1, 2)
    k = serial(Conv(3), Relu(), Conv(3), Relu(), Conv(3), Relu(), readout(), Dense())
    out = k(x)
    ntk, nngp = NT_CNTK[name]
    _agree_with_nt(out.ntk, ntk)
    _agree_with_nt(out.nngp, nngp)
    assert np.allclose(out.ntk.diagonal().numpy(), EXACT_CNTK_DIAG[name], rtol=1e-11, atol=0)  # 12 printed digits


@pytest.mark.parametrize("net", ["mlp", "flatten", "gap"])
def test_identical_inputs_in_different_tensors_are_exact(net):
    # x2 holds copies of rows of x1: those pairs must equal the self-pairs exactly (rho = 1),
    # not up to the sqrt(eps) error of arccos near 1.
    if net == "mlp":
        x1 = _inputs(0, 6, 64)
        k = mlp(3, sigma_b=0.2)
    else:
        x1 = _inputs(0, 6 * 32 * 4 * 4, 1).reshape(6, 32, 4, 4)
        ro = Flatten if net == "flatten" else GlobalAvgPool
        k = serial(Conv(3, sigma_b=0.2), Relu(), Conv(3), Relu(), ro(), Dense())
    perm = [4, 1, 5, 0, 3, 2]
    x2 = torch.cat([x1[perm].clone(), _inputs(9, 2, x1[0].numel()).reshape((2,) + x1.shape[1:])])
    sym, cross = k(x1), k(x1, x2)
    # equal up to the rounding of the final reductions (a few eps), far below sqrt(eps) ~ 1.5e-8
    for a, b in ((cross.ntk, sym.ntk), (cross.nngp, sym.nngp)):
        assert torch.allclose(a[perm, range(6)], b.diagonal()[perm], rtol=1e-14, atol=0)
    # a hidden Dense + nonlinearity after the readout: duplicates stay exact through the reduction
    if net != "mlp":
        deep = serial(*k.layers[:-1], Dense(sigma_b=0.1), Relu(), Dense())
        a, b = deep(x1, x2).ntk, deep(x1).ntk
        assert torch.allclose(a[perm, range(6)], b.diagonal()[perm], rtol=1e-14, atol=0)


@given(seed=st.integers(0, 10_000), depth=st.integers(0, 4), sw=st.floats(0.5, 2.0),
       act=st.sampled_from(["relu", "leaky_relu", "identity"]), q=st.floats(0.05, 1.0), n2=st.integers(1, 9))
def test_homogeneous_fast_path_equals_general_recursion(seed, depth, sw, act, q, n2):
    # sigma_b = 0 with ABReLU-family activations takes a factorised forward path; with input
    # gradients requested the general (tolerant-backward) path runs: both must agree.
    k = mlp(depth, act, sigma_w=sw, density=q, rescale=False, alpha=0.2)
    assert k._plan is not None
    x1, x2 = _inputs(seed, 7, 5), _inputs(seed + 1, n2, 5)
    x2[0] = x1[3]                                            # an exact duplicate across tensors
    fast, fast_sym = k(x1, x2), k(x1, batch_size=3)
    general = k(x1.clone().requires_grad_(), x2)
    general_sym = k(x1.clone().requires_grad_(), batch_size=3)
    for a, b in ((fast.ntk, general.ntk), (fast.nngp, general.nngp), (fast_sym.ntk, general_sym.ntk)):
        assert torch.allclose(a, b.detach(), rtol=1e-12, atol=1e-300)
    assert torch.equal(fast_sym.ntk, fast_sym.ntk.T)
    assert mlp(max(depth, 1), "erf")._plan is None and mlp(depth, sigma_b=0.1)._plan is None


def test_zero_inputs_and_zero_patches_give_exact_zeros_not_nan():
    # sigma_b = 0: a zero input has zero variance; its kernel row is exactly 0 (no 0/0)
    x = _inputs(0, 4, 6)
    x[1] = 0.0
    k = mlp(3)
    for xx in (x, x.clone().requires_grad_()):          # fast path and general (gradient) path
        out = k(xx)
        assert torch.isfinite(out.ntk).all() and torch.isfinite(out.nngp).all()
        assert torch.equal(out.ntk[1].detach(), torch.zeros(4, dtype=f64))
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(k(xg, x[[0, 2]]).ntk.sum(), xg)
    assert torch.isfinite(g).all()
    # MNIST-like images with a zero border: all-zero 3x3 patches must not poison the kernel
    img = torch.zeros(3, 1, 8, 8, dtype=f64)
    img[:, :, 2:6, 2:6] = _inputs(1, 48, 1).reshape(3, 1, 4, 4)
    for ro in (Flatten, GlobalAvgPool):
        kc = serial(Conv(3), Relu(), Conv(3), Relu(), ro(), Dense())
        a = kc(img).ntk
        b = kc(img + 1e-9 * _inputs(2, 192, 1).reshape(3, 1, 8, 8)).ntk      # continuity
        assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-6)


def test_nonlinearity_directly_after_flatten_is_refused():
    x = _inputs(0, 2 * 16, 1).reshape(2, 1, 4, 4)
    with pytest.raises(ValueError, match="layers"):
        serial(Conv(3), Flatten(), Relu(), Dense())(x)
    # after a Dense (or GlobalAvgPool) it is a genuine vector nonlinearity
    assert torch.isfinite(serial(Conv(3), Relu(), Flatten(), Dense(), Relu(), Dense())(x).ntk).all()


def test_float32_input_gradients_near_coincident_points():
    # a nearby (not identical) point: the cone term of the gradient must be kept in float32 too
    x = _inputs(0, 1, 8)
    xn = x + 0.03 * _inputs(1, 1, 8)
    k = mlp(2, sigma_b=0.1)
    grads = []
    for dt in (f64, torch.float32):
        xv = x.to(dt).clone().requires_grad_()
        (g,) = torch.autograd.grad(k(xv, xn.to(dt), dtype=dt).ntk.sum(), xv)
        grads.append(g.double())
    assert torch.allclose(grads[1], grads[0], rtol=1e-3, atol=1e-4)


def test_second_derivatives_match_finite_differences():
    # create_graph=True (Hessian-vector products, gradient penalties) differentiates the backward
    g = torch.Generator().manual_seed(0)
    va = (torch.rand(3, 1, generator=g, dtype=f64) + 0.5).requires_grad_()
    vb = (torch.rand(1, 2, generator=g, dtype=f64) + 0.5).requires_grad_()
    c = ((torch.rand(3, 2, generator=g, dtype=f64) * 1.6 - 0.8) * torch.sqrt(va * vb)).detach().requires_grad_()
    for a, b in ((0.0, 1.0), (0.2, 1.0)):
        assert torch.autograd.gradgradcheck(lambda c, va, vb: relu_expectations(c, va, vb, a, b), (c, va, vb))
    x1 = _inputs(0, 2, 4).requires_grad_()
    x2 = _inputs(1, 2, 4)
    assert torch.autograd.gradgradcheck(lambda a: mlp(2, sigma_b=0.1)(a, x2).ntk, (x1,))

"""ntk_theory.differentiable: values against empirical_ntk, gradients against the vmap(jacrev) recipe, gradcheck."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ntk_theory.activations import get
from ntk_theory.differentiable import differentiable_ntk, forward, plan
from ntk_theory.empirical import empirical_ntk
from ntk_theory.layers import NTKLinear, finite_mlp
from ntk_theory.masks import apply_mask, random_mask


def _net(act="relu", sigma_b=0.3, width=7, depth=2, out=3, seed=0, d_in=5):
    """NTKLinear MLP with any registered activation (finite_mlp needs a closed-form kernel)."""
    g = torch.Generator().manual_seed(seed)
    mods, fan = [], d_in
    for _ in range(depth):
        mods += [NTKLinear(fan, width, sigma_b=sigma_b, generator=g, dtype=torch.float64), get(act).module(0.2)]
        fan = width
    return nn.Sequential(*mods, NTKLinear(fan, out, sigma_b=sigma_b, generator=g, dtype=torch.float64))


def _x(n, seed, d=5):
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "sigmoid", "erf", "identity"])
@pytest.mark.parametrize("mode", ["full", "trace"])
def test_values_equal_empirical_ntk_dense(act, mode):
    m = _net(act)
    x1, x2 = _x(4, 1), _x(3, 2)
    ref = empirical_ntk(m, x1, x2, mode=mode, method="jacobian")
    assert torch.allclose(differentiable_ntk(m, x1, x2, mode=mode), ref, atol=1e-10, rtol=0)
    sym = empirical_ntk(m, x1, mode=mode, method="jacobian")
    assert torch.allclose(differentiable_ntk(m, x1, mode=mode), sym, atol=1e-10, rtol=0)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("mask_mode", ["subnetwork", "ntt"])
@pytest.mark.parametrize("mode", ["full", "trace"])
def test_values_equal_empirical_ntk_masked(rescale, mask_mode, mode):
    m = _net()
    mask = random_mask(m, 0.4, generator=3, include_bias=True)
    mm = apply_mask(copy.deepcopy(m), mask, rescale=rescale)
    x1, x2 = _x(4, 1), _x(3, 2)
    ref = empirical_ntk(mm, x1, x2, mode=mode, mask_mode=mask_mode, method="jacobian")
    got = differentiable_ntk(mm, x1, x2, mode=mode, mask_mode=mask_mode)
    assert torch.allclose(got, ref, atol=1e-10, rtol=0)
    # the same sub-network through masks= on the plain model
    if mask_mode == "subnetwork" and not rescale:
        fm = {k: v.double() for k, v in mask.items()}
        assert torch.allclose(differentiable_ntk(m, x1, x2, masks=fm, mode=mode),
                              empirical_ntk(m, x1, x2, mask=mask, mode=mode, method="jacobian"), atol=1e-10, rtol=0)


def test_outputs_and_forward_match_the_model():
    m = _net()
    x1, x2 = _x(4, 1), _x(3, 2)
    _, f1, f2 = differentiable_ntk(m, x1, x2, return_outputs=True)
    assert torch.allclose(f1, m(x1), atol=1e-12) and torch.allclose(f2, m(x2), atol=1e-12)
    assert torch.allclose(forward(m, x1), m(x1), atol=1e-12)


def _objective(K, f, K0, f0):
    return ((K - K0) ** 2).mean() + ((f - f0) ** 2).mean()


@pytest.mark.parametrize("mode", ["full", "trace"])
def test_gradient_equals_jacrev_recipe(mode):
    """∂/∂θ and ∂/∂M of a kernel-and-output matching objective: structured == vmap(jacrev) (float64, 1e-8)."""
    m = _net(sigma_b=0.2)
    x1, x2 = _x(4, 1), _x(4, 2)
    K0, f0, _ = differentiable_ntk(m, x1, x2, mode=mode, return_outputs=True)
    K0, f0 = K0.detach(), f0.detach()
    g = torch.Generator().manual_seed(5)
    names = [n for n, p in m.named_parameters() if p.dim() == 2][1:]
    grads = []
    for method in ("structured", "jacobian"):
        w = {n: p.detach().clone().requires_grad_(True) for n, p in m.named_parameters()}
        g.manual_seed(5)
        M = {n: torch.rand(w[n].shape, generator=g, dtype=torch.float64).requires_grad_(True) for n in names}
        K, f, _ = differentiable_ntk(m, x1, x2, weights=w, masks=M, mode=mode, method=method, return_outputs=True)
        loss = _objective(K, f, K0, f0)
        grads.append(torch.autograd.grad(loss, list(w.values()) + list(M.values())))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-8)
        assert a.abs().max() > 0


def test_gradient_with_explicit_coefficients_equals_jacrev():
    """The straight-through surrogate (C = M) has the same gradient through either method."""
    m = _net()
    x1 = _x(5, 1)
    names = [n for n, p in m.named_parameters() if p.dim() == 2][1:]
    grads = []
    for method in ("structured", "jacobian"):
        s = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64).requires_grad_(True)
             for i, (n, p) in enumerate(m.named_parameters()) if n in names}
        M = {n: (v > 0.5).double() + (v - v.detach()) for n, v in s.items()}
        K = differentiable_ntk(m, x1, masks=M, coefficients=M, mode="trace", method=method)
        grads.append(torch.autograd.grad((K ** 2).sum(), list(s.values())))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-8)


def test_gradcheck_tiny_net():
    m = _net("tanh", sigma_b=0.5, width=4, depth=1, out=2, d_in=3)
    x1, x2 = _x(2, 1, 3), _x(3, 2, 3)
    w0 = m[0].weight.detach().clone().requires_grad_(True)
    M1 = torch.rand(m[2].weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    def fn(w, mk):
        return differentiable_ntk(m, x1, x2, weights={"0.weight": w}, masks={"2.weight": mk}, mode="full")

    assert torch.autograd.gradcheck(fn, (w0, M1), eps=1e-6, atol=1e-6)


def test_plain_linear_and_flatten():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.LeakyReLU(0.2), nn.Linear(5, 2)).double()
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    assert torch.allclose(differentiable_ntk(m, x), empirical_ntk(m, x, method="jacobian"), atol=1e-10)


def test_bad_input():
    m = _net()
    with pytest.raises(ValueError, match="mode"):
        differentiable_ntk(m, _x(2, 0), mode="diag")
    with pytest.raises(ValueError, match="method"):
        differentiable_ntk(m, _x(2, 0), method="jvp")
    with pytest.raises(ValueError, match="masks"):
        differentiable_ntk(m, _x(2, 0), masks={"9.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="model"):
        plan(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(ValueError, match="x2"):
        differentiable_ntk(m, _x(2, 0), _x(2, 0, d=4))
    with pytest.raises(TypeError, match="model"):
        plan(lambda x: x)

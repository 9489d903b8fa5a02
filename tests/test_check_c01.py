"""C1 (NTK/NNGP concentration at initialisation): passes with the right ingredients, fails with each planted wrong one, and its helpers
against independent references. Tests marked ``# Was:`` are regressions of defects a review found."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ntk_theory.infinite import mlp
from proofs_checks.common import sphere_inputs
from proofs_checks.checks.c01_ntk_concentration import check_c1, finite_kernels
from proofs_checks.registry import CheckResult


SMALL = dict(widths=[64, 128, 256, 512], seeds=4, n_points=6)


def test_c1_passes_with_the_closed_form():
    res = check_c1(scale="quick", seed=0, **SMALL)
    assert isinstance(res, CheckResult)
    assert res.passed, res.summary()
    assert -0.65 <= res.measured["slope_ntk"] <= -0.35
    lo, hi = res.measured["ci_ntk"]
    assert lo <= res.measured["slope_ntk"] <= hi
    json.dumps(res.to_dict())


@pytest.mark.parametrize("wrong", [
    mlp(2, "relu", sigma_w=1.1 * 2 ** 0.5),    # sigma_w off by 10 %
    mlp(3, "relu"),                            # one layer too deep
    mlp(2, "relu", sigma_b=0.3),               # a bias that the network does not have
])
def test_c1_fails_with_a_planted_wrong_kernel(wrong):
    res = check_c1(scale="quick", seed=0, reference=wrong, **SMALL)
    assert not res.passed
    assert res.measured["slope_ntk"] > -0.35    # the error plateaus instead of decaying


@pytest.mark.parametrize("factor", [1.01, 0.99])
def test_c1_bias_test_catches_a_reference_one_percent_off(factor):
    """A reference with sigma_w 1 % off (NTK about 6 % off) keeps the slope in band (the finite-width
    error dominates it), but the Monte-Carlo bias statistic sees it."""
    wrong = mlp(2, "relu", factor * 2 ** 0.5)
    res = check_c1(scale="quick", seed=0, reference=wrong)
    assert -0.65 <= res.measured["slope_ntk"] <= -0.35  # the slope alone would pass
    assert res.measured["bias_z_ntk"] > 2.5 and not res.passed
    good = check_c1(scale="quick", seed=0)
    assert good.passed and good.measured["bias_z_ntk"] < 2.0


def test_c1_references_are_independently_anchored():
    """The closed form C1 trusts and the finite network it samples share ``mlp``: anchor both
    independently so that a shared bug cannot cancel (docs/theory.md B.1.1 [N]: Θ(x,x) = 2(L+1))."""
    x = sphere_inputs(5, 16, torch.Generator().manual_seed(0))
    for depth in (1, 2, 3):
        k = mlp(depth)(x)
        torch.testing.assert_close(torch.diagonal(k.ntk), torch.full((5,), 2.0 * (depth + 1), dtype=torch.float64))
        torch.testing.assert_close(torch.diagonal(k.nngp), torch.full((5,), 2.0, dtype=torch.float64))
    # finite network: NTK from an explicit NTK-parameterised forward pass and torch.func.jacrev
    width, sw, sb = 32, 2 ** 0.5, 0.1
    kern = mlp(2, "relu", sw, sb)
    net = kern.finite((16,), width, generator=torch.Generator().manual_seed(1))
    theta, nngp = finite_kernels(kern, x, width, sw, sb, torch.Generator().manual_seed(1))
    raw = {n: p.detach().clone() for n, p in net.named_parameters()}
    ws = [raw[n] for n in raw if n.endswith("weight")]
    bs = [raw[n] for n in raw if n.endswith("bias")]
    assert len(ws) == 3 and len(bs) == 3

    def f(params, xi):
        h = xi
        for i in range(3):
            W, b = params[2 * i], params[2 * i + 1]
            h = sw / math.sqrt(W.shape[1]) * h @ W.T + sb * b
            if i < 2:
                h = torch.relu(h)
        return h.reshape(-1)

    params = [t for pair in zip(ws, bs) for t in pair]
    jac = torch.func.jacrev(f)(params, x)
    J = torch.cat([j.reshape(x.shape[0], -1) for j in jac], 1)
    torch.testing.assert_close(theta, J @ J.T, rtol=1e-10, atol=1e-10)
    h = x
    for i in range(2):
        h = torch.relu(sw / math.sqrt(ws[i].shape[1]) * h @ ws[i].T + sb * bs[i])
    torch.testing.assert_close(nngp, sw ** 2 * h @ h.T / width + sb ** 2, rtol=1e-10, atol=1e-10)


def test_c1_rejects_a_reference_kernel_that_is_6_percent_off():
    # Was: C1's only criterion is a log-log slope over 1.5 decades; a width-independent bias below the error at the largest width passes
    wrong = mlp(2, "relu", 1.01 * 2 ** 0.5)           # sigma_w 1 % too large: NTK 6 % too large (sigma_w^2 cubed)
    x = sphere_inputs(8, 16, torch.Generator().manual_seed(0))
    assert float((wrong(x, get="ntk") - mlp(2)(x, get="ntk")).norm() / mlp(2)(x, get="ntk").norm()) > 0.06
    res = check_c1("quick", 0, reference=wrong)
    assert not res.passed, res.summary()


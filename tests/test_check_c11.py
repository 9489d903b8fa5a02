"""C11 (closed-form linearised dynamics = direct integration): passes with the right ingredients, fails with each planted wrong one, and its helpers
against independent references. Tests marked ``# Was:`` are regressions of defects a review found."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ntk_theory.dynamics import gradient_flow_mse
from ntk_theory.testing import train_test_kernels

from proofs_checks.checks.c11_closed_form_dynamics import PARAMS as PARAMS11
from proofs_checks.checks.c11_closed_form_dynamics import check_c11, rk4_flow


SMALL11 = dict(gd_steps=25, n_times=8)


def test_rk4_is_fourth_order_on_a_scalar_ode():
    # f' = -a k (f - y): f(t) = y + e^{-akt}(f0 - y)
    k = torch.tensor([[2.0]], dtype=torch.float64)
    y, f0 = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    times = torch.linspace(0, 2, 3, dtype=torch.float64)
    exact = 1 - math.exp(-2.0 * 2)
    errs = [abs(float(rk4_flow(k, k, y, f0, f0, 1.0, times, s)[0][-1, 0, 0]) - exact) for s in (16, 32)]
    assert 15 < errs[0] / errs[1] < 18      # 2^4 = 16 as h -> 0 (measured 16.9 at a k h = 0.125)


@pytest.mark.parametrize("seed", [0, 1])
def test_c11_passes(seed):
    res = check_c11(scale="quick", seed=seed, **SMALL11)
    assert res.passed, res.summary()
    m, e = res.measured, res.expected
    assert m["a_gd_max_rel_dev"] < 1e-12                   # GD agreement is at round-off
    assert m["b_flow_max_dev"] <= e["b_tol"] and 12 <= m["b_convergence_ratio"] <= 20
    assert m["c_flow_rel_dev"] < 1e-13 and m["c_gap_without_rescaling"] > 1e-3   # the rescaling matters
    assert res.details["gd"]["oscillating_modes"] >= 1     # the lr exercises 1 - a*lambda < 0
    json.dumps(res.to_dict())


def test_c11_fails_with_a_wrong_time_scale():
    res = check_c11(scale="quick", seed=0, lr_scale=1.001, **SMALL11)
    assert not res.passed
    assert not (res.measured["passed_a"] or res.measured["passed_b"] or res.measured["passed_c"])


def test_c11_fails_with_a_perturbed_kernel():
    res = check_c11(scale="quick", seed=0, kernel_shift=1e-6, **SMALL11)
    assert not res.passed
    assert not res.measured["passed_a"] and not res.measured["passed_b"]
    assert res.measured["passed_c"]            # (c) compares closed form with closed form


def test_c11_fails_when_c_forgets_the_outputs():
    n = PARAMS11["quick"]["n_train"]
    res = check_c11(scale="quick", seed=0, rescale_c=n, **SMALL11)   # c = N instead of N*O
    assert not res.passed
    assert res.measured["passed_a"] and res.measured["passed_b"] and not res.measured["passed_c"]



@settings(max_examples=15)
@given(train_test_kernels(n=(1, 5), m=(1, 3), lambda_min=(0.05, 1.0), condition=(1.0, 50.0)),
       st.integers(1, 2), st.integers(0, 10_000))
def test_c11_closed_form_flow_equals_rk4_and_normalisations_differ_by_c(blocks, o, seed):
    """C11 (b) and (c) for any kernel on train and test points: the closed-form flow equals RK4
    integration within its Richardson estimate, and 'size' at t equals 'none' at t / (N O)."""
    k, kx, _ = blocks
    n, m = k.shape[0], kx.shape[0]
    g = torch.Generator().manual_seed(seed)
    y, f0 = torch.randn(n, o, generator=g, dtype=torch.float64), torch.randn(n, o, generator=g, dtype=torch.float64)
    f0t = torch.randn(m, o, generator=g, dtype=torch.float64)
    lam_max = float(torch.linalg.eigvalsh(k)[-1])
    times = torch.linspace(0.0, 5.0 / lam_max, 5, dtype=torch.float64)
    flow = gradient_flow_mse(k, y, times, f0=f0, k_test_train=kx, f0_test=f0t, lr=1.0, normalization="none")
    coarse = rk4_flow(k, kx, y, f0, f0t, 1.0, times, 8)
    fine = rk4_flow(k, kx, y, f0, f0t, 1.0, times, 16)
    est = max(float((coarse[i] - fine[i]).abs().max()) for i in (0, 1)) / 15
    dev = max(float((flow.f_train - fine[0]).abs().max()), float((flow.f_test - fine[1]).abs().max()))
    assert dev <= 2 * est + 1e-12
    size = gradient_flow_mse(k, y, times, f0=f0, k_test_train=kx, f0_test=f0t, normalization="size")
    none = gradient_flow_mse(k, y, times / (n * o), f0=f0, k_test_train=kx, f0_test=f0t, normalization="none")
    torch.testing.assert_close(size.f_train, none.f_train, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(size.f_test, none.f_test, rtol=1e-12, atol=1e-13)

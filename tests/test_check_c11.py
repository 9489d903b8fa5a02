"""C11 (closed-form linearised dynamics = direct integration): passes with the right ingredients, fails with each planted wrong one, and its helpers
against independent references. Tests marked ``# Was:`` are regressions of defects a review found."""
from __future__ import annotations

import json
import math

import pytest
import torch

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


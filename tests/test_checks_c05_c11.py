"""C5 (lazy-training stability, width^-1/2) and C11 (closed-form dynamics = direct integration):
each passes, and fails when a wrong ingredient is planted."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import functional_call, grad

from ntk_theory.infinite import mlp
from proofs_checks.checks.c05_lazy_training_stability import FLOOR, check_c5, gd_step
from proofs_checks.checks.c11_closed_form_dynamics import PARAMS as PARAMS11
from proofs_checks.checks.c11_closed_form_dynamics import check_c11, rk4_flow
from proofs_checks.registry import registry

# C5 at a reduced scale (about 1 s): one hidden layer, widths 512..4096, 4 seeds
SMALL5 = dict(configs=[dict(depth=1, widths=[512, 1024, 2048, 4096])], seeds=4, kernel_every=4, n_test=16)
# C11 at a reduced scale (well under 1 s)
SMALL11 = dict(gd_steps=25, n_times=8)


def test_registered_as_theorems():
    reg = registry()
    assert reg["C5"].rigour == "theorem" and reg["C11"].rigour == "theorem"


# --------------------------------------------------------------------------------------------- C5
def test_gd_step_is_the_autograd_gradient_step():
    g = torch.Generator().manual_seed(3)
    net = mlp(2, "relu", 2 ** 0.5, 0.1).finite((5,), 16, generator=g)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randn(7, generator=g, dtype=torch.float64)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    loss = lambda p: 0.5 * (functional_call(net, p, (x,)).reshape(-1) - y).pow(2).sum() / 7.0
    gr = grad(loss)(params)
    gd_step(net, x, y, lr=0.3, c=7.0)
    for k, v in net.named_parameters():
        torch.testing.assert_close(v.detach(), params[k] - 0.3 * gr[k], rtol=0, atol=1e-13)


@pytest.fixture(scope="module")
def c5_small():
    return check_c5(scale="quick", seed=0, **SMALL5)


def test_c5_passes_and_both_quantities_decay(c5_small):
    res = c5_small
    assert res.passed, res.summary()
    for q in ("kernel", "function"):
        s = res.measured[f"slope_{q}_L1"]
        lo, hi = res.measured[f"ci_{q}_L1"]
        assert FLOOR <= s <= -0.35 and lo <= s <= hi
    cfg = res.details["configs"][0]
    assert cfg["mean_sup_kernel_change"][-1] < 0.5 * cfg["mean_sup_kernel_change"][0]
    assert cfg["mean_sup_function_gap"][-1] < 0.5 * cfg["mean_sup_function_gap"][0]
    assert res.measured["lr_over_stability_limit_L1"] < 1
    json.dumps(res.to_dict())


def test_c5_rejects_a_too_steep_claimed_exponent():
    # ReLU: the measured rate lies between n^-1/2 and n^-1; the claim "O(n^-1)" is rejected
    res = check_c5(scale="quick", seed=0, exponent=-1.0, **SMALL5)
    assert not res.passed
    assert max(res.measured["slope_kernel_L1"], res.measured["slope_function_L1"]) > -0.85


def test_c5_a_smooth_activation_decays_like_one_over_width():
    # erf: no gate flips, the O(n^-1) claim holds (it is rejected above for ReLU); quick scale, about 2 s
    res = check_c5(scale="quick", seed=0, activation="erf", exponent=-1.0)
    assert res.passed, res.summary()
    assert res.measured["slope_kernel_L1"] < -0.85 and res.measured["slope_function_L1"] < -0.85


@pytest.mark.parametrize("plant", [dict(lin_time_scale=1.2), dict(lin_kernel_shift=0.02)])
def test_c5_fails_with_a_wrong_linearised_reference(plant):
    res = check_c5(scale="quick", seed=0, **SMALL5, **plant)
    assert not res.passed
    assert res.measured["slope_function_L1"] > -0.35     # the gap plateaus instead of decaying


def test_c5_fails_above_the_critical_learning_rate():
    small = dict(SMALL5, configs=[dict(depth=1, widths=[512, 1024])], seeds=2)
    res = check_c5(scale="quick", seed=0, lr_fraction=1.5, **small)
    assert not res.passed
    assert res.measured["lr_over_stability_limit_L1"] > 1


# --------------------------------------------------------------------------------------------- C11
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

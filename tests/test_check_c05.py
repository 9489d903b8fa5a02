"""C5 (lazy-training stability, width^-1/2): passes with the right ingredients, fails with each planted wrong one, and its helpers
against independent references. Tests marked ``# Was:`` are regressions of defects a review found."""
from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call, grad

from ntk_theory.infinite import mlp
from proofs_checks.checks.c05_lazy_training_stability import FLOOR, check_c5, gd_step


SMALL5 = dict(configs=[dict(depth=1, widths=[512, 1024, 2048, 4096])], seeds=4, kernel_every=4, n_test=16)


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


def test_c5_rejects_a_2_percent_time_scale_error():
    small = dict(configs=[dict(depth=1, widths=[512, 1024, 2048, 4096])], seeds=4, kernel_every=4, n_test=16)
    res = check_c5("quick", 0, lin_time_scale=1.02, **small)
    assert not res.passed and res.measured["slope_function_L1"] > -0.35
    assert res.measured["slope_kernel_L1"] < -0.35      # the kernel part does not see the reference


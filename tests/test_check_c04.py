"""C4 (a masked first layer changes the limit; the mixture limit): passes with the right ingredients, fails with each planted wrong one, and its helpers
against independent references. Tests marked ``# Was:`` are regressions of defects a review found."""
from __future__ import annotations

import json

import pytest
import torch

from ntk_theory.infinite import mlp
from proofs_checks.common import sphere_inputs
from proofs_checks.checks.c04_first_layer_mask import check_c4, first_layer_masked_limit
import math


C4_SMALL = dict(widths=[512, 2048, 8192], seeds=4)


def test_mixture_limit_is_the_dense_kernel_at_density_one():
    x = sphere_inputs(6, 8, torch.Generator().manual_seed(3))
    for depth in (1, 2, 3):
        K, T = first_layer_masked_limit(x, depth, 1.0)
        ref = mlp(depth)(x)
        torch.testing.assert_close(K, ref.nngp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(T, ref.ntk, rtol=1e-12, atol=1e-12)


def test_mixture_limit_keeps_the_diagonal_and_moves_the_rest():
    x = sphere_inputs(6, 8, torch.Generator().manual_seed(4))
    ref = mlp(2)(x, get="ntk")
    _, T = first_layer_masked_limit(x, 2, 0.25)
    # ReLU is positively homogeneous: E_M of a quantity linear in Sigma_M(x, x) is exact
    torch.testing.assert_close(torch.diagonal(T), torch.diagonal(ref), rtol=1e-12, atol=1e-12)
    assert float((T - ref).norm() / ref.norm()) > 0.03


def test_mixture_limit_exact_enumeration_matches_monte_carlo():
    x = sphere_inputs(5, 12, torch.Generator().manual_seed(5))
    _, exact = first_layer_masked_limit(x, 1, 0.25)                       # 2^12 patterns, exact
    _, mc = first_layer_masked_limit(x, 1, 0.25, samples=2 ** 11,        # 2^12 > 2^11: Monte Carlo
                                     generator=torch.Generator().manual_seed(0))
    ref = mlp(1)(x, get="ntk")
    gap = float((exact - ref).norm() / ref.norm())
    assert float((mc - exact).norm() / ref.norm()) < 0.25 * gap       # MC error << the effect measured
    with pytest.raises(ValueError, match="depth"):
        first_layer_masked_limit(x, 0, 0.5)
    with pytest.raises(ValueError, match="density"):
        first_layer_masked_limit(x, 1, 0.0)


def test_c4_passes_at_quick_scale():
    res = check_c4(scale="quick", seed=0)
    assert res.passed, res.summary()
    row = res.details["rows"][0]
    assert all(row["criteria"].values())
    assert row["slope_first"] > -0.2 and -0.65 <= row["slope_control"] <= -0.35
    assert row["first_over_control"] > 3
    # the plateau is the predicted gap between the mixture limit and the dense limit
    assert row["plateau_over_gap"] == pytest.approx(1.0, abs=0.15)
    json.dumps(res.to_dict())


def test_c4_fails_when_the_first_layer_is_not_masked():
    res = check_c4(seed=0, mask_first_layer=False, **C4_SMALL)
    assert not res.passed
    crit = res.details["rows"][0]["criteria"]
    assert not crit["first_plateaus"] and not crit["first_above_control"]


def test_c4_fails_with_the_dense_kernel_as_the_mixture_limit():
    res = check_c4(seed=0, mixture_density=1.0, **C4_SMALL)
    assert not res.passed
    assert not res.details["rows"][0]["criteria"]["converges_to_mixture"]


def test_c4_fails_for_a_large_fan_in():
    # d q = 32 kept inputs per unit: the gap is below the finite-width error, no plateau
    res = check_c4(seed=0, d_in=128, widths=[256, 1024, 4096], seeds=4)
    assert not res.passed
    row = res.details["rows"][0]
    assert not row["criteria"]["first_plateaus"] and row["gap"] < 0.05


def test_c4_bias_test_catches_a_mixture_with_a_slightly_wrong_density():
    """q_mix = 0.2 instead of 0.25 (about 2.5 % off) keeps the slope against the mixture in band;
    the Monte-Carlo bias statistic rejects it."""
    good = check_c4(seed=0)
    assert good.passed and max(good.measured["bias_z_vs_mixture"]) < 2.0
    wrong = check_c4(seed=0, mixture_density=0.2)
    assert all(-0.65 <= s <= -0.35 for s in wrong.measured["slopes_vs_mixture"])
    assert max(wrong.measured["bias_z_vs_mixture"]) > 2.5 and not wrong.passed


def test_c4_rejects_a_mixture_limit_with_a_wrong_density():
    res = check_c4("quick", 0, mixture_density=0.5)      # at 3 widths the slope vs this mixture is -0.351: in band
    assert not res.passed
    crit = res.details["rows"][0]["criteria"]
    assert not crit["converges_to_mixture"] and crit["control_decays"] and crit["first_plateaus"]



def test_c4_is_deterministic():
    a = check_c4(seed=1, widths=[256, 1024], seeds=2)
    b = check_c4(seed=1, widths=[256, 1024], seeds=2)
    assert a.details["rows"][0]["per_seed"] == b.details["rows"][0]["per_seed"]
    assert not math.isnan(a.measured["gaps"][0])

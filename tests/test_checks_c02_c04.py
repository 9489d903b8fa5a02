"""C2 (masked + rescaled NTK -> dense limit, effective width q n) and C4 (a masked first layer
changes the limit): each passes, and each fails when a wrong ingredient is planted."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ntk_theory.infinite import mlp
from proofs_checks.checks.c01_ntk_concentration import sphere_inputs
from proofs_checks.checks.c02_masked_rescaled_limit import check_c2
from proofs_checks.checks.c04_first_layer_mask import first_layer_masked_limit, check_c4
from proofs_checks.registry import registry

# smaller than quick scale, for the planted failures
C2_SMALL = dict(widths=[128, 256, 512], densities=[0.5, 0.25], seeds=4, n_points=8)
C4_SMALL = dict(widths=[512, 2048, 8192], seeds=4)


def test_c2_and_c4_are_registered_with_their_rigour():
    reg = registry()
    assert reg["C2"].rigour == "theorem" and reg["C4"].rigour == "heuristic"


# ---------------------------------------------------------------------------------- C2
def test_c2_passes_at_quick_scale():
    res = check_c2(scale="quick", seed=0)
    assert res.passed, res.summary()
    m = res.measured
    assert m["limit_passed"] and m["effective_width_passed"]
    for s, lo, hi in zip(m["slopes"], m["ci_low"], m["ci_high"]):
        assert -0.65 <= s <= -0.35 and lo <= s <= hi
    for c in m["effective_width_ratios"]:
        assert 0.5 <= c <= 1.25
    # the masked error is larger than the dense one at the same width (fewer effective weights)
    assert all(e > res.details["series"]["y"]["dense"][-1] for e in m["err_at_max_width"])
    json.dumps(res.to_dict())


def test_c2_fails_with_a_wrong_reference_kernel():
    res = check_c2(seed=0, reference=mlp(2, sigma_w=1.1 * 2 ** 0.5), **C2_SMALL)
    assert not res.passed and not res.measured["limit_passed"]
    assert all(s > -0.35 for s in res.measured["slopes"])        # the error plateaus


def test_c2_fails_without_rescaling():
    res = check_c2(seed=0, rescale=False, **C2_SMALL)
    assert not res.passed and not res.measured["limit_passed"]
    # the unrescaled kernel tends to q^2 Theta (C3): relative error about 1 - q^2
    for q, e in zip(C2_SMALL["densities"], res.measured["err_at_max_width"]):
        assert e == pytest.approx(1 - q ** 2, abs=0.1)


@pytest.mark.parametrize("exponent, side", [(0.0, "above"), (2.0, "below")])
def test_c2_fails_with_a_wrong_effective_width(exponent, side):
    # effective width n (exponent 0) or q^2 n (exponent 2) instead of q n
    small = dict(widths=[256, 512], densities=[0.5, 0.125], seeds=4, n_points=8)
    res = check_c2(seed=0, effective_width_exponent=exponent, **small)
    assert not res.passed and not res.measured["effective_width_passed"]
    c = res.measured["effective_width_ratios"][-1]                  # q = 1/8 discriminates most
    assert c > 1.25 if side == "above" else c < 0.5


# ---------------------------------------------------------------------------------- C4
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


def test_checks_are_deterministic():
    a = check_c4(seed=1, widths=[256, 1024], seeds=2)
    b = check_c4(seed=1, widths=[256, 1024], seeds=2)
    assert a.details["rows"][0]["per_seed"] == b.details["rows"][0]["per_seed"]
    small = dict(widths=[64, 128], densities=[0.5], seeds=2, n_points=4)
    assert check_c2(seed=1, **small).details["err_masked"] == check_c2(seed=1, **small).details["err_masked"]
    assert not math.isnan(a.measured["gaps"][0])


def test_c4_bias_test_catches_a_mixture_with_a_slightly_wrong_density():
    """q_mix = 0.2 instead of 0.25 (about 2.5 % off) keeps the slope against the mixture in band;
    the Monte-Carlo bias statistic rejects it."""
    from proofs_checks.checks.c04_first_layer_mask import check_c4
    good = check_c4(seed=0)
    assert good.passed and max(good.measured["bias_z_vs_mixture"]) < 2.0
    wrong = check_c4(seed=0, mixture_density=0.2)
    assert all(-0.65 <= s <= -0.35 for s in wrong.measured["slopes_vs_mixture"])
    assert max(wrong.measured["bias_z_vs_mixture"]) > 2.5 and not wrong.passed

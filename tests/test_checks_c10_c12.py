"""proofs_checks C10 (random SubsetSum) and C12 (positive definiteness of the NTK): each passes with the
right ingredients and fails with a planted wrong one; the exact subset-sum gap against a naive grid."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proofs_checks.checks.c10_subset_sum import C_MAX, REFERENCE_MEDIANS, check_c10, exact_gap, subset_sums
from proofs_checks.checks.c12_positive_definiteness import (check_c12, cluster_points, cluster_shape,
                                                            min_pairwise_angle, predicted_rate)
from proofs_checks.registry import registry


def _naive_sums(x):
    """Every subset sum by explicit enumeration of the subsets (an independent reference)."""
    return np.array([sum(c) for r in range(len(x) + 1) for c in itertools.combinations(x, r)], dtype=float)


def _naive_gap(sums, n_grid: int = 4001):
    z = np.linspace(-1.0, 1.0, n_grid)
    return float(np.abs(z[:, None] - np.asarray(sums)[None, :]).min(axis=1).max()), 2.0 / (n_grid - 1)


# --------------------------------------------------------------------------------------------- C10
@settings(max_examples=30)
@given(st.lists(st.floats(-2.5, 2.5, allow_nan=False), min_size=0, max_size=7))
def test_exact_gap_agrees_with_a_naive_grid(x):
    sums = _naive_sums(x)
    np.testing.assert_allclose(subset_sums(x), np.sort(sums), rtol=0, atol=1e-12)
    exact = exact_gap(sums)                  # unsorted input on purpose
    naive, h = _naive_gap(sums)
    # the distance to a set is 1-Lipschitz: a grid of spacing h misses the sup by at most h/2
    assert naive <= exact + 1e-12
    assert exact <= naive + h / 2 + 1e-12


@pytest.mark.parametrize("x, gap", [
    ([], 1.0),                 # only the empty sum 0: z = +-1 is at distance 1
    ([0.5, -0.5], 0.5),        # sums -0.5, 0, 0, 0.5: the end points are the farthest
    ([1.5, -1.5], 0.75),       # sums -1.5, 0, 1.5: midpoints +-0.75 lie inside [-1, 1]
    ([2.4], 1.0),              # sums 0, 2.4: the midpoint 1.2 is outside, the end z = 1 counts
    ([0.25, 0.5, -1.0], 0.25),         # sums -1, -0.75, ..., 0.75: z = 1 is 0.25 from the largest
    ([0.25, 0.5, -1.0, 1.0], 0.125),   # sums -1, -0.75, ..., 1.75: interior half-gaps 0.125 everywhere
])
def test_exact_gap_on_hand_computed_sets(x, gap):
    assert exact_gap(subset_sums(x)) == pytest.approx(gap, abs=1e-15)


def test_exact_gap_rejects_bad_input():
    with pytest.raises(ValueError, match="sums"):
        exact_gap([])
    with pytest.raises(ValueError, match="lo, hi"):
        exact_gap([0.0], lo=1.0, hi=-1.0)
    with pytest.raises(ValueError, match="x"):
        subset_sums(np.zeros(27))


def test_c10_passes_at_quick_scale():
    for seed in range(3):
        res = check_c10("quick", seed)
        assert res.passed, res.summary()
        m = res.measured
        lo, hi = m["ci_c"]
        assert 0 < lo <= m["rate_c"] <= hi < 1.0
        assert m["C_eps"] <= C_MAX
        # same order of magnitude as THEORY.md's 5-draw medians
        for n, row in res.details["reference_medians"].items():
            assert abs(math.log10(row["measured"] / REFERENCE_MEDIANS[n])) < 1.0, (n, row)
    json.dumps(res.to_dict())


@pytest.mark.parametrize("support", [(0.0, 1.0), (-0.05, 0.05)])
def test_c10_fails_when_the_summands_cannot_cover_the_interval(support):
    res = check_c10("quick", 0, support=support)
    assert not res.passed
    assert res.measured["n_eps"] is None         # the median gap never falls below eps on the grid
    if support == (0.0, 1.0):
        assert res.measured["median_gap_at_max_n"] == 1.0 and res.measured["rate_c"] <= 0


# --------------------------------------------------------------------------------------------- C12
def test_cluster_points_have_the_requested_smallest_angle():
    x0, w = cluster_shape(8, 4, torch.Generator().manual_seed(0))
    for delta in (1e-3, 1e-2, 0.1):
        x = cluster_points(x0, w, delta)
        assert torch.allclose(x.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
        assert min_pairwise_angle(x) == pytest.approx(delta, rel=0.02)
    u = torch.tensor([[1.0, 0.0], [math.cos(0.3), math.sin(0.3)]], dtype=torch.float64)
    assert min_pairwise_angle(u) == pytest.approx(0.3, rel=1e-12)


def test_predicted_cluster_rates():
    assert predicted_rate("relu", 16, 4) == 1.0
    assert predicted_rate("erf", 8, 4) == 4.0      # 1 + 3 < 8 <= 1 + 3 + 6 monomials in 3 variables
    assert predicted_rate("erf", 16, 4) == 6.0
    assert predicted_rate("erf", 4, 4) == 2.0
    assert predicted_rate("identity", 8, 4) is None


def test_c12_passes_at_quick_scale():
    res = check_c12("quick", 0)
    assert res.passed, res.summary()
    m = res.measured
    assert m["clean_margin_min"] > 1e3 and m["cluster_margin_min"] > 1e3 and m["adv_margin_min"] > 1e3
    assert m["cluster_monotone"]
    assert all(abs(r - 1.0) < 0.05 for r in m["rate_relu"])
    assert all(abs(r - 4.0) < 0.1 for r in m["rate_erf"])
    # opposite-label pairs: the ReLU-kernel attacks pull the pairs together and lambda_min drops
    assert m["adversarial"]["pairs/relu"]["frac_lambda_smaller"] > 0.5
    json.dumps(res.to_dict())


def test_c12_fails_with_a_polynomial_activation():
    res = check_c12("quick", 0, activations=["identity"], adv_datasets=[])
    assert not res.passed
    assert res.measured["clean_margin_min"] < 1e3      # lambda_min at round-off level: singular kernel


def test_c10_and_c12_are_registered():
    reg = registry()
    assert reg["C10"].rigour == "theorem" and reg["C12"].rigour == "theorem"

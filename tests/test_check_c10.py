"""C10 (random SubsetSum): passes with the right ingredients, fails with each planted wrong one, and its helpers
against independent references. Tests marked ``# Was:`` are regressions of defects a review found."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntk_theory.testing import box_inputs

from proofs_checks.checks.c10_subset_sum import C_MAX, REFERENCE_MEDIANS, check_c10, exact_gap, subset_sums
from proofs_checks.checks.c10_subset_sum import PARAMS


def _naive_sums(x):
    """Every subset sum by explicit enumeration of the subsets (an independent reference)."""
    return np.array([sum(c) for r in range(len(x) + 1) for c in itertools.combinations(x, r)], dtype=float)


def _naive_gap(sums, n_grid: int = 4001):
    z = np.linspace(-1.0, 1.0, n_grid)
    return float(np.abs(z[:, None] - np.asarray(sums)[None, :]).min(axis=1).max()), 2.0 / (n_grid - 1)


@settings(max_examples=30)
@given(st.integers(1, 7).flatmap(lambda k: box_inputs(n=1, shape=(k,), low=-2.5, high=2.5)))
def test_exact_gap_agrees_with_a_naive_grid(batch):
    x = batch[0].tolist()        # 1 to 7 summands in [-2.5, 2.5] (the empty set is a hand-computed case below)
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
        # same order of magnitude as docs/theory.md's 5-draw medians
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


@pytest.mark.parametrize("n", [12, 14])
def test_c10_exact_gap_against_a_fine_grid_at_realistic_sizes(n):
    x = np.random.default_rng(n).uniform(-1, 1, n)
    s = np.sort(subset_sums(x))
    assert s.size == 2 ** n and s[0] == pytest.approx(x[x < 0].sum()) and s[-1] == pytest.approx(x[x > 0].sum())
    z = np.linspace(-1, 1, 2_000_001)                    # spacing h = 1e-6: the grid sup is within h/2 below
    j = np.clip(np.searchsorted(s, z), 1, s.size - 1)
    grid = float(np.minimum(np.abs(z - s[j - 1]), np.abs(z - s[j])).max())
    exact = exact_gap(s[::-1].copy())
    assert grid <= exact + 1e-15 and exact <= grid + 0.5e-6 + 1e-15


def test_c10_c_eps_criterion_can_bind():
    # Was: every grid ends below C_MAX ln(1/eps), so "C_eps <= C_MAX" is implied by n_eps existing and can never fail; the real criterion is C_eps <= max(ns)/ln(1/eps) (2.90 quick, 2.39 full), not the stated 3
    for scale, p in PARAMS.items():
        assert max(p["ns"]) >= C_MAX * math.log(1 / p["eps"]), scale


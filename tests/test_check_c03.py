"""C3 (unrescaled masks scale the NTK by q^k): passes with the right ingredients, fails with each planted wrong one, and its helpers
against independent references. Tests marked ``# Was:`` are regressions of defects a review found."""
from __future__ import annotations


import pytest
from proofs_checks.checks.c03_masked_scaling import check_c3



def test_c3_passes_and_fails_with_a_wrong_exponent():
    small = dict(width=512, seeds=4, densities=[0.5, 0.2])
    res = check_c3(seed=0, **small)
    assert res.passed, res.summary()
    for row in res.details["rows"]:
        assert row["tolerance"] < 0.5 * row["predicted"]     # the tolerance is tight enough to fail
    wrong = check_c3(seed=0, exponent=3, **small)
    assert not wrong.passed


@pytest.mark.parametrize("exponent", [1, 3])      # q^(k-1): one masked layer missed; q^(k+1): the first counted
def test_c3_rejects_an_off_by_one_exponent(exponent):
    res = check_c3(seed=0, exponent=exponent, width=512, seeds=4, densities=[0.5, 0.2])
    assert not res.passed
    assert all(not r["passed"] for r in res.details["rows"])


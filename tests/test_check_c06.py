"""C6 (dynamics perturbation lemma): passes with the right ingredients, fails with each planted wrong one, and its helpers
against independent references. Tests marked ``# Was:`` are regressions of defects a review found."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import proofs_checks.checks.c06_dynamics_perturbation as c6
from ntk_theory.dynamics import expm_gap, expm_gap_bound
from proofs_checks.checks.c06_dynamics_perturbation import check_c6



def test_c6_holds_and_a_too_tight_bound_fails():
    res = check_c6(seed=0)
    assert res.passed and res.measured["violations"] == 0
    assert 0.05 < res.measured["max_gap_over_bound"] <= 1.0     # non-trivial: the bound is not vacuous
    assert not check_c6(seed=0, bound_factor=0.1).passed


def _bound_with(lam_of):
    def bound(a, b, tau=None):
        la, lb = torch.linalg.eigvalsh(a), torch.linalg.eigvalsh(b)
        lam = lam_of(la, lb)
        d = torch.linalg.matrix_norm(a - b, ord=2)
        return d / (math.e * lam) if tau is None else d * tau * torch.exp(-lam * tau)
    return bound


@pytest.mark.parametrize("lam_of", [
    lambda la, lb: min(float(la[-1]), float(lb[-1])),     # lambda_max instead of lambda_min
    lambda la, lb: max(float(la[0]), float(lb[0])),       # the larger of the two lambda_min
    lambda la, lb: float(la.mean()),                      # the mean eigenvalue
], ids=["lambda_max", "max_of_mins", "mean"])
def test_c6_rejects_a_bound_with_the_wrong_eigenvalue(monkeypatch, lam_of):
    monkeypatch.setattr(c6, "expm_gap_bound", _bound_with(lam_of))
    res = c6.check_c6("quick", 0)
    assert not res.passed and res.measured["violations"] > 0


def test_c6_measured_gap_agrees_with_scipy_expm():
    """C6 takes both sides from ntk_theory.dynamics; an under-estimated gap would pass silently."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64)
    a = a @ a.T + 0.2 * torch.eye(7, dtype=torch.float64)
    e = 0.05 * torch.randn(7, 7, generator=g, dtype=torch.float64)
    b = a + 0.5 * (e + e.T)
    taus = [0.0, 0.05, 0.3, 1.0, 4.0, 20.0]
    ref = [np.linalg.norm(scipy.linalg.expm(-a.numpy() * t) - scipy.linalg.expm(-b.numpy() * t), 2) for t in taus]
    np.testing.assert_allclose(expm_gap(a, b, torch.tensor(taus, dtype=torch.float64)).numpy(), ref,
                               rtol=1e-9, atol=1e-13)
    lam = min(np.linalg.eigvalsh(a.numpy())[0], np.linalg.eigvalsh(b.numpy())[0])
    d = np.linalg.norm((a - b).numpy(), 2)
    assert float(expm_gap_bound(a, b)) == pytest.approx(d / (math.e * lam), rel=1e-10)


"""C6 (dynamics perturbation lemma): passes with the right ingredients, fails with each planted wrong one, and its helpers
against independent references. Tests marked ``# Was:`` are regressions of defects a review found."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ntk_theory.dynamics import gradient_flow_mse
from ntk_theory.testing import psd_pairs
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



TAUS = [0.0, 1e-3, 0.1, 1.0, 10.0, 1e2, 1e4]


@settings(max_examples=30)
@given(st.one_of(psd_pairs(n=(1, 7), lambda_min=(1e-3, 1.0), condition=(1.0, 1e4)),
                 psd_pairs(n=(1, 7), lambda_min=(1e-3, 1.0), condition=(1.0, 1e4), perturbation=(0.0, 0.3))))
def test_c6_bound_holds_for_pd_kernel_pairs(pair):
    """The lemma for any two PD kernels (independent, or a nearby sparse-like kernel), pointwise and sup;
    the gap against scipy's expm."""
    a, b = pair
    gap = expm_gap(a, b, TAUS)
    slack = 1e-9 * float(torch.linalg.matrix_norm(a - b, ord=2)) / 1e-3 + 1e-12
    assert bool((gap <= expm_gap_bound(a, b, TAUS) + slack).all())
    assert float(gap.max()) <= float(expm_gap_bound(a, b)) + slack
    ref = np.linalg.norm(scipy.linalg.expm(-a.numpy()) - scipy.linalg.expm(-b.numpy()), 2)
    assert float(gap[3]) == pytest.approx(ref, rel=1e-7, abs=1e-12)


@settings(max_examples=25)
@given(psd_pairs(n=(1, 6), lambda_min=(1e-2, 1.0), condition=(1.0, 1e3), perturbation=(0.0, 0.5)),
       st.integers(0, 10_000), st.integers(1, 3))
def test_c6_output_gap_corollary(pair, seed, o):
    """Corollary of C6: linearised MSE flows from the same f0 and targets under kernels A and B stay within
    ||f0 - y||_F ||A - B||_2 / (e lambda) of each other on the training points, for all time (lr = 1, c = 1)."""
    a, b = pair
    n = a.shape[0]
    g = torch.Generator().manual_seed(seed)
    y, f0 = torch.randn(n, o, generator=g, dtype=torch.float64), torch.randn(n, o, generator=g, dtype=torch.float64)
    fa = gradient_flow_mse(a, y, TAUS, f0=f0, normalization="none").f_train
    fb = gradient_flow_mse(b, y, TAUS, f0=f0, normalization="none").f_train
    gaps = torch.stack([torch.linalg.matrix_norm(fa[i] - fb[i]) for i in range(len(TAUS))])
    bound = float((f0 - y).norm()) * float(expm_gap_bound(a, b))
    assert float(gaps.max()) <= bound * (1 + 1e-8) + 1e-12
    per_tau = float((f0 - y).norm()) * expm_gap_bound(a, b, TAUS)
    assert bool((gaps <= per_tau * (1 + 1e-8) + 1e-12).all())

"""C13 (AWT existence template): its rigorous part (the C6 bound on linearised flows) against matrix
exponentials, each planted wrong ingredient fails, and the parts that hold at quick scale (slow)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from proofs_checks.checks.c13_awt_existence import _flow_gap, check_c13

TINY = dict(widths=[64, 128, 256], densities=[0.2], seeds=1, awt_steps=10, n_search=64, n_probe=16, at_train=8,
            at_steps=4)


def _psd(n, g, shift):
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T / n + shift * torch.eye(n, dtype=torch.float64)


def test_flow_gap_matches_matrix_exponentials_and_the_bound_holds():
    g = torch.Generator().manual_seed(0)
    A = _psd(8, g, 0.3)
    B = A + 0.05 * _psd(8, g, 0.0)
    r, r2 = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    gap, bound, ratio, lam = _flow_gap(A, B, r, r2, n_tau=30)
    lam_ref = float(min(torch.linalg.eigvalsh(A)[0], torch.linalg.eigvalsh(B)[0]))
    assert lam == pytest.approx(lam_ref, rel=1e-12)
    taus = torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.logspace(-3, math.log10(20.0 / lam_ref), 29, dtype=torch.float64)])
    ref = max(float((torch.linalg.matrix_exp(-A * t) @ r - torch.linalg.matrix_exp(-B * t) @ r2).norm()) for t in taus)
    assert gap == pytest.approx(ref, rel=1e-10)
    assert ratio <= 1 + 1e-12 and gap <= bound
    assert ratio == pytest.approx(1.0, abs=1e-12)      # tight at tau = 0: both sides are ||r - r'||
    # the bound's sup is C6's ||A - B||_2 / (e lambda) term plus ||r - r'||
    sup = float((r - r2).norm()) + float(r2.norm()) * float(torch.linalg.matrix_norm(A - B, ord=2)) / (math.e * lam_ref)
    assert bound <= sup * (1 + 1e-12)


def test_c13_fails_with_unrescaled_random_masks():
    # without 1/sqrt(q) the random sub-network's kernel shrinks by about q^k: d_Theta stays order one
    res = check_c13("quick", 0, random_rescale=False, **TINY)
    assert not res.passed and not res.details["criteria"]["random_scaling"]
    assert res.measured["random_slope_d_theta_vs_effective_width"] > -0.35
    assert min(r["d_theta"] for r in res.details["rows"] if r["method"] == "random") > 0.5


def test_c13_fails_with_a_too_tight_bound():
    res = check_c13("quick", 0, bound_factor=0.5, **TINY)
    assert not res.passed and not res.details["criteria"]["rigorous_fixed_set"]
    assert res.measured["max_flow_gap_over_bound"] > 1.5


def test_c13_refuses_bad_input():
    with pytest.raises(ValueError, match="densities"):
        check_c13("quick", 0, densities=[1.0])
    with pytest.raises(ValueError, match="eps"):
        check_c13("quick", 0, eps=[0.0])


@pytest.mark.slow
def test_c13_quick_scale_rigorous_part_and_random_scaling_hold():   # about 20 s
    res = check_c13("quick", 0)
    crit = res.details["criteria"]
    assert crit["rigorous_fixed_set"] and crit["random_scaling"] and crit["moving_points"], res.summary()
    assert -0.65 <= res.measured["random_slope_d_theta_vs_effective_width"] <= -0.35
    assert res.measured["awt_beats_random_on_d_f"]
    json.dumps(res.to_dict())

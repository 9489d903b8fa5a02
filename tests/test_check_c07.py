"""C7 (the adversarial NTK is Lipschitz in eps): passes with the right ingredients, fails with each planted wrong one, and its helpers
against independent references. Tests marked ``# Was:`` are regressions of defects a review found."""
from __future__ import annotations

import math

import torch

from ntk_theory.adversarial import adversarial_ntk
from ntk_theory.attacks import fgsm
from ntk_theory.infinite import mlp
import proofs_checks.checks.c07_adversarial_ntk_lipschitz as c7
from proofs_checks.checks.c07_adversarial_ntk_lipschitz import check_c7


def test_c7_linear_in_eps_and_a_quadratic_claim_fails():
    for seed in range(3):
        res = check_c7(seed=seed)
        assert res.passed, res.summary()
    assert abs(res.measured["slope"] - 1.0) < 0.05
    assert not check_c7(seed=0, band=(1.9, 2.1)).passed


def test_c7_attack_moves_every_coordinate_by_eps_and_an_eps_free_attack_fails(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g, dtype=torch.float64)
    y = torch.randn(6, generator=g, dtype=torch.float64)
    adv = adversarial_ntk(mlp(3, sigma_b=math.sqrt(0.1)), x, y, eps=1e-3, t=60.0,
                          attack=lambda f, xx, yy: fgsm(f, xx, yy, eps=1e-3, loss="mse", clamp=None))
    torch.testing.assert_close((adv.x_adv - x).abs(), torch.full_like(x, 1e-3), rtol=1e-9, atol=1e-15)
    # a perturbation that does not scale with eps: the slope is 0, not 1
    monkeypatch.setattr(c7, "fgsm", lambda f, xx, yy, eps, loss, clamp: xx + 1e-3 * torch.sign(xx))
    res = c7.check_c7("quick", 0)
    assert not res.passed and abs(res.measured["slope"]) < 0.1


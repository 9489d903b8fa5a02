"""C9 (lazy adversarial training, relative weight movement ~ width^-1/2): passes with the right ingredients, fails
with each planted wrong one, and its training loop against an independent reference."""
from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call, grad

from ntk_theory.attacks import pgd
from ntk_theory.layers import finite_mlp
from proofs_checks.checks.c09_lazy_adversarial_training import FLOOR, _train, check_c9
from proofs_checks.common import sphere_inputs

SMALL9 = dict(widths=[128, 256, 512], seeds=2)


def test_train_is_gradient_descent_at_the_attacked_points():
    # one AT step of the check's loop = the autograd gradient of the robust MSE with x~ held fixed (Danskin)
    g = torch.Generator().manual_seed(0)
    x = sphere_inputs(6, 5, g)
    y = torch.sign(torch.randn(6, generator=g, dtype=torch.float64))
    net = finite_mlp(5, 32, 2, sigma_b=0.1, generator=3)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    xa = pgd(net, x, y, eps=0.1, steps=3, loss="mse", clamp=None, generator=11)    # the loop's step-0 attack
    loss = lambda p: 0.5 * (functional_call(net, p, (xa,)).reshape(-1) - y).pow(2).sum() / 6.0
    gr = grad(loss)(before)
    losses, _ = _train(net, x, y, lr=0.2, c=6.0, eps=0.1, steps=3, train_steps=1, attack_seed=11)
    for k, v in net.named_parameters():
        torch.testing.assert_close(v.detach(), before[k] - 0.2 * gr[k], rtol=0, atol=1e-12)
    assert losses[0] == pytest.approx(float(loss(before)), rel=1e-12)


@pytest.fixture(scope="module")
def c9_small():
    return check_c9("quick", 0, **SMALL9)


def test_c9_passes_and_the_movement_decays(c9_small):
    res = c9_small
    assert res.passed, res.summary()
    m = res.measured
    assert -0.65 <= m["slope_max_layer"] <= -0.35
    lo, hi = m["ci_max_layer"]
    assert lo <= m["slope_max_layer"] <= hi
    # hidden-to-hidden layer: n^-1 (movement O(1) against ||W_0||_F ~ n), first and readout layers n^-1/2
    assert m["slope_2.weight"] < -0.8
    assert -0.65 <= m["slope_0.weight"] <= -0.35
    assert FLOOR <= m["slope_adversarial_ntk"] <= -0.35
    assert all(r <= 0.1 for r in m["robust_loss_ratio_T_over_0"])
    json.dumps(res.to_dict())


def test_c9_rejects_a_too_steep_claimed_exponent():
    res = check_c9("quick", 0, exponent=-1.0, **SMALL9)
    assert not res.passed
    assert res.measured["slope_max_layer"] > -0.85


def test_c9_fails_against_a_wrong_initialisation():
    res = check_c9("quick", 0, reference="other_init", **SMALL9)
    assert not res.passed
    assert abs(res.measured["slope_max_layer"]) < 0.2          # ~sqrt(2) at every width


def test_c9_fails_when_training_stops_early():
    res = check_c9("quick", 0, train_steps=3, **SMALL9)
    assert not res.passed and not res.details["criteria"]["floor"]
    assert min(res.measured["robust_loss_ratio_T_over_0"]) > 0.1


def test_c9_refuses_bad_input():
    with pytest.raises(ValueError, match="reference"):
        check_c9("quick", 0, reference="nope")
    with pytest.raises(ValueError, match="widths"):
        check_c9("quick", 0, widths=[128])

"""C8 (AT degeneration in kernel form): the full check passes at quick scale (slow), fails with each planted
wrong ingredient, and its helpers against independent references."""
from __future__ import annotations

import json

import pytest
import torch

from ntk_theory.adversarial import adversarial_kernel_training
from ntk_theory.infinite import mlp
from proofs_checks.checks.c08_at_degeneration import _ATPredictor, check_c8, digits_pair, tau_grid


def test_digits_pair_is_a_disjoint_two_class_split_in_the_box():
    x, y, xt, yt = digits_pair([3, 8], 20, 30, torch.Generator().manual_seed(0))
    assert x.shape == (20, 64) and xt.shape == (30, 64) and x.dtype == torch.float64
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and float(x.max()) == 1.0
    assert set(y.tolist()) == {1.0, -1.0} and set(yt.tolist()) <= {1.0, -1.0}
    again = digits_pair([3, 8], 20, 30, torch.Generator().manual_seed(0))
    other = digits_pair([3, 8], 20, 30, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], x) and not torch.equal(other[0], x)       # seeded split
    with pytest.raises(ValueError, match="classes"):
        digits_pair([3, 3], 5, 5, torch.Generator())
    with pytest.raises(ValueError, match="n_test"):
        digits_pair([3, 8], 300, 300, torch.Generator())


def test_tau_grid_is_geometric_and_ends_at_the_last_step():
    g = tau_grid(150, 10)
    assert g[0] == 1 and g[-1] == 150 and g == sorted(set(g)) and len(g) <= 10
    assert tau_grid(1, 5) == [1]


def test_the_rebuilt_predictor_is_the_trajectory():
    # f_k = sum_{s<k} Theta(., X~_s) a_s with a_s = -(lr/c)(f_s(X~_s) - Y) reproduces AT-2's own outputs
    x, y, xt, _ = digits_pair([1, 7], 6, 5, torch.Generator().manual_seed(1))
    k = mlp(1, sigma_b=0.1)
    lr = 0.5 * 2 * 6 / float(torch.linalg.eigvalsh(k(x, get="ntk"))[-1])
    tr = adversarial_kernel_training(k, x, y, train_steps=6, lr=lr, eps=0.1, steps=3, generator=0, x_test=xt)
    coef = -(lr / 6) * (tr.f_adv[:-1] - y)
    for step in (1, 3, 6):
        f = _ATPredictor(k, tr.x_adv[:step].reshape(-1, 64), coef[:step].reshape(-1))
        with torch.no_grad():
            torch.testing.assert_close(f(x), tr.f_train[step], rtol=0, atol=1e-10)
            torch.testing.assert_close(f(xt), tr.f_test[step], rtol=0, atol=1e-10)


@pytest.mark.slow
def test_c8_passes_at_quick_scale():      # about 25 s on one core
    res = check_c8("quick", 0)
    assert res.passed, res.summary()
    m = res.measured
    assert m["peak_robust_acc"] > m["std_regression_robust_acc"] > m["first_robust_acc"]
    assert 0 < m["peak_tau"] < m["last_tau"]
    assert m["max_reconstruction_error"] < 1e-8
    json.dumps(res.to_dict())


def test_c8_fails_against_a_wrong_reference():
    # the clean accuracy of standard regression is ~0.2 above its robust accuracy: the late gap is far off
    res = check_c8("quick", 0, reference="clean", seeds=2, train_steps=30, n_test=60, n_tau=5)
    assert not res.passed and not res.details["criteria"]["late_gap"]
    assert res.measured["late_gap"] > 0.1


def test_c8_fails_when_training_stops_before_the_peak():
    res = check_c8("quick", 0, seeds=2, train_steps=6, n_test=60, n_tau=6)
    assert not res.passed
    assert not (res.details["criteria"]["finite_peak"] and res.details["criteria"]["decay"])


def test_c8_refuses_bad_input():
    with pytest.raises(ValueError, match="reference"):
        check_c8("quick", 0, reference="nope")
    with pytest.raises(ValueError, match="seeds"):
        check_c8("quick", 0, seeds=1)

"""C12 (positive definiteness of the limiting NTK): passes with the right ingredients, fails with each planted wrong one, and its helpers
against independent references. Tests marked ``# Was:`` are regressions of defects a review found."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ntk_theory.testing import mlp_architectures, sphere_inputs

from proofs_checks.checks.c12_positive_definiteness import (check_c12, cluster_points, cluster_shape,
                                                            min_pairwise_angle, predicted_rate)
import proofs_checks.checks.c12_positive_definiteness as c12


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


@pytest.mark.parametrize("rel", [0.0, 1e-13])      # a singular kernel; one with a tiny negative eigenvalue
def test_c12_rejects_a_kernel_that_is_not_positive_definite(monkeypatch, rel):
    orig = c12.mlp

    class NotPD:
        def __init__(self, k):
            self.k = k

        def __call__(self, x, x2=None, get="ntk"):
            t = self.k(x, x2, get=get)
            ev, v = torch.linalg.eigh(t)
            return t + (-rel * ev[-1] - ev[0]) * torch.outer(v[:, 0], v[:, 0])

    monkeypatch.setattr(c12, "mlp", lambda depth, act: NotPD(orig(depth, act)))
    res = c12.check_c12("quick", 0, adv_datasets=[], depths=[1, 2], activations=["relu", "erf"])
    assert not res.passed
    assert res.measured["clean_margin_min"] < 1e3 and res.measured["cluster_margin_min"] < 1e3



@settings(max_examples=25)
@given(mlp_architectures(depth=(1, 3), activations=("relu", "erf", "leaky_relu"), sigma_b=(0.0, 0.5), d_in=(2, 5)),
       st.data())
def test_c12_limiting_ntk_is_positive_definite_on_distinct_sphere_points(arch, data):
    """C12 for any non-polynomial MLP with a hidden layer: lambda_min(Theta(X, X)) is above the check's margin
    (1e3 eps_64 lambda_max) on distinct, non-parallel points of the sphere, more points than d + 1 included."""
    x = data.draw(sphere_inputs(n=(2, 8), d=arch.in_shape[0], min_angle=0.3))
    ev = torch.linalg.eigvalsh(arch.kernel(x, get="ntk"))
    assert float(ev[0]) > 1e3 * c12.EPS64 * float(ev[-1])

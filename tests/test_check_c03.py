"""C3 (unrescaled masks scale the NTK by q^k): passes with the right ingredients, fails with each planted wrong one, and its helpers
against independent references. Tests marked ``# Was:`` are regressions of defects a review found."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ntk_theory.infinite import mlp
from ntk_theory.testing import mlp_architectures, sphere_inputs
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



@settings(max_examples=20)
@given(mlp_architectures(depth=(1, 3), activations="relu", sigma_b=0.0, d_in=(2, 6)), st.floats(0.01, 1.0),
       st.data())
def test_c3_limit_is_q_to_the_k_times_the_dense_ntk(arch, q, data):
    """C3 in closed form, for any ReLU MLP without biases: unrescaled masks of density q on the k = depth
    layers after the first give q^k Theta (NNGP likewise); rescaled ones give Theta."""
    x = data.draw(sphere_inputs(n=(1, 5), d=arch.in_shape[0]))
    dense = arch.kernel(x)
    masked = mlp(arch.depth, "relu", arch.sigma_w, 0.0, density=q, rescale=False)(x)
    torch.testing.assert_close(masked.ntk, q ** arch.depth * dense.ntk, rtol=1e-10, atol=1e-300)
    torch.testing.assert_close(masked.nngp, q ** arch.depth * dense.nngp, rtol=1e-10, atol=1e-300)
    rescaled = mlp(arch.depth, "relu", arch.sigma_w, 0.0, density=q, rescale=True)(x, get="ntk")
    torch.testing.assert_close(rescaled, dense.ntk, rtol=1e-12, atol=1e-300)

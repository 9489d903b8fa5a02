"""Tests of ntk_theory.activations: the one activation registry."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ntk_theory import activations as A
from ntk_theory import infinite
from ntk_theory.layers import ErfActivation, finite_mlp

D = torch.float64
ALL = tuple(A.ACTIVATIONS)


def test_registry_covers_the_settled_names():
    assert set(ALL) == {"relu", "leaky_relu", "erf", "identity", "tanh", "sigmoid"}
    assert A.names(kernel=True) == ("relu", "leaky_relu", "erf", "identity")
    assert A.names(kernel=False) == ("tanh", "sigmoid")
    for name in ALL:
        assert A.get(name).name == name


@pytest.mark.parametrize("name", ALL)
def test_phi_is_the_modules_forward_and_dphi_its_autograd_derivative(name):
    # independent reference: the torch module's forward and autograd through it (at 0 too: ReLU's kink)
    act = A.get(name)
    m = act.module(alpha=0.2)
    z = torch.linspace(-3, 3, 25, dtype=D).requires_grad_()
    p = act.params(m)
    torch.testing.assert_close(act.phi(z.detach(), **p), m(z).detach(), rtol=1e-15, atol=0)
    (g,) = torch.autograd.grad(m(z).sum(), z)
    torch.testing.assert_close(act.dphi(z.detach(), **p), g, rtol=1e-14, atol=1e-15)
    assert act.dphi(z.detach().float(), **p).dtype == torch.float32


@pytest.mark.parametrize("name", ALL)
def test_activation_of_finds_each_module_instance(name):
    act = A.get(name)
    assert A.activation_of(act.module(alpha=0.3)) is act


def test_activation_of_reads_parameters_and_rejects_others():
    act = A.activation_of(nn.LeakyReLU(0.25))
    assert act.name == "leaky_relu" and act.params(nn.LeakyReLU(0.25)) == {"alpha": 0.25}
    assert A.activation_of(ErfActivation()).name == "erf"
    assert A.activation_of(nn.Linear(2, 2)) is None
    assert A.activation_of(nn.Sequential(nn.ReLU())) is None
    assert A.activation_of(nn.GELU()) is None

    class Shifted(nn.ReLU):  # overrides forward: must not be mistaken for a ReLU
        def forward(self, x):
            return super().forward(x) - 1

    assert A.activation_of(Shifted()) is None

    class Plain(nn.ReLU):  # a subclass that keeps ReLU's forward is a ReLU
        pass

    assert A.activation_of(Plain()).name == "relu"


@pytest.mark.parametrize("name", A.names(kernel=True))
def test_kernel_layer_is_the_gaussian_expectation_of_its_own_phi(name):
    # independent reference: Monte Carlo of E[phi(u) phi(v)] and E[phi'(u) phi'(v)] with the registry's own
    # phi/dphi, tolerance 5 standard errors; serial(Dense(1), act, Dense(1)) on two inputs whose first-layer
    # covariance is [[k11, k12], [k12, k22]] gives nngp = E[phi phi] and ntk = E[phi phi] + k12 E[phi' phi']
    act, alpha = A.get(name), 0.2
    cov = torch.tensor([[1.3, 0.4], [0.4, 0.7]], dtype=D)
    L = torch.linalg.cholesky(cov)
    x = L * math.sqrt(2.0)  # d = 2, sigma_w = 1: K = x x^T / 2 = cov
    out = infinite.serial(infinite.Dense(1.0), act.kernel_layer(alpha), infinite.Dense(1.0))(x)
    uv = torch.randn(400_000, 2, dtype=D, generator=torch.Generator().manual_seed(0)) @ L.T
    e = act.phi(uv[:, 0], alpha=alpha) * act.phi(uv[:, 1], alpha=alpha)
    ed = act.dphi(uv[:, 0], alpha=alpha) * act.dphi(uv[:, 1], alpha=alpha)
    for sample, value in ((e, out.nngp[0, 1]), (e + cov[0, 1] * ed, out.ntk[0, 1])):
        se = float(sample.std()) / math.sqrt(sample.numel())
        assert abs(float(sample.mean()) - float(value)) < 5 * se + 1e-12, (name, float(sample.mean()), float(value))


@pytest.mark.parametrize("name", A.names(kernel=False))
def test_no_closed_form_is_said_not_guessed(name):
    act = A.get(name)
    assert not act.has_kernel and act.kernel is None
    with pytest.raises(ValueError, match="no closed-form"):
        act.kernel_layer()
    with pytest.raises(ValueError, match="no closed-form"):
        A.get(name, kernel=True)
    with pytest.raises(ValueError, match="activation"):
        infinite.mlp(1, name)
    # finite_mlp promises convergence to a closed form: it refuses too, naming the argument
    with pytest.raises(ValueError, match="activation"):
        finite_mlp(3, 4, 1, activation=name, generator=0)
    # the module and its phi' exist all the same (for empirical kernels)
    assert A.activation_of(act.module()) is act


@pytest.mark.parametrize("call, match", [
    (lambda: A.get("swish"), "activation"),
    (lambda: A.get(3), "activation"),
    (lambda: A.get("leaky_relu").module(alpha=math.nan), "alpha"),
    (lambda: A.get("leaky_relu").kernel_layer(alpha=math.inf), "alpha"),
])
def test_bad_names_and_slopes_are_refused(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()

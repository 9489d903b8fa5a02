"""Tests of ntk_theory.layers: finite NTK-parameterised layers and their factories."""
from __future__ import annotations

import math

import pytest
import torch

from ntk_theory.layers import NTKConv2d, NTKLinear, finite_cnn, finite_mlp

# --------------------------------------------------------------------------------------------- review regressions
# Moved from the core review file; tests marked ``# Was:`` are regressions: each names a defect a
# review found (fixed since) and fails if it comes back.
D = torch.float64


def test_ntk_layers_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    lin = NTKLinear(3, 4, sigma_w=1.3, sigma_b=0.7, generator=g, dtype=D)
    x = torch.randn(5, 3, dtype=D, generator=g)
    torch.testing.assert_close(lin(x), x @ (1.3 / math.sqrt(3) * lin.weight).T + 0.7 * lin.bias, rtol=1e-14, atol=0)
    conv = NTKConv2d(2, 3, 3, sigma_w=1.1, sigma_b=0.2, generator=g, dtype=D)
    xi = torch.randn(2, 2, 5, 5, dtype=D, generator=g)
    ref = torch.nn.functional.conv2d(xi, 1.1 / math.sqrt(18) * conv.weight, 0.2 * conv.bias, padding=1)
    torch.testing.assert_close(conv(xi), ref, rtol=1e-14, atol=1e-15)
    assert conv(xi).shape == xi.shape[:1] + (3, 5, 5)
    with pytest.raises(ValueError, match="kernel_size"):
        NTKConv2d(1, 1, 2)
    with pytest.raises(ValueError, match="sigma_w"):
        NTKLinear(2, 2, sigma_w=math.inf)


@pytest.mark.parametrize("build, arg", [
    (lambda: finite_mlp(3, 4, 0, activation="bogus"), "activation"),
    (lambda: finite_mlp(3, 4, 1, activation="leaky_relu", alpha=math.nan), "alpha"),
    (lambda: finite_cnn((1, -2, -3), 4, 1), "in_shape"),
])
def test_layer_factories_validate_every_argument(build, arg):
    # Was: finite_mlp checks `activation` only when depth >= 1 and never checks `alpha` (NaN -> NaN outputs);
    # finite_cnn accepts a negative image_size (its readout fan-in becomes (-2)(-3)c)
    with pytest.raises((ValueError, TypeError), match=arg):
        build()


# --------------------------------------------------------------------------------------------- gains, wrappers, devices
def test_gains_protocol():
    from torch import nn

    from ntk_theory.layers import gains
    lin, conv = NTKLinear(8, 3, sigma_w=1.5, sigma_b=0.2), NTKConv2d(2, 3, 3, sigma_w=0.9)
    assert gains(lin) == (pytest.approx(1.5 / math.sqrt(8)), pytest.approx(0.2))
    assert gains(conv) == (pytest.approx(0.9 / math.sqrt(18)), 0.0)
    assert gains(nn.Linear(2, 2)) == (1.0, 1.0) and gains(nn.Conv2d(1, 1, 3)) == (1.0, 1.0)
    assert gains(nn.ReLU()) is None and gains(nn.Sequential(nn.Linear(2, 2))) is None

    class Doubled(nn.Linear):  # a forward of its own: not known to be op(h, g_w W, g_b b)
        def forward(self, x):
            return 2 * super().forward(x)

    assert gains(Doubled(2, 2)) is None
    # the gains reproduce the forward: op(h, g_w W, g_b b)
    x = torch.randn(4, 8, dtype=torch.float32)
    gw, gb = gains(lin)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, gw * lin.weight, gb * lin.bias))


def test_finite_mlp_and_cnn_are_the_kernels_networks():
    from ntk_theory.infinite import Conv, Dense, GlobalAvgPool, LeakyRelu, mlp, serial
    a = finite_mlp(3, 8, 2, 2, activation="leaky_relu", alpha=0.2, sigma_b=0.1, generator=5)
    b = mlp(2, "leaky_relu", sigma_b=0.1, alpha=0.2).finite((3,), 8, out_features=2, generator=5)
    assert [type(m) for m in a] == [type(m) for m in b] and a[1].negative_slope == 0.2
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = finite_cnn((2, 5, 4), 6, 2, 3, readout="gap", activation="leaky_relu", alpha=0.3, generator=1)
    k = serial(Conv(3), LeakyRelu(0.3), Conv(3), LeakyRelu(0.3), GlobalAvgPool(), Dense())
    d = k.finite((2, 5, 4), 6, out_features=3, generator=1)
    assert [n for n, _ in c.named_parameters()] == ["0.weight", "2.weight", "6.weight"]
    assert all(torch.equal(p, q) for p, q in zip(c.parameters(), d.parameters()))
    assert c(torch.randn(2, 2, 5, 4, dtype=torch.float64)).shape == (2, 3)


@pytest.mark.parametrize("build, arg, exc", [
    # Was: generator=42 failed in torch's normal_ ("argument 'generator' must be torch.Generator, not int")
    (lambda: NTKLinear(2, 2, generator="42"), "generator", TypeError),
    (lambda: NTKLinear(2, 2, dtype=torch.int64), "dtype", ValueError),
    (lambda: NTKConv2d(1, 1, 3, device="tpu"), "device", ValueError),
    (lambda: finite_mlp(3, 4, 1, dtype=torch.int64), "dtype", ValueError),
    (lambda: finite_mlp(0, 4, 1), "d_in", ValueError),
    (lambda: finite_cnn(1, 4, 1), "in_shape", TypeError),
    (lambda: finite_cnn((1, 4), 4, 1), "in_shape", ValueError),
    (lambda: finite_cnn((1, 4, 4), 4, 0), "depth", ValueError),
    (lambda: finite_cnn((1, 4, 4), 4, 1, readout="max"), "readout", ValueError),
    (lambda: finite_cnn((1, 4, 4), 4, 1, activation="tanh"), "activation", ValueError),
])
def test_layer_arguments_are_validated(build, arg, exc):
    with pytest.raises(exc, match=arg):
        build()


def test_layers_take_int_seeds():
    a, b = NTKLinear(3, 4, generator=7), NTKLinear(3, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.weight, b.weight)
    c, d = NTKConv2d(1, 2, 3, generator=7, dtype=torch.float64), finite_mlp(3, 4, 1, generator=7)
    assert c.weight.dtype == torch.float64 and finite_mlp(3, 4, 1, generator=7)[0].weight.equal(d[0].weight)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("build", [
    lambda: NTKLinear(2, 2, device="cuda"),
    lambda: NTKConv2d(1, 1, 3, device="cuda"),
    lambda: finite_mlp(3, 4, 1, device="cuda"),
    lambda: finite_cnn((1, 4, 4), 4, 1, device="cuda"),
])
def test_cuda_without_cuda_is_a_clear_error(build):
    # Was: finite_mlp(..., device="cuda") ended in torch's "Torch not compiled with CUDA enabled" assertion
    with pytest.raises(ValueError, match="device.*CUDA is not available"):
        build()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layers_on_cuda():
    net = finite_cnn((1, 4, 4), 4, 1, generator=0, device="cuda")
    assert all(p.is_cuda for p in net.parameters())
    assert NTKLinear(2, 3, generator=1, device="cuda").weight.is_cuda

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

"""Finite-width layers in the NTK parameterisation (THEORY.md §B.0).

A dense layer computes ``z = (sigma_w / sqrt(fan_in)) W h + sigma_b b`` with
``W_ij, b_i ~ N(0, 1)``; a convolution does the same patch-wise with
``fan_in = C_in * k * k`` (stride 1, zero 'SAME' padding, odd square kernels).
These are the finite networks whose empirical NTK converges to the closed forms
of :mod:`ntk_theory.infinite` (Jacot et al. 2018; Lee et al. 2019; the
conventions of neural-tangents' ``stax`` with ``parameterization='ntk'``).

Both layers are ordinary :class:`torch.nn.Linear` / :class:`torch.nn.Conv2d`
subclasses that carry two scalar gains, ``weight_gain = sigma_w/sqrt(fan_in)``
and ``bias_gain = sigma_b``; the forward pass is the parent's operation applied
to the scaled parameters. The structured NTK path of
:mod:`ntk_theory.empirical` reads these gains (a plain ``nn.Linear`` has gains 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_choice, check_finite_number, check_int, check_nonnegative

__all__ = ["NTKLinear", "NTKConv2d", "Erf", "activation_module", "finite_mlp", "finite_cnn", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "erf", "leaky_relu", "identity")


def _normal_(t: torch.Tensor, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        t.normal_(0.0, 1.0, generator=generator)


class NTKLinear(nn.Linear):
    """``z = (sigma_w/sqrt(in_features)) W h + sigma_b b`` with standard-normal ``W, b``."""

    def __init__(self, in_features: int, out_features: int, *, sigma_w: float = 2 ** 0.5,
                 sigma_b: float = 0.0, bias: bool | None = None, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device=None):
        check_int(in_features, "in_features", minimum=1)
        check_int(out_features, "out_features", minimum=1)
        check_nonnegative(sigma_w, "sigma_w")
        check_nonnegative(sigma_b, "sigma_b")
        bias = (sigma_b > 0) if bias is None else bias
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self.sigma_w = float(sigma_w)
        self.sigma_b = float(sigma_b)
        self.weight_gain = self.sigma_w / math.sqrt(in_features)
        self.bias_gain = self.sigma_b
        _normal_(self.weight, generator)
        if self.bias is not None:
            _normal_(self.bias, generator)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias_gain * self.bias
        return F.linear(h, self.weight_gain * self.weight, b)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sigma_w={self.sigma_w:g}, sigma_b={self.sigma_b:g}"


class NTKConv2d(nn.Conv2d):
    """Stride-1 'SAME' convolution ``z = (sigma_w/sqrt(C_in k^2)) W * h + sigma_b b``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, sigma_w: float = 2 ** 0.5,
                 sigma_b: float = 0.0, bias: bool | None = None, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device=None):
        check_int(in_channels, "in_channels", minimum=1)
        check_int(out_channels, "out_channels", minimum=1)
        check_int(kernel_size, "kernel_size", minimum=1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: got {kernel_size}; only odd kernel sizes give 'SAME' padding")
        check_nonnegative(sigma_w, "sigma_w")
        check_nonnegative(sigma_b, "sigma_b")
        bias = (sigma_b > 0) if bias is None else bias
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2,
                         bias=bias, dtype=dtype, device=device)
        self.sigma_w = float(sigma_w)
        self.sigma_b = float(sigma_b)
        self.weight_gain = self.sigma_w / math.sqrt(in_channels * kernel_size * kernel_size)
        self.bias_gain = self.sigma_b
        _normal_(self.weight, generator)
        if self.bias is not None:
            _normal_(self.bias, generator)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias_gain * self.bias
        return self._conv_forward(h, self.weight_gain * self.weight, b)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sigma_w={self.sigma_w:g}, sigma_b={self.sigma_b:g}"


class Erf(nn.Module):
    """Elementwise ``erf``."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.erf(h)


def activation_module(name: str, alpha: float = 0.01) -> nn.Module:
    """The finite counterpart of an activation name of :func:`ntk_theory.infinite.mlp`."""
    check_choice(name, "activation", ACTIVATIONS)
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(alpha)
    if name == "erf":
        return Erf()
    return nn.Identity()


def finite_mlp(d_in: int, width: int, depth: int, out_features: int = 1, *, activation: str = "relu",
               sigma_w: float = 2 ** 0.5, sigma_b: float = 0.0, alpha: float = 0.01,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
               device=None) -> nn.Sequential:
    """Finite MLP in the NTK parameterisation: ``depth`` x (NTKLinear, activation), then an NTKLinear readout.

    Its empirical NTK converges, as ``width -> inf``, to
    ``ntk_theory.infinite.mlp(depth, activation, sigma_w, sigma_b)`` (times the
    identity over the ``out_features`` outputs).
    """
    check_int(depth, "depth", minimum=0)
    check_int(width, "width", minimum=1)
    check_int(d_in, "d_in", minimum=1)
    check_choice(activation, "activation", ACTIVATIONS)
    check_finite_number(alpha, "alpha", "a finite leaky-ReLU slope")
    layers: list[nn.Module] = []
    fan_in = d_in
    for _ in range(depth):
        layers += [NTKLinear(fan_in, width, sigma_w=sigma_w, sigma_b=sigma_b, generator=generator,
                             dtype=dtype, device=device), activation_module(activation, alpha)]
        fan_in = width
    layers.append(NTKLinear(fan_in, out_features, sigma_w=sigma_w, sigma_b=sigma_b, generator=generator,
                            dtype=dtype, device=device))
    return nn.Sequential(*layers)


def finite_cnn(in_channels: int, channels: int, depth: int, image_size: tuple[int, int], out_features: int = 1, *,
               kernel_size: int = 3, readout: str = "flatten", activation: str = "relu",
               sigma_w: float = 2 ** 0.5, sigma_b: float = 0.0, alpha: float = 0.01,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
               device=None) -> nn.Sequential:
    """Finite CNN: ``depth`` x (NTKConv2d, activation), ``readout`` in {"flatten", "gap"}, NTKLinear readout.

    Matches ``serial(*[Conv(k), act] * depth, Flatten() | GlobalAvgPool(), Dense())``.
    """
    check_int(depth, "depth", minimum=1)
    check_choice(readout, "readout", ("flatten", "gap"))
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise ValueError(f"image_size: expected a pair (H, W) of positive integers, got {image_size!r}")
    for s in image_size:
        check_int(s, "image_size", minimum=1)
    check_choice(activation, "activation", ACTIVATIONS)
    check_finite_number(alpha, "alpha", "a finite leaky-ReLU slope")
    layers: list[nn.Module] = []
    c = in_channels
    for _ in range(depth):
        layers += [NTKConv2d(c, channels, kernel_size, sigma_w=sigma_w, sigma_b=sigma_b, generator=generator,
                             dtype=dtype, device=device), activation_module(activation, alpha)]
        c = channels
    h, w = image_size
    if readout == "flatten":
        layers += [nn.Flatten(), NTKLinear(c * h * w, out_features, sigma_w=sigma_w, sigma_b=sigma_b,
                                           generator=generator, dtype=dtype, device=device)]
    else:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   NTKLinear(c, out_features, sigma_w=sigma_w, sigma_b=sigma_b, generator=generator,
                             dtype=dtype, device=device)]
    return nn.Sequential(*layers)

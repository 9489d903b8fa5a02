"""Finite-width layers in the NTK parameterisation (docs/theory.md §B.0).

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

from ._checks import as_generator, check_choice, check_device, check_finite_number, check_int, check_nonnegative

__all__ = ["NTKLinear", "NTKConv2d", "ErfActivation", "gains", "finite_mlp", "finite_cnn"]


def _factory_args(dtype, device, generator):
    """Validated ``(dtype, device, generator)`` of a layer constructor.

    ``dtype``: ``None`` (torch's default) or a floating dtype; ``device``: ``None`` (torch's default device)
    or anything :func:`ntk_theory._checks.check_device` accepts; ``generator``: an int seed, a
    ``torch.Generator`` or ``None`` (:func:`ntk_theory._checks.as_generator`), seeded on ``device``.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"dtype: got {dtype!r}; expected None or a real floating torch.dtype (torch.float32, torch.float64)")
    dev = None if device is None else check_device(device, "device")
    gen = as_generator(generator, "generator", dev if dev is not None else "cpu")
    if gen is not None and dev is not None and gen.device.type != dev.type:
        raise ValueError(f"generator: on device {gen.device}, but the layer is created on {dev}; "
                         "pass a generator of that device or an int seed")
    return dtype, dev, gen


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
        dtype, device, generator = _factory_args(dtype, device, generator)
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
        dtype, device, generator = _factory_args(dtype, device, generator)
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


class ErfActivation(nn.Module):
    """Elementwise ``erf`` (the module; :func:`ntk_theory.infinite.Erf` is its closed-form kernel layer)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.erf(h)


def gains(module: nn.Module) -> tuple[float, float] | None:
    """``(weight_gain, bias_gain)`` of an affine module: the one gains protocol.

    A layer computes ``op(h, weight_gain * W, bias_gain * b)``: :class:`NTKLinear` / :class:`NTKConv2d`
    give ``(sigma_w / sqrt(fan_in), sigma_b)``, a plain ``nn.Linear`` / ``nn.Conv2d`` (whose class has not
    overridden ``forward``) gives ``(1.0, 1.0)``; anything else (an activation, a container, a layer
    with a forward of its own) gives ``None``: its computation is not known to be of that form.
    """
    fwd = getattr(type(module), "forward", None)
    if isinstance(module, (NTKLinear, NTKConv2d)) and fwd in (NTKLinear.forward, NTKConv2d.forward):
        return float(module.weight_gain), float(module.bias_gain)
    if isinstance(module, (nn.Linear, nn.Conv2d)) and fwd in (nn.Linear.forward, nn.Conv2d.forward):
        return 1.0, 1.0
    return None


def finite_mlp(d_in: int, width: int, depth: int, out_features: int = 1, *, activation: str = "relu",
               sigma_w: float = 2 ** 0.5, sigma_b: float = 0.0, alpha: float = 0.01,
               generator: int | torch.Generator | None = None, dtype: torch.dtype = torch.float64,
               device: str | torch.device = "cpu") -> nn.Sequential:
    """Finite MLP in the NTK parameterisation: ``depth`` x (NTKLinear, activation), then an NTKLinear readout.

    A thin wrapper: ``mlp(depth, activation, sigma_w, sigma_b, alpha=alpha).finite((d_in,), width,
    out_features=..., generator=..., dtype=..., device=...)`` (:func:`ntk_theory.infinite.mlp`), so its
    empirical NTK converges, as ``width -> inf``, to that kernel (times the identity over the
    ``out_features`` outputs). Argument order as :func:`finite_cnn`: input, width, depth, outputs.
    ``activation`` must have a closed-form kernel (:func:`ntk_theory.activations.names` with ``kernel=True``).
    """
    from .infinite import mlp
    d_in = check_int(d_in, "d_in", minimum=1)
    return mlp(depth, activation, sigma_w, sigma_b, alpha=alpha).finite(
        (d_in,), width, out_features=out_features, generator=generator, dtype=dtype, device=device)


def finite_cnn(in_shape: tuple[int, int, int], width: int, depth: int, out_features: int = 1, *,
               kernel_size: int = 3, readout: str = "flatten", activation: str = "relu",
               sigma_w: float = 2 ** 0.5, sigma_b: float = 0.0, alpha: float = 0.01,
               generator: int | torch.Generator | None = None, dtype: torch.dtype = torch.float64,
               device: str | torch.device = "cpu") -> nn.Sequential:
    """Finite CNN: ``depth`` x (NTKConv2d with ``width`` channels, activation), ``readout`` in
    {"flatten", "gap"}, NTKLinear readout; ``in_shape = (C, H, W)`` per example.

    A thin wrapper: ``serial(*[Conv(kernel_size, sigma_w, sigma_b), act] * depth,
    Flatten() | GlobalAvgPool(), Dense(sigma_w, sigma_b)).finite(in_shape, width, ...)``; its
    empirical NTK converges to that kernel. Argument order as :func:`finite_mlp`.
    """
    from .infinite import Conv, Dense, Flatten, GlobalAvgPool, serial
    from .activations import get
    if not isinstance(in_shape, (tuple, list, torch.Size)):
        raise TypeError(f"in_shape: expected the per-example image shape (C, H, W), got {in_shape!r}; the arguments are "
                        "finite_cnn(in_shape, width, depth, out_features=1, ...), as finite_mlp's")
    depth = check_int(depth, "depth", minimum=1)
    check_choice(readout, "readout", ("flatten", "gap"))
    act = get(activation, kernel=True)
    body = []
    for _ in range(depth):
        body += [Conv(kernel_size, sigma_w, sigma_b), act.kernel_layer(alpha)]
    head = Flatten() if readout == "flatten" else GlobalAvgPool()
    return serial(*body, head, Dense(sigma_w, sigma_b)).finite(
        in_shape, width, out_features=out_features, generator=generator, dtype=dtype, device=device)

r"""Hypothesis strategies for property tests of NTK code: architectures (closed-form kernels and
their finite networks), PSD kernel matrices with a controlled spectrum, masks, input batches and
attack configurations.

``hypothesis`` is an optional dependency (``pip install hypothesis``, or ``pip install 'awt[test]'``);
importing this module without it raises an ``ImportError`` that says so.

Every strategy draws what it shrinks well (sizes, spectra, radii, depths) with hypothesis and the
bulk randomness (orthogonal bases, Gaussian weights, points) from an integer seed it also draws,
through a ``torch.Generator``: examples are reproducible, and under a derandomised profile (awt's
``tests/conftest.py``) deterministic. Tensors are float64 on the CPU unless ``dtype`` says
otherwise.

Ranges. A parameter given as a number is fixed; a ``(low, high)`` pair is a closed range to draw
from (integers uniformly, positive scales such as ``eps`` or ``condition`` log-uniformly); a
hypothesis strategy is used as it is. A bad range raises ``ValueError`` naming the parameter when
the strategy is built, not when it is drawn.

Example (docs/theory.md §C, C6: the dynamics perturbation bound holds for any two PSD kernels
with :math:`\lambda_{min} \ge 10^{-3}`)::

    from hypothesis import given
    from ntk_theory.dynamics import expm_gap, expm_gap_bound
    from ntk_theory.testing import psd_pairs

    @given(psd_pairs(n=(1, 8), lambda_min=1e-3, condition=(1.0, 1e4)))
    def test_c6_bound(pair):
        a, b = pair
        assert float(expm_gap(a, b, [0.0, 1.0, 10.0]).max()) <= float(expm_gap_bound(a, b)) * (1 + 1e-9)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - exercised with a monkeypatched sys.modules
    raise ImportError("ntk_theory.testing needs hypothesis, an optional dependency of awt: "
                      "pip install hypothesis (or pip install 'awt[test]')") from exc

import torch
from torch import nn

__all__ = ["Architecture", "AttackConfig", "mlp_architectures", "cnn_architectures", "architectures",
           "finite_networks", "psd_matrices", "psd_pairs", "train_test_kernels", "masks", "box_inputs",
           "sphere_inputs", "attack_configs", "seeds"]

SEED_MAX = 2 ** 31 - 1


# --------------------------------------------------------------------------------------------- ranges
def _ints(value, name: str, minimum: int) -> st.SearchStrategy[int]:
    if isinstance(value, st.SearchStrategy):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int or a (low, high) pair of ints, got {value!r}")
    if isinstance(value, int):
        if value < minimum:
            raise ValueError(f"{name}: got {value}; expected an integer >= {minimum}")
        return st.just(value)
    lo, hi = _pair(value, name)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
        raise TypeError(f"{name}: expected an int or a (low, high) pair of ints, got {value!r}")
    if not minimum <= lo <= hi:
        raise ValueError(f"{name}: got ({lo}, {hi}); expected {minimum} <= low <= high")
    return st.integers(lo, hi)


def _floats(value, name: str, *, minimum: float = -math.inf, positive: bool = False,
            log: bool = False) -> st.SearchStrategy[float]:
    if isinstance(value, st.SearchStrategy):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        if not math.isfinite(v) or v < minimum or (positive and v <= 0):
            raise ValueError(f"{name}: got {value!r}; expected a finite number "
                             + ("> 0" if positive else f">= {minimum:g}"))
        return st.just(v)
    lo, hi = (float(v) for v in _pair(value, name))
    if not (math.isfinite(lo) and math.isfinite(hi) and minimum <= lo <= hi) or (positive and lo <= 0):
        raise ValueError(f"{name}: got ({lo:g}, {hi:g}); expected finite "
                         + ("0 < " if positive else f"{minimum:g} <= ") + "low <= high")
    if lo == hi:
        return st.just(lo)
    if log:
        a, b = math.log(lo), math.log(hi)
        return st.floats(a, b).map(lambda t: min(hi, max(lo, math.exp(t))))
    return st.floats(lo, hi)


def _pair(value, name: str) -> tuple[Any, Any]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, a (low, high) pair or a hypothesis strategy, "
                        f"got {value!r}") from None
    return lo, hi


def _choices(value, name: str, accepted: Sequence[str]) -> st.SearchStrategy[str]:
    if isinstance(value, st.SearchStrategy):
        return value
    vals = (value,) if isinstance(value, str) else tuple(value)
    if not vals:
        raise ValueError(f"{name}: empty; accepted values are {', '.join(map(repr, accepted))}")
    for v in vals:
        if v not in accepted:
            raise ValueError(f"{name}: got {v!r}; accepted values are {', '.join(map(repr, accepted))}")
    return st.sampled_from(vals)


def seeds() -> st.SearchStrategy[int]:
    """Integer seeds in ``[0, 2**31 - 1]`` (for ``torch.Generator().manual_seed``)."""
    return st.integers(0, SEED_MAX)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# --------------------------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Architecture:
    """One network in the NTK parameterisation, as a closed-form kernel and as a finite network.

    ``kernel`` is the :class:`ntk_theory.infinite.KernelFn`; ``in_shape`` the per-example input
    shape (``(d,)`` for an MLP, ``(C, H, W)`` for a CNN); the other fields describe it (``kind`` is
    ``"mlp"`` or ``"cnn"``; ``kernel_size`` and ``readout`` (``"flatten"`` | ``"gap"``) are CNN
    fields, None for MLPs). :meth:`finite` builds the matching finite network with
    :meth:`KernelFn.finite <ntk_theory.infinite.KernelFn.finite>`, whose empirical NTK converges
    to ``kernel`` as ``width`` grows.
    """

    kind: str
    kernel: Any
    in_shape: tuple[int, ...]
    depth: int
    activation: str
    sigma_w: float
    sigma_b: float
    kernel_size: int | None = None
    readout: str | None = None

    def finite(self, width: int, *, out_features: int = 1, generator: int | torch.Generator | None = 0,
               dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> nn.Sequential:
        """The finite network of this architecture at ``width`` (``KernelFn.finite``)."""
        return self.kernel.finite(self.in_shape, width, out_features=out_features, generator=generator,
                                  dtype=dtype, device=device)

    def inputs(self, n: int, generator: int | torch.Generator = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``n`` standard-normal inputs of shape ``(n, *in_shape)``."""
        g = _gen(generator) if isinstance(generator, int) else generator
        return torch.randn(n, *self.in_shape, generator=g, dtype=dtype)


def _kernel_activations() -> tuple[str, ...]:
    from . import activations
    return tuple(activations.names(kernel=True))


@st.composite
def _mlp(draw, depth, activations, sigma_w, sigma_b, d_in):
    from .infinite import mlp
    L, act = draw(depth), draw(activations)
    sw, sb, d = draw(sigma_w), draw(sigma_b), draw(d_in)
    return Architecture("mlp", mlp(L, act, sw, sb), (d,), L, act, sw, sb)


def mlp_architectures(*, depth=(0, 3), activations=("relu", "erf", "leaky_relu"), sigma_w=(0.5, 2.0),
                      sigma_b=(0.0, 0.5), d_in=(1, 8)) -> st.SearchStrategy[Architecture]:
    r"""MLPs ``mlp(depth, activation, sigma_w, sigma_b)`` (:func:`ntk_theory.infinite.mlp`) on ``(d_in,)`` inputs.

    Parameters
    ----------
    depth : int or (low, high)
        Hidden layers, >= 0 (0: a single Dense readout, a linear kernel).
    activations : str or sequence of str
        Names from :mod:`ntk_theory.activations` that have a closed-form kernel
        (``activations.names(kernel=True)``).
    sigma_w, sigma_b : float or (low, high)
        Weight and bias standard deviations (:math:`\sigma_w > 0`, :math:`\sigma_b \ge 0`).
    d_in : int or (low, high)
        Input dimension, >= 1.
    """
    acts = _choices(activations, "activations", _kernel_activations())
    return _mlp(_ints(depth, "depth", 0), acts, _floats(sigma_w, "sigma_w", positive=True),
                _floats(sigma_b, "sigma_b", minimum=0.0), _ints(d_in, "d_in", 1))


@st.composite
def _cnn(draw, depth, activations, sigma_w, sigma_b, channels, image_size, kernel_sizes, readouts):
    from . import activations as acts_mod
    from .infinite import Conv, Dense, Flatten, GlobalAvgPool, serial
    L, act = draw(depth), draw(activations)
    sw, sb, c = draw(sigma_w), draw(sigma_b), draw(channels)
    h, w = draw(image_size), draw(image_size)
    k, readout = draw(kernel_sizes), draw(readouts)
    layers = []
    for _ in range(L):
        layers += [Conv(k, sw, sb), acts_mod.get(act).kernel_layer()]
    layers += [Flatten() if readout == "flatten" else GlobalAvgPool(), Dense(sw, sb)]
    return Architecture("cnn", serial(*layers), (c, h, w), L, act, sw, sb, kernel_size=k, readout=readout)


def cnn_architectures(*, depth=(1, 2), activations=("relu", "erf"), sigma_w=(0.5, 2.0), sigma_b=(0.0, 0.5),
                      channels=(1, 3), image_size=(2, 4), kernel_sizes=(1, 3), readouts=("flatten", "gap")
                      ) -> st.SearchStrategy[Architecture]:
    r"""CNNs ``serial([Conv(k, sigma_w, sigma_b), activation] * depth, Flatten() | GlobalAvgPool(), Dense())``.

    Parameters
    ----------
    depth : int or (low, high)
        Convolutional layers, >= 1.
    activations : str or sequence of str
        Activation names with a closed-form kernel (:mod:`ntk_theory.activations`).
    sigma_w, sigma_b : float or (low, high)
        As for :func:`mlp_architectures`.
    channels : int or (low, high)
        Input channels C, >= 1.
    image_size : int or (low, high)
        Height and width (drawn separately), >= 1. The closed form costs :math:`(HW)^2` per pair
        with ``"gap"``: keep it small.
    kernel_sizes : sequence of odd ints
        Filter sizes to choose from ('SAME' padding, stride 1).
    readouts : sequence of {"flatten", "gap"}
        ``Flatten()`` or ``GlobalAvgPool()`` before the Dense readout.
    """
    if isinstance(kernel_sizes, int):
        kernel_sizes = (kernel_sizes,)
    if not isinstance(kernel_sizes, st.SearchStrategy):
        ks = tuple(kernel_sizes)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(f"kernel_sizes: got {kernel_sizes!r}; expected odd positive ints")
        kernel_sizes = st.sampled_from(ks)
    return _cnn(_ints(depth, "depth", 1), _choices(activations, "activations", _kernel_activations()),
                _floats(sigma_w, "sigma_w", positive=True), _floats(sigma_b, "sigma_b", minimum=0.0),
                _ints(channels, "channels", 1), _ints(image_size, "image_size", 1), kernel_sizes,
                _choices(readouts, "readouts", ("flatten", "gap")))


def architectures(**kwargs) -> st.SearchStrategy[Architecture]:
    """MLPs or CNNs with the defaults of :func:`mlp_architectures` and :func:`cnn_architectures`;
    ``mlp=dict(...)`` and ``cnn=dict(...)`` pass parameters to each."""
    unknown = set(kwargs) - {"mlp", "cnn"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: not a parameter; accepted: mlp, cnn (dicts of their parameters)")
    return st.one_of(mlp_architectures(**kwargs.get("mlp", {})), cnn_architectures(**kwargs.get("cnn", {})))


@st.composite
def _finite(draw, archs, width, out_features, dtype):
    arch = draw(archs)
    return arch, arch.finite(draw(width), out_features=draw(out_features), generator=draw(seeds()), dtype=dtype)


def finite_networks(architectures: st.SearchStrategy[Architecture] | None = None, *, width=(2, 16),
                    out_features=1, dtype: torch.dtype = torch.float64
                    ) -> st.SearchStrategy[tuple[Architecture, nn.Sequential]]:
    """``(architecture, network)`` pairs: the finite network of each drawn architecture (random weights).

    Parameters
    ----------
    architectures : strategy of Architecture
        Default :func:`mlp_architectures`.
    width : int or (low, high)
        Hidden units (MLP) or channels (CNN), >= 1.
    out_features : int or (low, high)
        Outputs of the readout, >= 1.
    dtype : torch.dtype
        Of the parameters.
    """
    return _finite(mlp_architectures() if architectures is None else architectures, _ints(width, "width", 1),
                   _ints(out_features, "out_features", 1), dtype)


# --------------------------------------------------------------------------------------------- PSD kernels
def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))      # Haar-distributed


def _spectrum(draw, n, rank, lambda_min, condition):
    r = n if rank is None else min(draw(rank), n)
    lo, cond = draw(lambda_min), draw(condition)
    if r == 1:
        lam = [lo]
    else:
        inner = sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=r - 2, max_size=r - 2)))
        lam = [lo * cond ** t for t in [0.0, *inner, 1.0]]     # log-spaced between lambda_min and cond * lambda_min
    return torch.tensor(lam + [0.0] * (n - r), dtype=torch.float64)


def _psd(lam: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    k = (q * lam) @ q.T
    return 0.5 * (k + k.T)


@st.composite
def _psd_matrices(draw, n, rank, lambda_min, condition, dtype):
    size = draw(n)
    lam = _spectrum(draw, size, rank, lambda_min, condition)
    return _psd(lam, _orthogonal(size, draw(seeds()))).to(dtype)


def psd_matrices(*, n=(1, 8), lambda_min=(1e-3, 1.0), condition=(1.0, 1e4), rank=None,
                 dtype: torch.dtype = torch.float64) -> st.SearchStrategy[torch.Tensor]:
    r"""Symmetric PSD ``(n, n)`` matrices :math:`Q\,\mathrm{diag}(\lambda)\,Q^\top` with a chosen spectrum.

    :math:`Q` is Haar-random (QR of a Gaussian matrix). The nonzero eigenvalues run from
    :math:`\lambda_{min}` to exactly :math:`\kappa\,\lambda_{min}` (the condition number of the
    nonzero part is :math:`\kappa`), the others drawn log-uniformly between them; ``rank < n``
    sets the remaining ``n - rank`` eigenvalues to 0. The matrix is symmetrised exactly; its
    computed eigenvalues carry float64 rounding (about ``1e-16 * kappa * lambda_min``).

    Parameters
    ----------
    n : int or (low, high)
        Size, >= 1.
    lambda_min : float or (low, high)
        Smallest nonzero eigenvalue, > 0 (drawn log-uniformly).
    condition : float or (low, high)
        :math:`\kappa = \lambda_{max}/\lambda_{min}` of the nonzero part, >= 1 (log-uniformly).
    rank : None, int or (low, high)
        Number of nonzero eigenvalues (capped at n); None: full rank.
    dtype : torch.dtype
        Of the result (built in float64, then cast).
    """
    return _psd_matrices(_ints(n, "n", 1), None if rank is None else _ints(rank, "rank", 1),
                         _floats(lambda_min, "lambda_min", positive=True, log=True),
                         _floats(condition, "condition", minimum=1.0, log=True), dtype)


@st.composite
def _psd_pairs(draw, n, lambda_min, condition, perturbation, dtype):
    size = draw(n)
    a_lam = _spectrum(draw, size, None, lambda_min, condition)
    a = _psd(a_lam, _orthogonal(size, draw(seeds())))
    rel = draw(perturbation)
    lam_floor = float(a_lam[0])
    if rel is None:              # an independent second kernel with the same constraints
        b = _psd(_spectrum(draw, size, None, lambda_min, condition), _orthogonal(size, draw(seeds())))
    else:                        # B = A + E, ||E||_F = rel ||A||_F, eigenvalues raised to A's lambda_min
        e = torch.randn(size, size, generator=_gen(draw(seeds())), dtype=torch.float64)
        e = 0.5 * (e + e.T)
        e = e * (rel * float(a.norm()) / max(float(e.norm()), 1e-300))
        lam, v = torch.linalg.eigh(a + e)
        b = _psd(torch.clamp(lam, min=lam_floor), v)
    return a.to(dtype), b.to(dtype)


def psd_pairs(*, n=(1, 8), lambda_min=(1e-3, 1.0), condition=(1.0, 1e4), perturbation=None,
              dtype: torch.dtype = torch.float64) -> st.SearchStrategy[tuple[torch.Tensor, torch.Tensor]]:
    r"""Pairs ``(A, B)`` of positive definite ``(n, n)`` matrices, both with :math:`\lambda_{min} \ge`
    the drawn ``lambda_min`` (up to rounding) — the hypothesis of the dynamics perturbation lemma (C6).

    Parameters
    ----------
    n, lambda_min, condition : as for :func:`psd_matrices`
        ``A`` is drawn as there (full rank).
    perturbation : None, float or (low, high)
        None: ``B`` is an independent draw with the same constraints. A relative size
        :math:`\rho \ge 0`: ``B = A + E`` with a random symmetric ``E``, :math:`\|E\|_F = \rho\|A\|_F`,
        whose eigenvalues below :math:`\lambda_{min}(A)` are then raised to it (so ``B`` is a
        nearby kernel, as a sparse network's NTK is to the dense one's).
    dtype : torch.dtype
        Of the results.
    """
    pert = st.just(None) if perturbation is None else _floats(perturbation, "perturbation", minimum=0.0)
    return _psd_pairs(_ints(n, "n", 1), _floats(lambda_min, "lambda_min", positive=True, log=True),
                      _floats(condition, "condition", minimum=1.0, log=True), pert, dtype)


@st.composite
def _joint(draw, n, m, lambda_min, condition, dtype):
    nt, mt = draw(n), draw(m)
    lam = _spectrum(draw, nt + mt, None, lambda_min, condition)
    k = _psd(lam, _orthogonal(nt + mt, draw(seeds()))).to(dtype)
    return k[:nt, :nt].clone(), k[nt:, :nt].clone(), k[nt:, nt:].clone()


def train_test_kernels(*, n=(1, 6), m=(1, 3), lambda_min=(1e-2, 1.0), condition=(1.0, 1e3),
                       dtype: torch.dtype = torch.float64
                       ) -> st.SearchStrategy[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    r"""``(K(X, X), K(X*, X), K(X*, X*))`` blocks of one positive definite kernel on ``n + m`` points.

    The joint ``(n + m, n + m)`` matrix is drawn by :func:`psd_matrices` (full rank, so the train
    block has :math:`\lambda_{min} \ge` that of the joint matrix): the blocks are those of a real
    kernel on train and test points, as the linearised dynamics (C11) take them.

    Parameters
    ----------
    n, m : int or (low, high)
        Training and test points, >= 1.
    lambda_min, condition : as for :func:`psd_matrices`
        Of the joint matrix.
    """
    return _joint(_ints(n, "n", 1), _ints(m, "m", 1), _floats(lambda_min, "lambda_min", positive=True, log=True),
                  _floats(condition, "condition", minimum=1.0, log=True), dtype)


# --------------------------------------------------------------------------------------------- masks
@st.composite
def _masks(draw, model, density, skip_first, layerwise, include_bias):
    from .masks import random_mask
    return random_mask(model, draw(density), generator=draw(seeds()), skip_first=skip_first, layerwise=layerwise,
                       include_bias=include_bias)


def masks(model: nn.Module, density=(0.05, 1.0), *, skip_first: bool = True, layerwise: bool = True,
          include_bias: bool = False) -> st.SearchStrategy[dict[str, torch.Tensor]]:
    """Random masks of ``model`` (:func:`ntk_theory.masks.random_mask`: ``{name: BoolTensor}``, True = kept).

    Parameters
    ----------
    model : nn.Module
        The network the masks are for (not modified).
    density : float or (low, high)
        Keep-probability q in (0, 1]; with ``layerwise`` every masked tensor keeps exactly
        ``max(1, round(q * numel))`` entries.
    skip_first, layerwise, include_bias : bool
        As for ``random_mask`` (the first layer is left dense by default: docs/theory.md §B.7).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    q = _floats(density, "density", positive=True)
    if not isinstance(density, st.SearchStrategy):
        hi = density if isinstance(density, (int, float)) else _pair(density, "density")[1]
        if float(hi) > 1:
            raise ValueError(f"density: got {density!r}; expected values in (0, 1]")
    return _masks(model, q, skip_first, layerwise, include_bias)


# --------------------------------------------------------------------------------------------- inputs
@st.composite
def _box(draw, n, shape, low, high, dtype):
    size = draw(n)
    u = torch.rand(size, *shape, generator=_gen(draw(seeds())), dtype=torch.float64)
    return (low + (high - low) * u).to(dtype)


def box_inputs(*, n=(1, 8), shape=(4,), low: float = 0.0, high: float = 1.0,
               dtype: torch.dtype = torch.float64) -> st.SearchStrategy[torch.Tensor]:
    """Batches ``(n, *shape)`` uniform in the box ``[low, high]`` (images in [0, 1] by default).

    Parameters
    ----------
    n : int or (low, high)
        Batch size, >= 1.
    shape : tuple of int
        Per-example shape, e.g. ``(d,)`` or ``(C, H, W)``.
    low, high : float
        The box, ``low < high``.
    """
    shape = tuple(shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape: got {shape!r}; expected a tuple of positive ints")
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"low, high: got ({low!r}, {high!r}); expected finite low < high")
    return _box(_ints(n, "n", 1), shape, float(low), float(high), dtype)


def _min_angle(x: torch.Tensor) -> float:
    if x.shape[0] < 2:
        return math.pi
    u = x / x.norm(dim=1, keepdim=True)
    d = (u[:, None, :] - u[None, :, :]).norm(dim=-1)
    d.fill_diagonal_(math.inf)
    return float(2 * torch.asin(torch.clamp(d.min() / 2, max=1.0)))


@st.composite
def _sphere(draw, n, d, radius, min_angle, dtype):
    size, dim = draw(n), draw(d)
    x = torch.randn(size, dim, generator=_gen(draw(seeds())), dtype=torch.float64)
    r = math.sqrt(dim) if radius is None else radius
    x = x / x.norm(dim=1, keepdim=True) * r
    if min_angle:
        from hypothesis import assume
        assume(_min_angle(x) >= min_angle)
    return x.to(dtype)


def sphere_inputs(*, n=(1, 8), d=(2, 8), radius: float | None = None, min_angle: float = 0.0,
                  dtype: torch.dtype = torch.float64) -> st.SearchStrategy[torch.Tensor]:
    r"""Batches ``(n, d)`` uniform on the sphere of radius ``radius`` (default :math:`\sqrt d`, so that
    :math:`\|x\|^2 = d` and the first layer's variance is :math:`\sigma_w^2` in the NTK parameterisation).

    Parameters
    ----------
    n : int or (low, high)
        Points, >= 1.
    d : int or (low, high)
        Dimension, >= 1 (d = 1: the two points :math:`\pm r`).
    radius : float or None
        > 0.
    min_angle : float
        Reject batches whose smallest pairwise angle (radians) is below it (C12: distinct,
        non-parallel points). Keep it modest for many points in few dimensions, or hypothesis
        will fail its health check.
    """
    if radius is not None and not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius: got {radius!r}; expected a finite number > 0 or None")
    if not (0.0 <= min_angle < math.pi):
        raise ValueError(f"min_angle: got {min_angle!r}; expected 0 <= min_angle < pi")
    return _sphere(_ints(n, "n", 1), _ints(d, "d", 1), None if radius is None else float(radius),
                   float(min_angle), dtype)


# --------------------------------------------------------------------------------------------- attacks
@dataclass(frozen=True)
class AttackConfig:
    """One attack configuration; ``kwargs()`` is what :func:`ntk_theory.attacks.pgd` takes
    (``pgd(f, x, y, **cfg.kwargs())``); ``fgsm_kwargs()`` the subset :func:`~ntk_theory.attacks.fgsm` takes."""

    norm: str
    eps: float
    steps: int
    alpha: float | None
    random_start: bool

    def kwargs(self) -> dict[str, Any]:
        return dict(eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm, random_start=self.random_start)

    def fgsm_kwargs(self) -> dict[str, Any]:
        return dict(eps=self.eps, norm=self.norm)


@st.composite
def _attacks(draw, norms, eps, steps, alpha_fraction, random_start):
    e = draw(eps)
    frac = draw(alpha_fraction)
    return AttackConfig(norm=draw(norms), eps=e, steps=draw(steps), alpha=None if frac is None else e * frac,
                        random_start=draw(random_start))


def attack_configs(*, norms=("linf", "l2"), eps=(1e-3, 0.3), steps=(1, 10), alpha_fraction=None,
                   random_start=None) -> st.SearchStrategy[AttackConfig]:
    """Attack configurations (:class:`AttackConfig`).

    Parameters
    ----------
    norms : str or sequence of {"linf", "l2"}
        Threat models.
    eps : float or (low, high)
        Radius, > 0 (drawn log-uniformly).
    steps : int or (low, high)
        PGD iterations, >= 1.
    alpha_fraction : None, float or (low, high)
        Step size as a fraction of ``eps``, > 0; None: ``alpha=None`` (pgd's default, 2.5 eps / steps).
    random_start : None or bool
        None draws both.
    """
    frac = st.just(None) if alpha_fraction is None else _floats(alpha_fraction, "alpha_fraction", positive=True)
    if random_start is None:
        rs = st.booleans()
    elif isinstance(random_start, bool):
        rs = st.just(random_start)
    else:
        raise TypeError(f"random_start: expected None or a bool, got {random_start!r}")
    return _attacks(_choices(norms, "norms", ("linf", "l2")), _floats(eps, "eps", positive=True, log=True),
                    _ints(steps, "steps", 1), frac, rs)

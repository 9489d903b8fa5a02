"""Linearised training dynamics under MSE in closed form (Jacot et al. 2018; Lee et al. 2019; docs/theory.md §B.4).

Loss convention (the one used by every function of this module, and by awt's
training code). For training inputs ``X`` (``N`` points) and targets ``Y``
(``(N,)`` or ``(N, O)``)::

    L(θ) = (1 / (2c)) · ||f_θ(X) - Y||_F^2,   c = Y.numel() = N·O   (normalization="size")
                                               c = 1                  (normalization="none")

``"size"`` is neural-tangents' convention (``predict.gradient_descent_mse``: the
exponent is ``-Θ η t / y_train.size``); ``"none"`` is Lee et al.'s. Gradient
flow ``θ' = -η ∇L`` (``η = lr``) and gradient descent ``θ_{k+1} = θ_k - η ∇L``
on the linearised model ``f^lin_θ = f_0 + J_0 (θ - θ_0)`` give, with the NTK
``Θ = J_0(X) J_0(X)^T`` and the **scaled time** ``τ = η t / c``::

    flow, train:  f_τ(X) = Y + e^{-Θτ} (f_0(X) - Y)
    flow, test:   f_τ(x) = f_0(x) - Θ(x, X) Θ^{-1} (I - e^{-Θτ}) (f_0(X) - Y)
    GD, k steps:  e^{-Θτ} -> (I - (η/c) Θ)^k        (stable iff η < 2c / λ_max(Θ))

The matrix function ``Θ^{-1}(I - e^{-Θτ}) = V diag(φ(λ)) V^T`` is applied in the
eigenbasis ``Θ = V diag(λ) V^T`` with ``φ(λ) = -expm1(-λτ)/λ``, whose limit
``φ(0) = τ`` is used for a zero eigenvalue, so singular kernels give finite
results (as neural-tangents' ``_inv_expm1_fn``); for GD ``φ(λ) = (1 - (1 - aλ)^k)/λ``,
``a = η/c``, ``φ(0) = a·k``, through ``expm1(k·log1p(-aλ))``. Eigenvalues are
clipped at 0 after the PSD check. At ``t = inf`` the test prediction is the
kernel regression ``f_0(x) - Θ(x, X) (Θ + diag_reg·I)^{-1} (f_0(X) - Y)``, a
Cholesky solve; a singular (unregularised) ``Θ`` falls back to the
pseudo-inverse (eigenvalues below ``N·eps·λ_max`` count as zero), the limit of
the flow.

``diag_reg`` (absolute, ``>= 0``) is added to ``Θ(X, X)`` for the whole training
dynamics (as in neural-tangents), not to ``Θ(x, X)``.

Kernels: ``(N, N)`` acts on each output column independently (``Θ ⊗ I_O``, the
infinite-width structure); ``(N, N, O, O)`` is the full multi-output kernel,
flattened to ``(N·O, N·O)`` with index ``i·O + a`` (:func:`ntk_theory.metrics.as_matrix`).
Everything is computed in float64 and returned in the inputs' promoted dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jvp

from ._checks import (as_tensor, cast_like_model, check_choice, check_deterministic_forward, check_finite, check_nonnegative,
                      check_positive, check_rank, check_real)
from .io import Result
from .masks import validate_params

__all__ = [
    "NORMALIZATIONS",
    "loss_scale",
    "FlowResult",
    "GaussianMoments",
    "gradient_flow_mse",
    "gradient_descent_mse",
    "infinite_width_moments",
    "expm_gap",
    "expm_gap_bound",
    "LinearizedModel",
    "linearize",
]

NORMALIZATIONS = ("size", "none")


def loss_scale(y, normalization: str = "size") -> float:
    """The ``c`` of ``L = (1/(2c)) ||f(X) - Y||_F^2``: ``y.numel()`` for ``"size"``, ``1`` for ``"none"``."""
    check_choice(normalization, "normalization", NORMALIZATIONS)
    return float(as_tensor(y, "y").numel()) if normalization == "size" else 1.0


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class FlowResult(Result):
    """Outputs of the linearised model along training.

    Attributes:
        t: ``(T,)`` times (gradient flow) or step counts (gradient descent).
        tau: ``(T,)`` scaled times ``lr·t/c``.
        f_train: ``(T, *y.shape)`` training outputs.
        f_test: ``(T, M, *y.shape[1:])`` test outputs, or ``None``.
        loss_train: ``(T,)`` training loss ``(1/(2c)) ||f_train - Y||_F^2``.
        lr, c, normalization: the convention used.

    A frozen :class:`ntk_theory.io.Result`: ``to_dict()`` gives the fields as nested lists.
    """

    t: torch.Tensor
    tau: torch.Tensor
    f_train: torch.Tensor
    f_test: torch.Tensor | None
    loss_train: torch.Tensor
    lr: float
    c: float
    normalization: str


@dataclass(frozen=True)
class GaussianMoments(Result):
    """Mean and covariance of the infinite-width output distribution along training (Lee et al. 2019, eqs. 15-16).

    Attributes:
        t, tau: ``(T,)`` times and scaled times.
        mean: ``(T, M, *y.shape[1:])`` mean ``μ_t(x)``.
        cov: ``(T, M, M)`` covariance ``Σ_t(x, x')``, the same for every output
            (outputs are independent at infinite width).
        lr, c, normalization: the convention used.

    A frozen :class:`ntk_theory.io.Result`: ``to_dict()`` gives the fields as nested lists.
    """

    t: torch.Tensor
    tau: torch.Tensor
    mean: torch.Tensor
    cov: torch.Tensor
    lr: float
    c: float
    normalization: str


# --------------------------------------------------------------------------------------------- validation
def _psd_rtol(n: int, dtype: torch.dtype, psd_rtol: float | None) -> float:
    if psd_rtol is not None:
        return check_nonnegative(psd_rtol, "psd_rtol")
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    return max(1e-10, 10.0 * n * eps)


def _flat_kernel(k, name: str, rank4_ok: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    k = check_real(as_tensor(k, name), name)
    check_rank(k, name, (2, 4) if rank4_ok else (2,), "a kernel (N1, N2)" + (" or (N1, N2, O, O)" if rank4_ok else ""))
    if k.dim() == 4 and k.shape[2] != k.shape[3]:
        raise ValueError(f"{name}: a multi-output kernel must have shape (N1, N2, O, O), got {tuple(k.shape)}")
    check_finite(k, name)
    if k.dim() == 4:
        n1, n2, o, _ = k.shape
        flat = k.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)
    else:
        flat = k
    return k, flat.to(torch.float64)


def _check_psd(flat: torch.Tensor, name: str, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetry and PSD check (``λ_min >= -rtol·max|λ|``); returns the clipped eigenpairs of the symmetrised matrix."""
    if flat.shape[0] != flat.shape[1]:
        raise ValueError(f"{name}: expected a square kernel, got shape {tuple(flat.shape)}")
    scale = float(flat.abs().max()) if flat.numel() else 0.0
    asym = float((flat - flat.mT).abs().max()) if flat.numel() else 0.0
    if asym > rtol * scale:
        raise ValueError(f"{name}: expected a symmetric PSD kernel; max |K - K^T| = {asym:.3g} exceeds "
                         f"{rtol:.1e} * max|K| = {rtol * scale:.3g}")
    sym = 0.5 * (flat + flat.mT)
    lam, vec = torch.linalg.eigh(sym)
    lmax = float(lam.abs().max()) if lam.numel() else 0.0
    if lam.numel() and float(lam.min()) < -rtol * lmax:
        raise ValueError(f"{name}: expected a positive semi-definite kernel; smallest eigenvalue "
                         f"{float(lam.min()):.3g} < -{rtol:.1e} * max|λ| = {-rtol * lmax:.3g}")
    return torch.clamp(lam, min=0.0), vec


def _times(t, name: str, integer: bool = False) -> torch.Tensor:
    if isinstance(t, (int, float, np.integer, np.floating)) and not isinstance(t, bool):
        t = [float(t)]
    tt = check_real(as_tensor(t, name), name).to(torch.float64)
    if tt.dim() == 0:
        tt = tt.reshape(1)
    check_rank(tt, name, (1,), "a scalar or a vector of times")
    if bool(torch.isnan(tt).any()):
        raise ValueError(f"{name}: contains NaN; expected values in [0, inf]")
    if tt.numel() and float(tt.min()) < 0:
        raise ValueError(f"{name}: got a negative value {float(tt.min())!r}; accepted range is [0, inf]")
    if integer:
        if bool(torch.isinf(tt).any()) or bool((tt != torch.round(tt)).any()):
            raise ValueError(f"{name}: gradient descent needs finite non-negative integer step counts, got {tt.tolist()}")
    return tt


def _targets(y, n_rows: int, out: int | None, name: str = "y") -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` ``(N,)`` or ``(N, O)`` -> (original, ``(N, O)`` float64)."""
    y = check_real(as_tensor(y, name), name)
    check_rank(y, name, (1, 2), "targets (N,) or (N, O)")
    if y.numel() == 0:
        raise ValueError(f"{name}: got shape {tuple(y.shape)}; at least one training point and one output are needed")
    check_finite(y, name)
    if y.shape[0] != n_rows:
        raise ValueError(f"{name}: has {y.shape[0]} rows, the training kernel has {n_rows} points")
    y2 = y.reshape(y.shape[0], -1).to(torch.float64)
    if out is not None and y2.shape[1] != out:
        raise ValueError(f"{name}: has {y2.shape[1]} output(s) per point, the (N, N, O, O) kernel has O = {out}")
    return y, y2


# --------------------------------------------------------------------------------------------- core
class _Spectral:
    """Eigendecomposition of the (regularised) training kernel and the matrix functions of the dynamics."""

    def __init__(self, flat: torch.Tensor, name: str, diag_reg: float, rtol: float):
        lam, vec = _check_psd(flat, name, rtol)
        self.lam = lam + diag_reg  # eigenvalues of Θ + reg·I
        self.vec = vec
        self.reg = diag_reg
        self.flat = 0.5 * (flat + flat.mT)
        self.n = flat.shape[0]

    # decay E(λ) and φ(λ) = (1 - E(λ))/λ on a grid of scaled times (T, n)
    def flow_factors(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.lam[None, :]
        tt = tau[:, None]
        finite = torch.isfinite(tt)
        tt0 = torch.where(finite, tt, 0.0)
        lt = lam * tt0
        pos = lam > 0
        safe = torch.where(pos, lam, 1.0)
        decay_fin = torch.exp(-lt)
        phi_fin = torch.where(pos, -torch.expm1(-lt) / safe, tt0)  # φ(0) = τ
        pinv = self._pinv_mask()[None, :]
        decay_inf = torch.where(pinv, 0.0, 1.0).to(lam.dtype)
        phi_inf = torch.where(pinv, 1.0 / safe, 0.0)  # pseudo-inverse at τ = inf
        decay = torch.where(finite, decay_fin, decay_inf)
        phi = torch.where(finite, phi_fin, phi_inf)
        return decay, phi

    def gd_factors(self, steps: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.lam[None, :]
        k = steps[:, None]
        al = a * lam
        small = al < 1.0
        # (1 - aλ)^k = exp(k log1p(-aλ)) where aλ < 1 (accurate for tiny λ); a plain power otherwise
        log_q = torch.log1p(-torch.where(small, al, 0.0))
        decay_small = torch.exp(k * log_q)
        one_minus_small = -torch.expm1(k * log_q)
        decay_big = torch.pow(1.0 - al, k)
        decay = torch.where(small, decay_small, decay_big)
        one_minus = torch.where(small, one_minus_small, 1.0 - decay_big)
        pos = lam > 0
        phi = torch.where(pos, one_minus / torch.where(pos, lam, 1.0), (a * k).expand_as(one_minus))
        return decay, phi

    def _pinv_mask(self) -> torch.Tensor:
        lmax = float(self.lam.max()) if self.lam.numel() else 0.0
        return self.lam > self.n * torch.finfo(torch.float64).eps * lmax

    def chol(self):
        if not hasattr(self, "_chol"):
            m = self.flat + self.reg * torch.eye(self.n, dtype=self.flat.dtype)
            L, info = torch.linalg.cholesky_ex(m)
            self._chol = L if int(info) == 0 and self._pinv_mask().all() else None
        return self._chol

    def apply(self, diag: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``V diag(d_t) V^T rhs`` for every row ``d_t`` of ``diag`` (T, n); rhs (n, O) -> (T, n, O)."""
        coef = self.vec.mT @ rhs  # (n, O)
        return self.vec @ (diag[:, :, None] * coef[None])  # (T, n, O), no (T, n, n) intermediate


def _run(spec: _Spectral, taus: torch.Tensor, decay: torch.Tensor, phi: torch.Tensor, r0: torch.Tensor,
         kt: torch.Tensor | None, inf_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Residual ``E r0`` on train and ``Θ(x,X) Φ r0`` for test, rows with ``τ = inf`` through a Cholesky solve."""
    res = spec.apply(decay, r0)  # (T, n, O)
    test = None if kt is None else kt @ spec.apply(phi, r0)
    if bool(inf_rows.any()):
        L = spec.chol()
        if L is not None:
            alpha = torch.cholesky_solve(r0, L)
            res[inf_rows] = 0.0
            if test is not None:
                test[inf_rows] = (kt @ alpha)[None]
    return res, test


@dataclass(frozen=True)
class _Problem:
    """A validated linear-dynamics problem (what :func:`_prepare` hands to the solvers).

    ``spec``: the eigendecomposition of ``Θ(X, X) + diag_reg·I``; ``r0``: the initial residual
    ``f_0(X) - Y``, ``(N, O)`` (or ``(N·O, 1)`` for a multi-output kernel); ``y2``: ``Y`` as
    ``(N, O)`` float64 and ``y_orig`` as given; ``kx``: ``Θ(x, X)`` flattened to float64 (or
    None), ``m`` its number of test points, ``f0t`` the test outputs at initialisation in
    ``r0``'s layout; ``c``, ``lr``, ``normalization``: the loss convention; ``out_dtype``: the
    dtype of the results (the inputs' promoted floating dtype).
    """

    spec: "_Spectral"
    r0: torch.Tensor
    y2: torch.Tensor
    y_orig: torch.Tensor
    kx: torch.Tensor | None
    m: int | None
    f0t: torch.Tensor | None
    c: float
    lr: float
    out_dtype: torch.dtype
    normalization: str


def _prepare(k_train, y, f0, k_test_train, f0_test, lr, normalization, diag_reg, psd_rtol) -> _Problem:
    kt_orig, flat = _flat_kernel(k_train, "k_train")
    if kt_orig.shape[0] != kt_orig.shape[1]:
        raise ValueError(f"k_train: expected a square kernel (N, N) or (N, N, O, O), got {tuple(kt_orig.shape)}")
    n = kt_orig.shape[0]
    multi = kt_orig.dim() == 4
    o_k = kt_orig.shape[2] if multi else None
    y_orig, y2 = _targets(y, n, o_k)
    lr = check_positive(lr, "lr")
    check_choice(normalization, "normalization", NORMALIZATIONS)
    diag_reg = check_nonnegative(diag_reg, "diag_reg")
    c = loss_scale(y_orig, normalization)
    if f0 is None:
        f0_2 = torch.zeros_like(y2)
    else:
        f0_t = check_real(as_tensor(f0, "f0"), "f0")
        check_finite(f0_t, "f0")
        if f0_t.shape != y_orig.shape:
            raise ValueError(f"f0: shape {tuple(f0_t.shape)} does not match y's {tuple(y_orig.shape)}")
        f0_2 = f0_t.reshape(y2.shape).to(torch.float64)
    kx = None
    m = None
    f0t_2 = None
    if k_test_train is not None:
        kx_orig, kx = _flat_kernel(k_test_train, "k_test_train")
        if kx_orig.dim() != kt_orig.dim() or kx_orig.shape[1] != n or (multi and kx_orig.shape[2:] != kt_orig.shape[2:]):
            want = f"(M, {n}, {o_k}, {o_k})" if multi else f"(M, {n})"
            raise ValueError(f"k_test_train: expected shape {want} to match k_train {tuple(kt_orig.shape)}, "
                             f"got {tuple(kx_orig.shape)}")
        m = kx_orig.shape[0]
        if f0_test is None:
            if f0 is not None:
                raise ValueError("f0_test: required with f0 and k_test_train (the test outputs at initialisation); "
                                 "pass zeros explicitly for a zero-initialised predictor")
            f0t_2 = torch.zeros(m, y2.shape[1], dtype=torch.float64)
        else:
            f0t = check_real(as_tensor(f0_test, "f0_test"), "f0_test")
            check_finite(f0t, "f0_test")
            want = (m,) + tuple(y_orig.shape[1:])
            if tuple(f0t.shape) != want:
                raise ValueError(f"f0_test: expected shape {want}, got {tuple(f0t.shape)}")
            f0t_2 = f0t.reshape(m, -1).to(torch.float64)
    elif f0_test is not None:
        raise ValueError("f0_test: given without k_test_train")
    spec = _Spectral(flat, "k_train", diag_reg, _psd_rtol(flat.shape[0], kt_orig.dtype, psd_rtol))
    out_dtype = torch.promote_types(kt_orig.dtype, y_orig.dtype)
    if not out_dtype.is_floating_point:  # integer/bool inputs: the dynamics are real-valued
        out_dtype = torch.float64
    if multi:  # flatten residuals to (N·O, 1), index i·O + a
        r0 = (f0_2 - y2).reshape(-1, 1)
        f0t_flat = None if f0t_2 is None else f0t_2.reshape(-1, 1)
    else:
        r0 = f0_2 - y2
        f0t_flat = f0t_2
    return _Problem(spec=spec, r0=r0, y2=y2, y_orig=y_orig, kx=kx, m=m, f0t=f0t_flat, c=c, lr=lr,
                    out_dtype=out_dtype, normalization=normalization)


def _finish(p: _Problem, t, tau, decay, phi) -> FlowResult:
    inf_rows = torch.isinf(tau)
    res, test = _run(p.spec, tau, decay, phi, p.r0, p.kx, inf_rows)
    T = tau.shape[0]
    y2, y_orig = p.y2, p.y_orig
    res = res.reshape(T, *y2.shape)
    f_train = y2[None] + res
    loss = 0.5 * res.pow(2).sum(dim=(1, 2)) / p.c
    f_test = None
    if test is not None:
        f_test = (p.f0t[None] - test).reshape(T, p.m, *y_orig.shape[1:])
        f_test = f_test.to(p.out_dtype)
    return FlowResult(t=t, tau=tau, f_train=f_train.reshape(T, *y_orig.shape).to(p.out_dtype), f_test=f_test,
                      loss_train=loss.to(p.out_dtype), lr=p.lr, c=p.c, normalization=p.normalization)


# --------------------------------------------------------------------------------------------- public API
def gradient_flow_mse(k_train, y, t, *, f0=None, k_test_train=None, f0_test=None, lr: float = 1.0,
                      normalization: str = "size", diag_reg: float = 0.0, psd_rtol: float | None = None) -> FlowResult:
    """Closed-form gradient flow of the linearised model on the MSE loss (module docstring; docs/theory.md §B.4).

    ``f_τ(X) = Y + e^{-Θτ}(f_0(X) - Y)``, ``f_τ(x) = f_0(x) - Θ(x,X) Θ^{-1}(I - e^{-Θτ})(f_0(X) - Y)``,
    ``τ = lr·t/c``.

    Args:
        k_train: ``Θ(X, X)``, ``(N, N)`` or ``(N, N, O, O)``, symmetric PSD.
        y: targets ``(N,)`` or ``(N, O)``.
        t: a time or a vector of times ``>= 0``; ``inf`` gives the kernel-regression limit.
        f0: outputs at initialisation on ``X`` (``y``'s shape); default 0 (infinite-width ensemble mean).
        k_test_train: ``Θ(x, X)``, ``(M, N)`` or ``(M, N, O, O)``.
        f0_test: outputs at initialisation on the test points ``(M, *y.shape[1:])``;
            required when ``f0`` and ``k_test_train`` are given, else 0.
        lr: learning rate ``η > 0``.
        normalization: ``"size"`` (``c = y.numel()``) or ``"none"`` (``c = 1``).
        diag_reg: ``>= 0`` added to the diagonal of ``Θ(X, X)``.
        psd_rtol: PSD tolerance (``λ_min >= -psd_rtol·max|λ|``); default ``max(1e-10, 10·N·eps(dtype))``.

    Returns:
        :class:`FlowResult` with ``f_train`` ``(T, *y.shape)`` and ``f_test`` ``(T, M, ...)``.
    """
    p = _prepare(k_train, y, f0, k_test_train, f0_test, lr, normalization, diag_reg, psd_rtol)
    tt = _times(t, "t")
    tau = tt * (p.lr / p.c)
    decay, phi = p.spec.flow_factors(tau)
    return _finish(p, tt, tau, decay, phi)


def gradient_descent_mse(k_train, y, steps, *, f0=None, k_test_train=None, f0_test=None, lr: float = 1.0,
                         normalization: str = "size", diag_reg: float = 0.0,
                         psd_rtol: float | None = None) -> FlowResult:
    """Closed-form full-batch gradient descent on the linearised model (module docstring; docs/theory.md §B.4).

    After ``k`` steps of ``θ <- θ - lr ∇L``: ``f_k(X) = Y + (I - aΘ)^k (f_0(X) - Y)``,
    ``f_k(x) = f_0(x) - Θ(x,X) Θ^{-1}(I - (I - aΘ)^k)(f_0(X) - Y)``, ``a = lr/c``.
    Exact for the linearised network; stable iff ``lr < 2c/λ_max(Θ)`` (it diverges otherwise,
    as the real iteration does). Arguments as :func:`gradient_flow_mse`, with
    ``steps`` a non-negative integer or a vector of them; ``FlowResult.t`` holds
    the step counts and ``tau = lr·k/c``.
    """
    p = _prepare(k_train, y, f0, k_test_train, f0_test, lr, normalization, diag_reg, psd_rtol)
    kk = _times(steps, "steps", integer=True)
    a = p.lr / p.c
    decay, phi = p.spec.gd_factors(kk, a)
    return _finish(p, kk, kk * a, decay, phi)


def infinite_width_moments(nngp_train, ntk_train, y, t, *, nngp_test_train=None, ntk_test_train=None,
                           nngp_test=None, lr: float = 1.0, normalization: str = "size", diag_reg: float = 0.0,
                           psd_rtol: float | None = None) -> GaussianMoments:
    """Mean and covariance of the infinite-width network's outputs after gradient flow for time ``t``.

    With ``f_0 ~ GP(0, K)`` (NNGP ``K``) and the deterministic NTK ``Θ`` (Lee et al. 2019, eqs. 15-16;
    docs/theory.md §B.4), ``A_τ(x) = Θ(x,X) Θ^{-1}(I - e^{-Θτ})``, ``τ = lr·t/c``::

        μ_t(x)    = A_τ(x) Y
        Σ_t(x,x') = K(x,x') + A_τ(x) K(X,X) A_τ(x')^T - A_τ(x) K(X,x') - K(x,X) A_τ(x')^T

    The test points are ``x`` when ``nngp_test_train`` ``(M, N)``,
    ``ntk_test_train`` ``(M, N)`` and ``nngp_test`` ``(M, M)`` are all given; the
    training points themselves otherwise (then ``Σ_t = e^{-Θτ} K e^{-Θτ}``). Kernels
    are 2-d (``Θ ⊗ I_O``); ``diag_reg`` is added to ``Θ(X, X)`` only.
    ``t = inf`` gives the kernel-regression limit ``A = Θ(x,X)(Θ + reg)^{-1}``.

    Returns:
        :class:`GaussianMoments`: ``mean`` ``(T, M, *y.shape[1:])``, ``cov`` ``(T, M, M)``.
    """
    k_orig, k_flat = _flat_kernel(nngp_train, "nngp_train", rank4_ok=False)
    n = k_orig.shape[0]
    _flat_kernel(ntk_train, "ntk_train", rank4_ok=False)
    tests = (nngp_test_train, ntk_test_train, nngp_test)
    given = [a is not None for a in tests]
    if any(given) and not all(given):
        raise ValueError("nngp_test_train: nngp_test_train, ntk_test_train and nngp_test must be given together")
    p = _prepare(ntk_train, y, None, ntk_test_train if all(given) else None, None, lr, normalization, diag_reg,
                 psd_rtol)
    spec = p.spec
    if spec.n != n or k_orig.dim() != 2 or k_orig.shape[1] != n:
        raise ValueError(f"nngp_train: expected shape ({spec.n}, {spec.n}) like ntk_train, got {tuple(k_orig.shape)}")
    _check_psd(k_flat, "nngp_train", _psd_rtol(n, k_orig.dtype, psd_rtol))
    k_xx = 0.5 * (k_flat + k_flat.mT)
    if all(given):
        _, kxX = _flat_kernel(nngp_test_train, "nngp_test_train", rank4_ok=False)
        if kxX.shape != (p.m, n):
            raise ValueError(f"nngp_test_train: expected shape ({p.m}, {n}), got {tuple(kxX.shape)}")
        kt_orig, kxx = _flat_kernel(nngp_test, "nngp_test", rank4_ok=False)
        if kxx.shape != (p.m, p.m):
            raise ValueError(f"nngp_test: expected shape ({p.m}, {p.m}), got {tuple(kxx.shape)}")
        _check_psd(kxx, "nngp_test", _psd_rtol(p.m, kt_orig.dtype, psd_rtol))
        kxx = 0.5 * (kxx + kxx.mT)
        thxX = p.kx
    else:
        kxX, kxx, thxX = k_xx, k_xx, spec.flat
    tt = _times(t, "t")
    tau = tt * (p.lr / p.c)
    _, phi = spec.flow_factors(tau)
    # A_t^T = Φ_t Θ(X, x): (T, N, M)
    a_t = spec.apply(phi, thxX.mT).transpose(1, 2)  # (T, M, N)
    inf_rows = torch.isinf(tau)
    if bool(inf_rows.any()) and spec.chol() is not None:
        a_t[inf_rows] = torch.cholesky_solve(thxX.mT, spec.chol()).mT[None]
    mean = a_t @ p.y2
    akx = a_t @ kxX.mT  # A K(X, x')
    cov = kxx[None] + (a_t @ k_xx) @ a_t.transpose(1, 2) - akx - akx.transpose(1, 2)
    cov = 0.5 * (cov + cov.transpose(1, 2))
    m = a_t.shape[1]
    mean = mean.reshape(tau.shape[0], m, *p.y_orig.shape[1:]).to(p.out_dtype)
    return GaussianMoments(t=tt, tau=tau, mean=mean, cov=cov.to(p.out_dtype), lr=p.lr, c=p.c,
                           normalization=p.normalization)


# --------------------------------------------------------------------------------------------- C6 bound
def _sym_pair(a, b):
    _, fa = _flat_kernel(a, "a")
    _, fb = _flat_kernel(b, "b")
    if fa.shape != fb.shape or fa.shape[0] != fa.shape[1]:
        raise ValueError(f"b: expected a square matrix of a's shape {tuple(fa.shape)}, got {tuple(fb.shape)}")
    la, va = _check_psd(fa, "a", _psd_rtol(fa.shape[0], torch.float64, None))
    lb, vb = _check_psd(fb, "b", _psd_rtol(fb.shape[0], torch.float64, None))
    return fa, fb, (la, va), (lb, vb)


def _null(lam: torch.Tensor) -> torch.Tensor:
    """Eigenvalues that count as zero: ``λ <= N·eps·λ_max`` (the rule of the flow's ``t = inf`` limit)."""
    lmax = float(lam.max()) if lam.numel() else 0.0
    return lam <= lam.numel() * torch.finfo(torch.float64).eps * lmax


def expm_gap(a, b, tau) -> torch.Tensor:
    """``||e^{-Aτ} - e^{-Bτ}||_2`` for symmetric PSD ``A``, ``B`` at each ``τ`` of ``tau``; ``(T,)`` float64."""
    _, _, (la, va), (lb, vb) = _sym_pair(a, b)
    tt = _times(tau, "tau")
    out = []
    for s in tt.tolist():
        if math.isinf(s):
            ea = va @ torch.diag(_null(la).to(la.dtype)) @ va.mT
            eb = vb @ torch.diag(_null(lb).to(lb.dtype)) @ vb.mT
        else:
            ea = (va * torch.exp(-la * s)) @ va.mT
            eb = (vb * torch.exp(-lb * s)) @ vb.mT
        out.append(torch.linalg.matrix_norm(ea - eb, ord=2))
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def expm_gap_bound(a, b, tau=None) -> torch.Tensor:
    """Bound C6 (docs/theory.md §C) on ``||e^{-Aτ} - e^{-Bτ}||_2`` for symmetric PSD ``A``, ``B``.

    From ``e^{-Aτ} - e^{-Bτ} = -∫_0^τ e^{-A(τ-s)} (A - B) e^{-Bs} ds``: with
    ``λ = min(λ_min(A), λ_min(B))``, the gap is at most ``||A - B||_2 · τ e^{-λτ}``
    at each ``τ`` (returned, ``(T,)``, when ``tau`` is given), whose supremum over
    ``τ >= 0`` is ``||A - B||_2 / (e·λ)`` (returned as a 0-dim tensor when ``tau``
    is ``None``; ``inf`` when ``λ = 0`` and ``A != B``).
    """
    fa, fb, (la, _), (lb, _) = _sym_pair(a, b)
    d = torch.linalg.matrix_norm(fa - fb, ord=2)
    lam = torch.minimum(torch.where(_null(la), 0.0, la).min(), torch.where(_null(lb), 0.0, lb).min())
    if tau is None:
        if float(d) == 0.0:
            return d
        return d / (math.e * lam) if float(lam) > 0 else torch.tensor(math.inf, dtype=torch.float64)
    tt = _times(tau, "tau")
    fin = torch.isfinite(tt)
    body = d * torch.where(fin, tt, 0.0) * torch.exp(-lam * torch.where(fin, tt, 0.0))
    at_inf = torch.where(lam > 0, torch.zeros((), dtype=torch.float64),
                         torch.where(d > 0, torch.tensor(math.inf, dtype=torch.float64), torch.zeros((), dtype=torch.float64)))
    return torch.where(fin, body, at_inf)


# --------------------------------------------------------------------------------------------- linearisation
class LinearizedModel(nn.Module):
    """First-order Taylor model ``f^lin_θ(x) = f(θ_0; x) + J_θ f(θ_0; x) (θ - θ_0)`` of a network (docs/theory.md §B.4).

    The Jacobian-vector product comes from ``torch.func.jvp`` through
    ``torch.func.functional_call``; no Jacobian is materialised. The module's
    parameters are ``θ`` (one per trainable parameter of the base model, the same
    shapes, initialised at ``θ_0``), so it trains like any ``nn.Module``
    (``torch.optim`` over ``.parameters()``); outputs are differentiable in ``θ``
    and in ``x`` (so attacks work on it). Parameters of the base model with
    ``requires_grad=False`` and its buffers are frozen at their values at
    construction. The base model is used only through ``functional_call`` with
    these tensors: it is never modified, and it is not a submodule.

    A model whose forward is random or couples the examples is refused with a ``ValueError``
    naming ``model`` (dropout with ``p > 0`` or BatchNorm in training mode: two forwards differ,
    so there is no Taylor model), as :func:`ntk_theory.empirical.empirical_ntk` refuses it; call
    ``model.eval()`` first. Inputs ``x`` (tensors or numpy arrays) are cast to the dtype and device of
    ``θ`` (awt's dtype rule; complex refused), differentiably. ``params`` maps parameter names (raw ``named_parameters()`` names or,
    on a masked model, canonical ones such as ``"2.weight"``) to values; they are cast to the
    model parameter's dtype and device (awt's dtype rule).
    """

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        check_deterministic_forward(model, "model")
        named = dict(model.named_parameters())
        params = {} if params is None else validate_params(model, params, "params")
        self._model = (model,)  # a tuple, so that it is not registered as a submodule
        self.param_names = [k for k, p in named.items() if p.requires_grad]
        self.frozen_names = [k for k, p in named.items() if not p.requires_grad]
        self.buffer_names = [k for k, _ in model.named_buffers()]
        self.theta = nn.ParameterList()
        for i, k in enumerate(self.param_names):
            v = params.get(k, named[k]).detach().clone().to(dtype=named[k].dtype, device=named[k].device)
            self.register_buffer(f"_theta0_{i}", v.clone())
            self.theta.append(nn.Parameter(v))
        for i, k in enumerate(self.frozen_names):
            v = params.get(k, named[k]).detach().clone().to(dtype=named[k].dtype, device=named[k].device)
            self.register_buffer(f"_frozen_{i}", v)
        for i, (k, b) in enumerate(model.named_buffers()):
            self.register_buffer(f"_buffer_{i}", b.detach().clone())

    @property
    def base_model(self) -> nn.Module:
        return self._model[0]

    @property
    def theta0(self) -> dict[str, torch.Tensor]:
        """``θ_0`` by the base model's parameter names."""
        return {k: getattr(self, f"_theta0_{i}") for i, k in enumerate(self.param_names)}

    def named_linear_parameters(self) -> dict[str, nn.Parameter]:
        """``θ`` by the base model's parameter names."""
        return dict(zip(self.param_names, self.theta))

    def delta(self) -> dict[str, torch.Tensor]:
        """``θ - θ_0`` by parameter name (differentiable in ``θ``)."""
        return {k: p - p0 for (k, p), p0 in zip(self.named_linear_parameters().items(), self.theta0.values())}

    def _constants(self) -> dict[str, torch.Tensor]:
        c = {k: getattr(self, f"_frozen_{i}") for i, k in enumerate(self.frozen_names)}
        c.update({k: getattr(self, f"_buffer_{i}") for i, k in enumerate(self.buffer_names)})
        return c

    def f0(self, x) -> torch.Tensor:
        """``f(θ_0; x)``."""
        x = cast_like_model(x, "x", self)
        return functional_call(self.base_model, {**self.theta0, **self._constants()}, (x,))

    def forward(self, x) -> torch.Tensor:
        x = cast_like_model(x, "x", self)
        consts = self._constants()

        def fn(p):
            return functional_call(self.base_model, {**p, **consts}, (x,))

        out, tangent = jvp(fn, (self.theta0,), (self.delta(),))
        return out + tangent

    @torch.no_grad()
    def reset(self) -> None:
        """Set ``θ = θ_0``."""
        for p, p0 in zip(self.theta, self.theta0.values()):
            p.copy_(p0)


def linearize(model: nn.Module, params: Mapping[str, torch.Tensor] | None = None) -> LinearizedModel:
    """The linearisation ``f_0 + J_0 (θ - θ_0)`` of ``model`` at ``θ_0 = params`` (default: its current parameters).

    ``params`` maps parameter names (``model.named_parameters()``, or canonical names such as
    ``"2.weight"`` on a masked model, as in ``empirical_ntk(params=)``) to values; missing names
    take the model's current values (copied). Dropout (``p > 0``) or BatchNorm in training mode is
    refused (``ValueError``). See :class:`LinearizedModel`.
    """
    return LinearizedModel(model, params)

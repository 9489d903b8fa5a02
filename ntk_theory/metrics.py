"""Kernel and dynamics comparison metrics (docs/theory.md §B.6, §C).

Kernels are ``(N1, N2)`` matrices or ``(N1, N2, O, O)`` multi-output kernels
``K[i, j, a, b] = <df_a(x_i)/dθ, df_b(x_j)/dθ>``; the latter are flattened to the
``(N1·O, N2·O)`` matrix with row index ``i·O + a`` (``K.permute(0, 2, 1, 3).reshape``,
the layout of neural-tangents' ``trace_axes=()`` kernels reshaped as in Tsilivis &
Kempe's code). Every metric returns a 0-dim tensor in the (promoted) input
dtype; the ones built from norms and inner products are differentiable, so they
can serve as losses (e.g. an NTK-matching objective). Numpy arrays are accepted;
complex inputs are refused (``TypeError``: their imaginary part would be dropped).

Norms: ``||A||_F`` Frobenius, ``||A||_2`` spectral (largest singular value),
``<A, B> = sum_ij A_ij B_ij``.
"""
from __future__ import annotations

import torch

from ._checks import as_tensor, check_finite, check_int, check_rank, check_real

__all__ = [
    "as_matrix",
    "relative_frobenius",
    "kernel_distance",
    "kernel_alignment",
    "cka",
    "operator_norm_distance",
    "top_eigen_mass",
    "condition_number",
    "trajectory_distance",
]


# --------------------------------------------------------------------------------------------- helpers
def _kernel(k, name: str, square: bool = False) -> torch.Tensor:
    k = check_real(as_tensor(k, name), name)
    if not k.is_floating_point():
        k = k.to(torch.float64)
    check_rank(k, name, (2, 4), "a kernel (N1, N2) or (N1, N2, O, O)")
    if k.dim() == 4 and k.shape[2] != k.shape[3]:
        raise ValueError(f"{name}: a multi-output kernel must have shape (N1, N2, O, O), got {tuple(k.shape)}")
    if square and k.shape[0] != k.shape[1]:
        raise ValueError(f"{name}: expected a square kernel (N, N) or (N, N, O, O), got shape {tuple(k.shape)}")
    check_finite(k, name)
    return k


def as_matrix(k: torch.Tensor) -> torch.Tensor:
    """``(N1, N2)`` unchanged; ``(N1, N2, O, O)`` -> ``(N1·O, N2·O)`` with ``[i·O + a, j·O + b] = K[i, j, a, b]``."""
    if k.dim() == 4:
        n1, n2, o, _ = k.shape
        return k.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)
    return k


def _pair(k1, k2, square: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    a = _kernel(k1, "k1", square)
    b = _kernel(k2, "k2", square)
    if a.shape != b.shape:
        raise ValueError(f"k2: shape {tuple(b.shape)} does not match k1's {tuple(a.shape)}")
    dt = torch.promote_types(a.dtype, b.dtype)
    return a.to(dt), b.to(dt)


def _unit(k: torch.Tensor, name: str) -> torch.Tensor:
    """``k / max|k|`` (the scale detached): norms of the result neither overflow nor underflow."""
    s = k.detach().abs().max() if k.numel() else k.new_zeros(())
    _nonzero(s, name)
    return k / s


def _nonzero(norm: torch.Tensor, name: str) -> None:
    if float(norm.detach()) == 0.0:
        raise ValueError(f"{name}: has zero norm; the metric is undefined")


def _symmetric(k: torch.Tensor, name: str, rtol: float | None = None) -> torch.Tensor:
    m = as_matrix(k)
    if rtol is None:
        rtol = 100 * m.shape[0] * torch.finfo(m.dtype).eps
    scale = m.abs().max()
    if float((m - m.mT).abs().max()) > rtol * float(scale):
        raise ValueError(f"{name}: expected a symmetric kernel; max |K - K^T| = {float((m - m.mT).abs().max()):.3g} "
                         f"exceeds {rtol:.1e} * max |K| = {rtol * float(scale):.3g}")
    return 0.5 * (m + m.mT)


# --------------------------------------------------------------------------------------------- distances
def relative_frobenius(a, b) -> torch.Tensor:
    """``r(A, B) = ||A - B||_F / ||B||_F`` (docs/theory.md §C), any two tensors of the same shape.

    Not symmetric: ``B`` is the reference. Raises if ``||B||_F = 0``.
    """
    a = check_real(as_tensor(a, "a"), "a")
    b = check_real(as_tensor(b, "b"), "b")
    if a.shape != b.shape:
        raise ValueError(f"b: shape {tuple(b.shape)} does not match a's {tuple(a.shape)}")
    check_finite(a, "a")
    check_finite(b, "b")
    dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(dt), b.to(dt)
    s = b.detach().abs().max() if b.numel() else b.new_zeros(())
    _nonzero(s, "b")
    a, b = a / s, b / s
    nb = torch.linalg.vector_norm(b)
    _nonzero(nb, "b")
    return torch.linalg.vector_norm(a - b) / nb


def kernel_alignment(k1, k2) -> torch.Tensor:
    """Uncentred alignment (cosine similarity) ``<K1, K2> / (||K1||_F ||K2||_F)`` in ``[-1, 1]``; ``[0, 1]`` for PSD kernels."""
    a, b = _pair(k1, k2)
    a, b = _unit(as_matrix(a), "k1"), _unit(as_matrix(b), "k2")
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    _nonzero(na, "k1")
    _nonzero(nb, "k2")
    return torch.clamp((a * b).sum() / (na * nb), -1.0, 1.0)


def kernel_distance(k1, k2) -> torch.Tensor:
    """Kernel distance ``1 - <K1, K2> / (||K1||_F ||K2||_F)`` (Tsilivis & Kempe 2022; Fort et al. 2020).

    Symmetric, invariant to positive rescaling of either kernel, ``0`` iff
    ``K1 ∝ K2`` with a positive factor; in ``[0, 2]``, and ``[0, 1]`` for PSD kernels
    (``<K1, K2> = tr(K1 K2) >= 0``).
    """
    return 1.0 - kernel_alignment(k1, k2)


def _centre(k: torch.Tensor) -> torch.Tensor:
    """``(H ⊗ I_O) K (H ⊗ I_O)``, ``H = I - 11^T/N``: centre the features over the samples, per output."""
    # dims 0 and 1 are the sample axes for both (N, N) and (N, N, O, O)
    k = k - k.mean(dim=0, keepdim=True)
    return k - k.mean(dim=1, keepdim=True)


def cka(k1, k2) -> torch.Tensor:
    """Centred kernel alignment ``<K1c, K2c> / (||K1c||_F ||K2c||_F)``, ``Kc = H K H`` (Cortes et al. 2012; Kornblith et al. 2019).

    ``H = I - 11^T/N`` centres over the samples; for ``(N, N, O, O)`` kernels the
    centring is ``H ⊗ I_O`` (features centred over samples, per output) before the
    flattening. In ``[0, 1]`` for PSD kernels (``Kc`` is PSD too), ``1`` for
    ``K1 ∝ K2``, invariant to positive rescaling and to adding a constant
    ``c·11^T`` to a 2-d kernel. Raises if a centred kernel is zero (e.g. a constant kernel).
    """
    a, b = _pair(k1, k2, square=True)
    a, b = _unit(a, "k1"), _unit(b, "k2")  # scale first (centring is linear), then centre
    a, b = as_matrix(_centre(a)), as_matrix(_centre(b))
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    _nonzero(na, "k1 (centred)")
    _nonzero(nb, "k2 (centred)")
    return torch.clamp((a * b).sum() / (na * nb), -1.0, 1.0)


def operator_norm_distance(k1, k2, *, relative: bool = False) -> torch.Tensor:
    """``||K1 - K2||_2`` (largest singular value); with ``relative``, divided by ``||K2||_2``.

    This is the quantity in the dynamics perturbation bound C6 (docs/theory.md §C):
    ``sup_τ ||e^{-K1 τ} - e^{-K2 τ}||_2 <= ||K1 - K2||_2 / (e·λ)``.
    """
    a, b = _pair(k1, k2)
    a, b = as_matrix(a), as_matrix(b)
    d = torch.linalg.matrix_norm(a - b, ord=2)
    if relative:
        nb = torch.linalg.matrix_norm(b, ord=2)
        _nonzero(nb, "k2")
        return d / nb
    return d


# --------------------------------------------------------------------------------------------- spectra
def top_eigen_mass(kernel, k: int = 20) -> torch.Tensor:
    """Share of the squared spectrum in the ``k`` largest eigenvalues: ``sum_{i<=k} λ_i^2 / sum_i λ_i^2``.

    Eigenvalues of the symmetric kernel ordered by ``|λ|`` descending (Tsilivis &
    Kempe 2022, top-20 eigen-mass). ``sum_i λ_i^2 = ||K||_F^2``. In ``[0, 1]``,
    non-decreasing in ``k``, ``1`` for ``k >= rank``. Raises for a non-symmetric
    or zero kernel.
    """
    mat = _symmetric(_kernel(kernel, "kernel", square=True), "kernel")
    k = check_int(k, "k", minimum=1)
    lam = torch.linalg.eigvalsh(_unit(mat, "kernel"))
    sq = torch.sort(lam.pow(2), descending=True).values
    total = sq.sum()
    _nonzero(total, "kernel")
    return sq[:k].sum() / total


def condition_number(kernel) -> torch.Tensor:
    """2-norm condition number ``σ_max / σ_min`` (``λ_max/λ_min`` for a PSD kernel), as ``numpy.linalg.cond``.

    ``inf`` for a singular kernel (``σ_min = 0``). Report it next to any solve
    with an adversarial kernel, whose points cluster (docs/theory.md §E.6).
    """
    mat = as_matrix(_kernel(kernel, "kernel", square=True))
    s = torch.linalg.svdvals(mat)
    smax, smin = s.max(), s.min()
    if float(smin) == 0.0:
        return torch.tensor(float("inf"), dtype=s.dtype)
    return smax / smin


# --------------------------------------------------------------------------------------------- dynamics
def trajectory_distance(traj1, traj2, *, relative: bool = False) -> torch.Tensor:
    """``sup_t ||F1(t) - F2(t)||`` over the common time axis (dimension 0), the norm being Frobenius over the rest.

    ``traj1``, ``traj2``: ``(T, ...)`` tensors sampled at the same times, e.g. the
    outputs ``(T, N, O)`` of :func:`ntk_theory.dynamics.gradient_flow_mse` and of a
    trained network. With ``relative``, divided by ``sup_t ||F2(t)||``.
    """
    a = check_real(as_tensor(traj1, "traj1"), "traj1")
    b = check_real(as_tensor(traj2, "traj2"), "traj2")
    if a.dim() < 1 or a.shape[0] == 0:
        raise ValueError(f"traj1: expected a trajectory (T, ...) with T >= 1, got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"traj2: shape {tuple(b.shape)} does not match traj1's {tuple(a.shape)}")
    check_finite(a, "traj1")
    check_finite(b, "traj2")
    dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(dt).reshape(a.shape[0], -1), b.to(dt).reshape(b.shape[0], -1)
    d = torch.linalg.vector_norm(a - b, dim=1).max()
    if relative:
        nb = torch.linalg.vector_norm(b, dim=1).max()
        _nonzero(nb, "traj2")
        return d / nb
    return d

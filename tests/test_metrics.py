"""Tests of ntk_theory.metrics against numpy/scipy references and invariants (hypothesis)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ntk_theory.metrics import (
    as_matrix,
    cka,
    condition_number,
    kernel_alignment,
    kernel_distance,
    operator_norm_distance,
    relative_frobenius,
    top_eigen_mass,
    trajectory_distance,
)

DT = torch.float64


def _psd(n, p, seed, jitter=0.0):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, p))
    return f @ f.T / p + jitter * np.eye(n)


def _psd4(n, o, p, seed):
    """A PSD multi-output kernel K[i, j, a, b] = <φ_a(x_i), φ_b(x_j)>."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, o, p))
    return np.einsum("iap,jbp->ijab", f, f) / p


# --------------------------------------------------------------------------------------------- references
def _ref_cka(k1, k2):
    n = k1.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    a, b = h @ k1 @ h, h @ k2 @ h
    return (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))


def test_as_matrix_layout():
    k = torch.arange(2 * 3 * 4 * 4, dtype=DT).reshape(2, 3, 4, 4)
    m = as_matrix(k)
    assert m.shape == (8, 12)
    for i in range(2):
        for j in range(3):
            for a in range(4):
                for b in range(4):
                    assert m[i * 4 + a, j * 4 + b] == k[i, j, a, b]
    k2 = torch.ones(3, 5)
    assert as_matrix(k2) is k2


def test_against_numpy():
    k1, k2 = _psd(6, 4, 0), _psd(6, 9, 1, 0.1)
    t1, t2 = torch.tensor(k1), torch.tensor(k2)
    np.testing.assert_allclose(float(relative_frobenius(t1, t2)), np.linalg.norm(k1 - k2) / np.linalg.norm(k2), rtol=1e-13)
    cos = (k1 * k2).sum() / (np.linalg.norm(k1) * np.linalg.norm(k2))
    np.testing.assert_allclose(float(kernel_distance(t1, t2)), 1 - cos, rtol=1e-12)
    np.testing.assert_allclose(float(kernel_alignment(t1, t2)), cos, rtol=1e-13)
    np.testing.assert_allclose(float(cka(t1, t2)), _ref_cka(k1, k2), rtol=1e-12)
    np.testing.assert_allclose(float(operator_norm_distance(t1, t2)), np.linalg.norm(k1 - k2, 2), rtol=1e-12)
    np.testing.assert_allclose(float(operator_norm_distance(t1, t2, relative=True)),
                               np.linalg.norm(k1 - k2, 2) / np.linalg.norm(k2, 2), rtol=1e-12)
    lam = np.sort(np.linalg.eigvalsh(k2) ** 2)[::-1]
    for k in (1, 3, 6, 10):
        np.testing.assert_allclose(float(top_eigen_mass(t2, k)), lam[:k].sum() / lam.sum(), rtol=1e-12)
    np.testing.assert_allclose(float(condition_number(t2)), np.linalg.cond(k2), rtol=1e-9)
    # non-square cross kernels for the distances
    c1, c2 = np.random.default_rng(2).standard_normal((2, 4, 7))
    np.testing.assert_allclose(float(kernel_distance(torch.tensor(c1), torch.tensor(c2))),
                               1 - (c1 * c2).sum() / (np.linalg.norm(c1) * np.linalg.norm(c2)), rtol=1e-12)
    np.testing.assert_allclose(float(operator_norm_distance(torch.tensor(c1), torch.tensor(c2))),
                               np.linalg.norm(c1 - c2, 2), rtol=1e-12)
    # numpy in
    np.testing.assert_allclose(float(cka(k1, k2)), _ref_cka(k1, k2), rtol=1e-12)


def test_multi_output_kernels():
    k1, k2 = _psd4(5, 3, 24, 0), _psd4(5, 3, 6, 1)
    m1 = k1.transpose(0, 2, 1, 3).reshape(15, 15)
    m2 = k2.transpose(0, 2, 1, 3).reshape(15, 15)
    t1, t2 = torch.tensor(k1), torch.tensor(k2)
    np.testing.assert_allclose(float(kernel_distance(t1, t2)), float(kernel_distance(torch.tensor(m1), torch.tensor(m2))))
    np.testing.assert_allclose(float(operator_norm_distance(t1, t2)), np.linalg.norm(m1 - m2, 2), rtol=1e-12)
    np.testing.assert_allclose(float(condition_number(t1)), np.linalg.cond(m1), rtol=1e-8)
    lam = np.sort(np.linalg.eigvalsh(m1) ** 2)[::-1]
    np.testing.assert_allclose(float(top_eigen_mass(t1, 4)), lam[:4].sum() / lam.sum(), rtol=1e-12)
    # CKA for (N, N, O, O): features centred over samples per output, (H ⊗ I_O) K (H ⊗ I_O)
    h = np.kron(np.eye(5) - np.ones((5, 5)) / 5, np.eye(3))
    a, b = h @ m1 @ h, h @ m2 @ h
    np.testing.assert_allclose(float(cka(t1, t2)), (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)), rtol=1e-12)
    # with O = 1 it is the ordinary CKA
    s1, s2 = _psd(5, 3, 3), _psd(5, 4, 4)
    np.testing.assert_allclose(float(cka(torch.tensor(s1)[:, :, None, None], torch.tensor(s2)[:, :, None, None])),
                               _ref_cka(s1, s2), rtol=1e-12)


# --------------------------------------------------------------------------------------------- properties
kernels = st.tuples(st.integers(2, 8), st.integers(1, 10), st.integers(0, 10_000), st.integers(0, 10_000))


@given(kernels, st.floats(1e-3, 1e3), st.floats(1e-3, 1e3), st.floats(-5.0, 5.0))
def test_kernel_metric_properties(spec, s1, s2, const):
    n, p, seed1, seed2 = spec
    k1 = torch.tensor(_psd(n, p, seed1, 1e-3))
    k2 = torch.tensor(_psd(n, p + 1, seed2, 1e-3))
    d = float(kernel_distance(k1, k2))
    assert 0.0 <= d <= 1.0 + 1e-12  # PSD kernels: <K1, K2> >= 0
    np.testing.assert_allclose(d, float(kernel_distance(k2, k1)), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(d, float(kernel_distance(s1 * k1, s2 * k2)), rtol=1e-8, atol=1e-12)
    assert abs(float(kernel_distance(k1, s1 * k1))) < 1e-12
    c = float(cka(k1, k2))
    assert -1e-12 <= c <= 1.0 + 1e-12  # PSD -> centred kernels PSD -> alignment in [0, 1]
    np.testing.assert_allclose(c, float(cka(k2, k1)), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(c, float(cka(s1 * k1, s2 * k2)), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(c, float(cka(k1 + const, k2)), rtol=1e-7, atol=1e-9)  # invariant to c·11^T
    np.testing.assert_allclose(float(cka(k1, s1 * k1)), 1.0, rtol=1e-10)
    r = float(relative_frobenius(k1, k2))
    assert r >= 0 and float(relative_frobenius(k2, k2)) == 0.0
    np.testing.assert_allclose(float(relative_frobenius(s1 * k1, s1 * k2)), r, rtol=1e-10)
    op = float(operator_norm_distance(k1, k2))
    fro = float(torch.linalg.norm(k1 - k2))
    assert op <= fro * (1 + 1e-12) and op >= fro / math.sqrt(n) * (1 - 1e-12)
    masses = [float(top_eigen_mass(k1, k)) for k in range(1, n + 1)]
    assert all(0.0 <= m <= 1.0 + 1e-12 for m in masses)
    assert all(b >= a - 1e-12 for a, b in zip(masses, masses[1:]))
    np.testing.assert_allclose(masses[-1], 1.0, rtol=1e-12)
    assert masses[0] >= 1.0 / n - 1e-12
    cond = float(condition_number(k1))
    assert cond >= 1.0
    np.testing.assert_allclose(float(condition_number(s1 * k1)), cond, rtol=1e-6)


@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 1000))
def test_trajectory_distance(t, n, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2, t, n, 2))
    ref = np.linalg.norm((a - b).reshape(t, -1), axis=1).max()
    np.testing.assert_allclose(float(trajectory_distance(torch.tensor(a), torch.tensor(b))), ref, rtol=1e-13)
    rel = ref / np.linalg.norm(b.reshape(t, -1), axis=1).max()
    np.testing.assert_allclose(float(trajectory_distance(a, b, relative=True)), rel, rtol=1e-13)
    assert float(trajectory_distance(a, a)) == 0.0


def test_edge_cases():
    # rank-1 kernel: all eigen-mass in the top eigenvalue; singular -> infinite condition number
    v = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    k = torch.outer(v, v)
    np.testing.assert_allclose(float(top_eigen_mass(k, 1)), 1.0, rtol=1e-12)
    assert math.isinf(float(condition_number(torch.zeros(3, 3, dtype=DT))))
    assert float(condition_number(torch.eye(4))) == 1.0
    # differentiable: usable as a loss
    a = torch.tensor(_psd(4, 3, 0), requires_grad=True)
    b = torch.tensor(_psd(4, 3, 1))
    (kernel_distance(a, b) + cka(a, b) + relative_frobenius(a, b)).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    # float32 stays float32
    assert kernel_distance(torch.eye(3), torch.ones(3, 3) + torch.eye(3)).dtype == torch.float32


@pytest.mark.parametrize("fn, args, arg", [
    (relative_frobenius, (torch.ones(2, 2), torch.zeros(2, 2)), "b"),
    (relative_frobenius, (torch.ones(2, 2), torch.ones(3, 2)), "b"),
    (relative_frobenius, (torch.tensor([float("nan")]), torch.ones(1)), "a"),
    (kernel_distance, (torch.ones(2, 2), torch.ones(2, 3)), "k2"),
    (kernel_distance, (torch.zeros(2, 2), torch.ones(2, 2)), "k1"),
    (kernel_distance, (torch.ones(2), torch.ones(2)), "k1"),
    (kernel_distance, (torch.ones(2, 2, 2, 3), torch.ones(2, 2, 2, 3)), "k1"),
    (cka, (torch.ones(2, 3), torch.ones(2, 3)), "k1"),
    (cka, (torch.ones(3, 3), torch.eye(3)), "k1"),  # constant kernel: zero after centring
    (operator_norm_distance, (torch.eye(2), torch.zeros(2, 2), True), "k2"),
    (top_eigen_mass, (torch.tensor([[1.0, 2.0], [0.0, 1.0]]),), "kernel"),
    (top_eigen_mass, (torch.eye(2), 0), "k"),
    (top_eigen_mass, (torch.zeros(2, 2),), "kernel"),
    (condition_number, (torch.ones(2, 3),), "kernel"),
    (trajectory_distance, (torch.ones(3, 2), torch.ones(2, 2)), "traj2"),
    (trajectory_distance, (torch.ones(0, 2), torch.ones(0, 2)), "traj1"),
])
def test_validation(fn, args, arg):
    if fn is operator_norm_distance:
        args, kw = args[:2], dict(relative=args[2])
    else:
        kw = {}
    with pytest.raises(ValueError, match=arg):
        fn(*args, **kw)

# --------------------------------------------------------------------------------------------- review regressions
# Moved from the core review file; tests marked ``# Was:`` are regressions: each names a defect a
# review found (fixed since) and fails if it comes back.
D = torch.float64


def _np_cos(a, b):
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def _np_cka4(k1, k2):
    n, _, o, _ = k1.shape
    h = np.kron(np.eye(n) - np.ones((n, n)) / n, np.eye(o))
    m1, m2 = (k.transpose(0, 2, 1, 3).reshape(n * o, n * o) for k in (k1, k2))
    return _np_cos(h @ m1 @ h, h @ m2 @ h)


psd_specs = st.tuples(st.integers(2, 6), st.integers(1, 3), st.integers(1, 8), st.integers(0, 10_000))


@given(psd_specs, st.floats(1e-4, 1e4), st.floats(1e-4, 1e4))
def test_cka_and_kernel_distance_properties_multi_output(spec, s1, s2):
    n, o, p, seed = spec
    rng = np.random.default_rng(seed)
    f1, f2 = rng.standard_normal((n, o, p)), rng.standard_normal((n, o, p + 1))
    k1, k2 = (np.einsum("iap,jbp->ijab", f, f) / f.shape[-1] for f in (f1, f2))
    t1, t2 = torch.tensor(k1), torch.tensor(k2)
    c = float(cka(t1, t2))
    assert -1e-12 <= c <= 1 + 1e-12
    np.testing.assert_allclose(c, _np_cka4(k1, k2), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(cka(s1 * t1, s2 * t2)), c, rtol=1e-8, atol=1e-12)
    d = float(kernel_distance(t1, t2))
    assert -1e-12 <= d <= 1 + 1e-12
    np.testing.assert_allclose(d, float(kernel_distance(t2, t1)), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(d, 1 - _np_cos(k1, k2), rtol=1e-9, atol=1e-12)
    assert abs(float(kernel_distance(t1, s1 * t1))) < 1e-12
    assert abs(float(kernel_distance(s1 * t2, s2 * t2))) < 1e-12
    np.testing.assert_allclose(float(kernel_alignment(t1, t2)), 1 - d, rtol=1e-12, atol=1e-15)


def test_metrics_do_not_mutate_and_are_differentiable():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((5, 3))
    a = torch.tensor(f @ f.T, requires_grad=True)
    b = torch.tensor(f[:, :2] @ f[:, :2].T)
    a0, b0 = a.detach().clone(), b.clone()
    loss = kernel_distance(a, b) + cka(a, b) + relative_frobenius(a, b) + operator_norm_distance(a, b)
    loss.backward()
    assert torch.isfinite(a.grad).all()
    top_eigen_mass(b, 2), condition_number(b), trajectory_distance(b[None], b0[None])
    assert torch.equal(a.detach(), a0) and torch.equal(b, b0)


def test_condition_number_and_top_eigen_mass_against_numpy_multi_output():
    rng = np.random.default_rng(8)
    f = rng.standard_normal((4, 2, 9))
    k4 = np.einsum("iap,jbp->ijab", f, f) / 9
    m = k4.transpose(0, 2, 1, 3).reshape(8, 8)
    np.testing.assert_allclose(float(condition_number(torch.tensor(k4))), np.linalg.cond(m), rtol=1e-8)
    lam2 = np.sort(np.linalg.eigvalsh(m) ** 2)[::-1]
    np.testing.assert_allclose(float(top_eigen_mass(torch.tensor(k4), 3)), lam2[:3].sum() / lam2.sum(), rtol=1e-12)


@pytest.mark.parametrize("scale, dtype", [(1e20, torch.float32), (1e-25, torch.float32), (1e160, D)])
def test_scale_invariant_metrics_survive_large_and_small_magnitudes(scale, dtype):
    # Was: norms are computed as sqrt(sum(x^2)) with no rescaling: a float32 kernel with entries ~1e20 gives
    # kernel_distance = 1 (and cka = 0, top_eigen_mass = NaN) instead of the scale-free value; entries ~1e-25
    # raise "zero norm" on a non-zero kernel. The docstrings promise invariance to positive rescaling.
    rng = np.random.default_rng(0)
    f1, f2 = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    k1, k2 = torch.tensor(f1 @ f1.T), torch.tensor(f2 @ f2.T)
    s1, s2 = (scale * k1).to(dtype), k2.to(dtype)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kernel_distance(s1, s2).double(), kernel_distance(k1, k2), **tol)
    torch.testing.assert_close(cka(s1, s2).double(), cka(k1, k2), **tol)
    torch.testing.assert_close(relative_frobenius(s1, (scale * k2).to(dtype)).double(), relative_frobenius(k1, k2),
                               **tol)
    torch.testing.assert_close(top_eigen_mass(s1, 1).double(), top_eigen_mass(k1, 1), **tol)


@pytest.mark.parametrize("fn, args, arg", [
    (kernel_distance, (torch.ones(2, 2, 2, 2), torch.ones(2, 2, 3, 3)), "k2"),
    (cka, (torch.ones(1, 1), torch.ones(1, 1)), "k1"),  # single point: centred kernel is zero
    (cka, (torch.eye(2), torch.tensor([[1.0, math.inf], [0.0, 1.0]])), "k2"),
    (top_eigen_mass, (torch.eye(3), True), "k"),
    (condition_number, (torch.ones(2, 2, 1, 2),), "kernel"),
    (trajectory_distance, (torch.tensor(1.0), torch.tensor(1.0)), "traj1"),
    (trajectory_distance, (torch.ones(2, 2), torch.tensor([[1.0, math.nan], [0.0, 0.0]])), "traj2"),
    (relative_frobenius, (torch.ones(2), torch.zeros(2)), "b"),
])
def test_metric_validation(fn, args, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        fn(*args)


_C = torch.eye(3, dtype=torch.complex128)


@pytest.mark.parametrize("fn, args, arg", [
    (kernel_distance, (_C, torch.eye(3)), "k1"),
    (cka, (torch.eye(3), _C.numpy()), "k2"),
    (relative_frobenius, (_C, torch.eye(3)), "a"),
    (top_eigen_mass, (_C, 1), "kernel"),
    (condition_number, (_C,), "kernel"),
    (trajectory_distance, (torch.ones(2, 2), torch.ones(2, 2, dtype=torch.complex64)), "traj2"),
])
def test_complex_inputs_are_refused(fn, args, arg):
    # Was: a complex kernel became float64 through .to(), i.e. its real part, with only torch's cast warning
    # (kernel_distance) or was compared as complex (relative_frobenius); awt refuses complex everywhere
    with pytest.raises(TypeError, match=f"{arg}: expected real values"):
        fn(*args)

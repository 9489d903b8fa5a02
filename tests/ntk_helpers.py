"""Helpers shared by the empirical-NTK test files (imported by name: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import torch

TOL = 1e-10


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_rel(out: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    """max |out - ref| <= tol * max |ref| (shapes and dtypes equal)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == ref.dtype
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = float((out - ref).abs().max()) if ref.numel() else 0.0
    assert err <= tol * max(scale, 1e-300), f"relative error {err / max(scale, 1e-300):.3e} > {tol:g}"

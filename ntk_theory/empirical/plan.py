"""What :func:`~ntk_theory.empirical.empirical_ntk` may use (:class:`Budgets`) and what it chose (:class:`NTKInfo`).

The memory budgets are element counts (multiply by the element size, 8 bytes in float64): they
bound temporaries, never change a result (every budget is exercised in the tests down to one
element, against the Jacobian reference). ``empirical_ntk(..., return_info=True)`` returns the
kernel together with an :class:`NTKInfo` that says which method and which tracer computed it and
how each layer's features were formed.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..io import Result

__all__ = ["Budgets", "NTKInfo", "LayerInfo", "DEFAULT_BUDGETS"]


@dataclass(frozen=True)
class Budgets:
    """Memory and tiling budgets of the empirical NTK (element counts unless said otherwise).

    Fields (defaults measured on a 2-core CPU; see benchmarks/bench_empirical.py):

    ``temp_elems`` (``2**20``, 8 MiB in float64)
        one internal temporary of the masked contraction before it is split into row chunks: small
        enough to be reused by the allocator instead of page-faulting.
    ``jvp_elems`` (``2**24``)
        the vmapped tangents and activations of one chunk of ``method="jvp"``.
    ``jac_elems`` (``2**28``, 2 GiB in float64)
        the Jacobian rows held at once by ``method="jacobian"`` (half of it per side); the structured
        path's explicit (convolution) Jacobians get an eighth of it per block and a quarter as cache.
    ``sig_elems`` (``2**20``)
        the stacked signals of one chunk of examples in an explicit-Jacobian GEMM.
    ``gather_min_q`` (64 positions)
        pooled positions per channel from which the pool-form Jacobian of conv -> ReLU -> MaxPool2d is
        gathered rather than scattered (measured: LeNet-5's 12 x 12 pool output gains, its 4 x 4 loses).
    ``sym_split_rows`` (``(512, 1024)`` rows)
        a symmetric single-output full kernel ``Θ(x, x)`` with at least that many rows is tiled 2 x 2,
        resp. 3 x 3, and only the tiles on and above the diagonal are multiplied.
    """

    temp_elems: int = 1 << 20
    jvp_elems: int = 1 << 24
    jac_elems: int = 1 << 28
    sig_elems: int = 1 << 20
    gather_min_q: int = 64
    sym_split_rows: tuple[int, int] = (512, 1024)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            vals = v if f.name == "sym_split_rows" else (v,)
            if f.name == "sym_split_rows" and (not isinstance(v, tuple) or len(v) != 2):
                raise ValueError(f"budgets: sym_split_rows must be a pair of row counts, got {v!r}")
            for u in vals:
                if not isinstance(u, int) or isinstance(u, bool) or u < 1:
                    raise ValueError(f"budgets: {f.name} must be a positive int, got {v!r}")


DEFAULT_BUDGETS = Budgets()


@dataclass(frozen=True)
class LayerInfo(Result):
    """How the structured path formed one layer's features.

    ``form``: ``"gram"`` (one position: input Gram x signal Gram, nothing of size N x parameters),
    ``"jacobian"`` (several positions: explicit per-layer Jacobians), ``"pool-scattered"`` /
    ``"pool-gathered"`` (a conv -> ReLU -> MaxPool2d carried by its signals at the pool output).
    """

    name: str
    form: str


@dataclass(frozen=True)
class NTKInfo(Result):
    """Which path :func:`~ntk_theory.empirical.empirical_ntk` took.

    ``method``: ``"structured"``, ``"jacobian"`` or ``"jvp"`` (the one that ran, after ``"auto"``).
    ``tracer``: for ``"structured"``, ``"sequential"`` (the autograd-free engine for plain
    ``nn.Sequential`` models) or ``"autograd"`` (forward hooks and one batched backward); else None.
    ``declined``: why the structured path did not apply (``method="auto"`` fell back), else None.
    ``layers``: per differentiated layer (structured only), its :class:`LayerInfo`.
    ``block_size``: the row/column block size used (None: one block). ``budgets``: those in force.
    """

    method: str
    tracer: str | None
    declined: str | None
    layers: tuple[LayerInfo, ...]
    block_size: int | None
    budgets: Budgets

r"""Closed-form infinite-width NNGP and NTK kernels (dense and masked; MLPs and CNNs).

Layers compose like neural-tangents' ``stax`` (Novak et al. 2020): each layer maps
an immutable kernel record to a new one, and :func:`serial` folds them into a
kernel function::

    >>> from ntk_theory.infinite import serial, Dense, Relu
    >>> k = serial(Dense(), Relu(), Dense(), Relu(), Dense())
    >>> kern = k(x1, x2)                 # Kernels(nngp=(N1, N2), ntk=(N1, N2)), float64
    >>> theta = k(x1, x2, get="ntk")     # just the NTK tensor

Conventions (NTK parameterisation; docs/theory.md §B.1, §B.2; ``parameterization='ntk'`` in stax):

* the first ``Dense`` (or ``Conv``, patch-wise) gives
  :math:`K = \sigma_w^2 \langle x, x'\rangle / \mathrm{fan\_in} + \sigma_b^2` and :math:`\Theta = K`;
* a nonlinearity :math:`\phi` gives :math:`K \leftarrow E[\phi(u)\phi(v)]`,
  :math:`\Theta \leftarrow \Theta \cdot E[\phi'(u)\phi'(v)]` with
  :math:`(u, v) \sim N(0, [[K(x,x), K(x,x')], [K(x,x'), K(x',x')]])`;
* every later ``Dense``/``Conv`` gives :math:`K \leftarrow \sigma_w^2 K + \sigma_b^2` and
  :math:`\Theta \leftarrow K_{new} + \sigma_w^2 \Theta` (for ``Conv`` both through the
  patch mean :math:`\frac{1}{k^2}\sum_{a,b} K_{i+a\,j+b,\;i'+a\,j'+b}` with zero padding);
* ``Flatten`` averages the pixel-diagonal :math:`K_{ij,ij}` (what a following ``Dense``
  with fan-in ``C*H*W`` sees), ``GlobalAvgPool`` averages all pixel pairs.

Masked limits (docs/theory.md §B.7): a ``Dense``/``Conv`` with keep-probability ``density``
:math:`q` is the dense layer when its kept weights are rescaled by :math:`1/\sqrt q`
(``rescale=True``), and the dense layer with :math:`\sigma_w^2 \to q\sigma_w^2` without
rescaling. Both are exact width-limits only for layers whose fan-in grows with width; see
:func:`mlp` for the first-layer caveat.

Inputs: MLPs take ``(N, d)``, CNNs take ``(N, C, H, W)`` (torch layout). Kernels are
float64 by default and differentiable in the inputs: the arc-cosine expectations use a
custom backward whose singular terms (at :math:`\rho = \pm 1`, i.e. coincident or
antipodal points, where the ReLU NTK has a cone-shaped kink) are replaced by their
symmetric subgradient 0, so gradients are finite everywhere (as neural-tangents'
tolerant ``_sqrt``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from ._checks import as_tensor, check_choice, check_density, check_finite, check_int, check_nonnegative
from ._checks import as_generator, check_bool, check_device, check_finite_number, check_real
from . import activations as _acts
from .io import Result
from . import layers as _fl

__all__ = [
    "Kernels", "Layer", "KernelFn", "serial",
    "Dense", "Conv", "ABRelu", "Relu", "LeakyRelu", "Erf", "Identity", "Flatten", "GlobalAvgPool",
    "mlp", "relu_expectations", "erf_expectations",
]


# --------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernels(Result):
    r"""NNGP and NTK of a pair of input batches (an :class:`ntk_theory.io.Result`).

    Fields: ``nngp`` :math:`K(x_1, x_2)` and ``ntk`` :math:`\Theta(x_1, x_2)`, each ``(N1, N2)`` in the
    requested dtype (float64 by default), or ``None`` when not requested (``get=``).
    ``to_dict()`` gives nested lists (``None`` kept).
    """

    nngp: torch.Tensor | None
    ntk: torch.Tensor | None


@dataclass(frozen=True)
class _State:
    """Internal kernel record passed from layer to layer.

    Before the first affine layer ``x1``/``x2`` hold the raw inputs and ``nngp`` is None.
    Afterwards:

    * ``nngp``, ``ntk``: cross kernels, ``(n1, n2)``, ``(H, W, n1, n2)`` (pixel-diagonal,
      enough when the readout is ``Flatten``) or ``(H, H', W, W', n1, n2)`` (all pixel
      pairs, needed by ``GlobalAvgPool``);
    * ``var1``, ``var2``: self-covariances, ``(n,)``, ``(H, W, n)`` or ``(H, H', W, W', n)``.
    """

    x1: torch.Tensor | None
    x2: torch.Tensor | None
    nngp: torch.Tensor | None
    ntk: torch.Tensor | None
    var1: torch.Tensor | None
    var2: torch.Tensor | None
    spatial: str          # "diag" | "full": how image kernels are stored
    want_ntk: bool
    dup: torch.Tensor | None = None   # (n1, n2) pairs of identical inputs (self-pairs), or None
    flattened: bool = False           # a Flatten reduced an image kernel and no Dense has consumed it


# --------------------------------------------------------------------------------------
# elementwise Gaussian expectations
# --------------------------------------------------------------------------------------
def _tol(dtype: torch.dtype) -> float:
    # |sin angle| below which two points count as coincident/antipodal for gradients. Exact
    # duplicates are pinned to rho = 1 before this, so the cut-off only has to clear the
    # rounding noise of rho near 1 (sin ~ sqrt(2 * few eps)); docs/theory.md §E.5.
    return 4.0 * math.sqrt(torch.finfo(dtype).eps)


def _geo_mean(va: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
    """``sqrt(va * vb)`` without forming the product (no overflow/underflow of ``va*vb``).

    Exact (``== v``) when ``va == vb == v``; 0 where either variance is 0.
    """
    m = torch.maximum(va, vb)
    r = torch.minimum(va, vb) / torch.where(m > 0, m, torch.ones_like(m))
    return m * r.sqrt()


def _sqrt_prod(va: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
    """``sqrt(va * vb)`` (broadcast): the plain ``sqrt(fl(va vb))`` (two passes, and exactly ``v`` for
    ``va == vb == v``) when no product can overflow or underflow, checked on the extreme variances
    (cheap: the variances are vectors where the result is a matrix); else :func:`_geo_mean`."""
    if va.numel() == 0 or vb.numel() == 0:
        return torch.mul(va, vb)
    fi = torch.finfo(va.dtype)
    da, db = va.detach(), vb.detach()
    hi = float(da.max()) * float(db.max())
    inf = da.new_tensor(float("inf"))
    lo = float(torch.where(da > 0, da, inf).min()) * float(torch.where(db > 0, db, inf).min())  # smallest positive
    lo = 1.0 if math.isinf(lo) else lo  # no positive variance on a side: all products are 0, exact
    if hi < fi.max / 16 and lo > fi.tiny * 16:
        return torch.mul(va, vb).sqrt_()
    return _geo_mean(va, vb)


def _unbroadcast(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


class _ABReluExpect(torch.autograd.Function):
    r"""``(E[phi(u)phi(v)], E[phi'(u)phi'(v)])`` for ``phi(z) = a z 1{z<0} + b z 1{z>0}``.

    With :math:`c = K_{12}`, :math:`\theta = \arccos(c/\sqrt{K_{11}K_{22}})`, :math:`D = \sqrt{K_{11}K_{22}}\sin\theta`,
    :math:`f = (a-b)^2/(2\pi)` and :math:`A = (a^2+b^2)/2`:
    :math:`E[\phi\phi] = f D + (A - f\theta)c`, :math:`E[\phi'\phi'] = A - f\theta`
    (Cho & Saul 2009; stax ``ABRelu``). Analytic backward:
    :math:`\partial E/\partial c = A - f\theta`, :math:`\partial E/\partial K_{11} = fD/(2K_{11})`,
    :math:`\partial \dot E/\partial c = f/D`, :math:`\partial \dot E/\partial K_{11} = -fc/(2DK_{11})`;
    the last two are singular at :math:`D = 0` and are set to 0 there (subgradient).
    """

    @staticmethod
    def forward(ctx, c, va, vb, a, b):
        f = (a - b) ** 2 / (2 * math.pi)
        A = (a * a + b * b) / 2
        # rho = c / sqrt(va vb) and D = sqrt(va vb) sin(theta): for self-pairs (c == va == vb)
        # sqrt(fl(v*v)) == v, so rho == 1 and D == 0 exactly (no FMA-dependent sqrt(eps) error)
        s = _sqrt_prod(va, vb)
        # zero variance (zero input or all-zero patch, sigma_b = 0): 0/0 -> rho = 0; E = 0 exactly as s = 0
        rho = torch.div(c, s).nan_to_num_(0.0).clamp_(-1.0, 1.0)
        theta = torch.acos(rho)
        dn = torch.sin(theta)
        ed = theta.mul_(-f).add_(A)                 # E[phi' phi'] = A - f theta
        e = torch.addcmul(c * ed, s, dn, value=f)   # E[phi phi] = (A - f theta) c + f D
        ctx.save_for_backward(c, va, vb)
        ctx.f, ctx.A = f, A
        ctx.tol = _tol(c.dtype)
        return e, ed

    @staticmethod
    def backward(ctx, g_e, g_ed):
        # recomputed from the saved inputs with differentiable ops, so that double backward
        # (create_graph=True: Hessian-vector products, gradient penalties) is correct too
        c, va, vb = ctx.saved_tensors
        f = ctx.f
        gc = gva = gvb = None
        # where() with safe branches keeps second derivatives finite at the kinks (rho = +-1,
        # zero variance), where they get the same zero subgradient as the first derivatives
        pos = (va > 0) & (vb > 0)
        ones = torch.ones_like(c)
        s = torch.where(pos, _sqrt_prod(torch.where(pos, va, ones), torch.where(pos, vb, ones)), torch.zeros_like(c))
        rho = torch.where(pos, c / torch.where(pos, s, torch.ones_like(s)), torch.zeros_like(s)).clamp(-1.0, 1.0)
        inner = rho.abs() < 1
        theta = torch.where(inner, torch.acos(torch.where(inner, rho, torch.zeros_like(rho))), torch.acos(rho.detach()))
        dn = torch.sin(theta)
        ed = ctx.A - f * theta
        D = s * dn
        ok = (dn > ctx.tol) & (D > 0)
        Dsafe = torch.where(ok, D, torch.ones_like(D))
        va_s = torch.where(va > 0, va, torch.ones_like(va))
        vb_s = torch.where(vb > 0, vb, torch.ones_like(vb))
        if g_e is None:
            g_e = torch.zeros_like(c)
        if g_ed is None:
            g_ed = torch.zeros_like(c)
        sing = torch.where(ok, g_ed * f / Dsafe, torch.zeros_like(D))   # g_ed * f / D
        if ctx.needs_input_grad[0]:
            gc = g_e * ed + sing
        if ctx.needs_input_grad[1]:
            t = (g_e * f * D - sing * c) / (2 * va_s)
            gva = _unbroadcast(torch.where(va > 0, t, torch.zeros_like(t)), va.shape)
        if ctx.needs_input_grad[2]:
            t = (g_e * f * D - sing * c) / (2 * vb_s)
            gvb = _unbroadcast(torch.where(vb > 0, t, torch.zeros_like(t)), vb.shape)
        return gc, gva, gvb, None, None


def relu_expectations(c: torch.Tensor, va: torch.Tensor, vb: torch.Tensor, a: float = 0.0, b: float = 1.0):
    r"""Arc-cosine expectations for :math:`\phi(z) = a\,z\,1\{z<0\} + b\,z\,1\{z>0\}`.

    Returns ``(E[phi(u) phi(v)], E[phi'(u) phi'(v)])`` for
    :math:`(u, v) \sim N(0, [[v_a, c], [c, v_b]])`, elementwise with broadcasting.
    For ReLU (a=0, b=1): :math:`\tfrac12\sqrt{v_av_b}\,\kappa_1(\rho)` and :math:`\tfrac12\kappa_0(\rho)`
    with :math:`\kappa_0(\rho) = (\pi - \arccos\rho)/\pi`,
    :math:`\kappa_1(\rho) = (\sqrt{1-\rho^2} + (\pi - \arccos\rho)\rho)/\pi` (docs/theory.md §B.1.1).
    """
    _check_cov(c, va, vb)
    return _ABReluExpect.apply(c, va, vb, float(a), float(b))


def _check_cov(c, va, vb):
    """Public-boundary check that ``[[va, c], [c, vb]]`` is a covariance (up to rounding)."""
    for t, nm in ((c, "c"), (va, "va"), (vb, "vb")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{nm}: expected a torch.Tensor, got {type(t).__name__}")
        check_finite(t, nm)
    for t, nm in ((va, "va"), (vb, "vb")):
        if bool((t < 0).any()):
            raise ValueError(f"{nm}: variances must be >= 0, got min {float(t.min())!r}")
    excess = c.abs() - _geo_mean(va, vb) * (1 + 64 * torch.finfo(c.dtype).eps)
    if bool((excess > 0).any()):
        raise ValueError("c: |c| must not exceed sqrt(va * vb) (not a covariance); "
                         f"largest excess {float(excess.max())!r}")


def erf_expectations(c: torch.Tensor, va: torch.Tensor, vb: torch.Tensor):
    """Validated public form of :func:`_erf_expect` (same formulas)."""
    _check_cov(c, va, vb)
    return _erf_expect(c, va, vb)


def _erf_expect(c: torch.Tensor, va: torch.Tensor, vb: torch.Tensor):
    r"""Expectations for :math:`\phi = \mathrm{erf}` (Williams 1997; docs/theory.md §B.1.2).

    With :math:`P = (1+2v_a)(1+2v_b)`:
    :math:`E[\phi\phi] = \tfrac{2}{\pi}\arcsin(2c/\sqrt P)`,
    :math:`E[\phi'\phi'] = \tfrac{4}{\pi}(P - 4c^2)^{-1/2}`. Smooth everywhere since
    :math:`P - 4c^2 \ge 1 + 2(v_a + v_b) > 0`.
    """
    # P - 4c^2 = 1 + 2(va + vb) + 4(va vb - c^2): expanded so the 4 va vb terms cancel exactly,
    # with the covariance determinant clamped at 0 (rounding can push |c| past sqrt(va vb))
    s = _sqrt_prod(va, vb)
    Q = 1 + 2 * (va + vb) + 4 * ((s - c) * (s + c)).clamp_min(0)
    e = (2 / math.pi) * torch.atan2(2 * c, torch.sqrt(Q))
    ed = (4 / math.pi) * torch.rsqrt(Q)
    return e, ed


_HASH_P = 2 ** 31 - 1  # a prime: products stay below 2**62 and, reduced, each term below 2**31,
                       # so int64 row sums cannot overflow for rows of fewer than 2**32 entries
_HASH_COEF: dict = {}
_MEMO: list = []       # (weakref to a tensor, its version counter, tag, value): see _memo
_MEMO_SIZE = 32


def _memo(x: torch.Tensor, tag: str, compute: Callable[[], object]):
    """``compute()`` once per unchanged tensor: a value derived from ``x`` (its row keys, its finiteness)
    is reused while ``x`` is the *same object* with the same version counter (in-place writes, also
    through views, bump it). Only a weak reference is kept, so a freed tensor never matches a new one
    at the same address. AT-2 calls the kernel with the same accumulated centres ``x2`` at every PGD
    step of every training step; this saves recomputing their keys and their finiteness check."""
    import weakref

    ver = x._version
    for ref, v, t, val in _MEMO:
        if t == tag and v == ver and ref() is x:
            return val
    val = compute()
    try:
        _MEMO.insert(0, (weakref.ref(x), ver, tag, val))
    except TypeError:  # pragma: no cover - a tensor subclass without weak references: no memo
        return val
    del _MEMO[_MEMO_SIZE:]
    return val


def _row_keys(x: torch.Tensor) -> torch.Tensor:
    """An exact integer hash of each row's bit pattern (``-0.0`` folded into ``0.0``): identical rows
    get identical keys whatever the order of summation; different rows rarely do (any collision is
    resolved by :func:`_exact_duplicates`). One pass over the inputs, no sort; memoised per unchanged
    tensor (:func:`_memo`)."""
    return _memo(x, "row_keys", lambda: _compute_row_keys(x))


def _compute_row_keys(x: torch.Tensor) -> torch.Tensor:
    a = (x.detach().reshape(x.shape[0], -1) + 0.0).contiguous()
    ibits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    bits = torch.remainder(a.view(ibits).to(torch.int64), _HASH_P)
    key = (a.shape[1], a.device)
    if key not in _HASH_COEF:
        g = torch.Generator().manual_seed(20220214)
        _HASH_COEF[key] = torch.randint(1, _HASH_P, (a.shape[1],), generator=g, dtype=torch.int64).to(a.device)
    return torch.remainder(bits * _HASH_COEF[key], _HASH_P).sum(1)


def _exact_duplicates(r1: torch.Tensor, r2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor | None:
    """Boolean ``(n1, n2)`` marking pairs of identical inputs (None if there are none).

    Identical inputs have correlation exactly 1, but a GEMM and a row sum round
    differently, and arccos turns an O(eps) error in rho into O(sqrt(eps)) in the kernel.
    Marked pairs get their cross covariance set to the (identical) self variance. Candidates are
    pairs with equal keys (:func:`_row_keys`, computed once per kernel call); each is confirmed by
    comparing the rows exactly (no GEMM threshold, which float32 rounding defeats).
    """
    cand = k1[:, None] == k2[None, :]
    if not bool(cand.any()):
        return None
    i, j = cand.nonzero(as_tuple=True)
    a, b = r1.detach().reshape(r1.shape[0], -1), r2.detach().reshape(r2.shape[0], -1)
    same = ((a[i] + 0.0) == (b[j] + 0.0)).all(1)
    if not bool(same.any()):
        return None
    dup = torch.zeros_like(cand)
    dup[i[same], j[same]] = True
    return dup


def _pin_duplicates(dup: torch.Tensor | None, cross: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor):
    """Make pairs of identical inputs exactly correlated: ``cross[.., i, j] = v1[.., i] = v2[.., j]``.

    Values are replaced, gradients kept (straight-through), so ``rho == 1`` holds exactly at
    the next nonlinearity. Applied after the first layer and after every spatial reduction.
    """
    if dup is None:
        return cross, v2

    def pin(mask, value, t):
        return torch.where(mask, value.detach() + (t - t.detach()), t)

    cross = pin(dup, v1[..., :, None], cross)
    if v2 is not v1:
        v2 = pin(dup.any(0), v1[..., dup.to(torch.int8).argmax(0)], v2)
    return cross, v2


# --------------------------------------------------------------------------------------
# spatial helpers (CNTK; Arora et al. 2019)
# --------------------------------------------------------------------------------------
# Image kernels are stored spatial-axes-first so that the batch axes are contiguous and the
# shifted adds of the patch sums vectorise over them:
#   "diag": cross (H, W, n1, n2), self (H, W, n)                 pixel-diagonal only
#   "full": cross (H, H', W, W', n1, n2), self (H, H', W, W', n)  all pixel pairs
def _shift_sum(t: torch.Tensor, axes: tuple, k: int) -> torch.Tensor:
    """``sum_{a=-(k-1)/2}^{(k-1)/2} t[i+a, ...]`` shifting all ``axes`` together, zero padding."""
    out = t.clone()
    size = t.shape[axes[0]]
    for a in range(1, k // 2 + 1):
        if a >= size:
            break
        lo = [slice(None)] * t.dim()
        hi = [slice(None)] * t.dim()
        for ax in axes:
            lo[ax] = slice(0, size - a)
            hi[ax] = slice(a, size)
        out[tuple(lo)] += t[tuple(hi)]
        out[tuple(hi)] += t[tuple(lo)]
    return out


def _patch_sum(t: torch.Tensor, k: int, spatial: str) -> torch.Tensor:
    r""":math:`\sum_{a,b} t_{i+a\,j+b,\;i'+a\,j'+b}` (full) or :math:`\sum_{a,b} t_{i+a\,j+b}` (diag).

    Separable: the shift over rows and the shift over columns are applied one after the other.
    """
    if k == 1:
        return t
    if spatial == "full":
        return _shift_sum(_shift_sum(t, (0, 1), k), (2, 3), k)
    return _shift_sum(_shift_sum(t, (0,), k), (1,), k)


def _pixel_diag(v: torch.Tensor) -> torch.Tensor:
    """Full-layout self-covariance (H, H, W, W, n) -> pixel variances (H, W, n)."""
    return v.diagonal(0, 0, 1).diagonal(0, 0, 1).permute(1, 2, 0)


def _broadcast_vars(s: _State):
    """Broadcast the self-variances of both batches against the cross kernel ``s.nngp``."""
    v1, v2 = s.var1, s.var2
    if s.nngp.dim() == 2:
        return v1[:, None], v2[None, :]
    if s.spatial == "diag":
        return v1[..., :, None], v2[..., None, :]
    p1, p2 = _pixel_diag(v1), _pixel_diag(v2)
    return p1[:, None, :, None, :, None], p2[None, :, None, :, None, :]


def _self_vars(v: torch.Tensor, spatial: str):
    """``(c, va, vb)`` for applying a nonlinearity to a self-covariance ``v``."""
    if v.dim() == 5:
        p = _pixel_diag(v)
        return v, p[:, None, :, None, :], p[None, :, None, :, :]
    return v, v, v


# --------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------
class FiniteFactory(Protocol):
    """The finite-width counterpart of a layer (what :meth:`KernelFn.finite` calls, keywords only).

    ``shape`` is the per-example shape of the layer's input, ``(d,)`` or ``(C, H, W)``; the factory
    returns the module and the per-example shape of its output. ``width`` is the number of
    units/channels of a hidden affine layer, ``out_features`` that of the readout (``is_readout``).
    A factory raises ``ValueError`` naming ``in_shape`` when the layer cannot take ``shape``.
    """

    def __call__(self, shape: tuple[int, ...], *, width: int, out_features: int, is_readout: bool,
                 generator: torch.Generator | None, dtype: torch.dtype,
                 device: torch.device | None) -> tuple[nn.Module, tuple[int, ...]]: ...


@dataclass(frozen=True)
class Affine:
    r"""What a ``Dense``/``Conv`` layer declares about itself.

    ``sigma_w``, ``sigma_b`` the NTK-parameterisation scales; ``density`` the keep-probability
    :math:`q` of the random mask on its weight (1: dense) and ``rescale`` whether kept weights
    are scaled by :math:`1/\sqrt q`; ``kernel_size`` for ``Conv`` (``None`` for ``Dense``).
    """

    op: str                        # "dense" | "conv"
    sigma_w: float
    sigma_b: float
    density: float = 1.0
    rescale: bool = True
    kernel_size: int | None = None

    @property
    def sw2(self) -> float:
        r"""The effective weight variance :math:`\sigma_w^2` (:math:`q\sigma_w^2` for an unrescaled mask)."""
        return self.sigma_w ** 2 * (1.0 if self.rescale else self.density)

    @property
    def sb2(self) -> float:
        return self.sigma_b ** 2


@dataclass(frozen=True)
class Layer:
    r"""One layer: a kernel transformer, a factory for its finite-width counterpart, and what it declares.

    Declared fields (read by :class:`KernelFn` instead of guessing from names):

    * ``kind``: ``"affine"`` (Dense, Conv), ``"nonlin"`` (elementwise) or ``"readout"`` (Flatten,
      GlobalAvgPool: spatial reductions to vector features);
    * ``input_kind``: what the layer takes as the network's raw input, when it comes before any
      affine layer: ``"vector"`` ``(N, d)``, ``"image"`` ``(N, C, H, W)`` or ``"any"``;
    * ``pixel_pairs``: it needs the kernel between all pixel pairs, not only the pixel-diagonal
      (GlobalAvgPool; stax's ``@requires(diagonal_spatial=False)``);
    * ``affine``: an :class:`Affine` record for Dense/Conv, else ``None``;
    * ``slopes``: ``(a, b)`` for a piecewise-linear nonlinearity :math:`az1\{z<0\} + bz1\{z>0\}`
      (enables the homogeneous fast path), else ``None``;
    * ``activation``: the :class:`ntk_theory.activations.Activation` entry of a registered
      nonlinearity, else ``None``.
    """

    name: str
    kernel: Callable[[_State], _State]
    finite: FiniteFactory
    kind: str                                  # "affine" | "nonlin" | "readout"
    input_kind: str = "any"                    # "vector" | "image" | "any"
    pixel_pairs: bool = False
    affine: Affine | None = None
    slopes: tuple[float, float] | None = None
    activation: _acts.Activation | None = None

    def __repr__(self) -> str:
        return self.name


def _need_rank(shape: tuple[int, ...], rank: int, layer: str, hint: str = "") -> None:
    if len(shape) != rank:
        what = "(d,)" if rank == 1 else "(C, H, W)"
        raise ValueError(f"in_shape: {layer} takes per-example inputs of shape {what}, got {shape}{hint}")


def _check_sigmas(sigma_w, sigma_b):
    check_nonnegative(sigma_w, "sigma_w")
    check_nonnegative(sigma_b, "sigma_b")
    return float(sigma_w), float(sigma_b)


def Dense(sigma_w: float = 2 ** 0.5, sigma_b: float = 0.0, *, density: float = 1.0, rescale: bool = True) -> Layer:
    r"""Fully connected layer, NTK parameterisation.

    First layer: :math:`K = \sigma_w^2 x\cdot x'/d + \sigma_b^2`, :math:`\Theta = K`. Later layers:
    :math:`K \leftarrow \sigma_w^2 K + \sigma_b^2`, :math:`\Theta \leftarrow K + \sigma_w^2\Theta`.
    With ``density=q < 1`` and ``rescale=False`` the weight variance is :math:`q\sigma_w^2`
    (a random mask of keep-probability q); with ``rescale=True`` the kept weights are scaled
    by :math:`1/\sqrt q` and the limit is the dense one (docs/theory.md §B.7).
    """
    sw, sb = _check_sigmas(sigma_w, sigma_b)
    q = check_density(density)
    check_bool(rescale, "rescale")
    meta = Affine("dense", sw, sb, q, rescale)
    sw2, sb2 = meta.sw2, meta.sb2

    def kernel(s: _State) -> _State:
        if s.nngp is None:
            x1, x2 = s.x1, s.x2
            if x1.dim() != 2:
                raise ValueError(f"x1: Dense expects inputs of shape (N, d), got {tuple(x1.shape)}; "
                                 "put Flatten() or GlobalAvgPool() before Dense for images")
            d = x1.shape[1]
            nngp = (sw2 / d) * (x1 @ x2.T) + sb2
            v1 = (sw2 / d) * (x1 * x1).sum(1) + sb2
            v2 = v1 if x2 is x1 else (sw2 / d) * (x2 * x2).sum(1) + sb2
            nngp, v2 = _pin_duplicates(s.dup, nngp, v1, v2)
            return replace(s, x1=None, x2=None, nngp=nngp, ntk=nngp if s.want_ntk else None, var1=v1, var2=v2)
        if s.nngp.dim() != 2:
            raise ValueError("layers: Dense received an image kernel; put Flatten() or GlobalAvgPool() before Dense")
        nngp = s.nngp * sw2
        if sb2:
            nngp.add_(sb2)
        ntk = None if s.ntk is None else torch.add(nngp, s.ntk, alpha=sw2)
        return replace(s, nngp=nngp, ntk=ntk, var1=sw2 * s.var1 + sb2, var2=sw2 * s.var2 + sb2, flattened=False)

    def finite(shape: tuple[int, ...], *, width: int, out_features: int, is_readout: bool,
               generator: torch.Generator | None, dtype: torch.dtype,
               device: torch.device | None) -> tuple[nn.Module, tuple[int, ...]]:
        _need_rank(shape, 1, "Dense", "; put Flatten() or GlobalAvgPool() before Dense for images")
        n_out = out_features if is_readout else width
        return (_fl.NTKLinear(shape[0], n_out, sigma_w=sw, sigma_b=sb, generator=generator, dtype=dtype, device=device),
                (n_out,))

    return Layer(f"Dense(sigma_w={sw:g}, sigma_b={sb:g}, density={q:g}, rescale={rescale})", kernel, finite, "affine",
                 input_kind="vector", affine=meta)


def Conv(kernel_size: int = 3, sigma_w: float = 2 ** 0.5, sigma_b: float = 0.0, *, density: float = 1.0,
         rescale: bool = True) -> Layer:
    r"""2-D convolution, stride 1, zero 'SAME' padding, odd square ``kernel_size``; NTK parameterisation.

    First layer: :math:`K_{ij,i'j'} = \frac{\sigma_w^2}{C k^2}\sum_{a,b}\sum_c x_{c,i+a,j+b}x'_{c,i'+a,j'+b}
    + \sigma_b^2`. Later layers: :math:`K \leftarrow \sigma_w^2\,\mathrm{PM}(K) + \sigma_b^2`,
    :math:`\Theta \leftarrow K + \sigma_w^2\,\mathrm{PM}(\Theta)`, where PM is the patch mean
    :math:`\frac1{k^2}\sum_{a,b}K_{i+a\,j+b,\;i'+a\,j'+b}` (the CNTK "patch trace" of Arora et
    al. 2019 with the 1/k^2 of the fan-in). ``density``/``rescale`` as in :func:`Dense`.
    """
    k = check_int(kernel_size, "kernel_size", minimum=1)
    if k % 2 == 0:
        raise ValueError(f"kernel_size: got {k}; only odd kernel sizes are supported (stride 1, 'SAME' padding)")
    sw, sb = _check_sigmas(sigma_w, sigma_b)
    q = check_density(density)
    check_bool(rescale, "rescale")
    meta = Affine("conv", sw, sb, q, rescale, kernel_size=k)
    sw2, sb2 = meta.sw2, meta.sb2

    c_w = sw2 / (k * k)     # sigma_w^2 / fan_in, the channel count being normalised away

    def kernel(s: _State) -> _State:
        full = s.spatial == "full"
        if s.nngp is None:
            x1, x2 = s.x1, s.x2
            if x1.dim() != 4:
                raise ValueError(f"x1: Conv expects images of shape (N, C, H, W), got {tuple(x1.shape)}")
            C = x1.shape[1]
            if full:
                cross = torch.einsum("ncij,mckl->ikjlnm", x1, x2).contiguous() / C
                v1 = torch.einsum("ncij,nckl->ikjln", x1, x1).contiguous() / C
                v2 = v1 if x2 is x1 else torch.einsum("ncij,nckl->ikjln", x2, x2).contiguous() / C
            else:
                cross = torch.einsum("ncij,mcij->ijnm", x1, x2).contiguous() / C
                v1 = torch.einsum("ncij,ncij->ijn", x1, x1).contiguous() / C
                v2 = v1 if x2 is x1 else torch.einsum("ncij,ncij->ijn", x2, x2).contiguous() / C
            cross, v2 = _pin_duplicates(s.dup, cross, v1, v2)
            nngp = _patch_sum(cross, k, s.spatial).mul_(c_w).add_(sb2)
            v1n = _patch_sum(v1, k, s.spatial).mul_(c_w).add_(sb2)
            v2n = v1n if v2 is v1 else _patch_sum(v2, k, s.spatial).mul_(c_w).add_(sb2)
            return replace(s, x1=None, x2=None, nngp=nngp, ntk=nngp if s.want_ntk else None, var1=v1n, var2=v2n)
        if s.nngp.dim() == 2:
            raise ValueError("layers: Conv received a vector kernel (after Flatten/GlobalAvgPool/Dense)")
        nngp = _patch_sum(s.nngp, k, s.spatial).mul(c_w).add_(sb2)   # not in place: k=1 returns s.nngp itself
        ntk = None if s.ntk is None else torch.add(nngp, _patch_sum(s.ntk, k, s.spatial), alpha=c_w)
        v1 = _patch_sum(s.var1, k, s.spatial).mul(c_w).add_(sb2)
        v2 = v1 if s.var2 is s.var1 else _patch_sum(s.var2, k, s.spatial).mul(c_w).add_(sb2)
        return replace(s, nngp=nngp, ntk=ntk, var1=v1, var2=v2)

    def finite(shape: tuple[int, ...], *, width: int, out_features: int, is_readout: bool,
               generator: torch.Generator | None, dtype: torch.dtype,
               device: torch.device | None) -> tuple[nn.Module, tuple[int, ...]]:
        if is_readout:
            raise ValueError("layers: a Conv cannot be the readout; end with Flatten()/GlobalAvgPool() and Dense()")
        _need_rank(shape, 3, "Conv")
        c, h, w = shape
        return (_fl.NTKConv2d(c, width, k, sigma_w=sw, sigma_b=sb, generator=generator, dtype=dtype, device=device),
                (width, h, w))

    return Layer(f"Conv(kernel_size={k}, sigma_w={sw:g}, sigma_b={sb:g}, density={q:g}, rescale={rescale})",
                 kernel, finite, "affine", input_kind="image", affine=meta)


def _nonlin(name: str, expect, module_fn: Callable[[], nn.Module], *, slopes: tuple[float, float] | None = None,
            activation: _acts.Activation | None = None) -> Layer:
    def kernel(s: _State) -> _State:
        if s.nngp is None:
            raise ValueError(f"layers: {name} cannot come first; start the network with Dense() or Conv()")
        if s.flattened:
            raise ValueError(f"layers: {name} directly after Flatten() acts per pixel and needs the per-pixel kernel; "
                             "apply it before Flatten() (elementwise maps commute with flattening)")
        va, vb = _broadcast_vars(s)
        nngp, ed = expect(s.nngp, va, vb)
        ntk = None if s.ntk is None else s.ntk * ed
        c1, a1, b1 = _self_vars(s.var1, s.spatial)
        v1 = expect(c1, a1, b1)[0]
        if s.var2 is s.var1:
            v2 = v1
        else:
            c2, a2, b2 = _self_vars(s.var2, s.spatial)
            v2 = expect(c2, a2, b2)[0]
        return replace(s, nngp=nngp, ntk=ntk, var1=v1, var2=v2)

    def finite(shape: tuple[int, ...], *, width: int, out_features: int, is_readout: bool,
               generator: torch.Generator | None, dtype: torch.dtype,
               device: torch.device | None) -> tuple[nn.Module, tuple[int, ...]]:
        return module_fn(), shape

    return Layer(name, kernel, finite, "nonlin", slopes=slopes, activation=activation)


def ABRelu(a: float, b: float) -> Layer:
    r"""Piecewise-linear :math:`\phi(z) = a z` for :math:`z<0`, :math:`b z` for :math:`z>0` (arc-cosine kernels)."""
    a, b = float(a), float(b)
    for v, nm in ((a, "a"), (b, "b")):
        if not math.isfinite(v):
            raise ValueError(f"{nm}: got {v!r}; expected a finite slope")

    class _AB(nn.Module):
        def forward(self, h):
            return torch.where(h > 0, b * h, a * h)

    return _nonlin(f"ABRelu({a:g}, {b:g})", lambda c, va, vb: _ABReluExpect.apply(c, va, vb, a, b), _AB,
                   slopes=(a, b))


def Relu() -> Layer:
    """ReLU, :math:`\\phi(z) = \\max(z, 0)`."""
    act = _acts.get("relu")
    return _nonlin("Relu()", lambda c, va, vb: _ABReluExpect.apply(c, va, vb, 0.0, 1.0), act.module,
                   slopes=(0.0, 1.0), activation=act)


def LeakyRelu(alpha: float = 0.01) -> Layer:
    """Leaky ReLU with negative slope ``alpha``."""
    alpha = check_finite_number(alpha, "alpha", "a finite slope")
    act = _acts.get("leaky_relu")
    return _nonlin(f"LeakyRelu({alpha:g})", lambda c, va, vb: _ABReluExpect.apply(c, va, vb, alpha, 1.0),
                   lambda: act.module(alpha), slopes=(alpha, 1.0), activation=act)


def Erf() -> Layer:
    """:math:`\\phi(z) = \\mathrm{erf}(z)`."""
    act = _acts.get("erf")
    return _nonlin("Erf()", _erf_expect, act.module, activation=act)


def Identity() -> Layer:
    """The identity (linear network): leaves both kernels unchanged."""
    act = _acts.get("identity")

    def finite(shape: tuple[int, ...], *, width: int, out_features: int, is_readout: bool,
               generator: torch.Generator | None, dtype: torch.dtype,
               device: torch.device | None) -> tuple[nn.Module, tuple[int, ...]]:
        return act.module(), shape

    return Layer("Identity()", lambda s: s, finite, "nonlin", slopes=(1.0, 1.0), activation=act)


def Flatten() -> Layer:
    r"""Flatten ``(C, H, W) -> C*H*W``: the following ``Dense`` sees :math:`\frac1{HW}\sum_{ij}K_{ij,ij}`."""

    def kernel(s: _State) -> _State:
        if s.nngp is None:
            x1 = s.x1.flatten(1)
            x2 = x1 if s.x2 is s.x1 else s.x2.flatten(1)
            return replace(s, x1=x1, x2=x2)
        if s.nngp.dim() == 2:
            return s
        if s.spatial == "full":
            red = lambda t: t.diagonal(0, 0, 1).diagonal(0, 0, 1).mean((-2, -1))
            v1, v2 = _pixel_diag(s.var1).mean((0, 1)), _pixel_diag(s.var2).mean((0, 1))
        else:
            red = lambda t: t.mean((0, 1))
            v1, v2 = s.var1.mean((0, 1)), s.var2.mean((0, 1))
        v2 = v1 if s.var2 is s.var1 else v2
        nngp, v2 = _pin_duplicates(s.dup, red(s.nngp), v1, v2)
        return replace(s, nngp=nngp, ntk=None if s.ntk is None else red(s.ntk), var1=v1, var2=v2, flattened=True)

    def finite(shape: tuple[int, ...], *, width: int, out_features: int, is_readout: bool,
               generator: torch.Generator | None, dtype: torch.dtype,
               device: torch.device | None) -> tuple[nn.Module, tuple[int, ...]]:
        return nn.Flatten(), (math.prod(shape),)

    return Layer("Flatten()", kernel, finite, "readout", input_kind="any")


def GlobalAvgPool() -> Layer:
    r"""Average over pixels: the following ``Dense`` sees :math:`\frac1{(HW)^2}\sum_{ij,i'j'}K_{ij,i'j'}`."""

    def kernel(s: _State) -> _State:
        if s.nngp is None:
            x1 = s.x1.mean((2, 3))
            x2 = x1 if s.x2 is s.x1 else s.x2.mean((2, 3))
            return replace(s, x1=x1, x2=x2)
        if s.nngp.dim() == 2:
            return s
        if s.spatial != "full":  # pragma: no cover - serial() selects "full" whenever GAP is present
            raise RuntimeError("GlobalAvgPool needs the full spatial kernel")
        red = lambda t: t.mean((0, 1, 2, 3))
        v1 = red(s.var1)
        v2 = v1 if s.var2 is s.var1 else red(s.var2)
        nngp, v2 = _pin_duplicates(s.dup, red(s.nngp), v1, v2)
        return replace(s, nngp=nngp, ntk=None if s.ntk is None else red(s.ntk), var1=v1, var2=v2)

    def finite(shape: tuple[int, ...], *, width: int, out_features: int, is_readout: bool,
               generator: torch.Generator | None, dtype: torch.dtype,
               device: torch.device | None) -> tuple[nn.Module, tuple[int, ...]]:
        _need_rank(shape, 3, "GlobalAvgPool")
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), (shape[0],)

    return Layer("GlobalAvgPool()", kernel, finite, "readout", input_kind="image", pixel_pairs=True)


def _homogeneous_plan(layers: Sequence[Layer]):
    """``(sw2_0, [((a, b), sw2), ...])`` if the net is Dense, (piecewise-linear, Dense)* with all sigma_b = 0.

    Read from the layers' declared ``affine`` and ``slopes`` fields."""
    if len(layers) % 2 == 0:
        return None
    dense, acts = layers[0::2], layers[1::2]
    if any(l.affine is None or l.affine.op != "dense" or l.affine.sb2 != 0.0 for l in dense):
        return None
    if any(l.slopes is None or l.slopes[0] ** 2 + l.slopes[1] ** 2 == 0 for l in acts):
        return None
    return dense[0].affine.sw2, [(a.slopes, d.affine.sw2) for a, d in zip(acts, dense[1:])]


def _homogeneous_block(plan, x1, x2, want_ntk: bool, dup):
    r"""Forward-only fast path for positively homogeneous MLPs with :math:`\sigma_b = 0`.

    Then every covariance factorises as :math:`K_h(x,x') = s_h(x,x')\,\rho_h(x,x')` with
    :math:`s_{h+1} = \sigma_w^2 A\, s_h`, :math:`A = (a^2+b^2)/2`, and the correlation and the
    normalised NTK :math:`t_h = \Theta_h/s_h` follow
    :math:`\rho_{h+1} = (f\sin\theta + (A - f\theta)\rho_h)/A`,
    :math:`t_{h+1} = \rho_{h+1} + (A - f\theta)\,t_h/A`, :math:`\theta = \arccos\rho_h`: about
    half the elementwise passes of the general recursion (same formulas, docs/theory.md §B.1.1).
    """
    sw2_0, steps = plan
    d = x1.shape[1]
    v1 = (sw2_0 / d) * (x1 * x1).sum(1)
    v2 = v1 if x2 is x1 else (sw2_0 / d) * (x2 * x2).sum(1)
    s = _sqrt_prod(v1[:, None], v2[None, :])
    rho = (x1 @ x2.T).mul_(sw2_0 / d).div_(s).nan_to_num_(0.0).clamp_(-1.0, 1.0)   # zero rows: rho = 0, K = 0
    if dup is not None:
        rho.masked_fill_(dup, 1.0)
    t = rho.clone() if want_ntk else None
    scale = 1.0
    # two work buffers reused over the layers (fresh block-sized temporaries cost page faults)
    theta, spare = torch.empty_like(rho), torch.empty_like(rho)
    for (a, b), sw2 in steps:
        f = (a - b) ** 2 / (2 * math.pi)
        A = (a * a + b * b) / 2
        torch.acos(rho, out=theta)
        sn = torch.sin(theta, out=spare)
        kd = theta.mul_(-f).add_(A)                                   # A - f theta
        rho, spare = sn.mul_(f / A).addcmul_(kd, rho, value=1.0 / A).clamp_(-1.0, 1.0), rho
        if want_ntk:
            t.mul_(kd).mul_(1.0 / A).add_(rho)                        # rho + (A - f theta) t / A
        scale *= sw2 * A
    s.mul_(scale)
    return rho.mul_(s), (t.mul_(s) if want_ntk else None)


# --------------------------------------------------------------------------------------
# composition
# --------------------------------------------------------------------------------------
_GET = ("nngp", "ntk")


def _input_kind(layers: Sequence[Layer]) -> str:
    """What the network takes as raw input, from the layers' declared ``input_kind``: the first layer
    that declares one decides, unless a layer that accepts anything and reduces it to vectors
    (``Flatten``) comes first."""
    for l in layers:
        if l.input_kind != "any":
            return l.input_kind
        if l.kind in ("affine", "readout"):
            return "any"
    return "any"


class KernelFn:
    """The kernel function of a network built by :func:`serial`.

    ``k(x1, x2=None, get=("nngp", "ntk"), *, block_size=None, dtype=torch.float64)``
    returns :class:`Kernels` (or a single tensor when ``get`` is a string). ``x2=None`` means
    ``x2 = x1``; then only blocks on and above the diagonal are computed and mirrored.
    ``block_size`` bounds the rows of ``x1`` and of ``x2`` processed at once (peak memory
    ~ ``block_size**2`` times the per-pair size: 1, ``H*W`` or ``(H*W)**2`` for MLPs,
    Flatten-CNNs and GAP-CNNs); the result does not depend on it.

    **dtype.** Kernels are computed and returned in ``dtype``, float64 by default, whatever the
    inputs' dtype (inputs are cast; numpy arrays are accepted). Complex inputs are refused
    (``TypeError``): their imaginary part would be dropped. Empirical kernels
    (:func:`ntk_theory.empirical.empirical_ntk`) follow the model's dtype instead.

    Attributes read from the layers' declarations: ``layers``, ``spatial`` (``"full"`` when a
    layer needs all pixel pairs, else ``"diag"``), ``input_kind`` (``"vector"``, ``"image"`` or
    ``"any"``) and ``has_conv``.
    """

    def __init__(self, layers: Sequence[Layer]):
        self.layers = tuple(layers)
        self.spatial = "full" if any(l.pixel_pairs for l in self.layers) else "diag"
        self.input_kind = _input_kind(self.layers)
        self.has_conv = any(l.affine is not None and l.affine.op == "conv" for l in self.layers)
        self._plan = _homogeneous_plan(self.layers)

    def __repr__(self) -> str:
        return "serial(" + ", ".join(map(repr, self.layers)) + ")"

    # -- validation ---------------------------------------------------------------------
    def _prep(self, x, name, dtype):
        x = as_tensor(x, name)
        check_real(x, name)
        x = x.to(dtype)
        _memo(x, "finite", lambda: check_finite(x, name) is not None)
        if self.input_kind == "image" and x.dim() != 4:
            raise ValueError(f"{name}: this network starts with images; expected shape (N, C, H, W), got {tuple(x.shape)}")
        if self.input_kind == "vector" and x.dim() != 2:
            raise ValueError(f"{name}: this network starts with Dense; expected shape (N, d), got {tuple(x.shape)} "
                             "(put Flatten() or GlobalAvgPool() first for images)")
        if x.dim() not in (2, 4):
            raise ValueError(f"{name}: expected shape (N, d) (or (N, C, H, W) before Flatten), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name}: empty batch")
        if any(n == 0 for n in x.shape[1:]):
            raise ValueError(f"{name}: every feature dimension must be >= 1, got shape {tuple(x.shape)}")
        return x

    def _block(self, x1, x2, want_ntk, symmetric=False, fast=False, keys=None):
        if keys is None:
            keys = (_row_keys(x1), _row_keys(x1) if x2 is x1 else _row_keys(x2))
        dup = _exact_duplicates(x1, x2, *keys)  # identical rows inside x1 are pinned too
        if fast:
            nngp, ntk = _homogeneous_block(self._plan, x1, x2, want_ntk, dup)
            if symmetric:
                return 0.5 * (nngp + nngp.T), None if ntk is None else 0.5 * (ntk + ntk.T)
            return nngp, ntk
        s = _State(x1, x2, None, None, None, None, self.spatial, want_ntk, dup)
        for layer in self.layers:
            s = layer.kernel(s)
        if s.nngp is None or s.nngp.dim() != 2:
            raise ValueError("layers: the network must end with a Dense readout on vector features "
                             "(add Flatten()/GlobalAvgPool() and Dense())")
        if symmetric:  # GEMM rounding can break exact symmetry of a diagonal block; restore it
            return 0.5 * (s.nngp + s.nngp.T), None if s.ntk is None else 0.5 * (s.ntk + s.ntk.T)
        return s.nngp, (s.ntk.clone() if s.ntk is s.nngp else s.ntk)

    def _default_block(self, x) -> int:
        if not self.has_conv:
            return 384   # three float64 384x384 blocks fit this CPU's 4 MiB L2 (measured: 512 and 256 are slower)
        hw = x.shape[-1] * x.shape[-2]
        per_pair = hw * hw if self.spatial == "full" else hw
        return max(1, int(math.sqrt(2 ** 23 / per_pair)))

    def __call__(self, x1, x2=None, get=_GET, *, block_size: int | None = None,
                 dtype: torch.dtype = torch.float64) -> Kernels | torch.Tensor:
        single = isinstance(get, str)
        try:
            gets = (get,) if single else tuple(get)
        except TypeError:
            raise TypeError(f"get: got {get!r}; accepted values are 'nngp', 'ntk' or a tuple of them") from None
        if not gets:
            raise ValueError("get: asks for no kernel; accepted values are 'nngp', 'ntk' or a tuple of them")
        for g in gets:
            check_choice(g, "get", _GET)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: got {dtype!r}; expected a real floating torch.dtype (float64 by default)")
        x1 = self._prep(x1, "x1", dtype)
        sym = x2 is None
        x2 = x1 if sym else self._prep(x2, "x2", dtype)
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"x2: feature shape {tuple(x2.shape[1:])} does not match x1's {tuple(x1.shape[1:])}")
        if x2.device != x1.device:
            raise ValueError(f"x2: on device {x2.device}, x1 on {x1.device}; put both on one device")
        bs = self._default_block(x1) if block_size is None else check_int(block_size, "block_size", minimum=1)
        want_ntk = "ntk" in gets
        # the homogeneous fast path has no tolerant backward: only when no input gradient is needed
        fast = (self._plan is not None and x1.dim() == 2
                and not (torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad)))
        n1, n2 = x1.shape[0], x2.shape[0]
        k1 = _row_keys(x1)
        k2 = k1 if x2 is x1 else _row_keys(x2)
        if n1 <= bs and n2 <= bs:
            nngp, ntk = self._block(x1, x2, want_ntk, sym, fast, (k1, k2))
        else:
            # only the requested kernels are stored: the peak is the output plus O(bs^2) per block
            outs = {g: x1.new_empty((n1, n2)) for g in gets}
            for i in range(0, n1, bs):
                for j in range(0, n2, bs):
                    if sym and j < i:
                        continue
                    b1, b2 = x1[i:i + bs], x2[j:j + bs]
                    kn, kt = self._block(b1, b1 if (sym and i == j) else b2, want_ntk, sym and i == j, fast,
                                         (k1[i:i + bs], k1[i:i + bs] if (sym and i == j) else k2[j:j + bs]))
                    for g, blk in (("nngp", kn), ("ntk", kt)):
                        if g in outs:
                            outs[g][i:i + bs, j:j + bs] = blk
                            if sym and j > i:
                                outs[g][j:j + bs, i:i + bs] = blk.T
            nngp, ntk = outs.get("nngp"), outs.get("ntk")
        out = Kernels(nngp=nngp if "nngp" in gets else None, ntk=ntk if want_ntk else None)
        return getattr(out, gets[0]) if single else out

    # -- the matching finite network --------------------------------------------------
    def finite(self, in_shape: Sequence[int], width: int, *, out_features: int = 1,
               generator: int | torch.Generator | None = None, dtype: torch.dtype = torch.float64,
               device: str | torch.device = "cpu") -> nn.Sequential:
        r"""The finite network (NTK parameterisation) whose empirical NTK converges to this kernel.

        Every hidden ``Dense``/``Conv`` gets ``width`` units/channels; the last ``Dense`` has
        ``out_features`` outputs (the kernel is then that of each output, times the identity).

        ``in_shape`` is the per-example input shape, ``(d,)`` or ``(C, H, W)``, checked against
        the layers (a network that starts with ``Dense`` takes ``(d,)``, one that starts with
        ``Conv`` or ``GlobalAvgPool`` takes ``(C, H, W)``). ``generator`` (an int seed, a
        ``torch.Generator`` or ``None``: torch's global RNG) draws the weights, layer by layer,
        then the masks. ``dtype`` (a real floating dtype, float64 by default) and ``device``
        (``"cpu"``, ``"cuda"``, ``"auto"``; :func:`ntk_theory._checks.check_device`) place the
        parameters.

        **Masked layers.** Every ``Dense``/``Conv`` declared with ``density`` :math:`q < 1` gets a
        uniformly random mask keeping ``round(q * numel)`` of its weights (biases stay dense),
        drawn with :func:`ntk_theory.masks.random_mask` and applied with
        :func:`ntk_theory.masks.apply_mask` with the layer's own ``rescale`` (kept weights times
        :math:`1/\sqrt q` when true). So ``mlp(2, density=0.25, rescale=False).finite(...)`` is the
        masked network of that kernel, never the dense one. Its empirical NTK converges to the
        closed form for masks on layers whose fan-in grows with ``width``; a masked *first* layer
        (``mlp(..., mask_first_layer=True)``) has a fixed fan-in and converges to it only as the
        input dimension grows (the first-layer caveat of :func:`mlp`).
        """
        if isinstance(in_shape, (str, bytes)) or not isinstance(in_shape, (tuple, list, torch.Size)):
            raise TypeError(f"in_shape: expected the per-example input shape as a tuple, (d,) or (C, H, W); "
                            f"got {in_shape!r}")
        shape = tuple(check_int(v, "in_shape", minimum=1) for v in in_shape)
        allowed = {"vector": (1,), "image": (3,), "any": (1, 3)}[self.input_kind]
        if len(shape) not in allowed:
            what = {"vector": "(d,): it starts with Dense (put Flatten() first for images)",
                    "image": "(C, H, W): it starts with images", "any": "(d,) or (C, H, W)"}[self.input_kind]
            raise ValueError(f"in_shape: got {shape}; this network takes per-example inputs of shape {what}")
        width = check_int(width, "width", minimum=1)
        out_features = check_int(out_features, "out_features", minimum=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: got {dtype!r}; expected a real floating torch.dtype (torch.float64 by default)")
        dev = check_device(device, "device")
        gen = as_generator(generator, "generator", dev)
        affine_idx = [i for i, l in enumerate(self.layers) if l.affine is not None]
        if not affine_idx:
            raise ValueError("layers: the network has no Dense/Conv layer")
        mods, at = [], {}
        for i, layer in enumerate(self.layers):
            m, shape = layer.finite(shape, width=width, out_features=out_features, is_readout=i == affine_idx[-1],
                                    generator=gen, dtype=dtype, device=dev)
            at[i] = len(mods)
            # one flat Sequential (a GlobalAvgPool's pool + flatten become two modules): plain parameter names
            mods.extend(m if type(m) is nn.Sequential else [m])
        net = nn.Sequential(*mods)
        masked = [i for i in affine_idx if self.layers[i].affine.density < 1.0]
        if masked:
            from .masks import apply_mask, random_mask  # local: masks is not needed by the kernels
            if gen is None:   # torch's global RNG: one draw seeds the masks' generator
                gen = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2 ** 62, ())))
            for i in masked:
                meta = self.layers[i].affine
                sub = random_mask(net[at[i]], meta.density, generator=gen, skip_first=False)
                apply_mask(net, {f"{at[i]}.{k}": v for k, v in sub.items()}, rescale=meta.rescale)
        return net


def serial(*layers: Layer) -> KernelFn:
    """Compose layers into a :class:`KernelFn` (stax's ``serial``).

    The kernel function returns float64 kernels by default (``dtype=``), refuses complex inputs, and
    builds its finite network with :meth:`KernelFn.finite`.
    """
    if not layers:
        raise ValueError("layers: serial() needs at least one layer")
    for i, l in enumerate(layers):
        if not isinstance(l, Layer):
            raise TypeError(f"layers[{i}]: expected a Layer (Dense(), Relu(), ...), got {type(l).__name__}")
    return KernelFn(layers)


def mlp(depth: int, activation: str = "relu", sigma_w: float = 2 ** 0.5, sigma_b: float = 0.0, density: float = 1.0,
        rescale: bool = True, mask_first_layer: bool = False, *, alpha: float = 0.01) -> KernelFn:
    r"""Kernel of an MLP with ``depth`` hidden layers (Dense, activation) and a Dense readout.

    ``density`` is the keep-probability q of random masks on the weight layers after the
    first (hidden-to-hidden and readout). Without rescaling this is
    :math:`\sigma_w^2 \to q\sigma_w^2` on those layers; for ReLU with
    :math:`\sigma_b = 0` the NTK becomes :math:`q^{k}\Theta` with k = depth masked layers
    (docs/theory.md §B.7, C3); with ``rescale=True`` (weights times :math:`1/\sqrt q`) it is the
    dense kernel.

    **First-layer caveat** (docs/theory.md §B.7, C4). The first layer has a fixed fan-in d, so a
    random mask on it leaves each neuron's pre-activation covariance
    :math:`\frac{\sigma_w^2}{dq}\sum_j M_{ij} x_j x'_j` random as width grows; the next layer
    averages a nonlinear function of it, and the width limit is *not* the closed form below.
    ``mask_first_layer=False`` (default) leaves the first layer dense, which makes the
    formula exact. ``mask_first_layer=True`` applies the same substitution to the first
    layer too; it is exact only as :math:`d \to \infty` (a mean-field approximation).

    ``activation`` is a name of :mod:`ntk_theory.activations` with a closed-form kernel ("relu",
    "leaky_relu" with negative slope ``alpha``, "erf", "identity"; "tanh" and "sigmoid" have none and
    are refused). The returned :class:`KernelFn` gives float64 kernels by default; its
    ``.finite(in_shape, width, ...)`` builds the matching network, masks at ``density`` included.
    """
    depth = check_int(depth, "depth", minimum=0)
    act_entry = _acts.get(activation, kernel=True)
    q = check_density(density)
    check_bool(rescale, "rescale")
    check_bool(mask_first_layer, "mask_first_layer")
    act = lambda: act_entry.kernel_layer(alpha)
    first_q = q if mask_first_layer else 1.0
    layers = [Dense(sigma_w, sigma_b, density=first_q, rescale=rescale)]
    for _ in range(depth):
        layers += [act(), Dense(sigma_w, sigma_b, density=q, rescale=rescale)]
    return serial(*layers)

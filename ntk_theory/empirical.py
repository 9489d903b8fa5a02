"""Finite-width (empirical) NTK of any ``torch.nn.Module``, dense or masked (THEORY.md §B.3).

For a model ``f(θ; x) ∈ R^O`` the empirical NTK is

    Θ̂(x, x')[o, o'] = Σ_p ∂f_o(x)/∂θ_p · ∂f_o'(x')/∂θ_p          (Jacot et al. 2018)

over the differentiated parameters ``θ``. :func:`empirical_ntk` computes it in
three ways that agree to float64 round-off:

``"structured"``
    The exact per-layer factorisation (THEORY.md §B.3; Novak et al. ICML 2022,
    "structured derivatives"). A layer ``z = g_w W h + g_b b`` (``nn.Linear`` /
    ``nn.Conv2d`` and subclasses such as :class:`~ntk_theory.layers.NTKLinear`,
    with ``g_w = weight_gain``, ``g_b = bias_gain``, both 1 for plain torch layers)
    has ``∂f_o/∂W_ij = g_w δ_i h_j`` with ``δ = ∂f_o/∂z`` the back-propagated
    signal and ``h`` the layer input. Hence, for a dense layer,

        Θ̂_l = g_w² (Δ Δ'ᵀ) ⊙ (H H'ᵀ) + g_b² Δ Δ'ᵀ        (two GEMMs per layer)

    and, with the effective squared mask ``M²`` (entries 0 or ``s²``),

        Θ̂_l[x, x'] = g_w² Σ_i δ_i δ'_i (M² (h ⊙ h'))_i + g_b² Σ_i m_b,i² δ_i δ'_i .

    A convolution is the same over positions: ``∂f/∂W = g_w Σ_pos δ(pos) ⊗ patch(pos)``,
    formed per example from im2col patches and contracted as a Gram matrix. Any
    other modules (activations, pooling, flatten, residual adds, ...) may sit in
    between, as long as they carry no differentiated parameter: the signals ``δ``
    are taken by autograd through whatever the model does. One forward pass
    records every layer input ``h``; a backward pass per output (batched over the
    ``O`` cotangents with vmap, or a plain loop for convolutional models) gives every
    ``δ``. A plain ``nn.Sequential`` of ``Linear``/``Conv2d`` (NTK subclasses and awt
    masks included), ``ReLU``, ``LeakyReLU``, ``Tanh``, ``Sigmoid``, ``ErfActivation``, ``Identity``,
    ``Flatten`` and ``MaxPool2d`` is traced without autograd instead: the convolutions
    are GEMMs on the im2col patches that the Jacobians need anyway, and the ``O``
    cotangents go down as one batch of ``O N`` (``δ ← δ W``, the convolution's input
    gradient, the pooling indices, ``φ'(z)``), stopping at the first layer with
    parameters. Nothing of size ``N x (number of parameters)`` is formed for dense layers:
    memory is ``O(N² O²)`` plus activations and signals (``N O`` times the layer
    widths), plus ``N O x`` (parameters of the convolutions) for convolutions. For
    ``Θ(x, x)`` only the output-group tiles on and above the diagonal are multiplied.
``"jacobian"``
    ``torch.func.vmap(jacrev)`` per-example Jacobians, contracted: the reference.
``"jvp"``
    NTK-vector products: ``Θ̂ e = J (Jᵀ e)`` through ``torch.func.vjp`` (one example)
    then ``torch.func.jvp`` (the whole batch), never materialising the Jacobian of
    the batch; for few outputs and many parameters.

Masks (DESIGN.md, THEORY.md §B.3 "gotcha"): a mask ``m`` (``dict[str, BoolTensor]``,
True = kept) defines the sub-network ``f_m(θ) = f(m ⊙ θ)``.

- ``mask_mode="subnetwork"`` (default): ``Θ̂_m = J(m ⊙ θ) diag(m) J(m ⊙ θ)ᵀ``, the NTK
  of the sub-network; pruned coordinates are fixed zeros and contribute nothing.
- ``mask_mode="ntt"``: ``J(m ⊙ θ) J(m ⊙ θ)ᵀ``, the dense-architecture NTK evaluated
  at the masked weights, which is what Neural Tangent Transfer's code computes
  (Liu & Zenke 2020); pruned coordinates do contribute.

A model masked with :func:`ntk_theory.masks.apply_mask` gives the sub-network
kernel without any ``mask=`` argument: mask and rescaling (``W = s·m⊙θ``, ``s = 1/sqrt(q)``)
are read from the parametrisation, the derivative is w.r.t. the raw ``θ``
(squared coefficient ``s² m``). With ``mask_mode="ntt"`` the derivative is w.r.t.
``w = m⊙θ`` with ``W = s·w`` (squared coefficient ``s²`` everywhere). A ``mask=``
argument on such a model is combined (logical and) with the applied mask.

Assumptions (the same for all methods): dimension 0 of the input is the batch
and examples do not interact (no BatchNorm in training mode; no dropout);
``"structured"`` further assumes that a supported layer's parameters are used
only by that layer's own ``forward`` (no weights shared with other code).
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.nn.utils import parametrize
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from ._checks import as_tensor, check_choice, check_finite, check_int, check_real
from .layers import ErfActivation, NTKConv2d, NTKLinear
from .masks import (canonical_name, get_mask, mask_buffer_name, masked_value, raw_name, split_name, validate_mask,
                    validate_params)

__all__ = ["empirical_ntk", "MODES", "METHODS", "MASK_MODES"]

MODES = ("full", "trace", "diagonal")
METHODS = ("auto", "structured", "jacobian", "jvp")
MASK_MODES = ("subnetwork", "ntt")

# Elements of one internal temporary of the masked path before it is split into row chunks
# (8 MiB in float64: small enough to be reused by the allocator instead of page-faulting).
_TEMP_ELEMS = 1 << 20
# Elements of the vmapped tangents/activations of one chunk of method="jvp" (128 MiB in float64).
_JVP_ELEMS = 1 << 24
# Elements of the Jacobian rows held at once by method="jacobian" (2 GiB in float64); the
# structured path's explicit (convolution) Jacobians get an eighth of it per block.
_JAC_ELEMS = 1 << 28

# Symmetric single-output kernels with N >= 512 rows are tiled 2 x 2, with N >= 1024 rows 3 x 3.
_SYM_SPLIT_ROWS = (512, 1024)
# Elements of the stacked signals of one chunk of examples in an explicit Jacobian GEMM (8 MiB in float64).
_SIG_ELEMS = 1 << 20
# Pooled positions per channel from which the pool-form Jacobian of a conv -> ReLU -> MaxPool2d is
# gathered rather than scattered (measured: LeNet-5's 12 x 12 pool output gains, its 4 x 4 one loses).
_GATHER_MIN_Q = 64

# Module forwards whose computation is known to be op(h, weight_gain*W, bias_gain*b).
_LINEAR_FORWARDS = (nn.Linear.forward, NTKLinear.forward)
_CONV_FORWARDS = (nn.Conv2d.forward, NTKConv2d.forward)


class _Unsupported(Exception):
    """The structured path does not apply (the message says why)."""


# --------------------------------------------------------------------------------------------
# The problem: which tensors are differentiated, with which masks, through which function
# --------------------------------------------------------------------------------------------
@dataclass
class _Problem:
    model: nn.Module
    diff: dict[str, torch.Tensor]  # raw name -> differentiated variable (detached, cast)
    fixed: dict[str, torch.Tensor]  # raw name -> other tensors passed to functional_call
    mult: dict[str, torch.Tensor]  # raw name -> forward multiplier of a variable (explicit masks)
    sq: dict[str, object]  # raw name -> squared coefficient dW_module/dvariable: float or tensor
    dtype: torch.dtype
    device: torch.device

    def forward(self, diff: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        tensors = dict(self.fixed)
        for k, v in diff.items():
            tensors[k] = v * self.mult[k] if k in self.mult else v
        out = functional_call(self.model, tensors, (x,))
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"model: must return a tensor, returned {type(out).__name__}")
        if out.dim() == 0 or out.shape[0] != x.shape[0]:
            raise ValueError(f"model: output shape {tuple(out.shape)} has no batch dimension of size {x.shape[0]}")
        return out.reshape(x.shape[0], -1)


def _mask_info(model: nn.Module, raw: str):
    """``(mask, scale, buffer name)`` of an awt mask parametrising the raw parameter ``raw``, else None."""
    name = canonical_name(raw)
    if name == raw:
        return None
    prefix, tensor = split_name(name)
    module = model.get_submodule(prefix) if prefix else model
    try:
        info = get_mask(module, tensor)
    except ValueError:  # a foreign parametrisation: its raw tensor is an ordinary variable
        return None
    if info is None:
        return None
    return info[0], info[1], mask_buffer_name(name)


def _prepare(model, params, mask, mask_mode, dtype) -> _Problem:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for mname, m in model.named_modules():
        # the per-example NTK needs examples that do not interact and a deterministic forward
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"model: {type(m).__name__} {mname!r} is in training mode (batch statistics couple the "
                             "examples and its running statistics would be updated); call model.eval() first")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(f"model: {type(m).__name__} {mname!r} is in training mode with p = {m.p} (a random "
                             "forward has no NTK); call model.eval() first")
    named = dict(model.named_parameters())
    canon_to_raw = {canonical_name(r): r for r in named}
    if params is None:
        values = {r: p for r, p in named.items() if p.requires_grad}
    else:
        values = validate_params(model, params, "params")
    if not values:
        raise ValueError("params: no parameter to differentiate (the model has no trainable parameter)")
    first = next(iter(values.values()))
    if dtype is None:
        dtype = first.dtype
    elif not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: got {dtype!r}; expected a floating torch.dtype or None")
    if not dtype.is_floating_point:
        raise ValueError(f"params: parameters have dtype {dtype}; pass dtype= a floating dtype")
    device = first.device

    marg: dict[str, torch.Tensor] = {}
    if mask is not None:
        for name, m in validate_mask({canonical_name(r): p for r, p in named.items()}, mask).items():
            marg[canon_to_raw[name]] = m.to(device=named[canon_to_raw[name]].device)
    pinfo = {r: info for r in named if (info := _mask_info(model, r)) is not None}
    ntt = mask_mode == "ntt"

    def keep_of(r):
        ks = [t for t in (marg.get(r), pinfo[r][0] if r in pinfo else None) if t is not None]
        return ks[0] if len(ks) == 1 else (ks[0] & ks[1] if ks else None)

    def cast(t):
        return t.detach().to(dtype) if t.is_floating_point() else t.detach()

    fixed: dict[str, torch.Tensor] = {}
    for r, p in named.items():
        if r in values:
            continue
        t = cast(p)
        keep = keep_of(r) if ntt else marg.get(r)
        if keep is not None:  # forward at the masked point m ⊙ θ
            t = masked_value(t, keep)
        fixed[r] = t
    for b, buf in model.named_buffers():
        if buf.is_floating_point() and buf.dtype != dtype:
            fixed[b] = buf.detach().to(dtype)
    if ntt:  # the parametrisation's mask becomes all-True: W = s·w with w = m ⊙ θ held as the variable
        for r, (m, _, buf) in pinfo.items():
            fixed[buf] = torch.ones_like(m)

    diff, mult, sq = {}, {}, {}
    for r, v in values.items():
        t = cast(v)
        scale = pinfo[r][1] if r in pinfo else 1.0
        keep = keep_of(r)
        if ntt:
            diff[r] = t if keep is None else masked_value(t, keep)
            sq[r] = scale * scale
        else:
            diff[r] = t
            if r in marg:
                mult[r] = marg[r].to(dtype)
            sq[r] = scale * scale if keep is None else keep.to(dtype) * (scale * scale)
    return _Problem(model, diff, fixed, mult, sq, dtype, device)


def _prepare_x(x, name: str, prob: _Problem) -> torch.Tensor:
    """The dtype rule at the boundary: real inputs (any real dtype, numpy included) are cast to the
    kernel dtype; complex ones are refused (a cast would silently drop the imaginary part)."""
    t = check_real(as_tensor(x, name), name)
    if t.dim() < 1 or t.shape[0] < 1:
        raise ValueError(f"{name}: expected a non-empty batch of shape (N, ...), got shape {tuple(t.shape)}")
    check_finite(t, name)
    # a private, detached copy: an in-place first module (ReLU(inplace=True)) must not write into the
    # caller's tensor, and a caller's autograd graph must not reach the kernel
    return t.detach().to(device=prob.device, dtype=prob.dtype, copy=True)


# --------------------------------------------------------------------------------------------
# Blocking
# --------------------------------------------------------------------------------------------
def _slices(n: int, size: int | None) -> list[slice]:
    size = n if size is None else max(1, min(size, n))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class _RowCache:
    """Per-slice cache of row features (Jacobian rows): keeps the most recent slices while they
    hold at most ``budget`` elements in all (and always the last two)."""

    def __init__(self, fn: Callable[[slice], object], budget: int):
        self.fn, self.budget, self.items = fn, budget, OrderedDict()

    @staticmethod
    def _numel(v) -> int:
        if v is None:
            return 0
        if isinstance(v, dict):
            return sum(t.numel() for t in v.values())
        return sum(t.numel() for t in v) if isinstance(v, (list, tuple)) else v.numel()

    def __call__(self, s: slice):
        key = (s.start, s.stop)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        val = self.fn(s)
        self.items[key] = val
        while len(self.items) > 2 and sum(self._numel(v) for v in self.items.values()) > self.budget:
            self.items.popitem(last=False)
        return val


def _assemble(N1: int, N2: int, O: int, mode: str, sym: bool, bs: int | None,
              block: Callable[[slice, slice], torch.Tensor], like: torch.Tensor,
              omajor: bool = False) -> torch.Tensor:
    """Tile the kernel from ``block(s1, s2)`` and return ``(N1, N2, O, O)`` (full) or ``(N1, N2)``.

    Full-mode blocks are ``(b1, O, b2, O)``, or ``(O, b1, O, b2)`` with ``omajor`` (rows ordered
    output-major, as autograd returns the signals); trace-mode blocks are ``(b1, b2)``. With
    ``sym`` (x2 is x1) only blocks on and above the diagonal are computed; the others are
    their transposes, ``Θ(x', x)[o', o] = Θ(x, x')[o, o']``.
    """
    perm, mirror = ((1, 3, 0, 2), (3, 1, 2, 0)) if omajor else ((0, 2, 1, 3), (2, 0, 3, 1))
    s1s = _slices(N1, bs)
    s2s = s1s if sym else _slices(N2, bs)
    if len(s1s) == 1 and len(s2s) == 1:
        blk = block(s1s[0], s2s[0])
        return blk.permute(*perm).contiguous() if mode == "full" else blk
    out = like.new_empty((N1, N2, O, O) if mode == "full" else (N1, N2))
    for i, a in enumerate(s1s):
        for j, b in enumerate(s2s):
            if sym and j < i:
                continue
            blk = block(a, b)
            if mode == "full":
                out[a, b] = blk.permute(*perm)
                if sym and j > i:
                    out[b, a] = blk.permute(*mirror)
            else:
                out[a, b] = blk
                if sym and j > i:
                    out[b, a] = blk.T
    return out


def _finish(K: torch.Tensor, mode: str, O: int, N1: int, N2: int) -> torch.Tensor:
    """Squeeze a single output: ``(N1, N2, 1, 1)`` -> ``(N1, N2)``, ``(N1, 1, 1)`` -> ``(N1,)``."""
    if mode == "diagonal":
        return K.reshape(N1) if O == 1 else K
    return K.reshape(N1, N2) if O == 1 else K


# --------------------------------------------------------------------------------------------
# Structured path
# --------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    module: nn.Module
    name: str
    kind: str  # "linear" | "conv"
    w: str | None  # raw name of the differentiated weight, if any
    b: str | None  # raw name of the differentiated bias, if any
    gw: float
    gb: float


def _structured_layers(prob: _Problem) -> list[_Layer]:
    model = prob.model
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    named = dict(model.named_parameters())
    layers: dict[str, _Layer] = {}
    for raw in prob.diff:
        name = canonical_name(raw)
        prefix, tensor = split_name(name)
        module = model.get_submodule(prefix) if prefix else model
        where = f"parameter {name!r}"
        if not _runs_forward(module):
            raise _Unsupported(f"{where} belongs to a module whose call does not run its class's forward")
        if isinstance(module, nn.Linear) and type(module).forward in _LINEAR_FORWARDS:
            kind = "linear"
        elif isinstance(module, nn.Conv2d) and type(module).forward in _CONV_FORWARDS:
            kind = "conv"
            if module.groups != 1 or module.padding_mode != "zeros":
                raise _Unsupported(f"{where}: Conv2d with groups != 1 or padding_mode != 'zeros'")
        else:
            raise _Unsupported(f"{where} belongs to {type(module).__name__}, not an nn.Linear/nn.Conv2d "
                               "with a standard forward")
        if tensor not in ("weight", "bias"):
            raise _Unsupported(f"{where} is neither the weight nor the bias of its layer")
        if raw != name and _mask_info(model, raw) is None:
            raise _Unsupported(f"{where} carries a parametrisation other than an awt mask")
        if owners.get(id(named[raw]), 1) > 1:
            raise _Unsupported(f"{where} is shared by several modules")
        gains = _gains(module)
        if gains is None:
            raise _Unsupported(f"{where}: weight_gain/bias_gain are not numbers")
        lay = layers.setdefault(prefix, _Layer(module, prefix, kind, None, None, *gains))
        setattr(lay, "w" if tensor == "weight" else "b", raw)
    return list(layers.values())


def _sq_simplify(sq):
    """A squared-coefficient tensor that is constant collapses to a float (the dense fast path)."""
    if isinstance(sq, torch.Tensor):
        first = sq.reshape(-1)[0]
        if bool((sq == first).all()):
            return float(first)
    return sq


@dataclass
class _Gram:
    """Single-position layer: input ``h (N, K)``, signals ``d (O, N, C)`` (output-major, as
    autograd returns them), squared coefficients."""
    h: torch.Tensor | None
    d: torch.Tensor
    sq_w: object  # None | float | (C, K)
    sq_b: object  # None | float | (C,)
    _mats: dict = field(default_factory=dict)

    def mat(self, s: slice) -> torch.Tensor:
        """``(O * r, C)``: the signals of rows ``s``, rows ordered (o, n); one copy per slice."""
        if s.start == 0 and s.stop == self.d.shape[1]:
            return self.d.reshape(-1, self.d.shape[2])
        key = (s.start, s.stop)
        if key not in self._mats:
            self._mats[key] = self.d[:, s].reshape(-1, self.d.shape[2])
        return self._mats[key]


@dataclass
class _Jac:
    """Layer with several positions (conv, or Linear on (N, P, K)): explicit per-layer Jacobians.

    The bias is folded into the weight: the patches carry a last row of ones (``∂f/∂b = g_b Σ_pos δ``
    is the weight Jacobian of a constant input 1), so one batched GEMM per block of examples gives
    both, with the outputs stacked into its rows."""
    dls: list[torch.Tensor] | None  # O x (N, C, P): the signals of each output
    hl: torch.Tensor  # (N, K', P): the layer's input patches (im2col), then a row of ones with a bias
    coef: object  # float | (C, K'): g · sqrt(squared mask coefficient) of each (weight | bias) entry
    # conv -> ReLU -> MaxPool2d (see _pool_patterns), instead of ``dls``: the signals at the pool output
    # (N, O, C, Q) and the argmax positions in the conv output (N, C, Q), or P where the ReLU derivative
    # there is 0; the conv-output signals are the former scattered to the latter (the windows do not
    # overlap), column P (the positions to drop) left out
    pool: tuple | None = None

    def parts(self, s: slice) -> list[torch.Tensor]:
        """``[(r, O, C*K')]``: rows ``s`` (example-major, then output) of ``∂f_o/∂[W | b]`` times the
        mask coefficients, ``Σ_pos δ_o(pos) ⊗ [h(pos) | 1]``. Example-major so that the ``O``
        signals of a chunk of examples are one ``(O C, P)`` operand of one GEMM per example."""
        if self.pool is not None:
            dp, idx = self.pool
            _, O, C, Q = dp.shape
        else:
            O, C = len(self.dls), self.dls[0].shape[1]
        P, K = self.hl.shape[2], self.hl.shape[1]
        r = s.stop - s.start
        J = self.hl.new_empty((r, O, C, K))
        if self.pool is not None and Q >= _GATHER_MIN_Q:
            return self._gathered(s, J)
        nb = max(1, min(r, _SIG_ELEMS // max(O * C * P, 1)))  # a cache-sized stack of signals
        if self.pool is not None:
            buf1 = self.hl.new_empty((nb, O, C, P + 1))
        else:
            buf = self.hl.new_empty((nb, O, C, P))
        for i in range(s.start, s.stop, nb):
            j = min(i + nb, s.stop)
            if self.pool is not None:  # the conv-output signals: one scatter into the zeroed buffer
                D1 = buf1[:j - i].zero_()
                D1.scatter_(3, idx[i:j].unsqueeze(1).expand(j - i, O, C, Q), dp[i:j])
                D = D1.as_strided((j - i, O * C, P), (O * C * (P + 1), P + 1, 1))  # column P left out
            else:
                D = buf[:j - i]
                for o in range(O):
                    D[:, o].copy_(self.dls[o][i:j])
                D = D.view(j - i, O * C, P)
            torch.bmm(D, self.hl[i:j].transpose(1, 2), out=J[i - s.start:j - s.start].view(j - i, O * C, K))
        if isinstance(self.coef, torch.Tensor) or self.coef != 1.0:
            J.mul_(self.coef)
        return [J.view(r, O, C * K)]

    def _gathered(self, s: slice, J: torch.Tensor) -> list[torch.Tensor]:
        """The pool form by gathering instead of scattering: ``J[n, o, c] = Σ_q dp[n, o, c, q] ·
        [h | 1](idx[n, c, q])``, one ``(O, Q) @ (Q, K')`` product per example and channel (a quarter
        of the FLOPs of the scattered GEMM for 2 x 2 pools; faster when ``Q`` is large)."""
        dp, idx = self.pool
        _, O, C, Q = dp.shape
        K, P = self.hl.shape[1], self.hl.shape[2]
        hT = self.hl.transpose(1, 2)  # (N, P, K')
        if not hT.is_contiguous():
            hT = hT.contiguous()
        r = s.stop - s.start
        nb = max(1, min(r, _SIG_ELEMS // max(C * K * Q, 1)))
        for i in range(s.start, s.stop, nb):
            j = min(i + nb, s.stop)
            dead = idx[i:j] >= P  # ReLU' = 0 at the argmax: no signal, any valid index
            dps = dp[i:j].masked_fill(dead.unsqueeze(1), 0).transpose(1, 2).contiguous()  # (n, C, O, Q)
            rows = idx[i:j].masked_fill(dead, 0) + torch.arange(i - i, j - i, device=idx.device).view(-1, 1, 1) * P
            Pg = hT[i:j].reshape(-1, K).index_select(0, rows.reshape(-1)).view(j - i, C, Q, K)
            J[i - s.start:j - s.start].copy_(torch.matmul(dps, Pg).transpose(1, 2))  # (n, C, O, K')
        if isinstance(self.coef, torch.Tensor) or self.coef != 1.0:
            J.mul_(self.coef)
        return [J.view(r, O, C * K)]

    @property
    def width(self) -> int:
        return (self.pool[0].shape[2] if self.pool is not None else self.dls[0].shape[1]) * self.hl.shape[1]


@dataclass
class _Features:
    N: int
    O: int
    grams: list[_Gram] = field(default_factory=list)
    jacs: list[_Jac] = field(default_factory=list)
    layout: list[tuple] = field(default_factory=list)  # (layer, kind, widths): must agree for x1 and x2

    def jac_parts(self, s: slice) -> list[torch.Tensor]:
        return [p for j in self.jacs for p in j.parts(s)]

    @property
    def jac_width(self) -> int:
        return sum(j.width for j in self.jacs)


def _conv_patches(module: nn.Conv2d, h: torch.Tensor, ones: bool) -> torch.Tensor:
    """im2col: ``(N, C_in, H, W)`` -> ``(N, C_in k k (+ 1), P)`` in the order of ``weight.reshape(C_out, -1)``,
    with a last row of ones if ``ones``. A strided view copied once (cheaper than ``F.unfold``), stored
    positions-major (the result is the transpose of a contiguous ``(N, P, K')``) so that the patch of
    one position is a contiguous row for the gathers of :meth:`_Jac._gathered`."""
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    if isinstance(module.padding, str):
        if module.padding == "same":
            h = F.pad(h, module._reversed_padding_repeated_twice)
    elif any(module.padding):
        ph, pw = module.padding
        h = F.pad(h, (pw, pw, ph, ph))
    N, Cin, H, W = h.shape
    OH, OW = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    K = Cin * kh * kw
    out = h.new_empty((N, OH * OW, K + int(ones)))  # positions-major storage: a patch is contiguous
    s0, s1, s2, s3 = h.stride()
    view = h.as_strided((N, OH, OW, Cin, kh, kw), (s0, sh * s2, sw * s3, s1, dh * s2, dw * s3), h.storage_offset())
    out[:, :, :K].view(N, OH, OW, Cin, kh, kw).copy_(view)
    if ones:
        out[:, :, K].fill_(1)
    return out.transpose(1, 2)


def _cat(ts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def _signals(out: torch.Tensor, es: list[torch.Tensor], looped: bool) -> list:
    """``δ_o = ∂f_o/∂e`` for every output ``o``: per ``e``, an ``(O, *e.shape)`` tensor (batched) or a
    list of ``O`` tensors of ``e``'s shape (looped); either way ``sig[o]`` is ``δ_o``.

    One backward pass batched over the ``O`` cotangents (``is_grads_batched``, a vmap), or, with
    ``looped``, ``O`` ordinary backward passes whose results are kept as they come: on CPU the
    convolution and pooling backward kernels have no batching rule, and vmap's fallback loop and
    stacking (fresh, page-faulting memory) are slower than the plain loop.
    """
    N, O = out.shape
    if not out.requires_grad:
        return [[torch.zeros_like(e) for _ in range(O)] for e in es]
    if not looped:
        basis = torch.eye(O, dtype=out.dtype, device=out.device).unsqueeze(1).expand(O, N, O).contiguous()
        grads = torch.autograd.grad(out, es, grad_outputs=basis, is_grads_batched=True, allow_unused=True)
        return [torch.zeros((O,) + e.shape, dtype=e.dtype, device=e.device) if g is None else g
                for g, e in zip(grads, es)]
    res: list[list[torch.Tensor]] = [[] for _ in es]
    for o in range(O):
        ct = torch.zeros_like(out)
        ct[:, o] = 1
        grads = torch.autograd.grad(out, es, grad_outputs=ct, retain_graph=o < O - 1, allow_unused=True)
        for lst, g, e in zip(res, grads, es):
            lst.append(torch.zeros_like(e) if g is None else g)
    return res


def _unhooked(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _runs_forward(m: nn.Module) -> bool:
    """Calling ``m`` runs its class's ``forward`` (no ``forward`` set on the instance, no custom ``__call__``)."""
    return ("forward" not in vars(m) and type(m).__call__ is nn.Module.__call__
            and type(m)._call_impl is nn.Module._call_impl)


def _gains(m: nn.Module) -> tuple[float, float] | None:
    """``(g_w, g_b)`` that the module's forward applies (NTK layers; 1 for plain torch layers), or None
    where they are not plain numbers."""
    if type(m).forward not in (NTKLinear.forward, NTKConv2d.forward):
        return 1.0, 1.0
    gs = (getattr(m, "weight_gain", 1.0), getattr(m, "bias_gain", 1.0))
    if not all(isinstance(g, (int, float)) and not isinstance(g, bool) for g in gs):
        return None
    return float(gs[0]), float(gs[1])


def _pool_patterns(model: nn.Module, layers: list[_Layer]) -> dict[int, tuple[nn.Module, nn.Module]]:
    """``{layer index: (relu, pool)}`` for the conv layers followed, in a plain ``nn.Sequential``, by
    an ``nn.ReLU`` and an ``nn.MaxPool2d``: the conv output then reaches nothing but ReLU then the
    pool, so its signals are those at the pool output scattered to the argmax positions, times the
    ReLU derivative there (``pool output > 0``). Carrying the signals at the pool output saves the
    backward passes through the full-resolution pool and ReLU. Checked again at run time."""
    where: dict[int, tuple[nn.Sequential, int]] = {}
    for m in model.modules():
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward and _unhooked(m) \
                and _runs_forward(m):
            for j, c in enumerate(m):
                where.setdefault(id(c), (m, j))
    found = {}
    for i, lay in enumerate(layers):
        if lay.kind != "conv" or id(lay.module) not in where or not _unhooked(lay.module):
            continue
        seq, j = where[id(lay.module)]
        if j + 2 >= len(seq):
            continue
        relu, pool = seq[j + 1], seq[j + 2]
        if not (type(relu).forward is nn.ReLU.forward and type(pool).forward is nn.MaxPool2d.forward
                and not pool.return_indices and not pool.ceil_mode and _unhooked(relu) and _unhooked(pool)
                and _runs_forward(relu) and _runs_forward(pool) and _runs_forward(lay.module)):
            continue
        if _tiling_pool(pool):
            found[i] = (relu, pool)
    return found


def _tiling_pool(pool: nn.MaxPool2d) -> bool:
    """Windows that tile the input (stride = kernel, no padding, no dilation, floor mode): every input
    position is in at most one window, so signals at the pool output scatter without collisions."""
    k = _pair(pool.kernel_size)
    return (k == _pair(pool.stride if pool.stride is not None else k) and _pair(pool.padding) == (0, 0)
            and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode)


def _trace(prob: _Problem, layers: list[_Layer], x: torch.Tensor, pools: bool = True) -> _Features:
    """One forward pass recording every layer's input, one (batched) backward pass for the signals.

    Each hooked layer's output ``z`` is replaced by ``z + e`` with ``e = 0`` requiring grad,
    so ``∂f_o/∂e = ∂f_o/∂z = δ_o`` even when nothing upstream requires grad; the hooks
    are removed before returning (the model is left as it was). For a conv -> ReLU -> MaxPool2d
    pattern (see :func:`_pool_patterns`) ``e`` is added at the pool output instead and the argmax
    indices and ReLU derivative there are recorded; if the pattern is not followed at run time the
    trace is redone without it.
    """
    N = x.shape[0]
    recs: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]
    pats = _pool_patterns(prob.model, layers) if pools else {}
    pinfo: dict[int, tuple] = {}  # layer index -> (argmax positions in the conv output (N, C, Q), P = H W)
    pend_conv: dict[int, tuple] = {}  # id(conv output) -> (layer index, the tensor)
    pend_relu: dict[int, tuple] = {}  # id(relu output) -> (layer index, the tensor)
    broken: list[int] = []

    def hook_for(i):
        def hook(module, args, kwargs, output):
            h = args[0] if args else kwargs["input"]
            if i in pats:
                if recs[i] or not isinstance(output, torch.Tensor) or output.dim() != 4:
                    broken.append(i)
                else:
                    pend_conv[id(output)] = (i, output)
                recs[i].append((h.detach(), None))
                return None
            e = torch.zeros_like(output).requires_grad_(True)
            recs[i].append((h.detach(), e))
            return output + e
        return hook

    def relu_hook(module, args, kwargs, output):
        h = args[0] if args else kwargs.get("input")
        ent = pend_conv.pop(id(h), None)
        if ent is not None and ent[1] is h:
            pend_relu[id(output)] = (ent[0], output)

    def pool_hook(module, args, kwargs, output):
        h = args[0] if args else kwargs.get("input")
        ent = pend_relu.pop(id(h), None)
        if ent is None or ent[1] is not h or pats[ent[0]][1] is not module:
            return None
        i = ent[0]
        _, idx = F.max_pool2d(h.detach(), module.kernel_size, module.stride, return_indices=True)
        Nn, C = output.shape[:2]
        P = h.shape[2] * h.shape[3]
        idx.masked_fill_(output.detach() <= 0, P)  # ReLU derivative 0 at the argmax: to the dropped column
        pinfo[i] = (idx.reshape(Nn, C, -1), P)
        e = torch.zeros_like(output).requires_grad_(True)
        recs[i][0] = (recs[i][0][0], e)
        return output + e

    handles = [lay.module.register_forward_hook(hook_for(i), with_kwargs=True) for i, lay in enumerate(layers)]
    seen: set[int] = set()
    for relu, pool in pats.values():
        for m, hk in ((relu, relu_hook), (pool, pool_hook)):
            if id(m) not in seen:
                seen.add(id(m))
                handles.append(m.register_forward_hook(hk, with_kwargs=True))
    try:
        with torch.enable_grad():
            out = prob.forward(prob.diff, x)
    finally:
        for hd in handles:
            hd.remove()
    if pats and (broken or any(len(recs[i]) != 1 or i not in pinfo for i in pats)):
        return _trace(prob, layers, x, pools=False)
    O = out.shape[1]
    for lay, rec in zip(layers, recs):
        if not rec:
            raise _Unsupported(f"layer {lay.name!r} was not called through its forward")
        for h, e in rec:
            if h.dim() < 2 or h.shape[0] != N or e.shape[0] != N:
                raise _Unsupported(f"layer {lay.name!r} does not keep the batch in dimension 0")
    es = [e for rec in recs for _, e in rec]
    grads = _signals(out, es, looped=any(lay.kind == "conv" for lay in layers))

    feats = _Features(N, O)
    it = iter(grads)
    for i, (lay, rec) in enumerate(zip(layers, recs)):
        gs = [next(it) for _ in rec]  # per record: O tensors shaped like the layer's output
        sq_w, sq_b = _sq_of(prob, lay)
        if lay.kind == "linear":
            K, C = rec[0][0].shape[-1], rec[0][1].shape[-1]
            hs = _cat([h.reshape(N, -1, K) for h, _ in rec], 1)  # (N, P, K)
            if hs.shape[1] == 1:
                g = gs[0]
                d = g.reshape(O, N, C) if isinstance(g, torch.Tensor) else torch.stack([t.reshape(N, C) for t in g])
                feats.layout.append((lay.name, "gram", (C,), (K,)))
                feats.grams.append(_Gram(hs[:, 0] if lay.w is not None else None, d, sq_w, sq_b))
                continue
            hl = hs.transpose(1, 2) if lay.w is not None else None  # (N, K, P), a view
            if lay.b is not None:
                ones = hs.new_ones((N, 1, hs.shape[1]))
                hl = ones if hl is None else torch.cat([hl, ones], 1)
            dls = [_cat([g[o].reshape(N, -1, C) for g in gs], 1).transpose(1, 2) for o in range(O)]  # (N, C, P)
        elif i in pinfo:  # signals at the pool output, expanded to the conv output in _Jac.parts
            idx, P = pinfo[i]
            C, Q = idx.shape[1:]
            dp = torch.stack([gs[0][o].reshape(N, C, Q) for o in range(O)], 1)  # (N, O, C, Q)
            dls = None
            if lay.w is not None:
                hl = _conv_patches(lay.module, rec[0][0], lay.b is not None)  # (N, K', P)
            else:
                hl = rec[0][0].new_ones((1, 1, P)).expand(N, 1, -1)
        else:
            dls = [_cat([g[o].reshape(N, g[o].shape[1], -1) for g in gs], 2) for o in range(O)]  # (N, C, P)
            if lay.w is not None:
                hl = _cat([_conv_patches(lay.module, h, lay.b is not None) for h, _ in rec], 2)  # (N, K', P)
            else:
                hl = rec[0][0].new_ones((1, 1, dls[0].shape[2])).expand(N, 1, -1)
        C = dls[0].shape[1] if dls is not None else dp.shape[2]
        feats.layout.append((lay.name, "jac", (C,), tuple(hl.shape[1:2])))
        feats.jacs.append(_Jac(dls, hl, _jac_coef(sq_w, sq_b, C, hl), (dp, pinfo[i][0]) if i in pinfo else None))
    return feats


def _sq_of(prob: _Problem, lay: _Layer) -> tuple[object, object]:
    """The squared coefficients ``g² · (mask coefficient)²`` of a layer's weight and bias (None if absent)."""
    sq_w = None if lay.w is None else _sq_simplify(prob.sq[lay.w] * lay.gw ** 2)
    sq_b = None if lay.b is None else _sq_simplify(prob.sq[lay.b] * lay.gb ** 2)
    return sq_w, sq_b


def _jac_coef(sq_w, sq_b, C: int, hl: torch.Tensor):
    """The multiplier of an explicit Jacobian ``(C, K')`` (or one float): the square roots of the
    squared coefficients of the ``[W | b]`` columns."""
    cs = []  # per column group of [W | b]: sqrt of the squared coefficients, (C, k) or a float
    if sq_w is not None:
        cs.append(math.sqrt(sq_w) if isinstance(sq_w, float) else sq_w.reshape(C, -1).sqrt())
    if sq_b is not None:
        cs.append(math.sqrt(sq_b) if isinstance(sq_b, float) else sq_b.sqrt().unsqueeze(1))
    if all(isinstance(c, float) for c in cs) and len(set(cs)) == 1:
        return cs[0]
    widths = [hl.shape[1] - 1, 1] if len(cs) == 2 else [hl.shape[1]]
    return torch.cat([c.expand(C, k) if isinstance(c, torch.Tensor) else hl.new_full((C, k), c)
                      for c, k in zip(cs, widths)], 1)  # (C, K')


# The sequential engine: plain nn.Sequential models of the modules below are traced without autograd.
_ACT_FORWARDS = {nn.ReLU.forward: "relu", nn.LeakyReLU.forward: "leaky_relu", nn.Tanh.forward: "tanh",
                 nn.Sigmoid.forward: "sigmoid", ErfActivation.forward: "erf", nn.Identity.forward: "identity"}


def _no_global_hooks() -> bool:
    """No module hooks registered globally (``nn.modules.module.register_module_forward_hook`` & co.)."""
    from torch.nn.modules import module as _m
    return not any(getattr(_m, n, None) for n in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                   "_global_backward_hooks", "_global_backward_pre_hooks"))


def _conv_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    """The symmetric numeric padding of a conv, or None where it is asymmetric ('same' with an even span)."""
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        left_w, right_w, top_h, bottom_h = m._reversed_padding_repeated_twice
        return (top_h, left_w) if (left_w == right_w and top_h == bottom_h) else None
    return _pair(m.padding)


def _sequential_plan(model: nn.Module) -> list[tuple[str, nn.Module, str]] | None:
    """``[(name, module, kind)]`` of a plain (possibly nested) ``nn.Sequential`` whose modules are
    all of the kinds the engine knows (``linear``, ``conv``, ``flatten``, ``maxpool`` or an
    elementwise activation of ``_ACT_FORWARDS``), each used once and without hooks; else None."""
    if not _no_global_hooks():
        return None
    plan: list[tuple[str, nn.Module, str]] = []

    def walk(seq: nn.Module, prefix: str) -> bool:
        if not (isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward and _unhooked(seq)
                and _runs_forward(seq)):
            return False
        for name, m in seq._modules.items():
            if m is None:  # nn.Sequential would fail on it: leave the error to the model
                return False
            full = prefix + name
            if isinstance(m, nn.Sequential):
                if not walk(m, full + "."):
                    return False
                continue
            if not _unhooked(m) or not _runs_forward(m):
                return False
            fwd = type(m).forward
            if fwd in _LINEAR_FORWARDS:
                kind = "linear"
            elif fwd in _CONV_FORWARDS:
                if m.groups != 1 or m.padding_mode != "zeros" or _conv_padding(m) is None:
                    return False
                kind = "conv"
            elif fwd in _ACT_FORWARDS:
                kind = _ACT_FORWARDS[fwd]
            elif fwd is nn.Flatten.forward:
                kind = "flatten"
            elif fwd is nn.MaxPool2d.forward and not m.return_indices:
                kind = "maxpool"
            else:
                return False
            if kind not in ("linear", "conv") and (any(True for _ in m.parameters()) or any(True for _ in m.buffers())):
                return False
            for t in ("weight", "bias"):
                if kind in ("linear", "conv") and parametrize.is_parametrized(m, t):
                    try:
                        if get_mask(m, t) is None:
                            return False
                    except ValueError:
                        return False
            plan.append((full, m, kind))
        return True

    if not walk(model, "") or len({id(m) for _, m, _ in plan}) != len(plan):
        return None
    return plan


def _pool_form(plan, j: int) -> bool:
    """Is the conv at ``plan[j]`` followed by ReLU and a non-overlapping, unpadded MaxPool2d?"""
    if j + 2 >= len(plan) or plan[j + 1][2] != "relu" or plan[j + 2][2] != "maxpool":
        return False
    return _tiling_pool(plan[j + 2][1])


def _trace_sequential(prob: _Problem, layers: list[_Layer], x: torch.Tensor) -> _Features | None:
    """:func:`_trace` for plain ``nn.Sequential`` models (see :func:`_sequential_plan`), without autograd.

    The forward pass computes each differentiated convolution as a GEMM on its im2col patches
    (which the Jacobian needs anyway) and pools once, with indices. The signals of all ``O``
    outputs are then propagated together, as one batch of ``O N`` cotangents laid out ``(O, N, ...)``:
    ``δ ← δ W`` through a dense layer, the input gradient of the convolution
    (``aten.convolution_backward``) through a conv, a scatter-add of the pooling indices through
    max-pooling and the product with ``φ'(z)`` through an activation (ReLU: ``1[z > 0]``, as
    autograd). The propagation stops at the earliest layer that needs its signals. Returns None
    (and the caller falls back to :func:`_trace`) where the model is not such a ``Sequential`` or
    the input does not fit it.
    """
    plan = _sequential_plan(prob.model)
    if plan is None:
        return None
    pos = {id(m): j for j, (_, m, _) in enumerate(plan)}
    if any(id(lay.module) not in pos for lay in layers):
        return None
    lay_at = {pos[id(lay.module)]: i for i, lay in enumerate(layers)}

    alias: dict[str, str] = {}  # every name of a (tied) parameter -> the name named_parameters() keeps
    first: dict[int, str] = {}
    for n, p in prob.model.named_parameters(remove_duplicate=False):
        alias[n] = first.setdefault(id(p), n)

    def value(raw: str) -> torch.Tensor:
        raw = alias.get(raw, raw)
        if raw in prob.diff:
            v = prob.diff[raw]
            return v * prob.mult[raw] if raw in prob.mult else v
        return prob.fixed[raw]

    def effective(name: str, m: nn.Module, t: str) -> torch.Tensor | None:
        if parametrize.is_parametrized(m, t):
            canon = f"{name}.{t}" if name else t
            mask, scale = get_mask(m, t)
            keep = prob.fixed.get(mask_buffer_name(canon), mask)
            return masked_value(value(raw_name(canon)), keep, scale)
        own = getattr(m, t)
        if own is None:
            return None
        key = alias.get(f"{name}.{t}", f"{name}.{t}")
        if key in prob.diff or key in prob.fixed:
            return value(key)
        return own.detach().to(prob.dtype)  # a buffer standing for the tensor (a frozen layer)

    N = x.shape[0]
    h = x
    back: list[tuple] = []  # per module: what its backward needs
    rec: dict[int, dict] = {}  # layer index -> recorded inputs
    with torch.no_grad():
        for j, (name, m, kind) in enumerate(plan):
            i = lay_at.get(j)
            if kind == "linear":
                gains = _gains(m)
                W, b = effective(name, m, "weight"), effective(name, m, "bias")
                if gains is None or W is None or W.dim() != 2 or h.dim() != 2 or h.shape[1] != W.shape[1]:
                    return None
                gw, gb = gains
                Wg = W * gw if gw != 1.0 else W
                z = F.linear(h, Wg, None if b is None else (b * gb if gb != 1.0 else b))
                if i is not None:
                    rec[i] = {"h": h}
                back.append(("linear", Wg))
            elif kind == "conv":
                gains = _gains(m)
                W, b = effective(name, m, "weight"), effective(name, m, "bias")
                if gains is None or W is None or W.dim() != 4 or h.dim() != 4 or h.shape[1] != W.shape[1] \
                        or tuple(W.shape[2:]) != tuple(m.kernel_size):
                    return None
                gw, gb = gains
                Wg = W * gw if gw != 1.0 else W
                bg = None if b is None else (b * gb if gb != 1.0 else b)
                pad = _conv_padding(m)
                (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
                OH = (h.shape[2] + 2 * pad[0] - dh * (kh - 1) - 1) // sh + 1
                OW = (h.shape[3] + 2 * pad[1] - dw * (kw - 1) - 1) // sw + 1
                if OH < 1 or OW < 1:
                    return None
                if i is not None and layers[i].w is not None:
                    hl = _conv_patches(m, h, layers[i].b is not None)  # (N, K(+1), P)
                    K = Wg[0].numel()
                    z = torch.matmul(Wg.reshape(Wg.shape[0], K), hl[:, :K])
                    if bg is not None:
                        z.add_(bg.view(1, -1, 1))
                    z = z.view(N, -1, OH, OW)
                    rec[i] = {"hl": hl}
                else:
                    z = F.conv2d(h, Wg, bg, m.stride, m.padding, m.dilation)
                    if i is not None:
                        rec[i] = {"P": OH * OW}
                back.append(("conv", Wg, tuple(h.shape), pad))
            elif kind == "flatten":
                start = m.start_dim % h.dim() if h.dim() else 0
                if h.dim() < 2 or start == 0:
                    return None
                back.append(("reshape", tuple(h.shape)))
                z = m(h)
            elif kind == "maxpool":
                if h.dim() != 4:
                    return None
                z, idx = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                      return_indices=True)
                back.append(("maxpool", idx, tuple(h.shape), z))
            else:  # elementwise activation: the derivative, as autograd computes it
                if kind == "relu":
                    z, d = h.clamp_min(0), h > 0
                elif kind == "leaky_relu":
                    z = F.leaky_relu(h, m.negative_slope)
                    d = torch.where(h > 0, h.new_ones(()), h.new_full((), m.negative_slope))
                elif kind == "tanh":
                    z = torch.tanh(h)
                    d = 1 - z * z
                elif kind == "sigmoid":
                    z = torch.sigmoid(h)
                    d = z * (1 - z)
                elif kind == "erf":
                    z, d = torch.erf(h), torch.exp(-h * h) * (2 / math.sqrt(math.pi))
                else:
                    z, d = h, None
                back.append(("act", d, z))
            h = z
        if h.dim() < 1 or h.shape[0] != N:
            return None
        O = h[0].numel()

        # where each layer's signals are taken: the pool output for conv -> ReLU -> MaxPool2d
        take = {(j + 2 if plan[j][2] == "conv" and _pool_form(plan, j) else j): i for j, i in lay_at.items()}
        first = min(take)
        G = torch.eye(O, dtype=h.dtype, device=h.device).view((O, 1) + tuple(h.shape[1:])).expand(
            (O,) + tuple(h.shape))
        sig: dict[int, torch.Tensor] = {}
        relu_done = -1
        for j in range(len(plan) - 1, first - 1, -1):
            if j in take:
                sig[take[j]] = G
            if j == first:
                break
            op = back[j]
            if op[0] == "linear":
                G = torch.matmul(G, op[1])
            elif op[0] == "conv":
                _, Wg, shape, pad = op
                m = plan[j][1]
                Gf = G.reshape((O * N,) + tuple(G.shape[2:]))
                G = torch.ops.aten.convolution_backward(
                    Gf, Gf.new_empty(1).expand((O * N,) + shape[1:]), Wg, None, m.stride, pad, m.dilation,
                    False, [0, 0], 1, (True, False, False))[0].view((O,) + shape)
            elif op[0] == "reshape":
                G = G.reshape((O,) + op[1])
            elif op[0] == "maxpool":
                _, idx, shape, pooled = op
                C, Q = idx.shape[1], idx.shape[2] * idx.shape[3]
                if plan[j - 1][2] == "relu":  # ReLU' at the argmax is 1[pool output > 0]: applied here,
                    G = G * (pooled > 0)  # on the smaller tensor, and the ReLU below is skipped
                    relu_done = j - 1
                HW = shape[2] * shape[3]
                ix, src = idx.view(1, N, C, Q).expand(O, N, C, Q).reshape(O * N, C, Q), G.reshape(O * N, C, Q)
                if int(idx.max()) >= HW:  # a window entirely in the padding (output -inf): no input gets its signal
                    past = ix >= HW
                    ix, src = ix.masked_fill(past, 0), src.masked_fill(past, 0)
                Gi = G.new_zeros((O * N, C, HW))
                Gi.scatter_add_(2, ix, src)
                G = Gi.view((O,) + shape)
            elif op[1] is not None and relu_done != j:  # activation
                G = G * op[1]

    feats = _Features(N, O)
    for i, lay in enumerate(layers):
        sq_w, sq_b = _sq_of(prob, lay)
        r, d = rec[i], sig[i]
        C = d.shape[2]
        if lay.kind == "linear":
            K = r["h"].shape[1]
            feats.layout.append((lay.name, "gram", (C,), (K,)))
            feats.grams.append(_Gram(r["h"] if lay.w is not None else None, d.reshape(O, N, C).contiguous(),
                                     sq_w, sq_b))
            continue
        j = pos[id(lay.module)]
        if "hl" in r:
            hl = r["hl"]
        else:
            P = r["P"]
            hl = x.new_ones((1, 1, P)).expand(N, 1, -1)
        P = hl.shape[2]
        pool = dls = None
        if _pool_form(plan, j):  # signals at the pool output; argmax positions, P where ReLU' = 0 there
            _, idx, _, pooled = back[j + 2]
            idx = idx.reshape(N, C, -1).masked_fill(pooled.reshape(N, C, -1) <= 0, P)
            pool = (d.reshape(O, N, C, -1).transpose(0, 1).contiguous(), idx)
        else:
            dls = [d[o].reshape(N, C, P) for o in range(O)]
        feats.layout.append((lay.name, "jac", (C,), tuple(hl.shape[1:2])))
        feats.jacs.append(_Jac(dls, hl, _jac_coef(sq_w, sq_b, C, hl), pool))
    return feats


def _row_chunks(s: slice, per_row: int) -> list[slice]:
    """Split a row slice so that one chunk's temporary holds at most ``_TEMP_ELEMS`` elements."""
    r = max(1, _TEMP_ELEMS // max(per_row, 1))
    return [slice(i, min(i + r, s.stop)) for i in range(s.start, s.stop, r)]


def _masked_pairs(g1: _Gram, g2: _Gram, a: slice, b: slice):
    """Yield ``(rows, S)`` with ``S[n1, n2, i] = Σ_j M²_ij h1_j h2_j + m_b,i²``, in row chunks."""
    h2 = g2.h[b]
    nb, K = h2.shape
    O, _, C = g1.d.shape
    for r in _row_chunks(a, nb * max(K, O * C)):
        pairs = (g1.h[r].unsqueeze(1) * h2.unsqueeze(0)).reshape(-1, K)
        S = (pairs @ g1.sq_w.T).view(r.stop - r.start, nb, C)
        if g1.sq_b is not None:
            S = S + g1.sq_b
        yield r, S


class _Acc:
    """Accumulator of one ``(O, b1, O, b2)`` block: GEMMs write into it (or into one reused
    scratch buffer) so that no layer allocates a fresh block-sized temporary."""

    def __init__(self, shape: tuple[int, int, int, int], like: torch.Tensor):
        self.t = like.new_empty(shape)
        self.mat = self.t.view(shape[0] * shape[1], shape[2] * shape[3])
        self.written = False
        self._scratch: torch.Tensor | None = None

    def gemm(self, A: torch.Tensor, B: torch.Tensor, coef=None) -> None:
        """``acc += (A Bᵀ).view(O, b1, O, b2) * coef`` (``coef`` None, a float or ``(1, b1, 1, b2)``)."""
        if coef is None:
            if self.written:
                self.mat.addmm_(A, B.T)
            else:
                torch.mm(A, B.T, out=self.mat)
        elif not self.written:
            torch.mm(A, B.T, out=self.mat)
            self.t.mul_(coef)
        else:
            if self._scratch is None:
                self._scratch = torch.empty_like(self.t)
            torch.mm(A, B.T, out=self._scratch.view_as(self.mat))
            if isinstance(coef, torch.Tensor):
                self.t.addcmul_(self._scratch, coef)
            else:
                self.t.add_(self._scratch, alpha=coef)
        self.written = True

    def result(self) -> torch.Tensor:
        return self.t if self.written else self.t.zero_()

    def add_example_major(self, G: torch.Tensor) -> None:
        """``acc += G`` for ``G (b1 O, b2 O)`` with rows and columns ordered (example, output)."""
        O, b1, _, b2 = self.t.shape
        Gp = G.view(b1, O, b2, O).permute(1, 0, 3, 2)
        self.t.add_(Gp) if self.written else self.t.copy_(Gp)
        self.written = True


class _SymAcc(_Acc):
    """Accumulator of the symmetric ``(O, N, O, N)`` kernel ``Θ(x, x)``: each product ``A Aᵀ`` is
    computed only on the output-group tiles on and above the diagonal, ``(G + 1) / 2G`` of the
    FLOPs for ``G`` groups of outputs; :meth:`assemble` mirrors the rest. Contributions added to
    ``t`` directly (the masked path) may fill every tile; only the upper ones are read."""

    def __init__(self, shape: tuple[int, int, int, int], like: torch.Tensor):
        super().__init__(shape, like)
        O, N = shape[0], shape[1]
        g = -(-O // min(O, 5))
        self.groups = [(o, min(o + g, O)) for o in range(0, O, g)]
        self.N = N

    def gemm(self, A: torch.Tensor, B: torch.Tensor, coef=None) -> None:
        N, ON = self.N, self.mat.shape[0]
        for a0, a1 in self.groups:
            r0, r1 = a0 * N, a1 * N
            dst = self.mat[r0:r1, r0:]
            if coef is None:
                if self.written:
                    dst.addmm_(A[r0:r1], B[r0:].T)
                else:
                    torch.mm(A[r0:r1], B[r0:].T, out=dst)
                continue
            dst4 = self.t[a0:a1, :, a0:, :]
            if not self.written:
                torch.mm(A[r0:r1], B[r0:].T, out=dst)
                dst4.mul_(coef)
                continue
            if self._scratch is None:
                self._scratch = self.mat.new_empty(self.groups[0][1] * N * ON)
            tmp = self._scratch[:(r1 - r0) * (ON - r0)].view(r1 - r0, ON - r0)
            torch.mm(A[r0:r1], B[r0:].T, out=tmp)
            tmp4 = tmp.view(a1 - a0, N, -1, N)
            if isinstance(coef, torch.Tensor):
                dst4.addcmul_(tmp4, coef)
            else:
                dst4.add_(tmp4, alpha=coef)
        self.written = True

    jac: torch.Tensor | None = None  # the explicit-Jacobian layers' Gram, example-major (see _jac_gram)

    def assemble(self) -> torch.Tensor:
        """``(N, N, O, O)`` from the upper output tiles: ``Θ[o2, n2, o1, n1] = Θ[o1, n1, o2, n2]``,
        plus the example-major Gram ``jac`` (added in the same pass that reorders the result)."""
        O, N = self.t.shape[0], self.N
        G = None if self.jac is None else self.jac.view(N, O, N, O).permute(0, 2, 1, 3)
        if not self.written:
            return self.t.zero_().permute(1, 3, 0, 2).contiguous() if G is None else G.contiguous()
        t = self.t
        for o in range(O - 1):
            t[o + 1:, :, o, :] = t[o, :, o + 1:, :].permute(1, 2, 0)
        if G is None:
            return t.permute(1, 3, 0, 2).contiguous()
        return torch.add(t.permute(1, 3, 0, 2), G, out=t.new_empty((N, N, O, O)))


def _jac_gram(A: list[torch.Tensor], B: list[torch.Tensor], sym: bool) -> torch.Tensor | None:
    """``Σ_parts A Bᵀ``, ``(b1 O, b2 O)`` example-major, from the explicit Jacobian parts ``(b, O, w)``.
    With ``sym`` (``A is B``) only row groups on and above the diagonal are multiplied (``(k + 1) / 2k``
    of the FLOPs for ``k`` groups) and the rest is mirrored."""
    if not A:
        return None
    mats = [(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])) for a, b in zip(A, B)]
    R1, R2 = mats[0][0].shape[0], mats[0][1].shape[0]
    G = A[0].new_empty((R1, R2))
    g = -(-R1 // 5) if sym else R1
    for r0 in range(0, R1, g):
        r1 = min(r0 + g, R1)
        c0 = r0 if sym else 0
        for i, (a, b) in enumerate(mats):
            if i == 0:
                torch.mm(a[r0:r1], b[c0:].T, out=G[r0:r1, c0:])
            else:
                G[r0:r1, c0:].addmm_(a[r0:r1], b[c0:].T)
    if sym:
        for r0 in range(0, R1, g):
            r1 = min(r0 + g, R1)
            G[r1:, r0:r1] = G[r0:r1, r1:].T
    return G


def _coef(g1: _Gram, g2: _Gram, a: slice, b: slice):
    """``g_w² H H'ᵀ + g_b²`` for the unmasked parts of a layer (None if both are masked or absent)."""
    coef = None
    if g1.sq_w is not None and not isinstance(g1.sq_w, torch.Tensor):
        coef = g1.sq_w * (g1.h[a] @ g2.h[b].T)
    if isinstance(g1.sq_b, float) and not isinstance(g1.sq_w, torch.Tensor):
        coef = g1.sq_b if coef is None else coef.add_(g1.sq_b)
    return coef


def _gram_full(g1: _Gram, g2: _Gram, a: slice, b: slice, acc: _Acc) -> None:
    """Add a single-position layer's ``Θ_l[o1, n1, o2, n2]`` to the block accumulator."""
    D1, D2 = g1.mat(a), g2.mat(b)  # (O n1, C), (O n2, C)
    O, _, C = g1.d.shape
    n1, n2 = a.stop - a.start, b.stop - b.start
    coef = _coef(g1, g2, a, b)
    if coef is not None:  # (Δ Δ'ᵀ) ⊙ (g_w² H H'ᵀ + g_b²)
        acc.gemm(D1, D2, coef.view(1, n1, 1, n2) if isinstance(coef, torch.Tensor) else coef)
    if isinstance(g1.sq_b, torch.Tensor) and not isinstance(g1.sq_w, torch.Tensor):  # masked bias
        acc.gemm(D1 * g1.sq_b, D2)
    if isinstance(g1.sq_w, torch.Tensor):  # Σ_i δ_i S_i δ'_i with S = M² (h ⊙ h') + m_b², per pair
        written = acc.written
        d2 = g2.d[:, b].transpose(0, 1).contiguous()  # (n2, O, C)
        for r, S in _masked_pairs(g1, g2, a, b):
            T = S.unsqueeze(2) * d2.unsqueeze(0)  # (r, n2, O, C): δ' scaled by S per pair
            blk = torch.matmul(g1.d[:, r].transpose(0, 1), T.reshape(T.shape[0], n2 * O, C).transpose(1, 2))
            blk = blk.view(-1, O, n2, O).permute(1, 0, 3, 2)  # (O, r, O, n2)
            rr = slice(r.start - a.start, r.stop - a.start)
            acc.t[:, rr].add_(blk) if written else acc.t[:, rr].copy_(blk)
        acc.written = True


def _gram_trace(g1: _Gram, g2: _Gram, a: slice, b: slice, acc: torch.Tensor) -> None:
    """Add Σ_o Θ_l[:, :, o, o] of a single-position layer to ``acc (b1, b2)`` (divided by O later)."""
    d1, d2 = g1.d[:, a], g2.d[:, b]  # (O, n1, C), (O, n2, C)
    coef = _coef(g1, g2, a, b)
    if coef is not None:
        A = torch.bmm(d1, d2.transpose(1, 2)).sum(0)
        acc.addcmul_(A, coef) if isinstance(coef, torch.Tensor) else acc.add_(A, alpha=coef)
    if isinstance(g1.sq_b, torch.Tensor) and not isinstance(g1.sq_w, torch.Tensor):
        acc.add_(torch.bmm(d1 * g1.sq_b, d2.transpose(1, 2)).sum(0))
    if isinstance(g1.sq_w, torch.Tensor):
        for r, S in _masked_pairs(g1, g2, a, b):
            d1r = g1.d[:, r]
            E = d1r[0].unsqueeze(1) * d2[0].unsqueeze(0)  # (r, n2, C): Σ_o δ_o,i δ'_o,i, accumulated
            for o in range(1, d1r.shape[0]):
                E.addcmul_(d1r[o].unsqueeze(1), d2[o].unsqueeze(0))
            rr = slice(r.start - a.start, r.stop - a.start)
            acc[rr].add_(E.mul_(S).sum(-1))


def _gram_diag(g: _Gram, s: slice) -> torch.Tensor:
    """``(r, O, O)``: the layer's ``Θ_l(x, x)`` for the rows ``s``."""
    d = g.d[:, s].transpose(0, 1)  # (r, O, C)
    dt = d.transpose(1, 2)
    if isinstance(g.sq_w, torch.Tensor):
        h = g.h[s]
        w = (h * h) @ g.sq_w.T
        if g.sq_b is not None:
            w = w + g.sq_b
        return torch.bmm(d * w.unsqueeze(1), dt)
    G = None
    coef = None
    if g.sq_w is not None:
        h = g.h[s]
        coef = g.sq_w * (h * h).sum(1)
    if isinstance(g.sq_b, float):
        coef = g.sq_b if coef is None else coef + g.sq_b
    if coef is not None:
        G = torch.bmm(d, dt) * (coef.view(-1, 1, 1) if isinstance(coef, torch.Tensor) else coef)
    if isinstance(g.sq_b, torch.Tensor):
        Gb = torch.bmm(d * g.sq_b, dt)
        G = Gb if G is None else G + Gb
    return G


def _structured(prob: _Problem, layers: list[_Layer], x1: torch.Tensor, x2: torch.Tensor | None,
                mode: str, bs: int | None) -> torch.Tensor:
    sym = x2 is None
    F1 = _trace_sequential(prob, layers, x1) or _trace(prob, layers, x1)
    F2 = F1 if sym else (_trace_sequential(prob, layers, x2) or _trace(prob, layers, x2))
    N1, N2, O = F1.N, F2.N, F1.O
    if O != F2.O:
        raise ValueError(f"x2: the model gives {F2.O} outputs on x2 but {F1.O} on x1")
    if F1.layout != F2.layout:
        raise _Unsupported("the layers are used differently on x1 and on x2")
    Q = F1.jac_width
    if Q:  # explicit-Jacobian layers: bound the rows of one block of Jacobian features
        cap = max(1, _JAC_ELEMS // 8 // (O * Q))
        bs = cap if (bs is None and max(N1, N2) > cap) else (min(bs, cap) if bs is not None else None)
    if sym and bs is None and mode == "full" and O == 1 and N1 >= _SYM_SPLIT_ROWS[0]:
        # Θ(x, x) is symmetric: computing the blocks on and above the diagonal of a k x k
        # tiling costs (k + 1) / 2k of the GEMM FLOPs (several outputs: see _SymAcc)
        bs = -(-N1 // (2 if N1 < _SYM_SPLIT_ROWS[1] else 3))
    J1 = _RowCache(F1.jac_parts, _JAC_ELEMS // 4)
    J2 = J1 if sym else _RowCache(F2.jac_parts, _JAC_ELEMS // 4)

    if mode == "diagonal":
        parts = []
        for s in _slices(N1, bs):
            G = None
            for g in F1.grams:
                Gg = _gram_diag(g, s)
                G = Gg if G is None else G.add_(Gg)
            for J in J1(s):  # (r, O, w)
                Gj = torch.bmm(J, J.transpose(1, 2))
                G = Gj if G is None else G.add_(Gj)
            parts.append(G)
        return _finish(_cat(parts, 0), mode, O, N1, N1)

    like = x1

    def block(a: slice, b: slice, acc_type: type = _Acc) -> torch.Tensor | _Acc:
        n1, n2 = a.stop - a.start, b.stop - b.start
        if mode == "full":
            acc = acc_type((O, n1, O, n2), like)
            for g1, g2 in zip(F1.grams, F2.grams):
                _gram_full(g1, g2, a, b, acc)
            G = _jac_gram(J1(a), J2(b), sym and a == b)
            if acc_type is _SymAcc:
                acc.jac = G
                return acc
            if G is not None:
                acc.add_example_major(G)
            return acc.result()
        acc = like.new_zeros((n1, n2))
        for g1, g2 in zip(F1.grams, F2.grams):
            _gram_trace(g1, g2, a, b, acc)
        for A, B in zip(J1(a), J2(b)):  # Σ_o Σ_w A[n1, o, w] B[n2, o, w]: one GEMM
            acc.addmm_(A.reshape(n1, -1), B.reshape(n2, -1).T)
        return acc.div_(O)

    if sym and mode == "full" and bs is None and O > 1:
        return block(slice(0, N1), slice(0, N1), _SymAcc).assemble()
    K = _assemble(N1, N2, O, mode, sym, bs, block, like, omajor=True)
    return _finish(K, mode, O, N1, N2)


# --------------------------------------------------------------------------------------------
# Reference (Jacobian contraction) and NTK-vector products
# --------------------------------------------------------------------------------------------
def _jacobian_fn(prob: _Problem) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    def f1(diff, xi):
        return prob.forward(diff, xi.unsqueeze(0)).reshape(-1)

    jac = vmap(jacrev(f1), in_dims=(None, 0))

    def rows(x):  # {raw name: (n, O, numel)}
        J = jac(prob.diff, x)
        return {k: v.reshape(x.shape[0], v.shape[1], -1) for k, v in J.items()}
    return rows


def _jacobian(prob: _Problem, x1, x2, mode: str, bs: int | None, O: int) -> torch.Tensor:
    sym = x2 is None
    xs2 = x1 if sym else x2
    N1, N2 = x1.shape[0], xs2.shape[0]
    P = sum(v.numel() for v in prob.diff.values())
    cap = max(1, _JAC_ELEMS // 2 // (O * P))
    if max(N1, N2) > cap:
        bs = cap if bs is None else min(bs, cap)
    rows = _jacobian_fn(prob)
    R1 = _RowCache(lambda s: rows(x1[s]), _JAC_ELEMS)
    R2 = R1 if sym else _RowCache(lambda s: rows(xs2[s]), _JAC_ELEMS)

    if mode == "diagonal":
        parts = []
        for s in _slices(N1, bs):
            J = R1(s)
            parts.append(sum(torch.bmm(v, v.transpose(1, 2)) for v in J.values()))
        return _finish(_cat(parts, 0), mode, O, N1, N1)

    def block(a, b):
        A, B = R1(a), R2(b)
        n1, n2 = a.stop - a.start, b.stop - b.start
        if mode == "full":
            return sum((A[k].reshape(n1 * O, -1) @ B[k].reshape(n2 * O, -1).T) for k in A).view(n1, O, n2, O)
        return sum(A[k].reshape(n1, -1) @ B[k].reshape(n2, -1).T for k in A) / O

    return _finish(_assemble(N1, N2, O, mode, sym, bs, block, x1), mode, O, N1, N2)


def _jvp(prob: _Problem, x1, x2, mode: str, bs: int | None, O: int, act: int) -> torch.Tensor:
    """``Θ[:, n2, :, o2] = J(x1) (J(x2_n2)ᵀ e_o2)``: a vjp at one example, then a jvp over the block."""
    sym = x2 is None
    xs2 = x1 if sym else x2
    N1, N2 = x1.shape[0], xs2.shape[0]
    P = sum(v.numel() for v in prob.diff.values())
    eye = torch.eye(O, dtype=prob.dtype, device=prob.device)

    def single(d, xi):
        return prob.forward(d, xi.unsqueeze(0)).reshape(-1)

    def cotangent(xi, ct):
        _, pull = vjp(lambda d: single(d, xi), prob.diff)
        return pull(ct)[0]

    if mode == "diagonal":
        def one(xi):
            _, pull = vjp(lambda d: single(d, xi), prob.diff)

            def col(ct):
                return jvp(lambda d: single(d, xi), (prob.diff,), (pull(ct)[0],))[1]
            return vmap(col)(eye).T  # (o1, o2)

        chunk = max(1, _JVP_ELEMS // max(O * (P + act), 1))
        parts = [vmap(one, chunk_size=chunk)(x1[s]) for s in _slices(N1, bs)]
        return _finish(_cat(parts, 0), mode, O, N1, N1)

    def block(a, b):
        xa, xb = x1[a], xs2[b]
        n1, n2 = xa.shape[0], xb.shape[0]

        def col(xi, ct):
            v = cotangent(xi, ct)
            return jvp(lambda d: prob.forward(d, xa), (prob.diff,), (v,))[1]  # (n1, O)

        xs = xb.repeat_interleave(O, 0)
        cts = eye.repeat(n2, 1)
        chunk = max(1, _JVP_ELEMS // max(P + n1 * act, 1))
        cols = vmap(col, chunk_size=chunk)(xs, cts)  # ((n2, o2), n1, o1)
        K = cols.view(n2, O, n1, O).permute(2, 3, 0, 1)  # (n1, o1, n2, o2)
        if mode == "full":
            return K
        return torch.diagonal(K, dim1=1, dim2=3).mean(-1)

    return _finish(_assemble(N1, N2, O, mode, sym, bs, block, x1), mode, O, N1, N2)


def _probe(prob: _Problem, x: torch.Tensor) -> tuple[int, int, int]:
    """``(O, forward FLOPs, activation elements)`` of one example, from one instrumented forward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class _Count(TorchDispatchMode):
        elems = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                _Count.elems += out.numel()
            return out

    with torch.no_grad(), FlopCounterMode(display=False) as fc, _Count():
        out = prob.forward(prob.diff, x[:1])
    return out.shape[1], int(fc.get_total_flops()), int(_Count.elems)


def _cheaper(prob: _Problem, N1: int, N2: int, O: int, flops: int, mode: str) -> str:
    """Pick "jacobian" or "jvp" by a FLOP model (per-example backward ≈ 2 forwards, jvp ≈ 3).

    jacobian: 3 F O (N1 + N2) + 2 N1 N2 O^a P   (a = 2 full, 1 trace; diagonal: 2 N O² P)
    jvp:      N2 O (3 F + 3 F N1)               (diagonal: 6 N O F)
    """
    P = sum(v.numel() for v in prob.diff.values())
    Fl = max(flops, 2 * P)
    if mode == "diagonal":
        jac, jv = 3 * Fl * O * N1 + 2 * N1 * O * O * P, 6 * N1 * O * Fl
    else:
        jac = 3 * Fl * O * (N1 + N2) + 2 * N1 * N2 * (O * O if mode == "full" else O) * P
        jv = N2 * O * (3 * Fl + 3 * Fl * N1)
    return "jvp" if jv < jac else "jacobian"


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def empirical_ntk(model: nn.Module, x1, x2=None, *, params: Mapping[str, torch.Tensor] | None = None,
                  mask: Mapping[str, torch.Tensor] | None = None, mask_mode: str = "subnetwork",
                  mode: str = "full", method: str = "auto", block_size: int | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Empirical NTK ``Θ̂(x1, x2) = J(x1) Jᵀ(x2)`` of ``model`` (THEORY.md §B.3).

    Args:
        model: any ``nn.Module`` mapping ``(N, ...)`` to ``(N,)`` or ``(N, O)`` (further output
            dimensions are flattened into ``O``). Never mutated: it is called through
            ``torch.func.functional_call``; hooks used by ``"structured"`` are removed again.
        x1, x2: input batches ``(N1, ...)``, ``(N2, ...)`` with the same feature shape (tensors or
            numpy arrays); ``x2=None`` means ``x2 = x1`` (and exploits the symmetry). The dtype rule:
            inputs are cast to the kernel dtype (the model's dtype unless ``dtype=`` is given) at
            the boundary, and moved to the parameters' device; the caller's tensors are never
            modified. Must be real (complex inputs raise ``TypeError``) and finite.
        params: the parameters to differentiate, ``{name: tensor}`` (names of
            ``model.named_parameters()``, or canonical names for masked models); the other
            parameters are held at the model's values. Default: every parameter with
            ``requires_grad``.
        mask: ``{name: BoolTensor}``, True = kept (:mod:`ntk_theory.masks`); the forward pass is
            at ``m ⊙ θ``.
        mask_mode: ``"subnetwork"``: ``J(m⊙θ) diag(m) J(m⊙θ)ᵀ`` (the sub-network's NTK);
            ``"ntt"``: ``J(m⊙θ) J(m⊙θ)ᵀ`` (dense architecture at the masked weights, as NTT).
        mode: ``"full"`` -> ``(N1, N2, O, O)``, ``Θ[n1, n2, o1, o2] = ∂f_o1(x1_n1)·∂f_o2(x2_n2)``
            (``(N1, N2)`` for one output); ``"trace"`` -> ``(N1, N2)``, ``(1/O) Σ_o Θ[:, :, o, o]``,
            the estimate of the scalar infinite-width kernel; ``"diagonal"`` -> ``(N1, O, O)``
            (``(N1,)`` for one output), ``Θ(x, x)`` for each ``x`` in ``x1`` only (``x2`` must be None).
        method: ``"structured"`` (per-layer factorisation; ``nn.Linear``/``nn.Conv2d`` parameters
            only), ``"jacobian"`` (vmap(jacrev) and contraction, the reference), ``"jvp"``
            (NTK-vector products), ``"auto"`` (structured when it applies, else the cheaper of
            the other two by a FLOP model).
        block_size: compute the kernel in blocks of ``block_size`` rows and columns (bounded
            memory for large N); the result equals the unblocked one.
        dtype: kernel dtype (a floating ``torch.dtype``); default the model's dtype, i.e. that of
            the (first) differentiated parameter. Parameters, buffers and inputs are cast to it.

    Returns:
        The kernel as described under ``mode``, in ``dtype`` on the parameters' device.

    Raises:
        ValueError naming the argument for unknown ``mode``/``method``/``mask_mode``, invalid
        masks, mismatching or non-finite inputs, or ``method="structured"`` on a model it
        cannot handle. TypeError for arguments of the wrong type and for complex inputs.

    Cost of ``"structured"`` for an MLP with widths ``n_l``: ``Σ_l 2 (N O)² n_l + 2 N² n_{l-1}``
    FLOPs in full mode (``O`` times less in trace mode); with a mask a layer costs
    ``2 N² n_l n_{l-1}`` more. Convolutions cost ``2 (N O)² C_out C_in k²``.
    """
    check_choice(mode, "mode", MODES)
    check_choice(method, "method", METHODS)
    check_choice(mask_mode, "mask_mode", MASK_MODES)
    if block_size is not None:
        check_int(block_size, "block_size", minimum=1)
    prob = _prepare(model, params, mask, mask_mode, dtype)
    if x2 is x1:
        x2 = None
    x1 = _prepare_x(x1, "x1", prob)
    if x2 is not None:
        if mode == "diagonal":
            raise ValueError("x2: mode='diagonal' computes Θ(x, x) for each x in x1; pass x2=None")
        x2 = _prepare_x(x2, "x2", prob)
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"x2: feature shape {tuple(x2.shape[1:])} does not match x1's {tuple(x1.shape[1:])}")

    if method in ("auto", "structured"):
        try:
            return _structured(prob, _structured_layers(prob), x1, x2, mode, block_size)
        except _Unsupported as exc:
            if method == "structured":
                raise ValueError(f"method: 'structured' does not apply to this model ({exc}); "
                                 "use 'jacobian', 'jvp' or 'auto'") from None
    O, flops, act = _probe(prob, x1)
    if method == "auto":
        method = _cheaper(prob, x1.shape[0], x1.shape[0] if x2 is None else x2.shape[0], O, flops, mode)
    if method == "jacobian":
        return _jacobian(prob, x1, x2, mode, block_size, O)
    with warnings.catch_warnings():  # torch's first forward-mode AD call scripts its decompositions
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
        return _jvp(prob, x1, x2, mode, block_size, O, act)

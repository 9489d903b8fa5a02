"""Per-layer features of the structured NTK: which layers are differentiated (:func:`structured_layers`),
the Gram factors of single-position layers (:class:`Gram`), the explicit Jacobians of several-position
layers (:class:`Jac`, convolutions as im2col GEMMs, conv -> ReLU -> MaxPool2d in its pool form), and the
one builder (:func:`build_features`) that both tracers (:mod:`.sequential`, :mod:`.autograd_tracer`) end with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..layers import NTKConv2d, NTKLinear
from ..layers import gains as layers_gains
from ..masks import canonical_name, split_name
from .plan import DEFAULT_BUDGETS, Budgets, LayerInfo
from .problem import Problem, Unsupported, mask_info

__all__ = ["LINEAR_FORWARDS", "CONV_FORWARDS", "Layer", "structured_layers", "Gram", "Jac", "Features",
           "LayerRecord", "build_features", "conv_patches", "unhooked", "runs_forward", "gains_of",
           "tiling_pool", "sq_of", "jac_coef"]

# Module forwards whose computation is known to be op(h, weight_gain*W, bias_gain*b).
LINEAR_FORWARDS = (nn.Linear.forward, NTKLinear.forward)
CONV_FORWARDS = (nn.Conv2d.forward, NTKConv2d.forward)


@dataclass
class Layer:
    module: nn.Module
    name: str
    kind: str  # "linear" | "conv"
    w: str | None  # raw name of the differentiated weight, if any
    b: str | None  # raw name of the differentiated bias, if any
    gw: float
    gb: float


def structured_layers(prob: Problem) -> list[Layer]:
    model = prob.model
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    named = dict(model.named_parameters())
    layers: dict[str, Layer] = {}
    for raw in prob.diff:
        name = canonical_name(raw)
        prefix, tensor = split_name(name)
        module = model.get_submodule(prefix) if prefix else model
        where = f"parameter {name!r}"
        if not runs_forward(module):
            raise Unsupported(f"{where} belongs to a module whose call does not run its class's forward")
        if isinstance(module, nn.Linear) and type(module).forward in LINEAR_FORWARDS:
            kind = "linear"
        elif isinstance(module, nn.Conv2d) and type(module).forward in CONV_FORWARDS:
            kind = "conv"
            if module.groups != 1 or module.padding_mode != "zeros":
                raise Unsupported(f"{where}: Conv2d with groups != 1 or padding_mode != 'zeros'")
        else:
            raise Unsupported(f"{where} belongs to {type(module).__name__}, not an nn.Linear/nn.Conv2d "
                               "with a standard forward")
        if tensor not in ("weight", "bias"):
            raise Unsupported(f"{where} is neither the weight nor the bias of its layer")
        if raw != name and mask_info(model, raw) is None:
            raise Unsupported(f"{where} carries a parametrisation other than an awt mask")
        if owners.get(id(named[raw]), 1) > 1:
            raise Unsupported(f"{where} is shared by several modules")
        gains = gains_of(module)
        if gains is None:
            raise Unsupported(f"{where}: weight_gain/bias_gain are not numbers")
        lay = layers.setdefault(prefix, Layer(module, prefix, kind, None, None, *gains))
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
class Gram:
    """Single-position layer: input ``h (N, K)``, signals ``d (O, N, C)`` (output-major, as
    autograd returns them), squared coefficients."""
    h: torch.Tensor | None
    d: torch.Tensor
    sq_w: object  # None | float | (C, K)
    sq_b: object  # None | float | (C,)
    budgets: Budgets = DEFAULT_BUDGETS
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
class Jac:
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
    budgets: Budgets = DEFAULT_BUDGETS

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
        if self.pool is not None and Q >= self.budgets.gather_min_q:
            return self._gathered(s, J)
        nb = max(1, min(r, self.budgets.sig_elems // max(O * C * P, 1)))  # a cache-sized stack of signals
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
        nb = max(1, min(r, self.budgets.sig_elems // max(C * K * Q, 1)))
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
class Features:
    N: int
    O: int
    grams: list[Gram] = field(default_factory=list)
    jacs: list[Jac] = field(default_factory=list)
    layout: list[tuple] = field(default_factory=list)  # (layer, kind, widths): must agree for x1 and x2
    tracer: str = ""  # "sequential" | "autograd"
    forms: list[LayerInfo] = field(default_factory=list)  # per layer, in the order of the layers

    def jac_parts(self, s: slice) -> list[torch.Tensor]:
        return [p for j in self.jacs for p in j.parts(s)]

    @property
    def jac_width(self) -> int:
        return sum(j.width for j in self.jacs)


def conv_patches(module: nn.Conv2d, h: torch.Tensor, ones: bool) -> torch.Tensor:
    """im2col: ``(N, C_in, H, W)`` -> ``(N, C_in k k (+ 1), P)`` in the order of ``weight.reshape(C_out, -1)``,
    with a last row of ones if ``ones``. A strided view copied once (cheaper than ``F.unfold``), stored
    positions-major (the result is the transpose of a contiguous ``(N, P, K')``) so that the patch of
    one position is a contiguous row for the gathers of :meth:`Jac._gathered`."""
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


def unhooked(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def runs_forward(m: nn.Module) -> bool:
    """Calling ``m`` runs its class's ``forward`` (no ``forward`` set on the instance, no custom ``__call__``)."""
    return ("forward" not in vars(m) and type(m).__call__ is nn.Module.__call__
            and type(m)._call_impl is nn.Module._call_impl)


def gains_of(m: nn.Module) -> tuple[float, float] | None:
    """``(g_w, g_b)`` that an affine module's forward applies (:func:`ntk_theory.layers.gains`), or None
    where they are not plain numbers (a per-unit tensor gain: the structured path does not apply)."""
    try:
        return layers_gains(m)
    except (TypeError, ValueError, RuntimeError):
        return None


def tiling_pool(pool: nn.MaxPool2d) -> bool:
    """Windows that tile the input (stride = kernel, no padding, no dilation, floor mode): every input
    position is in at most one window, so signals at the pool output scatter without collisions."""
    k = _pair(pool.kernel_size)
    return (k == _pair(pool.stride if pool.stride is not None else k) and _pair(pool.padding) == (0, 0)
            and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode)


def sq_of(prob: Problem, lay: Layer) -> tuple[object, object]:
    """The squared coefficients ``g² · (mask coefficient)²`` of a layer's weight and bias (None if absent)."""
    sq_w = None if lay.w is None else _sq_simplify(prob.sq[lay.w] * lay.gw ** 2)
    sq_b = None if lay.b is None else _sq_simplify(prob.sq[lay.b] * lay.gb ** 2)
    return sq_w, sq_b


def jac_coef(sq_w, sq_b, C: int, hl: torch.Tensor):
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


@dataclass
class LayerRecord:
    """What a tracer recorded for one layer; :func:`build_features` turns it into a :class:`Gram` or a :class:`Jac`.

    A single-position layer has ``h (N, K)``, its input, and ``d (O, N, C)``, the signals ``δ_o = ∂f_o/∂z``.
    A several-position layer has ``hl (N, K', P)``, its input patches (a last row of ones with a
    differentiated bias), or only the number of positions ``P`` where its weight is not differentiated;
    and either ``dls`` (``O`` tensors ``(N, C, P)``) or, for conv -> ReLU -> MaxPool2d, ``pool`` =
    (signals at the pool output ``(N, O, C, Q)``, argmax positions ``(N, C, Q)``, ``P`` where ReLU' = 0).
    """

    h: torch.Tensor | None = None
    d: torch.Tensor | None = None
    hl: torch.Tensor | None = None
    P: int | None = None
    dls: list[torch.Tensor] | None = None
    pool: tuple | None = None


def build_features(prob: Problem, layers: list[Layer], N: int, O: int, records: list[LayerRecord],
                   tracer: str) -> Features:
    """The one feature builder of both tracers: per layer, the squared coefficients ``g² · m²`` of its
    weight and bias and either the Gram factors (input ``h``, signals ``d``) or the explicit-Jacobian
    factors (patches, signals, coefficients). This is the seam a kernel differentiable in the weights
    or masks can reuse: ``Θ_l = (Δ Δ'ᵀ) ⊙ (g_w² H M² H'ᵀ) + g_b² Δ M_b² Δ'ᵀ`` per :class:`Gram`."""
    feats = Features(N, O, tracer=tracer)
    for lay, r in zip(layers, records):
        sq_w, sq_b = sq_of(prob, lay)
        if r.d is not None:
            C, K = r.d.shape[2], r.h.shape[-1]
            feats.layout.append((lay.name, "gram", (C,), (K,)))
            feats.grams.append(Gram(r.h if lay.w is not None else None, r.d, sq_w, sq_b, budgets=prob.budgets))
            feats.forms.append(LayerInfo(lay.name, "gram"))
            continue
        like = r.dls[0] if r.dls is not None else r.pool[0]
        hl = r.hl if r.hl is not None else like.new_ones((1, 1, r.P)).expand(N, 1, -1)
        C = r.dls[0].shape[1] if r.dls is not None else r.pool[0].shape[2]
        feats.layout.append((lay.name, "jac", (C,), tuple(hl.shape[1:2])))
        feats.jacs.append(Jac(r.dls, hl, jac_coef(sq_w, sq_b, C, hl), r.pool, budgets=prob.budgets))
        form = "jacobian" if r.pool is None else (
            "pool-gathered" if r.pool[0].shape[3] >= prob.budgets.gather_min_q else "pool-scattered")
        feats.forms.append(LayerInfo(lay.name, form))
    return feats

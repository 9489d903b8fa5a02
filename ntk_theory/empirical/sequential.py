"""The sequential engine: plain ``nn.Sequential`` models traced without autograd.

A plain (possibly nested) ``nn.Sequential`` of ``Linear``/``Conv2d`` (NTK subclasses and awt masks
included), the activations of :mod:`ntk_theory.activations`, ``Flatten`` and ``MaxPool2d`` is run
forward once: each differentiated convolution as a GEMM on the im2col patches that its Jacobian needs
anyway, each pooling with its indices. The signals of all ``O`` outputs then go down together, as one
batch of ``O N`` cotangents laid out ``(O, N, ...)``: ``δ ← δ W`` through a dense layer, the input
gradient of the convolution (``aten.convolution_backward``) through a conv, a scatter-add of the pooling
indices through max-pooling and the product with ``φ'(z)`` (the registry's ``dphi``; ReLU: ``1[z > 0]``,
as autograd) through an activation, stopping at the earliest layer that needs its signals.

Each module kind has one entry in :data:`_FORWARD` (its forward, recording what its backward needs)
and one in :data:`_BACKWARD` (the signals through it); a new kind is one entry in each.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.nn.utils import parametrize

from ..activations import Activation, activation_of
from ..masks import get_mask, mask_buffer_name, masked_value, raw_name
from .features import (CONV_FORWARDS, LINEAR_FORWARDS, Features, Layer, LayerRecord, build_features, conv_patches,
                       gains_of, runs_forward, tiling_pool, unhooked)
from .problem import Problem

__all__ = ["sequential_plan", "conv_padding", "trace_sequential"]

_LINEAR_ACTS = ("identity",)  # φ' = 1: no product on the way down


@dataclass
class _Step:
    """One module of the plan: its full name, the module, its kind, and the activation entry (``kind == "act"``)."""
    name: str
    module: nn.Module
    kind: str  # "linear" | "conv" | "flatten" | "maxpool" | "act"
    act: Activation | None = None


def _no_global_hooks() -> bool:
    """No module hooks registered globally (``nn.modules.module.register_module_forward_hook`` & co.)."""
    from torch.nn.modules import module as _m
    return not any(getattr(_m, n, None) for n in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                   "_global_backward_hooks", "_global_backward_pre_hooks"))


def conv_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    """The symmetric numeric padding of a conv, or None where it is asymmetric ('same' with an even span)."""
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        left_w, right_w, top_h, bottom_h = m._reversed_padding_repeated_twice
        return (top_h, left_w) if (left_w == right_w and top_h == bottom_h) else None
    return _pair(m.padding)


# The kinds of module the engine knows, by the forward their class runs (activations: by the registry).
_KIND_OF_FORWARD = {**{f: "linear" for f in LINEAR_FORWARDS}, **{f: "conv" for f in CONV_FORWARDS},
                    nn.Flatten.forward: "flatten", nn.MaxPool2d.forward: "maxpool"}


def _step_of(name: str, m: nn.Module) -> _Step | None:
    """The plan step of one leaf module, or None where the engine does not know it."""
    if not unhooked(m) or not runs_forward(m):
        return None
    kind = _KIND_OF_FORWARD.get(type(m).forward)
    act = None
    if kind is None:
        act = activation_of(m)
        if act is None:
            return None
        kind = "act"
    if kind == "conv" and (m.groups != 1 or m.padding_mode != "zeros" or conv_padding(m) is None):
        return None
    if kind == "maxpool" and m.return_indices:
        return None
    if kind not in ("linear", "conv"):
        if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
            return None
        return _Step(name, m, kind, act)
    for t in ("weight", "bias"):
        if parametrize.is_parametrized(m, t):
            try:
                if get_mask(m, t) is None:
                    return None
            except ValueError:  # a foreign parametrisation
                return None
    return _Step(name, m, kind)


def sequential_plan(model: nn.Module) -> list[_Step] | None:
    """The steps of a plain (possibly nested) ``nn.Sequential`` whose modules are all of the kinds the
    engine knows, each used once and without hooks; else None."""
    if not _no_global_hooks():
        return None
    plan: list[_Step] = []

    def walk(seq: nn.Module, prefix: str) -> bool:
        if not (isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward and unhooked(seq)
                and runs_forward(seq)):
            return False
        for name, m in seq._modules.items():
            if m is None:  # nn.Sequential would fail on it: leave the error to the model
                return False
            if isinstance(m, nn.Sequential):
                if not walk(m, prefix + name + "."):
                    return False
                continue
            step = _step_of(prefix + name, m)
            if step is None:
                return False
            plan.append(step)
        return True

    if not walk(model, "") or len({id(s.module) for s in plan}) != len(plan):
        return None
    return plan


def _pool_form(plan: list[_Step], j: int) -> bool:
    """Is the conv at ``plan[j]`` followed by ReLU and a non-overlapping, unpadded MaxPool2d?"""
    if j + 2 >= len(plan) or not _is_relu(plan[j + 1]) or plan[j + 2].kind != "maxpool":
        return False
    return tiling_pool(plan[j + 2].module)


def _is_relu(step: _Step) -> bool:
    return step.kind == "act" and step.act.name == "relu"


@dataclass
class _Run:
    """The state of one engine run: the problem, the plan, the layers' positions, and what the
    forward pass left for the backward pass (``back[j]``) and for the features (``rec[i]``)."""
    prob: Problem
    plan: list[_Step]
    layers: list[Layer]
    lay_at: dict[int, int]  # plan position -> layer index
    alias: dict[str, str]  # every name of a (tied) parameter -> the name named_parameters() keeps
    N: int
    back: list[tuple] = field(default_factory=list)
    rec: dict[int, dict] = field(default_factory=dict)

    def value(self, raw: str) -> torch.Tensor:
        raw = self.alias.get(raw, raw)
        if raw in self.prob.diff:
            v = self.prob.diff[raw]
            return v * self.prob.mult[raw] if raw in self.prob.mult else v
        return self.prob.fixed[raw]

    def effective(self, name: str, m: nn.Module, t: str) -> torch.Tensor | None:
        """The tensor the module's forward uses as ``m.<t>``, from the problem's tensors."""
        canon = f"{name}.{t}" if name else t
        if parametrize.is_parametrized(m, t):
            mask, scale = get_mask(m, t)
            keep = self.prob.fixed.get(mask_buffer_name(canon), mask)
            return masked_value(self.value(raw_name(canon)), keep, scale)
        if getattr(m, t) is None:
            return None
        key = self.alias.get(canon, canon)
        if key in self.prob.diff or key in self.prob.fixed:
            return self.value(key)
        return getattr(m, t).detach().to(self.prob.dtype)  # a buffer standing for the tensor (a frozen layer)

    def affine(self, step: _Step, ndim: int, h: torch.Tensor):
        """``(g_w W, g_b b)`` of a linear / conv step, or None where the input or weights do not fit."""
        m = step.module
        gains = gains_of(m)
        W, b = self.effective(step.name, m, "weight"), self.effective(step.name, m, "bias")
        if gains is None or W is None or W.dim() != ndim or h.dim() != ndim or h.shape[1] != W.shape[1]:
            return None
        gw, gb = gains
        return (W * gw if gw != 1.0 else W), (None if b is None else (b * gb if gb != 1.0 else b))


# ---------------------------------------------------------------------------------------- forward
def _fwd_linear(run: _Run, j: int, step: _Step, h: torch.Tensor):
    wb = run.affine(step, 2, h)
    if wb is None:
        return None
    Wg, bg = wb
    if j in run.lay_at:
        run.rec[run.lay_at[j]] = {"h": h}
    run.back.append(("linear", Wg))
    return F.linear(h, Wg, bg)


def _fwd_conv(run: _Run, j: int, step: _Step, h: torch.Tensor):
    m = step.module
    wb = run.affine(step, 4, h)
    if wb is None or tuple(wb[0].shape[2:]) != tuple(m.kernel_size):
        return None
    Wg, bg = wb
    pad = conv_padding(m)
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    OH = (h.shape[2] + 2 * pad[0] - dh * (kh - 1) - 1) // sh + 1
    OW = (h.shape[3] + 2 * pad[1] - dw * (kw - 1) - 1) // sw + 1
    if OH < 1 or OW < 1:
        return None
    i = run.lay_at.get(j)
    if i is not None and run.layers[i].w is not None:
        hl = conv_patches(m, h, run.layers[i].b is not None)  # (N, K(+1), P)
        K = Wg[0].numel()
        z = torch.matmul(Wg.reshape(Wg.shape[0], K), hl[:, :K])
        if bg is not None:
            z.add_(bg.view(1, -1, 1))
        z = z.view(run.N, -1, OH, OW)
        run.rec[i] = {"hl": hl}
    else:
        z = F.conv2d(h, Wg, bg, m.stride, m.padding, m.dilation)
        if i is not None:
            run.rec[i] = {"P": OH * OW}
    run.back.append(("conv", Wg, tuple(h.shape), pad))
    return z


def _fwd_flatten(run: _Run, j: int, step: _Step, h: torch.Tensor):
    start = step.module.start_dim % h.dim() if h.dim() else 0
    if h.dim() < 2 or start == 0:
        return None
    run.back.append(("reshape", tuple(h.shape)))
    return step.module(h)


def _fwd_maxpool(run: _Run, j: int, step: _Step, h: torch.Tensor):
    m = step.module
    if h.dim() != 4:
        return None
    z, idx = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
    run.back.append(("maxpool", idx, tuple(h.shape), z))
    return z


def _fwd_act(run: _Run, j: int, step: _Step, h: torch.Tensor):
    """``z = φ(h)`` and ``φ'(h)`` from the activation registry (the derivative autograd computes)."""
    kw = step.act.params(step.module)
    z = step.act.phi(h, **kw)
    d = None if step.act.name in _LINEAR_ACTS else step.act.dphi(h, **kw)
    run.back.append(("act", d, z))
    return z


_FORWARD = {"linear": _fwd_linear, "conv": _fwd_conv, "flatten": _fwd_flatten, "maxpool": _fwd_maxpool,
            "act": _fwd_act}


# ---------------------------------------------------------------------------------------- backward
def _back_linear(run: _Run, j: int, op: tuple, G: torch.Tensor) -> torch.Tensor:
    return torch.matmul(G, op[1])


def _back_conv(run: _Run, j: int, op: tuple, G: torch.Tensor) -> torch.Tensor:
    _, Wg, shape, pad = op
    m = run.plan[j].module
    O, N = G.shape[0], run.N
    Gf = G.reshape((O * N,) + tuple(G.shape[2:]))
    return torch.ops.aten.convolution_backward(
        Gf, Gf.new_empty(1).expand((O * N,) + shape[1:]), Wg, None, m.stride, pad, m.dilation,
        False, [0, 0], 1, (True, False, False))[0].view((O,) + shape)


def _back_reshape(run: _Run, j: int, op: tuple, G: torch.Tensor) -> torch.Tensor:
    return G.reshape((G.shape[0],) + op[1])


def _back_maxpool(run: _Run, j: int, op: tuple, G: torch.Tensor) -> torch.Tensor:
    _, idx, shape, pooled = op
    O, N = G.shape[0], run.N
    C, Q = idx.shape[1], idx.shape[2] * idx.shape[3]
    if j >= 1 and _is_relu(run.plan[j - 1]):  # ReLU' at the argmax is 1[pool output > 0]: applied here,
        G = G * (pooled > 0)  # on the smaller tensor, and the ReLU below is skipped (see _back_act)
    HW = shape[2] * shape[3]
    ix, src = idx.view(1, N, C, Q).expand(O, N, C, Q).reshape(O * N, C, Q), G.reshape(O * N, C, Q)
    if int(idx.max()) >= HW:  # a window entirely in the padding (output -inf): no input gets its signal
        past = ix >= HW
        ix, src = ix.masked_fill(past, 0), src.masked_fill(past, 0)
    Gi = G.new_zeros((O * N, C, HW))
    Gi.scatter_add_(2, ix, src)
    return Gi.view((O,) + shape)


def _back_act(run: _Run, j: int, op: tuple, G: torch.Tensor) -> torch.Tensor:
    if op[1] is None or (_is_relu(run.plan[j]) and j + 1 < len(run.plan) and run.plan[j + 1].kind == "maxpool"):
        return G  # φ' = 1, or a ReLU whose derivative the max-pooling above has applied
    return G * op[1]


_BACKWARD = {"linear": _back_linear, "conv": _back_conv, "reshape": _back_reshape, "maxpool": _back_maxpool,
             "act": _back_act}


# ---------------------------------------------------------------------------------------- the tracer
def trace_sequential(prob: Problem, layers: list[Layer], x: torch.Tensor) -> Features | None:
    """The features of ``layers`` on ``x`` from the engine, or None (the caller then uses the
    autograd tracer) where the model is not such a ``Sequential`` or the input does not fit it."""
    plan = sequential_plan(prob.model)
    if plan is None:
        return None
    pos = {id(s.module): j for j, s in enumerate(plan)}
    if any(id(lay.module) not in pos for lay in layers):
        return None
    alias: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for n, p in prob.model.named_parameters(remove_duplicate=False):
        alias[n] = first_name.setdefault(id(p), n)
    N = x.shape[0]
    run = _Run(prob, plan, layers, {pos[id(lay.module)]: i for i, lay in enumerate(layers)}, alias, N)

    with torch.no_grad():
        h = x
        for j, step in enumerate(plan):
            h = _FORWARD[step.kind](run, j, step, h)
            if h is None:
                return None
        if h.dim() < 1 or h.shape[0] != N:
            return None
        O = h[0].numel()

        # where each layer's signals are taken: the pool output for conv -> ReLU -> MaxPool2d
        take = {(j + 2 if plan[j].kind == "conv" and _pool_form(plan, j) else j): i for j, i in run.lay_at.items()}
        first = min(take)
        G = torch.eye(O, dtype=h.dtype, device=h.device).view((O, 1) + tuple(h.shape[1:])).expand(
            (O,) + tuple(h.shape))
        sig: dict[int, torch.Tensor] = {}
        for j in range(len(plan) - 1, first - 1, -1):
            if j in take:
                sig[take[j]] = G
            if j == first:
                break
            op = run.back[j]
            G = _BACKWARD[op[0]](run, j, op, G)

    records = []
    for i, lay in enumerate(layers):
        r, d = run.rec[i], sig[i]
        C = d.shape[2]
        if lay.kind == "linear":
            records.append(LayerRecord(h=r["h"], d=d.reshape(O, N, C).contiguous()))
            continue
        j = pos[id(lay.module)]
        hl = r.get("hl")
        P = hl.shape[2] if hl is not None else r["P"]
        if _pool_form(plan, j):  # signals at the pool output; argmax positions, P where ReLU' = 0 there
            _, idx, _, pooled = run.back[j + 2]
            idx = idx.reshape(N, C, -1).masked_fill(pooled.reshape(N, C, -1) <= 0, P)
            records.append(LayerRecord(hl=hl, P=P, pool=(d.reshape(O, N, C, -1).transpose(0, 1).contiguous(), idx)))
        else:
            records.append(LayerRecord(hl=hl, P=P, dls=[d[o].reshape(N, C, P) for o in range(O)]))
    return build_features(prob, layers, N, O, records, "sequential")

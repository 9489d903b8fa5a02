"""The autograd-hook tracer of the structured NTK: any model whose differentiated parameters belong
to ``nn.Linear``/``nn.Conv2d`` layers. One forward pass with hooks records every layer's input, one
backward pass batched over the ``O`` outputs gives every layer's signals ``δ_o = ∂f_o/∂z``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocking import cat
from .features import (Features, Layer, LayerRecord, build_features, conv_patches, runs_forward, tiling_pool,
                       unhooked)
from .problem import Problem, Unsupported

__all__ = ["signals", "pool_patterns", "trace_autograd"]


def signals(out: torch.Tensor, es: list[torch.Tensor], looped: bool) -> list:
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


def pool_patterns(model: nn.Module, layers: list[Layer]) -> dict[int, tuple[nn.Module, nn.Module]]:
    """``{layer index: (relu, pool)}`` for the conv layers followed, in a plain ``nn.Sequential``, by
    an ``nn.ReLU`` and an ``nn.MaxPool2d``: the conv output then reaches nothing but ReLU then the
    pool, so its signals are those at the pool output scattered to the argmax positions, times the
    ReLU derivative there (``pool output > 0``). Carrying the signals at the pool output saves the
    backward passes through the full-resolution pool and ReLU. Checked again at run time."""
    where: dict[int, tuple[nn.Sequential, int]] = {}
    for m in model.modules():
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward and unhooked(m) \
                and runs_forward(m):
            for j, c in enumerate(m):
                where.setdefault(id(c), (m, j))
    found = {}
    for i, lay in enumerate(layers):
        if lay.kind != "conv" or id(lay.module) not in where or not unhooked(lay.module):
            continue
        seq, j = where[id(lay.module)]
        if j + 2 >= len(seq):
            continue
        relu, pool = seq[j + 1], seq[j + 2]
        if not (type(relu).forward is nn.ReLU.forward and type(pool).forward is nn.MaxPool2d.forward
                and not pool.return_indices and not pool.ceil_mode and unhooked(relu) and unhooked(pool)
                and runs_forward(relu) and runs_forward(pool) and runs_forward(lay.module)):
            continue
        if tiling_pool(pool):
            found[i] = (relu, pool)
    return found


def trace_autograd(prob: Problem, layers: list[Layer], x: torch.Tensor, pools: bool = True) -> Features:
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
    pats = pool_patterns(prob.model, layers) if pools else {}
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
        return trace_autograd(prob, layers, x, pools=False)
    O = out.shape[1]
    for lay, rec in zip(layers, recs):
        if not rec:
            raise Unsupported(f"layer {lay.name!r} was not called through its forward")
        for h, e in rec:
            if h.dim() < 2 or h.shape[0] != N or e.shape[0] != N:
                raise Unsupported(f"layer {lay.name!r} does not keep the batch in dimension 0")
    es = [e for rec in recs for _, e in rec]
    grads = signals(out, es, looped=any(lay.kind == "conv" for lay in layers))

    records = []
    it = iter(grads)
    for i, (lay, rec) in enumerate(zip(layers, recs)):
        gs = [next(it) for _ in rec]  # per record: O tensors shaped like the layer's output
        if lay.kind == "linear":
            K, C = rec[0][0].shape[-1], rec[0][1].shape[-1]
            hs = cat([h.reshape(N, -1, K) for h, _ in rec], 1)  # (N, P, K)
            if hs.shape[1] == 1:
                g = gs[0]
                d = g.reshape(O, N, C) if isinstance(g, torch.Tensor) else torch.stack([t.reshape(N, C) for t in g])
                records.append(LayerRecord(h=hs[:, 0], d=d))
                continue
            hl = hs.transpose(1, 2) if lay.w is not None else None  # (N, K, P), a view
            if lay.b is not None:
                ones = hs.new_ones((N, 1, hs.shape[1]))
                hl = ones if hl is None else torch.cat([hl, ones], 1)
            dls = [cat([g[o].reshape(N, -1, C) for g in gs], 1).transpose(1, 2) for o in range(O)]  # (N, C, P)
            records.append(LayerRecord(hl=hl, dls=dls))
        elif i in pinfo:  # signals at the pool output, expanded to the conv output in Jac.parts
            idx, P = pinfo[i]
            C, Q = idx.shape[1:]
            dp = torch.stack([gs[0][o].reshape(N, C, Q) for o in range(O)], 1)  # (N, O, C, Q)
            hl = conv_patches(lay.module, rec[0][0], lay.b is not None) if lay.w is not None else None  # (N, K', P)
            records.append(LayerRecord(hl=hl, P=P, pool=(dp, idx)))
        else:
            dls = [cat([g[o].reshape(N, g[o].shape[1], -1) for g in gs], 2) for o in range(O)]  # (N, C, P)
            hl = None
            if lay.w is not None:
                hl = cat([conv_patches(lay.module, h, lay.b is not None) for h, _ in rec], 2)  # (N, K', P)
            records.append(LayerRecord(hl=hl, P=dls[0].shape[2], dls=dls))
    return build_features(prob, layers, N, O, records, "autograd")

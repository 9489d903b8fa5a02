"""The structured path: the tracer that gives the features, and their contraction into the kernel."""
from __future__ import annotations

import torch

from .autograd_tracer import trace_autograd
from .blocking import RowCache, assemble, cat, finish, slices
from .contraction import Acc, SymAcc, gram_diag, gram_full, gram_trace, jac_gram
from .features import Features, Layer
from .problem import Problem, Unsupported
from .sequential import trace_sequential

__all__ = ["features", "structured"]


def features(prob: Problem, layers: list[Layer], x: torch.Tensor, tracer: str) -> Features:
    """The layers' features on ``x``: the sequential engine where it applies (``tracer="auto"``), else the
    autograd tracer; ``tracer="sequential"`` raises :class:`Unsupported` where the engine does not apply."""
    if tracer != "autograd":
        F_ = trace_sequential(prob, layers, x)
        if F_ is not None:
            return F_
        if tracer == "sequential":
            raise Unsupported("the sequential engine does not apply (not a plain nn.Sequential of Linear/Conv2d, "
                              "registered activations, Flatten and MaxPool2d, or an input that does not fit it)")
    return trace_autograd(prob, layers, x)


def structured(prob: Problem, layers: list[Layer], x1: torch.Tensor, x2: torch.Tensor | None,
               mode: str, bs: int | None, tracer: str = "auto") -> tuple[torch.Tensor, Features, int | None]:
    """The kernel from the per-layer features; returns ``(kernel, features of x1, block size used)``."""
    sym = x2 is None
    B = prob.budgets
    F1 = features(prob, layers, x1, tracer)
    F2 = F1 if sym else features(prob, layers, x2, tracer)
    N1, N2, O = F1.N, F2.N, F1.O
    if O != F2.O:
        raise ValueError(f"x2: the model gives {F2.O} outputs on x2 but {F1.O} on x1")
    if F1.layout != F2.layout:
        raise Unsupported("the layers are used differently on x1 and on x2")
    Q = F1.jac_width
    if Q:  # explicit-Jacobian layers: bound the rows of one block of Jacobian features
        cap = max(1, B.jac_elems // 8 // (O * Q))
        bs = cap if (bs is None and max(N1, N2) > cap) else (min(bs, cap) if bs is not None else None)
    if sym and bs is None and mode == "full" and O == 1 and N1 >= B.sym_split_rows[0]:
        # Θ(x, x) is symmetric: computing the blocks on and above the diagonal of a k x k
        # tiling costs (k + 1) / 2k of the GEMM FLOPs (several outputs: see SymAcc)
        bs = -(-N1 // (2 if N1 < B.sym_split_rows[1] else 3))
    J1 = RowCache(F1.jac_parts, B.jac_elems // 4)
    J2 = J1 if sym else RowCache(F2.jac_parts, B.jac_elems // 4)

    if mode == "diagonal":
        parts = []
        for s in slices(N1, bs):
            G = None
            for g in F1.grams:
                Gg = gram_diag(g, s)
                G = Gg if G is None else G.add_(Gg)
            for J in J1(s):  # (r, O, w)
                Gj = torch.bmm(J, J.transpose(1, 2))
                G = Gj if G is None else G.add_(Gj)
            parts.append(G)
        return finish(cat(parts, 0), mode, O, N1, N1), F1, bs

    like = x1

    def block(a: slice, b: slice, acc_type: type = Acc) -> torch.Tensor | Acc:
        n1, n2 = a.stop - a.start, b.stop - b.start
        if mode == "full":
            acc = acc_type((O, n1, O, n2), like)
            for g1, g2 in zip(F1.grams, F2.grams):
                gram_full(g1, g2, a, b, acc)
            G = jac_gram(J1(a), J2(b), sym and a == b)
            if acc_type is SymAcc:
                acc.jac = G
                return acc
            if G is not None:
                acc.add_example_major(G)
            return acc.result()
        acc = like.new_zeros((n1, n2))
        for g1, g2 in zip(F1.grams, F2.grams):
            gram_trace(g1, g2, a, b, acc)
        for A, B in zip(J1(a), J2(b)):  # Σ_o Σ_w A[n1, o, w] B[n2, o, w]: one GEMM
            acc.addmm_(A.reshape(n1, -1), B.reshape(n2, -1).T)
        return acc.div_(O)

    if sym and mode == "full" and bs is None and O > 1:
        return block(slice(0, N1), slice(0, N1), SymAcc).assemble(), F1, bs
    K = assemble(N1, N2, O, mode, sym, bs, block, like, omajor=True)
    return finish(K, mode, O, N1, N2), F1, bs

"""The references: per-example Jacobians contracted (``method="jacobian"``, ``vmap(jacrev)``) and
NTK-vector products (``method="jvp"``, a vjp at one example then a jvp over a block), with the
FLOP model that picks between them."""
from __future__ import annotations

from typing import Callable

import torch
from torch.func import jacrev, jvp, vjp, vmap

from .blocking import RowCache, assemble, cat, finish, slices
from .problem import Problem

__all__ = ["jacobian", "jvp_kernel", "probe", "cheaper"]


def _jacobian_fn(prob: Problem) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    def f1(diff, xi):
        return prob.forward(diff, xi.unsqueeze(0)).reshape(-1)

    jac = vmap(jacrev(f1), in_dims=(None, 0))

    def rows(x):  # {raw name: (n, O, numel)}
        J = jac(prob.diff, x)
        return {k: v.reshape(x.shape[0], v.shape[1], -1) for k, v in J.items()}
    return rows


def jacobian(prob: Problem, x1, x2, mode: str, bs: int | None, O: int) -> torch.Tensor:
    sym = x2 is None
    xs2 = x1 if sym else x2
    N1, N2 = x1.shape[0], xs2.shape[0]
    P = sum(v.numel() for v in prob.diff.values())
    cap = max(1, prob.budgets.jac_elems // 2 // (O * P))
    if max(N1, N2) > cap:
        bs = cap if bs is None else min(bs, cap)
    rows = _jacobian_fn(prob)
    R1 = RowCache(lambda s: rows(x1[s]), prob.budgets.jac_elems)
    R2 = R1 if sym else RowCache(lambda s: rows(xs2[s]), prob.budgets.jac_elems)

    if mode == "diagonal":
        parts = []
        for s in slices(N1, bs):
            J = R1(s)
            parts.append(sum(torch.bmm(v, v.transpose(1, 2)) for v in J.values()))
        return finish(cat(parts, 0), mode, O, N1, N1), bs

    def block(a, b):
        A, B = R1(a), R2(b)
        n1, n2 = a.stop - a.start, b.stop - b.start
        if mode == "full":
            return sum((A[k].reshape(n1 * O, -1) @ B[k].reshape(n2 * O, -1).T) for k in A).view(n1, O, n2, O)
        return sum(A[k].reshape(n1, -1) @ B[k].reshape(n2, -1).T for k in A) / O

    return finish(assemble(N1, N2, O, mode, sym, bs, block, x1), mode, O, N1, N2), bs


def jvp_kernel(prob: Problem, x1, x2, mode: str, bs: int | None, O: int, act: int) -> torch.Tensor:
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

        chunk = max(1, prob.budgets.jvp_elems // max(O * (P + act), 1))
        parts = [vmap(one, chunk_size=chunk)(x1[s]) for s in slices(N1, bs)]
        return finish(cat(parts, 0), mode, O, N1, N1)

    def block(a, b):
        xa, xb = x1[a], xs2[b]
        n1, n2 = xa.shape[0], xb.shape[0]

        def col(xi, ct):
            v = cotangent(xi, ct)
            return jvp(lambda d: prob.forward(d, xa), (prob.diff,), (v,))[1]  # (n1, O)

        xs = xb.repeat_interleave(O, 0)
        cts = eye.repeat(n2, 1)
        chunk = max(1, prob.budgets.jvp_elems // max(P + n1 * act, 1))
        cols = vmap(col, chunk_size=chunk)(xs, cts)  # ((n2, o2), n1, o1)
        K = cols.view(n2, O, n1, O).permute(2, 3, 0, 1)  # (n1, o1, n2, o2)
        if mode == "full":
            return K
        return torch.diagonal(K, dim1=1, dim2=3).mean(-1)

    return finish(assemble(N1, N2, O, mode, sym, bs, block, x1), mode, O, N1, N2)


def probe(prob: Problem, x: torch.Tensor) -> tuple[int, int, int]:
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


def cheaper(prob: Problem, N1: int, N2: int, O: int, flops: int, mode: str) -> str:
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

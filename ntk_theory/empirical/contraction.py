"""Contraction of per-layer features into kernel blocks: ``Θ_l = g_w² (Δ Δ'ᵀ) ⊙ (H H'ᵀ) + g_b² Δ Δ'ᵀ``
for a dense single-position layer (two GEMMs), the masked form ``Σ_i δ_i δ'_i (M² (h ⊙ h'))_i`` in row
chunks, explicit-Jacobian Grams, and the block accumulators (symmetric: only tiles on and above the
diagonal are multiplied)."""
from __future__ import annotations

import torch

from .features import Gram

__all__ = ["Acc", "SymAcc", "jac_gram", "gram_full", "gram_trace", "gram_diag"]


def _row_chunks(s: slice, per_row: int, budget: int) -> list[slice]:
    """Split a row slice so that one chunk's temporary holds at most ``budget`` elements."""
    r = max(1, budget // max(per_row, 1))
    return [slice(i, min(i + r, s.stop)) for i in range(s.start, s.stop, r)]


def _masked_pairs(g1: Gram, g2: Gram, a: slice, b: slice):
    """Yield ``(rows, S)`` with ``S[n1, n2, i] = Σ_j M²_ij h1_j h2_j + m_b,i²``, in row chunks."""
    h2 = g2.h[b]
    nb, K = h2.shape
    O, _, C = g1.d.shape
    for r in _row_chunks(a, nb * max(K, O * C), g1.budgets.temp_elems):
        pairs = (g1.h[r].unsqueeze(1) * h2.unsqueeze(0)).reshape(-1, K)
        S = (pairs @ g1.sq_w.T).view(r.stop - r.start, nb, C)
        if g1.sq_b is not None:
            S = S + g1.sq_b
        yield r, S


class Acc:
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


class SymAcc(Acc):
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

    jac: torch.Tensor | None = None  # the explicit-Jacobian layers' Gram, example-major (see jac_gram)

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


def jac_gram(A: list[torch.Tensor], B: list[torch.Tensor], sym: bool) -> torch.Tensor | None:
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


def _coef(g1: Gram, g2: Gram, a: slice, b: slice):
    """``g_w² H H'ᵀ + g_b²`` for the unmasked parts of a layer (None if both are masked or absent)."""
    coef = None
    if g1.sq_w is not None and not isinstance(g1.sq_w, torch.Tensor):
        coef = g1.sq_w * (g1.h[a] @ g2.h[b].T)
    if isinstance(g1.sq_b, float) and not isinstance(g1.sq_w, torch.Tensor):
        coef = g1.sq_b if coef is None else coef.add_(g1.sq_b)
    return coef


def gram_full(g1: Gram, g2: Gram, a: slice, b: slice, acc: Acc) -> None:
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


def gram_trace(g1: Gram, g2: Gram, a: slice, b: slice, acc: torch.Tensor) -> None:
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


def gram_diag(g: Gram, s: slice) -> torch.Tensor:
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

"""Blocking: the row/column blocks of a kernel, the tiling of ``Θ(x1, x2)`` (mirrored when
``x2 is x1``), a cache of row features, and the final squeeze of single outputs."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

__all__ = ["slices", "RowCache", "assemble", "finish", "cat"]


def slices(n: int, size: int | None) -> list[slice]:
    size = n if size is None else max(1, min(size, n))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class RowCache:
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


def assemble(N1: int, N2: int, O: int, mode: str, sym: bool, bs: int | None,
              block: Callable[[slice, slice], torch.Tensor], like: torch.Tensor,
              omajor: bool = False) -> torch.Tensor:
    """Tile the kernel from ``block(s1, s2)`` and return ``(N1, N2, O, O)`` (full) or ``(N1, N2)``.

    Full-mode blocks are ``(b1, O, b2, O)``, or ``(O, b1, O, b2)`` with ``omajor`` (rows ordered
    output-major, as autograd returns the signals); trace-mode blocks are ``(b1, b2)``. With
    ``sym`` (x2 is x1) only blocks on and above the diagonal are computed; the others are
    their transposes, ``Θ(x', x)[o', o] = Θ(x, x')[o, o']``.
    """
    perm, mirror = ((1, 3, 0, 2), (3, 1, 2, 0)) if omajor else ((0, 2, 1, 3), (2, 0, 3, 1))
    s1s = slices(N1, bs)
    s2s = s1s if sym else slices(N2, bs)
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


def finish(K: torch.Tensor, mode: str, O: int, N1: int, N2: int) -> torch.Tensor:
    """Squeeze a single output: ``(N1, N2, 1, 1)`` -> ``(N1, N2)``, ``(N1, 1, 1)`` -> ``(N1,)``."""
    if mode == "diagonal":
        return K.reshape(N1) if O == 1 else K
    return K.reshape(N1, N2) if O == 1 else K


def cat(ts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)

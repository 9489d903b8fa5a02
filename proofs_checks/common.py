"""Helpers shared by the check modules: the sweep progress bar, inputs on the sphere, seeded
generators and a one-thread context for loops of many tiny ops."""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, TypeVar

import torch

__all__ = ["progress", "progress_bar", "sphere_inputs", "generator", "one_intra_op_thread"]

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar over a check's sweep; silent when stderr is not a terminal (``disable=None``)."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None)


def progress_bar(total: int, desc: str):
    """A tqdm bar of ``total`` steps for nested sweeps (``with progress_bar(n, "C1") as bar: ... bar.update()``);
    silent when stderr is not a terminal."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, disable=None)


def sphere_inputs(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    r"""``(n, d)`` float64 points drawn uniformly on the sphere :math:`\|x\|^2 = d` (so that the
    first layer's pre-activation variance is :math:`\sigma_w^2` in the NTK parameterisation)."""
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True) * math.sqrt(d)


def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (an int; the checks combine their base seed
    with sweep indices, e.g. ``seed * 1_000_003 + width * 7_919 + s``)."""
    return torch.Generator().manual_seed(int(seed))


@contextlib.contextmanager
def one_intra_op_thread():
    """Run a block on one intra-op thread, restoring the caller's setting afterwards.

    Loops of thousands of small (N x width) ops (C5's GD, C11's RK4) on several OpenMP threads,
    on a machine whose cores are shared, wait at every op's barrier for descheduled threads
    (measured: 25 s instead of 1.3 s for C5 on 2 busy cores); one thread is never slower there.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

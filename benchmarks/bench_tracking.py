"""Benchmark of empirical.tracking: one KernelTracker call on the default probe set (64 clean + 64 PGD
test points) of the digits MLP 64-512-512-10 (NTK parameterisation, ReLU), against one PGD-10
adversarial-training epoch on digits (1438 training points, batch 128, SGD) written as a plain
PyTorch loop below (``plain_at_epoch``), timed in the same run. Target (issue 9): tracking costs at
most 10 % of an epoch.

Cases: ``own`` (the run's kernel and its drift, ``reference=None``), ``vs_dense`` (also the dense
reference network's kernel and outputs: two kernels), ``masked_vs_dense`` (a ticket masked with
``apply_mask`` at density 0.2 against the dense reference). ``awt experiment`` calls ``own`` and
``vs_dense`` for a ticket each epoch: its cost is the sum of the two rows.

Run:  .venv/bin/python -m pytest benchmarks/bench_tracking.py --benchmark-only -q
The ratios are in each benchmark's ``extra_info`` and in the table printed at the end.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch
from _report import write_lines
from torch import nn

from empirical import data as data_mod
from empirical import models
from empirical.tracking import KernelTracker, ProbeSet
from ntk_theory.masks import apply_mask, random_mask

EPS, STEPS, BATCH = 0.1, 10, 128
_ROWS: list[str] = []


def digits_mlp(seed: int = 0) -> nn.Module:
    return models.build("mlp", in_shape=(1, 8, 8), num_classes=10, seed=seed)


def plain_at_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                   opt: torch.optim.Optimizer) -> None:
    """One epoch of Madry et al.'s PGD-AT, the textbook loop: shuffled batches of 128; PGD-10 linf,
    alpha = 2.5 eps / steps, random start, projection by clamping to the ball and [0, 1]; one SGD
    step on the cross-entropy at the PGD points."""
    alpha = 2.5 * EPS / STEPS
    perm = torch.randperm(x.shape[0], generator=gen)
    for i in range(0, x.shape[0], BATCH):
        idx = perm[i:i + BATCH]
        xb, yb = x[idx], y[idx]
        model.eval()
        xa = (xb + torch.empty_like(xb).uniform_(-EPS, EPS, generator=gen)).clamp(0, 1)
        for _ in range(STEPS):
            xa.requires_grad_(True)
            loss = nn.functional.cross_entropy(model(xa), yb)
            (g,) = torch.autograd.grad(loss, xa)
            xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), xb - EPS), xb + EPS).clamp(0, 1)
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(xa), yb).backward()
        opt.step()


@pytest.fixture(scope="module")
def setup():
    ds = data_mod.load("digits")
    dense = digits_mlp(0)
    probe = ProbeSet.make(dense, ds, n_clean=64, n_adv=64, eps=EPS, steps=STEPS, seed=0)
    return ds, dense, probe


@pytest.fixture(scope="module", autouse=True)
def _table(request):
    yield
    if not _ROWS:
        return
    lines = ["", f"tracking (probe 64 + 64, digits MLP 64-512-512-10, mode='trace') vs one plain PGD-10 AT epoch "
                 f"(1438 points, batch 128), {torch.get_num_threads()} thread(s)"] + ["  " + r for r in _ROWS]
    write_lines(request, lines)


@pytest.mark.parametrize("case", ["own", "vs_dense", "masked_vs_dense"])
def test_tracking_vs_an_at_epoch(benchmark, setup, case):
    """The epoch is timed in pytest-benchmark's (untimed) setup before every round, so epochs and
    tracking calls alternate and share whatever load the machine has; the ratio is median/median."""
    ds, dense, probe = setup
    model = copy.deepcopy(dense)
    if case == "masked_vs_dense":
        apply_mask(model, random_mask(model, 0.2, generator=0))
    tracker = KernelTracker(probe, reference=None if case == "own" else dense)
    tracker(0, model)
    with torch.no_grad():  # a model away from its init, so that every figure is non-trivial
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))

    net = copy.deepcopy(dense)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    epochs: list[float] = []

    def one_epoch():
        t = time.perf_counter()
        plain_at_epoch(net, ds.x_train, ds.y_train, gen, opt)
        epochs.append(time.perf_counter() - t)

    out = benchmark.pedantic(lambda: tracker(1, model), setup=one_epoch, rounds=7, warmup_rounds=1, iterations=1)
    med = benchmark.stats.stats.median
    epoch_s = sorted(epochs[1:])[len(epochs[1:]) // 2]  # the first epoch ran before the warm-up round
    ratio = med / epoch_s
    benchmark.extra_info.update({"tracking_median_s": med, "plain_at_epoch_median_s": epoch_s,
                                 "fraction_of_epoch": ratio, "threads": torch.get_num_threads()})
    _ROWS.append(f"{case:16s} tracking {med * 1e3:7.1f} ms   epoch {epoch_s * 1e3:7.1f} ms   "
                 f"{100 * ratio:5.1f} % of an epoch (target <= 10 %)")
    assert out["kernel_distance_to_init"] > 0
    assert case == "own" or out["kernel_distance"] > 0

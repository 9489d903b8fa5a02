"""One PGD-10 adversarial-training epoch: ``empirical.train.adversarial_train`` against a plain
hand-written PyTorch PGD-AT loop on the same model, data and attack, timed in the same run.

Run: ``.venv/bin/python -m pytest benchmarks/bench_train.py --benchmark-only -q``.

Groups: the digits MLP (64-512-512-10, NTK parameterisation, 1437 training images) and LeNet-300-100
on the shared MNIST split (8,000 training images of ``../shared/data/mnist``; skipped without it),
batch 128, l-inf eps 0.1, PGD-10 (alpha = 2.5 eps / 10). The plain loop is the minimum work: a
permutation, 10 attack forward/backward passes and one training forward/backward per batch, SGD.
The masked variants prune 90 % of every layer but the first (``apply_mask`` in awt; the classic
``w *= m`` after every step in the plain loop). The issue's target: awt at least 0.9x the plain loop.
The last group is the issue's second target: 20 epochs of PGD-10 AT of the digits MLP (at most 60 s on
2 CPU cores).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _report import write_lines

from empirical import data as data_mod
from empirical import models
from empirical.train import adversarial_train
from ntk_theory.masks import random_mask

EPS, STEPS, BATCH = 0.1, 10, 128
ALPHA = 2.5 * EPS / STEPS
MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _setup(which):
    if which == "digits-mlp":
        ds = data_mod.load("digits")
        model = models.build("mlp", in_shape=ds.input_shape, num_classes=10, widths=(512, 512), seed=0)
    else:
        if not MNIST.is_dir():
            pytest.skip(f"no MNIST files in {MNIST}")
        ds = data_mod.load("mnist", root=MNIST)
        model = models.build("lenet300_100", in_shape=ds.input_shape, num_classes=10, seed=0)
    return ds, model


def _mask(model):
    names = [n for n, p in model.named_parameters() if p.dim() >= 2][1:]
    full = random_mask(model, 0.1, generator=0)
    return {n: (full[n] if n in names else torch.ones_like(full[n])) for n in full}


def _plain_epoch(model, ds, mask=None, lr=0.1):
    """The hand-written baseline (no validation, no bookkeeping)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    params = dict(model.named_parameters())
    x, y = ds.x_train, ds.y_train
    order = torch.randperm(x.shape[0])
    model.train()
    for i in range(0, x.shape[0], BATCH):
        xb, yb = x[order[i:i + BATCH]], y[order[i:i + BATCH]]
        xa = torch.clamp(xb + torch.empty_like(xb).uniform_(-EPS, EPS), 0, 1)
        for _ in range(STEPS):
            xa = xa.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xa), yb, reduction="sum"), xa)
            xa = torch.clamp(xb + torch.clamp(xa.detach() + ALPHA * g.sign() - xb, -EPS, EPS), 0, 1)
        loss = F.cross_entropy(model(xa.detach()), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mask is not None:
            with torch.no_grad():
                for n, m in mask.items():
                    params[n].mul_(m)
    return model


@pytest.mark.parametrize("which", ["digits-mlp", "lenet300_100-mnist"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked-q0.1"])
@pytest.mark.parametrize("impl", ["awt", "plain_torch_baseline"])
def test_epoch(benchmark, which, masked, impl):
    ds, model = _setup(which)
    benchmark.group = f"pgd10-at-epoch-{which}-{'masked' if masked else 'dense'}"
    mask = _mask(model) if masked else None
    if impl == "awt":
        run = lambda: adversarial_train(model, ds, mask=mask, eps=EPS, steps=STEPS, alpha=ALPHA, epochs=1,  # noqa: E731
                                        batch_size=BATCH, lr=0.1, progress=False)
    else:
        run = lambda: _plain_epoch(model, ds, mask)  # noqa: E731
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="pgd10-at-20-epochs-digits-mlp")
def test_twenty_epochs_digits_mlp(benchmark):
    ds, model = _setup("digits-mlp")
    res = benchmark.pedantic(lambda: adversarial_train(model, ds, eps=EPS, steps=STEPS, epochs=20, batch_size=BATCH,
                                                       lr=0.1, progress=False), rounds=1, iterations=1)
    assert len(res.history) == 21


_ROWS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _table(request):
    yield
    if _ROWS:
        head = (f"PGD-10 AT epoch, adversarial_train vs the plain loop, interleaved (best of 3 x 3 epochs, "
                f"{torch.get_num_threads()} thread(s))")
        write_lines(request, ["", head] + ["  " + r for r in _ROWS])


@pytest.mark.parametrize("which", ["digits-mlp", "lenet300_100-mnist"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked-q0.1"])
def test_epoch_ratio_interleaved(benchmark, which, masked):
    """The issue's target (awt at least 0.9x the plain loop's speed), timed alternately in one run so
    that a busy machine moves both sides alike: 3 epochs of each, three times, best time per epoch."""
    ds, model = _setup(which)
    benchmark.group = "pgd10-at-epoch-ratio"
    mask = _mask(model) if masked else None
    _plain_epoch(model, ds, mask)   # warm-up

    def pair():
        tp = ta = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(3):
                _plain_epoch(model, ds, mask)
            tp = min(tp, (time.perf_counter() - t) / 3)
            t = time.perf_counter()
            adversarial_train(model, ds, mask=mask, eps=EPS, steps=STEPS, alpha=ALPHA, epochs=3, batch_size=BATCH,
                              lr=0.1, progress=False)
            ta = min(ta, (time.perf_counter() - t) / 3)
        return tp, ta

    tp, ta = benchmark.pedantic(pair, rounds=1, iterations=1)
    _ROWS.append(f"{which:20s} {'masked q=0.1' if masked else 'dense':12s} plain {tp:.3f} s  awt {ta:.3f} s  "
                 f"speed ratio {tp / ta:.3f}")

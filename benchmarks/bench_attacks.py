"""PGD-10 on a 784-512-512-10 MLP (NTK parameterisation, float32), batch 256.

Run: ``.venv/bin/python -m pytest benchmarks/bench_attacks.py --benchmark-only -q``.
Baselines in the same group: a plain-torch PGD loop (the minimum work: 10
forward/backward passes) and ``torchattacks.PGD`` when it is installed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ntk_theory.attacks import fgsm, pgd
from ntk_theory.layers import finite_mlp

EPS, STEPS = 0.3, 10
ALPHA = 2.5 * EPS / STEPS


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    model = finite_mlp(784, 512, 2, out_features=10, generator=g, dtype=torch.float32).eval()
    x = torch.rand(256, 784, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    return model, x, y


def _plain_pgd(model, x, y):
    xa = torch.clamp(x + torch.empty_like(x).uniform_(-EPS, EPS), 0, 1)
    for _ in range(STEPS):
        xa = xa.detach().requires_grad_(True)
        (gr,) = torch.autograd.grad(F.cross_entropy(model(xa), y, reduction="sum"), xa)
        xa = torch.clamp(x + torch.clamp(xa.detach() + ALPHA * gr.sign() - x, -EPS, EPS), 0, 1)
    return xa.detach()


@pytest.mark.benchmark(group="pgd10-linf-784-512-512-10-b256")
def test_pgd10_linf_awt(benchmark, setup):
    model, x, y = setup
    g = torch.Generator().manual_seed(1)
    out = benchmark(lambda: pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, generator=g))
    assert float((out - x).abs().max()) <= EPS


@pytest.mark.benchmark(group="pgd10-linf-784-512-512-10-b256")
def test_pgd10_linf_plain_torch_baseline(benchmark, setup):
    model, x, y = setup
    benchmark(lambda: _plain_pgd(model, x, y))


@pytest.mark.benchmark(group="pgd10-linf-784-512-512-10-b256")
def test_pgd10_linf_torchattacks(benchmark, setup):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = setup
    atk = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
    benchmark(lambda: atk(x, y))


@pytest.mark.benchmark(group="pgd10-l2-784-512-512-10-b256")
def test_pgd10_l2_awt(benchmark, setup):
    model, x, y = setup
    g = torch.Generator().manual_seed(1)
    benchmark(lambda: pgd(model, x, y, eps=2.0, steps=STEPS, norm="l2", generator=g))


@pytest.mark.benchmark(group="fgsm-784-512-512-10-b256")
def test_fgsm_awt(benchmark, setup):
    model, x, y = setup
    benchmark(lambda: fgsm(model, x, y, eps=EPS))

"""Closed-form kernel benchmarks (README performance table).

Run: ``make bench`` or ``.venv/bin/python -m pytest benchmarks/bench_infinite.py --benchmark-only``.
Cases fixed by the foundation issue: ReLU MLP NTK with L=4 hidden layers on N=2000, d=64
(float64, x2=None so the symmetric path is used), and 3-conv CNTKs (Flatten and GAP
readouts) on N=64 images of 1x12x12.
"""
from __future__ import annotations

import pytest
import torch

from ntk_theory.infinite import Conv, Dense, Flatten, GlobalAvgPool, Relu, mlp, serial


@pytest.fixture(scope="module")
def mlp_inputs():
    return torch.randn(2000, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def images():
    return torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_mlp_relu_L4_N2000(benchmark, mlp_inputs):
    k = mlp(4)
    out = benchmark(k, mlp_inputs)
    assert out.ntk.shape == (2000, 2000)


def test_mlp_relu_L4_N2000_x1_x2(benchmark, mlp_inputs):
    k = mlp(4)
    x2 = mlp_inputs.flip(0).contiguous()
    out = benchmark(k, mlp_inputs, x2)
    assert out.ntk.shape == (2000, 2000)


@pytest.mark.parametrize("readout", [Flatten, GlobalAvgPool], ids=["flatten", "gap"])
def test_cntk_3conv_N64_12x12(benchmark, images, readout):
    k = serial(Conv(3), Relu(), Conv(3), Relu(), Conv(3), Relu(), readout(), Dense())
    out = benchmark.pedantic(k, args=(images,), rounds=3 if readout is GlobalAvgPool else 10, warmup_rounds=1)
    assert out.ntk.shape == (64, 64)

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


_PEAK_SCRIPT = r"""
import sys, torch
from ntk_theory.infinite import mlp
n, bs = int(sys.argv[1]), int(sys.argv[2])
x = torch.randn(n, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
k = mlp(4)
k(x[:8])                                   # warm-up: allocator and kernels
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")
r0 = status("VmRSS")
ntk = k(x, get="ntk", block_size=bs)
print(status("VmHWM") - r0, ntk.numel() * 8 / 2 ** 20)
"""


@pytest.mark.parametrize("n", [5000, 20000])
def test_mlp_peak_memory_is_the_output(benchmark, n):
    """Peak memory of a blocked N x N NTK (MiB, in a fresh process) against the output's own size.

    The blocks add O(block_size^2) working memory, so the peak stays close to the N^2 result.
    """
    import subprocess
    import sys

    def run():
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(n), "384"], capture_output=True, text=True,
                             check=True).stdout.split()
        return float(out[0]), float(out[1])

    peak, result = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(peak_mib=round(peak, 1), output_mib=round(result, 1))
    print(f"\nN={n}: peak {peak:.0f} MiB for an output of {result:.0f} MiB")
    assert peak < result + 200

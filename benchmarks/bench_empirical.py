"""Benchmarks of ntk_theory.empirical: "structured" against the plain torch.func Jacobian-contraction
recipe (``jacobian_recipe`` below, the same computation as method="jacobian" without its memory
blocking), timed in the same run; peak memory of "structured" measured in fresh subprocesses
(the resident high-water mark added by one call, see ``_peak_rss_mib``).

Run:  .venv/bin/python -m pytest benchmarks/bench_empirical.py --benchmark-only -q
The ratio, the Jacobian time and the memory figures are in each benchmark's ``extra_info``
(``--benchmark-json=FILE``) and in the table printed at the end of the module.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from _report import write_lines
from torch import nn

from ntk_theory.empirical import empirical_ntk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROWS: list[str] = []


def mlp(dtype: torch.dtype) -> nn.Module:
    """MLP 784-512-512-10 (plain nn.Linear, ReLU)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10)).to(dtype)


def lenet5(dtype: torch.dtype) -> nn.Module:
    """LeNet-5 on 1x28x28: conv5x5(6)-relu-maxpool-conv5x5(16)-relu-maxpool-120-84-10."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84),
                         nn.ReLU(), nn.Linear(84, 10)).to(dtype)


MODELS = {"mlp": (mlp, (784,)), "lenet5": (lenet5, (1, 28, 28))}


@pytest.fixture(scope="module", autouse=True)
def _table(request):
    """Print the summary rows at the end of the module (past pytest's output capture)."""
    yield
    if not _ROWS:
        return
    lines = ["", "empirical_ntk: structured vs the jacobian recipe (same run), full O x O outputs"]
    lines += ["  " + row for row in _ROWS]
    write_lines(request, lines)


def _peak_rss_mib(model: str, n: int, dtype: str, method: str) -> float:
    """Peak resident memory added by one empirical_ntk call (MiB), in a fresh interpreter.

    After a warm-up call on 2 points (thread pools, lazily loaded kernels), the kernel's
    high-water mark is reset (``/proc/self/clear_refs`` = 5) and the call's peak is
    ``VmHWM - VmRSS`` before the call; it includes the returned kernel. Falls back to the
    ``ru_maxrss`` increase where the reset is not allowed."""
    code = textwrap.dedent(f"""
        import json, resource, sys, torch
        sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); sys.path.insert(0, {ROOT!r})
        torch.set_num_threads({torch.get_num_threads()})
        from bench_empirical import MODELS
        from ntk_theory.empirical import empirical_ntk

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1])

        build, shape = MODELS[{model!r}]
        dt = getattr(torch, {dtype!r})
        net = build(dt)
        x = torch.randn({n}, *shape, dtype=dt)
        empirical_ntk(net, x[:2], method={method!r})
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            r0, how = status("VmRSS"), "VmHWM"
        except OSError:
            r0, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
        k = empirical_ntk(net, x, method={method!r})
        r1 = status("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"mib": (r1 - r0) / 1024, "how": how}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["mib"]


def jacobian_recipe(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain torch.func recipe (PyTorch's "Neural Tangent Kernels" tutorial): per-example
    Jacobians by ``vmap(jacrev)``, materialised for the whole batch, contracted per parameter;
    the Jacobian is computed once and used for both sides (x2 = x1). Returns (N, N, O, O)."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f1(p, xi):
        return torch.func.functional_call(net, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = torch.func.vmap(torch.func.jacrev(f1), (None, 0))(params, x)
    jac = [j.flatten(2) for j in jac.values()]
    return sum(torch.einsum("Naf,Mbf->NMab", j, j) for j in jac)


def _time(fn, rounds: int) -> float:
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


@pytest.mark.parametrize("case", [("mlp", 128, "float64"), ("mlp", 128, "float32"), ("lenet5", 64, "float64"),
                                  ("lenet5", 64, "float32"), ("lenet5", 128, "float64")],
                         ids=lambda c: f"{c[0]}-N{c[1]}-{c[2]}")
def test_structured_vs_jacobian(benchmark, case):
    name, n, dtype = case
    build, shape = MODELS[name]
    dt = getattr(torch, dtype)
    net = build(dt)
    x = torch.randn(n, *shape, dtype=dt, generator=torch.Generator().manual_seed(0))

    def structured():
        return empirical_ntk(net, x, method="structured")

    t0 = time.perf_counter()
    ref = jacobian_recipe(net, x)  # the baseline, also the reference value
    jac_s = time.perf_counter() - t0
    if name != "mlp":  # cheap enough to repeat: median of 3 after this warm-up
        jac_s = _time(lambda: jacobian_recipe(net, x), rounds=3)
    out = benchmark.pedantic(structured, rounds=15, warmup_rounds=2, iterations=1)
    med = benchmark.stats.stats.median
    rel = float((out - ref).abs().max() / ref.abs().max())
    mem = _peak_rss_mib(name, n, dtype, "structured")
    n_params = sum(p.numel() for p in net.parameters())
    benchmark.extra_info.update({
        "structured_median_s": med, "jacobian_s": jac_s, "speedup": jac_s / med, "max_rel_diff": rel,
        "structured_peak_rss_mib": mem, "output_mib": out.numel() * out.element_size() / 2 ** 20,
        "jacobian_analytic_gib": n * 10 * n_params * out.element_size() / 2 ** 30, "threads": torch.get_num_threads(),
    })
    _ROWS.append(f"{name:7s} N={n:<4d} {dtype:8s} structured {med * 1e3:8.1f} ms  jacobian {jac_s * 1e3:9.1f} ms  "
                 f"x{jac_s / med:6.1f}  peak RSS +{mem:6.1f} MiB  (J alone: "
                 f"{n * 10 * n_params * out.element_size() / 2 ** 30:.2f} GiB)  max rel diff {rel:.1e}")
    assert rel < (1e-10 if dt == torch.float64 else 1e-3)


@pytest.mark.parametrize("mode", ["trace", "diagonal"])
def test_structured_modes_mlp(benchmark, mode):
    net = mlp(torch.float64)
    x = torch.randn(128, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    benchmark.pedantic(lambda: empirical_ntk(net, x, mode=mode, method="structured"), rounds=15, warmup_rounds=2)
    _ROWS.append(f"mlp     N=128  float64  structured mode={mode:8s} {benchmark.stats.stats.median * 1e3:8.1f} ms")


def test_structured_masked_mlp(benchmark):
    from ntk_theory.masks import random_mask
    net = mlp(torch.float64)
    m = random_mask(net, 0.1, generator=0)
    x = torch.randn(128, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    benchmark.pedantic(lambda: empirical_ntk(net, x, mask=m, method="structured"), rounds=5, warmup_rounds=1)
    _ROWS.append(f"mlp     N=128  float64  structured, masked (q=0.1, layers 2-3) "
                 f"{benchmark.stats.stats.median * 1e3:8.1f} ms")


@pytest.mark.parametrize("n", [64, 256])
def test_structured_memory_scaling(benchmark, n):
    """Peak memory grows like N² O² (the output and one layer's Gram), not like N x #params."""
    net = mlp(torch.float64)
    x = torch.randn(n, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = benchmark.pedantic(lambda: empirical_ntk(net, x, method="structured"), rounds=3, warmup_rounds=1)
    mem = _peak_rss_mib("mlp", n, "float64", "structured")
    benchmark.extra_info.update({"structured_peak_rss_mib": mem,
                                 "output_mib": out.numel() * out.element_size() / 2 ** 20})
    _ROWS.append(f"mlp     N={n:<4d} float64  structured {benchmark.stats.stats.median * 1e3:8.1f} ms  "
                 f"peak RSS +{mem:6.1f} MiB  (output {out.numel() * 8 / 2 ** 20:.1f} MiB)")

"""Benchmarks of the ticket search (issue 10 targets), timed in the same run.

* ``test_awt_step``: one AWT search step (subnetwork mode, density 0.1, straight-through scores) on the
  digits MLP 64-512-512-10 (NTK parameterisation): 64 adversarial points split in halves, trace kernel,
  the objective of :func:`empirical.tickets.awt.objective` and its backward pass to the scores, through
  the structured differentiable kernel (``method="structured"``) and through ``vmap(jacrev)`` with the
  graph kept (``method="jacobian"``, the same objective); the ratio (target: >= 10x) is in the
  structured case's ``extra_info`` and the table printed at the end.
* ``test_awt_search_digits``: a whole AWT search with the default hyper-parameters on digits at
  density 0.1 (target: <= 60 s on 2 CPU cores).
* ``test_baseline_search_digits``: the other methods' searches on the same problem, for scale.

Run:  OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_tickets.py --benchmark-only -q
"""
from __future__ import annotations

import time

import pytest
import torch
from _report import write_lines

from empirical import data as D
from empirical import models as Mo
from empirical.tickets import awt, find_ticket
from ntk_theory.attacks import pgd


_ROWS: list[str] = []
_TIMES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _table(request):
    yield
    if not _ROWS:
        return
    lines = ["", "ticket search (digits MLP 64-512-512-10, density 0.1, "
             f"{torch.get_num_threads()} thread(s))"] + ["  " + r for r in _ROWS]
    write_lines(request, lines)


@pytest.fixture(scope="module")
def problem():
    ds = D.load("digits", seed=0)
    model = Mo.build("mlp", in_shape=ds.input_shape, num_classes=10, seed=0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = ds.x_train[:64]
    xa = pgd(model, x, model(x).argmax(1), eps=0.1, steps=10, generator=0)
    names = [n for n, p in model.named_parameters() if p.dim() >= 2][1:]
    params = dict(model.named_parameters())
    k = {n: round(0.1 * params[n].numel()) for n in names}
    return ds, model, xa, names, params, k


def _step(model, xa, names, params, k, method):
    scores = {n: params[n].detach().abs().clone().requires_grad_(True) for n in names}
    K0, f0 = awt.teacher(model, xa, 32, "trace")

    def run():
        M, C, _ = awt.subnetwork_masks(scores, k, False, torch.float32)
        out, ker = awt.objective(model, xa, 32, M, C, None, K0, f0, kernel_loss="distance", method=method)
        (0.3 * out + ker).backward()
        for s in scores.values():
            s.grad = None
    return run


@pytest.mark.parametrize("method", ["jacobian", "structured"])
def test_awt_step(benchmark, problem, method):
    _, model, xa, names, params, k = problem
    run = _step(model, xa, names, params, k, method)
    run()  # warm-up
    benchmark.pedantic(run, rounds=3 if method == "jacobian" else 10, iterations=1)
    t = benchmark.stats.stats.median
    _TIMES[method] = t
    benchmark.extra_info["median_s"] = t
    if method == "structured" and "jacobian" in _TIMES:
        ratio = _TIMES["jacobian"] / t
        benchmark.extra_info["speedup_vs_jacobian"] = ratio
        _ROWS.append(f"AWT step (64 adversarial points, trace): structured {t * 1e3:.1f} ms, vmap(jacrev) "
                     f"create_graph {_TIMES['jacobian'] * 1e3:.0f} ms, ratio {ratio:.1f}x (target >= 10x)")


def test_awt_search_digits(benchmark, problem):
    ds, model, *_ = problem
    out = {}

    def search():
        out["r"] = find_ticket("awt", model, ds, 0.1, seed=0, device="cpu", progress=False)

    benchmark.pedantic(search, rounds=1, iterations=1)
    r = out["r"]
    steps = [h["seconds"] for h in r.diagnostics["history"]]
    benchmark.extra_info.update(search_seconds=r.search_seconds, median_step_s=sorted(steps)[len(steps) // 2],
                                adv_kernel_distance=r.diagnostics["final"]["adv_kernel_distance"])
    _ROWS.append(f"AWT search, defaults (300 steps): {r.search_seconds:.1f} s (target <= 60 s), median step "
                 f"{sorted(steps)[len(steps) // 2] * 1e3:.1f} ms, held-out adversarial kernel distance "
                 f"{r.diagnostics['final']['adv_kernel_distance']:.2e}")


@pytest.mark.parametrize("method, hp", [("magnitude", {}), ("snip", {}), ("grasp", {}), ("synflow", {}),
                                        ("hydra", {"epochs": 2}), ("adv_imp", {"epochs": 1})],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_baseline_search_digits(benchmark, problem, method, hp):
    ds, model, *_ = problem
    ds = ds.subset(n_train=1024, seed=0)
    t0 = time.perf_counter()
    benchmark.pedantic(lambda: find_ticket(method, model, ds, 0.1, seed=0, device="cpu", progress=False, **hp),
                       rounds=1, iterations=1)
    _ROWS.append(f"{method} search ({hp or 'defaults'}, 1024 training points): {time.perf_counter() - t0:.2f} s")

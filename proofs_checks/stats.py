"""Small statistics used by the checks: log-log slopes with bootstrap intervals, and a Monte-Carlo
bias test of finite-width kernels against their limit."""
from __future__ import annotations

import numpy as np

__all__ = ["loglog_slope", "bootstrap_slope", "bias_z", "BIAS_Z"]


def loglog_slope(x, y) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    return float(np.polyfit(lx, ly, 1)[0])


def bootstrap_slope(x, samples, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """Slope of ``log(mean over seeds)`` vs ``log x`` and a percentile bootstrap interval.

    ``samples[i]`` holds the per-seed measurements at ``x[i]``; the bootstrap resamples
    seeds independently at each ``x`` (docs/theory.md §C: "slope of log(mean over >= 5 seeds)").
    Returns ``(slope, (lo, hi))``.
    """
    x = np.asarray(x, float)
    samples = [np.asarray(s, float) for s in samples]
    if len(x) != len(samples) or len(x) < 2:
        raise ValueError("samples: need one array of seeds per x, and at least two x values")
    slope = loglog_slope(x, [s.mean() for s in samples])
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        means = [s[rng.integers(0, len(s), len(s))].mean() for s in samples]
        boots[b] = loglog_slope(x, means)
    a = (1 - level) / 2
    return slope, (float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a)))


# Threshold of :func:`bias_z`: z is about 1 for an unbiased estimate (measured 0.4-1.4 for C1 over seeds
# 0-9); a reference kernel 2 % off gives z > 3.
BIAS_Z = 2.5


def bias_z(widths, kernels, limit) -> float:
    r"""Monte-Carlo test that the finite-width kernels average to ``limit``.

    ``kernels[i]`` is a ``(seeds, ...)`` stack of kernels at width ``widths[i]``. Their variance
    decays like 1/n, so the precision-weighted mean over widths uses weights
    :math:`w_i \propto n_i`; its standard error comes from the seeds,
    :math:`s^2 = \sum_i w_i^2 \widehat{\mathrm{Var}}_i / S_i` (entrywise, summed), and

    .. math:: z = \|\bar K - K_\infty\|_F / s

    is about 1 when the estimate is unbiased (a chi-type statistic over many entries) and grows
    with any bias that does not shrink with width: a wrong reference kernel, which the log-log
    slope alone can miss when the error it adds is below the finite-width error. (The
    :math:`O(1/n)` finite-width bias is small against :math:`s` at the widths the checks use.)
    """
    import torch
    if len(widths) != len(kernels) or not len(widths):
        raise ValueError(f"kernels: need one (seeds, ...) stack per width, got {len(kernels)} for {len(widths)} widths")
    for i, k in enumerate(kernels):
        if k.dim() < 1 or k.shape[0] < 2 or k.shape[1:] != limit.shape:
            raise ValueError(f"kernels[{i}]: expected shape (seeds >= 2, *{tuple(limit.shape)}), got {tuple(k.shape)}")
    w = np.asarray(widths, float)
    w = w / w.sum()
    mean = sum(float(wi) * k.mean(0) for wi, k in zip(w, kernels))
    var = sum(float(wi) ** 2 * k.var(0) / k.shape[0] for wi, k in zip(w, kernels))
    s = float(torch.as_tensor(var).sum().sqrt())
    return float((mean - limit).norm()) / s if s > 0 else float("inf")

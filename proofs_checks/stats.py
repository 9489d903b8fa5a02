"""Small statistics used by the checks: log-log slopes with bootstrap intervals."""
from __future__ import annotations

import numpy as np

__all__ = ["loglog_slope", "bootstrap_slope"]


def loglog_slope(x, y) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    return float(np.polyfit(lx, ly, 1)[0])


def bootstrap_slope(x, samples, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """Slope of ``log(mean over seeds)`` vs ``log x`` and a percentile bootstrap interval.

    ``samples[i]`` holds the per-seed measurements at ``x[i]``; the bootstrap resamples
    seeds independently at each ``x`` (THEORY.md §C: "slope of log(mean over >= 5 seeds)").
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

r"""C3: an unrescaled random mask scales the NTK by :math:`q^k`.

Statement (docs/theory.md §B.7, C3). For a ReLU MLP with :math:`\sigma_b = 0` in the NTK
parameterisation whose ``k`` weight layers after the first carry a uniformly random mask of
keep-probability ``q`` (no rescaling), the empirical NTK converges to the closed form with
:math:`\sigma_w^2 \to q\sigma_w^2` on those layers, which equals :math:`q^k\,\Theta`; hence
:math:`\mathrm{tr}\,\hat\Theta_{mask} / \mathrm{tr}\,\Theta \to q^k`. The check measures the
trace ratio over seeds at the largest width and passes when it agrees with :math:`q^k` within
4 standard errors of the seed mean plus an :math:`O(1/n)` finite-width allowance, for every q.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ntk_theory.empirical import empirical_ntk
from ntk_theory.infinite import mlp
from ntk_theory.masks import random_mask

from ..common import progress_bar, sphere_inputs
from ..registry import Outcome, register

PARAMS = {
    "quick": dict(depth=2, d_in=16, n_points=8, width=1024, densities=[0.5, 0.2, 0.05], seeds=6),
    "full": dict(depth=3, d_in=32, n_points=16, width=4096, densities=[0.5, 0.2, 0.1, 0.05, 0.02], seeds=10),
}
STATEMENT = ("For a ReLU MLP (sigma_b = 0) with unrescaled random masks of density q on its k weight layers after "
             "the first, tr NTK_mask / tr NTK -> q^k (the limit with sigma_w^2 -> q sigma_w^2 on masked layers).")


@register("C3", title="Unrescaled masks scale the NTK by q^k", statement=STATEMENT, rigour="theorem", params=PARAMS)
def check_c3(p: dict, seed: int, *, exponent: int | None = None) -> Outcome:
    """Run C3. ``exponent`` replaces k in the prediction q^k (tests plant a wrong one)."""
    k = p["depth"] if exponent is None else exponent     # masked layers: hidden-to-hidden and readout
    g = torch.Generator().manual_seed(seed)
    x = sphere_inputs(p["n_points"], p["d_in"], g)
    kern = mlp(p["depth"])
    limit_tr = float(kern(x, get="ntk").trace())
    rows, passed = [], True
    bar = progress_bar(len(p["densities"]) * p["seeds"], "C3 densities x seeds")
    for q in p["densities"]:
        ratios = []
        for s in range(p["seeds"]):
            gs = torch.Generator().manual_seed(seed * 7919 + s)
            net = kern.finite((p["d_in"],), width=p["width"], generator=gs)
            mask = random_mask(net, q, generator=gs)
            ratios.append(float(empirical_ntk(net, x, mask=mask).trace()) / limit_tr)
            bar.update()
        mean, se = float(np.mean(ratios)), float(np.std(ratios, ddof=1) / math.sqrt(len(ratios)))
        target = q ** k
        tol = 4 * se + 2 * target / (q * p["width"])      # O(1/(q n)): effective width q n
        ok = abs(mean - target) <= tol
        passed &= ok
        rows.append(dict(density=q, ratio=mean, se=se, predicted=target, tolerance=tol, passed=bool(ok)))
    bar.close()
    worst = max(abs(r["ratio"] / r["predicted"] - 1) for r in rows)
    return Outcome(
        parameters=dict(masked_layers=p["depth"], exponent=k),
        measured=dict(max_relative_deviation=worst, ratios=[r["ratio"] for r in rows]),
        expected=dict(ratios=[r["predicted"] for r in rows]),
        passed=bool(passed),
        details=dict(rows=rows, series=dict(x=p["densities"], y={"measured tr ratio": [r["ratio"] for r in rows],
                                                                 f"q^{k}": [r["predicted"] for r in rows]},
                                            xlabel="density q", ylabel="tr NTK_mask / tr NTK", loglog=True)),
    )

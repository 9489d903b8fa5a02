r"""C7: the adversarial NTK is a Lipschitz perturbation of the clean NTK.

Statement (docs/theory.md §C, C7; heuristic: the closed-form ReLU NTK is smooth away from
coincident points, so a perturbation of size :math:`\epsilon` moves it by :math:`O(\epsilon)`).
For the infinite-width ReLU NTK (depth 3, :math:`\sigma_b^2 = 0.1`) on inputs away from 0 and
from each other, with :math:`\tilde X = X + \epsilon\,\mathrm{sign}(\nabla_x \ell)` the FGSM
points of the kernel predictor (:math:`\ell_\infty`, no box),

.. math:: r(\epsilon) = \|\Theta(\tilde X,\tilde X) - \Theta(X, X)\|_F / \|\Theta(X, X)\|_F \propto \epsilon

for small :math:`\epsilon`. The check fits the log-log slope of :math:`r` over a grid of
:math:`\epsilon` and passes if it lies in [0.9, 1.1].
"""
from __future__ import annotations

import math

import torch

from ntk_theory.adversarial import adversarial_ntk
from ntk_theory.attacks import fgsm
from ntk_theory.infinite import mlp

from ..common import progress
from ..registry import Outcome, register
from ..stats import loglog_slope

BAND = (0.9, 1.1)
PARAMS = {
    "quick": dict(depth=3, d_in=64, n_points=16, eps=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),
    "full": dict(depth=3, d_in=64, n_points=64, eps=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),
}
STATEMENT = ("The infinite-width ReLU NTK at FGSM points moves linearly with the attack radius: "
             "r(eps) = ||Theta(X~,X~) - Theta(X,X)||_F / ||Theta(X,X)||_F has log-log slope in [0.9, 1.1].")


@register("C7", title="Adversarial NTK is Lipschitz in the attack radius", statement=STATEMENT, rigour="heuristic",
          params=PARAMS)
def check_c7(p: dict, seed: int, *, band: tuple[float, float] = BAND) -> Outcome:
    """Run C7. ``band`` replaces the accepted slope band (tests plant a quadratic claim)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p["n_points"], p["d_in"], generator=g, dtype=torch.float64)
    y = torch.randn(p["n_points"], generator=g, dtype=torch.float64)
    k = mlp(p["depth"], sigma_b=math.sqrt(0.1))
    clean = k(x, get="ntk")
    ratios = []
    for eps in progress(p["eps"], "C7 radii"):
        # FGSM on the kernel predictor fitted on (x, y) for time t = 10 N (adversarial_ntk builds it)
        attack = lambda f, xx, yy, e=eps: fgsm(f, xx, yy, eps=e, loss="mse", clamp=None)
        adv = adversarial_ntk(k, x, y, eps=eps, attack=attack, t=10.0 * p["n_points"])
        ratios.append(float((adv.k_adv_adv - clean).norm() / clean.norm()))
    slope = loglog_slope(p["eps"], ratios)
    passed = band[0] <= slope <= band[1]
    return Outcome(
        parameters=dict(sigma_b2=0.1, attack="FGSM linf on the kernel predictor (t = 10 N)", band=list(band)),
        measured=dict(slope=slope, r_at_max_eps=ratios[-1]),
        expected=dict(slope_band=list(band)),
        passed=bool(passed),
        details=dict(eps=p["eps"], ratios=ratios,
                     series=dict(x=p["eps"], y={"r(eps)": ratios}, xlabel="attack radius eps (l-inf)",
                                 ylabel="relative change of the NTK", loglog=True, reference_slope=1.0)),
    )

r"""C8: AT degeneration — robust accuracy of kernel-form adversarial training peaks at a finite time.

Statement (docs/theory.md §B.6 and §C, C8; Fu & Wang, ICLR 2024, "AT degeneration"; heuristic: a
theorem under their assumptions, which awt has not retrieved in full). Adversarial training of an
infinitely wide network in the kernel regime (AT-2 of §B.6, the infinite-width mean predictor,
:func:`ntk_theory.adversarial.adversarial_kernel_training` with a :func:`ntk_theory.infinite.mlp`
kernel): at each step the current predictor :math:`f_k` is attacked on the training set,
:math:`\tilde X_k = \mathrm{PGD}(f_k, X, Y)`, and

.. math:: f_{k+1}(x) = f_k(x) - \tfrac{\mathrm{lr}}{c}\,\Theta(x, \tilde X_k)\,(f_k(\tilde X_k) - Y),
          \qquad \tau_k = \mathrm{lr}\,k/c,

so :math:`f_k = \sum_{s<k}\Theta(\cdot, \tilde X_s)\,a_s` with :math:`a_s = -(\mathrm{lr}/c)(f_s(\tilde X_s) - Y)`.
The claim: the robust test accuracy :math:`A(\tau)` (PGD against :math:`f_k` itself, on held-out
points) **rises**, **peaks at a finite** :math:`\tau^*`, and then **decays toward** the robust
accuracy :math:`A_{std}` of standard NTK regression
:math:`\Theta(x, X)\Theta(X, X)^{-1}Y` (:class:`ntk_theory.adversarial.KernelRegressor`, ``t = inf``),
attacked in the same way.

Task. Two digit classes of scikit-learn's ``load_digits`` (8x8, 1797 images; offline), pixels /16 in
[0, 1], flattened to :math:`d = 64`, targets :math:`\pm 1` (MSE), ``n_train`` training and ``n_test``
held-out points drawn at random per seed (the seeds vary the split, the attacks' random starts and
nothing else). Attacks: :math:`\ell_\infty` PGD on the MSE loss inside the box [0, 1]
(:func:`ntk_theory.attacks.pgd`), ``steps`` iterations during training and ``eval_steps`` for the
evaluation. The predictor :math:`f_k` at a recorded step is rebuilt from the trajectory's adversarial
sets and residuals (``record_every=1``) and checked against the trajectory's own outputs on the clean
training points (``details["max_reconstruction_error"]``, must be < 1e-8).

Measured (quick scale: digits 3 vs 8, 12 training and 150 test points, depth-2 ReLU kernel,
:math:`\sigma_b = 0.1`, eps = 0.1, 5 PGD steps in training and 10 in evaluation, ``lr`` = half the
stability limit, 150 steps, 5 seeds; about 22 s on one core). Base seed 0: :math:`A` rises from 0.57
(:math:`\tau = 0.08`) to a peak of 0.757 at :math:`\tau^* = 2.3`, then falls to 0.727 at
:math:`\tau = 12.2` (:math:`\tau\lambda_{min} \approx 2`), against 0.689 for standard regression
(clean accuracy 0.936): passed. The effect is small and **seed-dependent**: base seeds 0 and 2 pass;
for base seed 1 the mean curve still rises at the last time (0.776 at :math:`\tau = 6.9`, 0.771 at 12),
and for base seed 3 the decay (0.005) is below two standard errors, so the check fails there. At
eps = 0.2 (not the quick scale) AT-2 stays far above standard regression over the horizon that fits
(0.45-0.50 against 0.19-0.27 at :math:`\tau\lambda_{min} \approx 1.6`-2.8) with only a shallow decay after
its peak. A reading [heuristic]: AT-2 uses the exact kernel at the adversarial points, and a fixed point
of it fits :math:`Y` at the worst points of the balls, which is more robust than the interpolant of the
clean points; in Fu & Wang's closed form the AT predictor at infinite width is a kernel expansion on the
clean points with per-sample training times (Adv-NTK, docs/theory.md §B.6), which tends to standard
regression as those times grow. The check therefore tests the
shape of the curve on a horizon of a few relaxation times, not the limit.

Pass criterion (seeds s = 1..S give the standard errors; ``z = 2``). With :math:`\bar A(\tau)` the
mean over seeds on the recorded grid, :math:`k^* = \arg\max\bar A`:

1. finite peak: :math:`k^*` is neither the first nor the last grid point;
2. rise: :math:`\bar A(\tau^*) - \bar A(\tau_{first}) \ge z\,SE`;
3. decay: :math:`\bar A(\tau^*) - \bar A(\tau_{last}) \ge z\,SE` (paired per-seed differences);
4. toward standard regression: the late-time gap :math:`|\bar A(\tau_{last}) - A_{ref}|` is at most
   ``max(z SE, late_tol)`` with ``late_tol = 0.05`` (the run stops at a finite time
   ``tau_last * lambda_min`` of a few relaxation times, so it approaches and need not reach
   the limit), and smaller than the peak's excess :math:`\bar A(\tau^*) - A_{ref}` (the decay has
   covered part of the way down to the reference).

Planted failures (tests): ``reference="clean"`` compares the late time with the *clean* accuracy
of standard regression (a wrong reference: the gap is many standard errors); a run stopped before
the peak (``train_steps`` small) has its maximum at the last point (no finite peak, no decay).
Training without attack (``eps=0``) is reported but is not a planted failure: early-stopped standard
kernel training is itself more robust than the interpolant, so its curve peaks too.

Rigour: heuristic. What is exact: the AT-2 recursion (up to float64 rounding) and the attacks
(PGD is a lower bound on the worst case, so :math:`A` is an upper bound on the true robust accuracy).
What is not: the claim itself (Fu & Wang's theorem has assumptions on the data and the attack that
are not checked here), and a finite horizon stands in for :math:`\tau\to\infty`.

Cost: AT-2 at infinite width is quadratic in ``train_steps`` (each step's attack evaluates the kernel
against every past adversarial set), so the quick scale uses 12 training points and a few relaxation
times of :math:`\lambda_{min}(\Theta(X, X))`.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from ntk_theory.adversarial import KernelRegressor, adversarial_kernel_training
from ntk_theory.attacks import pgd
from ntk_theory.dynamics import loss_scale
from ntk_theory.infinite import mlp

from ..common import one_intra_op_thread, progress
from ..registry import Outcome, register

Z = 2.0            # standard errors for the rise / decay / late-gap tests
LATE_TOL = 0.05    # absolute floor of the late-time tolerance (accuracy units)
RECON_TOL = 1e-8   # the rebuilt predictor must reproduce the trajectory's own outputs

PARAMS = {
    "quick": dict(classes=[3, 8], n_train=12, n_test=150, depth=2, sigma_b=0.1, eps=0.1, steps=5,
                  eval_steps=10, lr_fraction=0.5, train_steps=150, n_tau=10, seeds=5),
    "full": dict(classes=[3, 8], n_train=24, n_test=300, depth=2, sigma_b=0.1, eps=0.1, steps=5,
                 eval_steps=20, lr_fraction=0.5, train_steps=400, n_tau=16, seeds=8),
}
STATEMENT = ("Kernel-form adversarial training (AT-2, infinite-width ReLU NTK) on two digit classes: robust "
             "test accuracy A(tau) under PGD against the kernel predictor rises, peaks at a finite tau*, and "
             "decays toward the robust accuracy of standard NTK regression: the peak is an interior grid point, "
             "rise and decay are >= 2 standard errors over seeds, and the late-time gap to standard "
             "regression is <= max(2 SE, 0.05) and below the peak's excess over it.")


@lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float64), torch.tensor(d.target, dtype=torch.int64)


def digits_pair(classes, n_train: int, n_test: int, generator: torch.Generator):
    """``(x, y, x_test, y_test)``: two digit classes, pixels in [0, 1] flattened to 64, targets +-1
    (+1 for ``classes[0]``), a random split of ``n_train + n_test`` images drawn with ``generator``."""
    if len(classes) != 2 or classes[0] == classes[1] or not all(0 <= int(c) <= 9 for c in classes):
        raise ValueError(f"classes: expected two distinct digits in 0..9, got {classes!r}")
    x_all, t_all = _digits()
    sel = (t_all == classes[0]) | (t_all == classes[1])
    x_all, t_all = x_all[sel], t_all[sel]
    if n_train + n_test > len(x_all):
        raise ValueError(f"n_test: n_train + n_test = {n_train + n_test} exceeds the {len(x_all)} images of "
                         f"digits {classes[0]} and {classes[1]}")
    perm = torch.randperm(len(x_all), generator=generator)
    y_all = torch.where(t_all == classes[0], 1.0, -1.0).to(torch.float64)
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    return x_all[tr], y_all[tr], x_all[te], y_all[te]


def tau_grid(train_steps: int, n_tau: int) -> list[int]:
    """Recorded steps: about ``n_tau`` geometrically spaced steps in ``1..train_steps``, last included."""
    g = np.unique(np.round(np.geomspace(1, train_steps, n_tau)).astype(int))
    return [int(v) for v in g]


class _ATPredictor(torch.nn.Module):
    r""":math:`f_k(z) = \Theta(z, [\tilde X_0; ...; \tilde X_{k-1}])\,[a_0; ...; a_{k-1}]`."""

    def __init__(self, kernel, centres: torch.Tensor, coef: torch.Tensor):
        super().__init__()
        self.kernel, self.centres, self.coef = kernel, centres, coef

    def forward(self, z):
        return self.kernel(z, self.centres, get="ntk") @ self.coef


def _robust_acc(f, x, y, *, eps, steps, seed) -> tuple[float, float]:
    """(robust, clean) accuracy of sign(f) under l-inf PGD on the MSE loss in the box [0, 1]."""
    xa = pgd(f, x, y, eps=eps, steps=steps, loss="mse", clamp=(0.0, 1.0), generator=seed)
    with torch.no_grad():
        rob = float(((f(xa).reshape(-1) * y) > 0).double().mean())
        cln = float(((f(x).reshape(-1) * y) > 0).double().mean())
    return rob, cln


def _one_seed(p, kern, s_seed: int, grid: list[int], reference: str) -> dict:
    g = torch.Generator().manual_seed(s_seed)
    x, y, xt, yt = digits_pair(p["classes"], p["n_train"], p["n_test"], g)
    c = loss_scale(y, "size")
    lam = torch.linalg.eigvalsh(kern(x, get="ntk"))
    lam_min, lam_max = float(lam[0]), float(lam[-1])
    lr = p["lr_fraction"] * 2 * c / lam_max
    eval_seed = s_seed + 17
    traj = adversarial_kernel_training(kern, x, y, train_steps=p["train_steps"], lr=lr, eps=p["eps"],
                                       steps=p["steps"], clamp=(0.0, 1.0), generator=s_seed + 1)
    coef = -(lr / c) * (traj.f_adv[:-1] - y)          # a_s, s = 0..T-1
    centres = traj.x_adv[:-1]
    rob, cln, recon = [], [], 0.0
    for k in grid:
        f = _ATPredictor(kern, centres[:k].reshape(-1, x.shape[1]), coef[:k].reshape(-1))
        with torch.no_grad():
            recon = max(recon, float((f(x) - traj.f_train[k]).abs().max()))
        r_, c_ = _robust_acc(f, xt, yt, eps=p["eps"], steps=p["eval_steps"], seed=eval_seed)
        rob.append(r_)
        cln.append(c_)
    reg = KernelRegressor(kern, x, y)                     # standard NTK regression, t = inf
    std_rob, std_clean = _robust_acc(reg, xt, yt, eps=p["eps"], steps=p["eval_steps"], seed=eval_seed)
    # standard (eps = 0) kernel training stopped at the same times, attacked the same way (a reference curve)
    std_curve = [_robust_acc(KernelRegressor(kern, x, y, t=float(k), lr=lr), xt, yt, eps=p["eps"],
                             steps=p["eval_steps"], seed=eval_seed)[0] for k in grid]
    ref = std_rob if reference == "robust" else std_clean
    return dict(robust=rob, clean=cln, std_robust=std_rob, std_clean=std_clean, ref=ref, std_curve=std_curve,
                tau=[lr * k / c for k in grid], lr=lr, lam_min=lam_min, lam_max=lam_max,
                lr_limit=traj.meta["lr_limit"], recon=recon, final_robust_loss=float(traj.robust_loss[-1]))


@register("C8", title="AT degeneration: robust accuracy of kernel AT peaks at finite tau, then decays",
          statement=STATEMENT, rigour="heuristic", params=PARAMS)
def check_c8(p: dict, seed: int, *, reference: str = "robust") -> Outcome:
    """Run C8. ``reference``: ``"robust"`` (standard regression's robust accuracy, the claim) or
    ``"clean"`` (its clean accuracy: a planted wrong reference)."""
    if reference not in ("robust", "clean"):
        raise ValueError(f"reference: expected 'robust' or 'clean', got {reference!r}")
    for key in ("n_train", "n_test", "train_steps", "n_tau", "seeds", "depth"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise ValueError(f"{key}: expected a positive int, got {p[key]!r}")
    if p["seeds"] < 2:
        raise ValueError(f"seeds: need at least 2 seeds for a standard error, got {p['seeds']}")
    kern = mlp(p["depth"], "relu", 2 ** 0.5, p["sigma_b"])
    grid = tau_grid(p["train_steps"], p["n_tau"])
    runs = []
    with one_intra_op_thread():
        for s in progress(range(p["seeds"]), "C8 seeds"):
            runs.append(_one_seed(p, kern, seed * 1_000_003 + 7_919 * s, grid, reference))
    A = np.array([r["robust"] for r in runs])                # (S, K)
    ref = np.array([r["ref"] for r in runs])                 # (S,)
    S = A.shape[0]
    se = lambda v: float(np.std(v, ddof=1) / math.sqrt(S))
    mean = A.mean(0)
    kstar = int(np.argmax(mean))
    peak, first, last, ref_mean = float(mean[kstar]), float(mean[0]), float(mean[-1]), float(ref.mean())
    rise, se_rise = peak - first, se(A[:, kstar] - A[:, 0])
    decay, se_decay = peak - last, se(A[:, kstar] - A[:, -1])
    late_gap, se_gap = abs(last - ref_mean), se(A[:, -1] - ref)
    late_tol = max(Z * se_gap, LATE_TOL)
    excess = peak - ref_mean
    recon = max(r["recon"] for r in runs)
    checks = dict(
        finite_peak=0 < kstar < len(grid) - 1,
        rise=rise >= Z * se_rise and rise > 0,
        decay=decay >= Z * se_decay and decay > 0,
        late_gap=late_gap <= late_tol and late_gap < excess,
        reconstruction=recon < RECON_TOL,
    )
    passed = all(checks.values())
    tau_mean = np.array([r["tau"] for r in runs]).mean(0)
    relax = float(np.mean([r["tau"][-1] * r["lam_min"] for r in runs]))
    std_curve = np.array([r["std_curve"] for r in runs]).mean(0)
    return Outcome(
        parameters=dict(reference=reference, kernel=f"mlp({p['depth']}, relu, sigma_w=sqrt 2, sigma_b={p['sigma_b']})",
                        attack="PGD linf on the MSE loss in [0, 1], against the kernel predictor itself",
                        normalization="size", z=Z, late_tol_floor=LATE_TOL, tau_grid_steps=grid),
        measured=dict(peak_tau=float(tau_mean[kstar]), peak_robust_acc=peak, first_robust_acc=first,
                      last_robust_acc=last, last_tau=float(tau_mean[-1]), last_tau_times_lambda_min=relax,
                      std_regression_robust_acc=float(np.mean([r["std_robust"] for r in runs])),
                      std_regression_clean_acc=float(np.mean([r["std_clean"] for r in runs])),
                      reference_acc=ref_mean, rise=rise, se_rise=se_rise, decay=decay, se_decay=se_decay,
                      late_gap=late_gap, se_late_gap=se_gap, late_tol=late_tol, peak_excess=excess,
                      max_reconstruction_error=recon,
                      lr_over_limit=float(max(r["lr"] / r["lr_limit"] for r in runs))),
        expected=dict(finite_peak="0 < argmax < last grid point", rise=f">= {Z:g} SE", decay=f">= {Z:g} SE",
                      late_gap=f"<= max({Z:g} SE, {LATE_TOL:g}) and < peak_excess",
                      max_reconstruction_error=f"< {RECON_TOL:g}"),
        passed=bool(passed),
        details=dict(criteria={k: bool(v) for k, v in checks.items()}, tau=tau_mean.tolist(),
                     mean_robust_acc=mean.tolist(), per_seed=runs,
                     series=dict(x=[math.log10(t) for t in tau_mean.tolist()],
                                 y={"AT-2 robust test acc (mean over seeds)": mean.tolist(),
                                    "standard kernel training stopped at tau, robust acc": std_curve.tolist(),
                                    "standard NTK regression (tau = inf), robust acc": [float(
                                        np.mean([r["std_robust"] for r in runs]))] * len(grid)},
                                 xlabel="log10 training time tau = lr * step / c",
                                 ylabel="PGD robust test accuracy", loglog=False)),
    )

r"""C9: lazy adversarial training — PGD-AT of a wide network reaches its robust-loss floor near initialisation.

Statement (docs/theory.md §C, C9; Gao et al. 2019, "Convergence of adversarial training in
overparametrized neural networks", and Zhang et al. 2020; theorem *shape*: the exponents of their
width requirement :math:`m \ge \mathrm{poly}(n, R, 1/\epsilon)\,2^{O(H)}` were not retrieved). For an
MLP in the NTK parameterisation (:func:`ntk_theory.layers.finite_mlp`, depth ``depth``, hidden width
:math:`n`) trained by full-batch gradient descent on the robust MSE loss

.. math:: L(\theta) = \tfrac{1}{2c}\,\|f_\theta(\tilde X(\theta)) - Y\|^2,\qquad
          \tilde X(\theta) = \mathrm{PGD}(f_\theta, X, Y)

(``c = N``; Danskin: the step uses the gradient at the attacked points, held fixed), the robust
training loss reaches its floor while every weight matrix stays within :math:`O(n^{-1/2})` of its
initialisation *relative to its own size*: :math:`\|W_T - W_0\|_F/\|W_0\|_F = O(n^{-1/2})`, and the
NTK at the adversarial points moves less as the width grows.

Why :math:`n^{-1/2}` is the rate of the headline and only a bound per layer: the total parameter
movement is :math:`O(1)` in the NTK parameterisation (Lee et al. 2019) and :math:`\|W_0\|_F \approx
\sqrt{\mathrm{fan_{in}}\,\mathrm{fan_{out}}}`, so the first layer (:math:`n \times d`) and the readout
(:math:`1 \times n`) move by :math:`\Theta(n^{-1/2})` relative, and a hidden-to-hidden layer
(:math:`n \times n`, movement :math:`O(1)` against :math:`\|W_0\|_F \approx n`) by :math:`O(n^{-1})`,
which is Gao et al.'s per-layer :math:`R/\sqrt m` in absolute terms. The largest relative movement over
the layers therefore decays *as* :math:`n^{-1/2}`.

Pass criterion (slopes: :func:`proofs_checks.stats.bootstrap_slope`, log of the mean over seeds
against log n):

1. the largest per-layer relative movement (per network, the max over its weight matrices) has slope
   in ``[exponent - 0.15, exponent + 0.15]`` with ``exponent = -1/2`` (docs/theory.md §C's band);
2. every layer's relative movement has slope in ``[-1.5, exponent + 0.15]`` (at least as fast as
   :math:`n^{-1/2}`; as C5's ``FLOOR``, :math:`n^{-1}` minus 0.5 of fit noise);
3. the adversarial NTK change :math:`r(\hat\Theta_T(\tilde X_T,\tilde X_T), \hat\Theta_0(\tilde X_T,\tilde X_T))`
   (:math:`\tilde X_T` the PGD points of the trained network) has slope in ``[-1.5, -0.35]``;
4. the robust training loss reaches its floor: at every width its mean over seeds at the last step is
   at most ``FLOOR_RATIO = 0.1`` of its value at step 0, and the floor does not depend on the width
   (the log-log slope of the final mean robust loss against n lies in ``[-0.15, 0.15]``): the
   lazy limit. For information the check also runs kernel-form AT at infinite width
   (:func:`ntk_theory.adversarial.adversarial_kernel_training` on :func:`ntk_theory.infinite.mlp`,
   docs/theory.md §B.6 AT-2, same lr, attack and steps): that is the *mean* predictor, which starts
   from :math:`f_0 = 0`, whereas each finite network starts from a random :math:`f_0` of order one
   whose input gradient the attack also uses; its robust loss is lower (measured 0.012 against
   0.06-0.07 at every width, quick scale, seed 0) and is not the floor of a single network.

Planted failures (tests): a claimed ``exponent=-1`` (the first and last layers move as
:math:`n^{-1/2}`, so the band [-1.15, -0.85] is missed); ``reference="other_init"`` measures the
movement against the initialisation of another seed (a wrong :math:`W_0`: the relative distance is
about :math:`\sqrt 2` at every width, slope 0); ``train_steps`` too small (the loss is far above its
floor).

Training loop. The theorem is about full-batch gradient descent on the robust *regression* loss of a
fixed training set of sphere inputs (no [0, 1] box), whereas :func:`empirical.train.adversarial_train`
is minibatch SGD with momentum on classification data in the box; so the check runs the theorem's
loop: every step attacks the current network with :func:`ntk_theory.attacks.pgd` (the one attack loop;
``steps`` iterations, :math:`\ell_\infty`, no box, random start seeded per step) and takes one full-batch
GD step at the attacked points with
:func:`proofs_checks.checks.c05_lazy_training_stability.gd_step` (the autograd gradient step, tested
there). ``lr = lr_fraction * 2c/lambda_max(Theta(X, X))`` of the infinite-width kernel, below the
stability limit of every width.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ntk_theory.adversarial import adversarial_kernel_training
from ntk_theory.attacks import pgd
from ntk_theory.dynamics import loss_scale
from ntk_theory.empirical import empirical_ntk
from ntk_theory.infinite import mlp
from ntk_theory.layers import finite_mlp
from ntk_theory.metrics import relative_frobenius

from ..common import one_intra_op_thread, progress_bar, sphere_inputs
from ..registry import Outcome, register
from ..stats import bootstrap_slope, loglog_slope
from .c05_lazy_training_stability import gd_step

EXPONENT = -0.5     # relative movement of the first and last layers, and so of the max over layers
TOL = 0.15          # docs/theory.md §C: slope band [-0.65, -0.35] around -1/2
FLOOR = -1.5        # n^-1 (hidden-to-hidden layers) minus 0.5 of fit noise
KERNEL_MAX = -0.35  # the adversarial NTK moves at least as fast as n^-1/2 to 0 (C5's upper edge)
FLOOR_RATIO = 0.1   # the robust loss falls at least 10-fold
FLOOR_SLOPE = 0.15  # |log-log slope of the final robust loss against width|: a width-independent floor

PARAMS = {
    "quick": dict(widths=[128, 256, 512, 1024], depth=2, d_in=16, n_train=16, sigma_b=0.1, eps=0.1, steps=5,
                  train_steps=100, lr_fraction=0.5, seeds=3),
    "full": dict(widths=[128, 256, 512, 1024, 2048, 4096], depth=2, d_in=16, n_train=24, sigma_b=0.1, eps=0.1,
                 steps=10, train_steps=200, lr_fraction=0.5, seeds=6),
}
STATEMENT = ("Full-batch GD with PGD-AT (robust MSE) on a fixed training set, NTK-parameterised ReLU MLPs of "
             "growing width n (Gao et al. 2019, theorem shape): the robust training loss falls >= 10-fold to "
             "a floor independent of the width (|log-log slope| <= 0.15), the largest per-layer "
             "relative weight movement ||W_T - W_0||_F/||W_0||_F has log-log slope in [-0.65, -0.35], every "
             "layer's slope lies in [-1.5, -0.35], and the NTK at the adversarial points moves with slope in "
             "[-1.5, -0.35].")


def _weights(net) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters() if p.dim() == 2}


def _train(net, x, y, *, lr, c, eps, steps, train_steps, attack_seed):
    """PGD-AT in place; returns the robust losses at steps 0..T and the final adversarial points."""
    losses = []
    for t in range(train_steps + 1):
        xa = pgd(net, x, y, eps=eps, steps=steps, loss="mse", clamp=None, generator=attack_seed + t)
        with torch.no_grad():
            losses.append(float(0.5 * (net(xa).reshape(-1) - y).pow(2).sum() / c))
        if not math.isfinite(losses[-1]):
            break
        if t < train_steps:
            gd_step(net, xa, y, lr, c)
    return losses, xa


@register("C9", title="Lazy adversarial training: PGD-AT moves each layer by O(width^-1/2)", statement=STATEMENT,
          rigour="theorem", params=PARAMS)
def check_c9(p: dict, seed: int, *, exponent: float = EXPONENT, reference: str = "init") -> Outcome:
    """Run C9. Planted ingredients: ``exponent`` (the claimed rate of the largest relative movement) and
    ``reference`` (``"init"``: the network's own initialisation; ``"other_init"``: another seed's, wrong)."""
    if reference not in ("init", "other_init"):
        raise ValueError(f"reference: expected 'init' or 'other_init', got {reference!r}")
    widths = [int(w) for w in p["widths"]]
    if len(widths) < 2 or p["seeds"] < 1 or p["train_steps"] < 1:
        raise ValueError("widths: need at least two widths, seeds >= 1 and train_steps >= 1")
    g = torch.Generator().manual_seed(seed * 1_000_003 + 9)
    x = sphere_inputs(p["n_train"], p["d_in"], g)
    y = torch.sign(torch.randn(p["n_train"], generator=g, dtype=torch.float64))
    c = loss_scale(y, "size")
    kern = mlp(p["depth"], "relu", 2 ** 0.5, p["sigma_b"])
    lam = torch.linalg.eigvalsh(kern(x, get="ntk"))
    lr = p["lr_fraction"] * 2 * c / float(lam[-1])
    net_seed = lambda w, s: seed * 1_000_003 + w * 101 + s
    layer_names, rows = None, []
    move, kern_change, final_loss, first_loss, curves = [], [], [], [], []
    bar = progress_bar(len(widths) * p["seeds"] + 1, "C9 trainings")
    with one_intra_op_thread():
        inf_traj = adversarial_kernel_training(kern, x, y, train_steps=p["train_steps"], lr=lr, eps=p["eps"],
                                               steps=p["steps"], clamp=None, generator=seed + 5)
        bar.update()
        for w in widths:
            mv_w, kc_w, fl_w, l0_w, curve_w = [], [], [], [], []
            for s in range(p["seeds"]):
                make = lambda gen: finite_mlp(p["d_in"], w, p["depth"], sigma_b=p["sigma_b"], generator=gen)
                net = make(net_seed(w, s))
                w0 = _weights(make(net_seed(w, s) + 555_555) if reference == "other_init" else net)
                net0 = make(net_seed(w, s))
                losses, xa = _train(net, x, y, lr=lr, c=c, eps=p["eps"], steps=p["steps"],
                                    train_steps=p["train_steps"], attack_seed=net_seed(w, s) * 7 + 3)
                xa = pgd(net, x, y, eps=p["eps"], steps=p["steps"], loss="mse", clamp=None,
                         generator=net_seed(w, s) + 11)          # the trained network's adversarial points
                wt = _weights(net)
                layer_names = list(wt)
                rel = {n: float((wt[n] - w0[n]).norm() / w0[n].norm()) for n in wt}
                kc = float(relative_frobenius(empirical_ntk(net, xa), empirical_ntk(net0, xa)))
                mv_w.append(rel)
                kc_w.append(kc)
                fl_w.append(losses[-1])
                l0_w.append(losses[0])
                curve_w.append(losses)
                rows.append(dict(width=w, seed=s, relative_movement=rel, adversarial_ntk_change=kc,
                                 robust_loss_0=losses[0], robust_loss_T=losses[-1]))
                bar.update()
            move.append(mv_w)
            kern_change.append(kc_w)
            final_loss.append(fl_w)
            first_loss.append(l0_w)
            curves.append(np.mean(np.array([cv for cv in curve_w if len(cv) == p["train_steps"] + 1]), 0)
                          if all(len(cv) == p["train_steps"] + 1 for cv in curve_w) else None)
    bar.close()
    finite = all(math.isfinite(v) and v > 0 for r in rows for v in
                 list(r["relative_movement"].values()) + [r["adversarial_ntk_change"], r["robust_loss_T"]])
    nan2 = [float("nan"), float("nan")]
    measured, slopes_ok = {}, True
    if finite:
        mx = [[max(r.values()) for r in mv_w] for mv_w in move]
        s_max, ci_max = bootstrap_slope(widths, mx, seed=seed)
        measured.update(slope_max_layer=s_max, ci_max_layer=list(ci_max))
        slopes_ok = exponent - TOL <= s_max <= exponent + TOL
        for i, n in enumerate(layer_names):
            s_l, ci_l = bootstrap_slope(widths, [[r[n] for r in mv_w] for mv_w in move], seed=seed + 1 + i)
            measured[f"slope_{n}"] = s_l
            measured[f"ci_{n}"] = list(ci_l)
            slopes_ok = slopes_ok and FLOOR <= s_l <= exponent + TOL
        s_k, ci_k = bootstrap_slope(widths, kern_change, seed=seed + 99)
        measured.update(slope_adversarial_ntk=s_k, ci_adversarial_ntk=list(ci_k))
        slopes_ok = slopes_ok and FLOOR <= s_k <= KERNEL_MAX
    else:
        measured.update(slope_max_layer=float("nan"), ci_max_layer=nan2, slope_adversarial_ntk=float("nan"))
        slopes_ok = False
    mean_final = [float(np.mean(v)) for v in final_loss]
    mean_first = [float(np.mean(v)) for v in first_loss]
    inf_loss = float(inf_traj.robust_loss[-1])
    ratio = [f / i for f, i in zip(mean_final, mean_first)]
    s_floor = float(loglog_slope(widths, mean_final)) if finite else float("nan")
    floor_ok = finite and all(r <= FLOOR_RATIO for r in ratio) and abs(s_floor) <= FLOOR_SLOPE
    measured.update(robust_loss_ratio_T_over_0=ratio, final_robust_loss=mean_final,
                    slope_final_robust_loss=s_floor, infinite_width_mean_predictor_robust_loss=inf_loss,
                    lr=lr, lr_over_kernel_limit=lr * float(lam[-1]) / (2 * c))
    passed = bool(finite and slopes_ok and floor_ok)
    mean_layer = {n: [float(np.mean([r[n] for r in mv_w])) for mv_w in move] for n in (layer_names or [])}
    ys = {f"max over layers of ||W_T - W_0||/||W_0|| (mean over seeds)":
          [float(np.mean([max(r.values()) for r in mv_w])) for mv_w in move]}
    ys.update({f"layer {n}": v for n, v in mean_layer.items()})
    ys["r(Theta_T, Theta_0) at adversarial points"] = [float(np.mean(v)) for v in kern_change]
    return Outcome(
        parameters=dict(exponent=exponent, reference=reference, normalization="size", sigma_w=2 ** 0.5,
                        attack="PGD linf on the MSE loss, no box, fresh random start every step",
                        training="full-batch GD at the attacked points (Danskin), gd_step of C5"),
        measured=measured,
        expected=dict(slope_max_layer=[exponent - TOL, exponent + TOL], slope_per_layer=[FLOOR, exponent + TOL],
                      slope_adversarial_ntk=[FLOOR, KERNEL_MAX], robust_loss_ratio=f"<= {FLOOR_RATIO:g}",
                      slope_final_robust_loss=[-FLOOR_SLOPE, FLOOR_SLOPE]),
        passed=passed,
        details=dict(rows=rows, widths=widths, mean_relative_movement=mean_layer,
                     mean_adversarial_ntk_change=[float(np.mean(v)) for v in kern_change],
                     robust_loss_curves={str(w): (cv.tolist() if cv is not None else None)
                                         for w, cv in zip(widths, curves)},
                     infinite_width_robust_loss=inf_traj.robust_loss.tolist(),
                     criteria=dict(slopes=bool(slopes_ok), floor=bool(floor_ok), finite=bool(finite)),
                     series=dict(x=widths, y=ys, xlabel="width n", ylabel="relative change after PGD-AT",
                                 loglog=True, reference_slope=-0.5)),
    )

r"""C4: masking the first layer, whose fan-in is finite, changes the infinite-width NTK.

Statement (docs/theory.md §B.7 "first-layer gotcha" and §C, C4; heuristic). Take a ReLU MLP in
the NTK parameterisation (:math:`\sigma_b = 0`) with input dimension :math:`d` and
``depth`` hidden layers of width n. Mask *every* weight layer, the first included, with
random masks of density q, and rescale the kept weights by :math:`1/\sqrt q`. Then
:math:`r(\hat\Theta_{n,q,first}, \Theta)` does not tend to 0, where :math:`\Theta` is the
dense closed form (the limit of C2). Instead it plateaus. The control network masks
the same layers except the first, and its error decays like :math:`n^{-1/2}` (C2).

**Why, and what the limit is instead.** Row i of the first-layer mask is a fixed random
pattern :math:`M_i \in \{0,1\}^d`. Unit i then has the input covariance

.. math::  \Sigma_{M_i}(x,x') = \frac{\sigma_w^2}{d\,q}\sum_j M_{ij}\,x_j x'_j ,

which stays random as n grows because d is fixed: it does not self-average over the d
inputs. ``random_mask`` keeps exactly :math:`\mathrm{round}(qnd)` entries of the layer, so the
rows are exchangeable and, as n grows, i.i.d. :math:`\mathrm{Bernoulli}(q)^d`. Units are
independent given their rows, so sums over the units of layer 1 average over that row
distribution. Write
:math:`\mathbb{E}_\Lambda` for the Gaussian expectation under the :math:`2\times 2`
covariance built from :math:`\Sigma_M`. The second layer's NNGP and NTK are then

.. math::  K^{(2)} = \sigma_w^2\,\mathbb{E}_M\big[\mathbb{E}_{\Lambda_M}\phi(u)\phi(v)\big], \qquad
           \Theta^{(2)} = K^{(2)} + \sigma_w^2\,\mathbb{E}_M\big[\Sigma_M\,\mathbb{E}_{\Lambda_M}\phi'(u)\phi'(v)\big].

Above layer 2 the usual recursion applies, because those fan-ins grow with n and the
masks there are rescaled. The result is the *mixture limit* :math:`\Theta_{mix}`. Here
:math:`\mathbb{E}_M\Sigma_M = \Sigma` (the rescaling), but the ReLU expectations are
nonlinear in the correlation, so :math:`\mathbb{E}_M F(\Sigma_M) \ne F(\Sigma)` off the
diagonal. The diagonal is preserved exactly, because ReLU is positively homogeneous. For
:math:`d \le 16` the function :func:`first_layer_masked_limit` computes
:math:`\Theta_{mix}` exactly by enumerating the :math:`2^d` row patterns; for larger
:math:`d` it uses Monte Carlo over rows. A row with no kept entry is a dead unit and
contributes 0. :math:`\Theta_{mix} \to \Theta` as :math:`d q \to \infty`, so the effect
needs a small fan-in.

**Pass criterion** (for every density q; slopes are fitted on
:math:`\log \mathrm{mean}_{seeds}` against :math:`\log n`, with bootstrap intervals):

1. the control decays: slope of :math:`r(\hat\Theta_{ctrl}, \Theta)` in [-0.65, -0.35];
2. the masked-first error plateaus: its slope over the three largest widths (where a
   plateau, if any, has been reached) exceeds -0.2. The slope over all widths is reported;
   it is steeper, because at small n the finite-width fluctuation still exceeds the gap;
3. it stays well above the control: at the largest width, its mean exceeds
   ``factor`` (3) times the control's;
4. the mechanism: :math:`r(\hat\Theta_{first}, \Theta_{mix})` decays, with slope in [-0.65, -0.35],
   and the masked-first kernels average to :math:`\Theta_{mix}` (Monte-Carlo bias statistic
   :func:`proofs_checks.stats.bias_z` at most 2.5; the slope alone accepts a mixture a few per
   cent off).

The check fails if the first layer is not really masked (the plateau disappears), if
:math:`dq` is large (the gap falls below the finite-width error), or if the mixture is
wrong (criterion 4). The plateau is also compared with the predicted gap
:math:`r(\Theta_{mix}, \Theta)`; that comparison is reported, not tested.

**Scale.** The gap shrinks with depth. For :math:`d = 16` and q = 1/4 it is 0.07 to 0.09,
about 0.04 and about 0.025 at depths 1, 2 and 3 (two draws of 8 points on the sphere). For
depth 2 and q = 0.2 it is 0.045 to 0.055. That fits THEORY's measurement, which still falls
from 0.106 to 0.068 between n = 2048 and 8192: the plateau has not been reached there.
Moreover, the finite-width fluctuation of a masked-first network is larger than the
control's. So the plateau is cleanly visible at affordable cost only for depth 1 and
small :math:`d`, with widths up to :math:`2^{15}` (quick) and :math:`2^{18}` (full).
Such networks are cheap because no layer is n x n. The mixture formula itself covers
any depth.
"""
from __future__ import annotations

import numpy as np
import torch

from ntk_theory.empirical import empirical_ntk
from ntk_theory.infinite import mlp, relu_expectations
from ntk_theory.masks import apply_mask, random_mask
from ntk_theory.metrics import relative_frobenius

from ..common import progress_bar, sphere_inputs
from ..registry import Outcome, register
from ..stats import BIAS_Z, bias_z, bootstrap_slope, loglog_slope

BAND = (-0.65, -0.35)
PLATEAU = -0.2
FACTOR = 3.0

PARAMS = {
    "quick": dict(depth=1, d_in=8, n_points=8, widths=[512, 2048, 8192, 32768], densities=[0.25], seeds=8),
    "full": dict(depth=1, d_in=8, n_points=16, widths=[1024, 4096, 16384, 65536, 262144],
                 densities=[0.5, 0.25, 0.125], seeds=10),
}

STATEMENT = ("Masking the finite-fan-in first layer (density q, rescaled) changes the NTK limit: "
             "r(NTK_first, NTK_dense) plateaus (slope over the 3 largest widths > -0.2, > 3x the control at the "
             "largest width), "
             "while the control (first layer dense) decays as n^(-1/2) and NTK_first converges as n^(-1/2) "
             "to the mixture limit E_M over the first-layer mask rows.")


def first_layer_masked_limit(x: torch.Tensor, depth: int, density: float, *, sigma_w: float = 2 ** 0.5,
                             samples: int = 2 ** 16, generator: torch.Generator | None = None,
                             chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(NNGP, NTK)`` ``(N, N)`` infinite-width limit of a ReLU MLP (``sigma_b = 0``) whose first
    layer carries a random mask of density q, with every mask rescaled by :math:`1/\sqrt q`.

    Computes the mixture over first-layer rows :math:`M \sim \mathrm{Bernoulli}(q)^d` from the
    module docstring. The expectation is exact (:math:`2^d` patterns weighted by
    :math:`q^{|M|}(1-q)^{d-|M|}`) when :math:`2^d \le` ``samples``; otherwise it is a Monte
    Carlo average over ``samples`` rows drawn with ``generator``. Masks on later layers,
    rescaled, do not change the limit. At ``density=1`` the result is
    ``mlp(depth, sigma_w=sigma_w)(x)``.
    """
    if depth < 1:
        raise ValueError(f"depth: got {depth}; a masked first layer needs at least one hidden layer")
    if not 0 < density <= 1:
        raise ValueError(f"density: got {density}; expected 0 < density <= 1")
    x = torch.as_tensor(x, dtype=torch.float64)
    N, d = x.shape
    sw2, q = sigma_w ** 2, float(density)
    if 2 ** d <= samples:
        pats = ((torch.arange(2 ** d)[:, None] >> torch.arange(d)) & 1).to(torch.float64)
        k = pats.sum(1)
        weights = q ** k * (1 - q) ** (d - k)
    else:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        pats = (torch.rand(samples, d, generator=g, dtype=torch.float64) < q).to(torch.float64)
        weights = torch.full((samples,), 1.0 / samples, dtype=torch.float64)
    alive = pats.sum(1) > 0                                 # an all-zero row is a dead unit: contributes 0
    pats, weights = pats[alive], weights[alive]
    e_sum = x.new_zeros(N, N)
    d_sum = x.new_zeros(N, N)
    for i in range(0, len(pats), chunk):
        p, w = pats[i:i + chunk], weights[i:i + chunk]
        S = torch.einsum("pj,aj,bj->pab", p, x, x) * (sw2 / (d * q))      # Sigma_M(x, x') per row pattern
        v = torch.diagonal(S, dim1=1, dim2=2).clamp_min(1e-300)
        e, ed = relu_expectations(S, v[:, :, None], v[:, None, :])
        e_sum += torch.einsum("p,pab->ab", w, e)
        d_sum += torch.einsum("p,pab->ab", w, S * ed)
    K = sw2 * e_sum
    T = K + sw2 * d_sum
    for _ in range(depth - 1):                              # wide layers: the usual recursion
        dg = torch.diagonal(K)
        e, ed = relu_expectations(K, dg[:, None], dg[None, :])
        K = sw2 * e
        T = K + sw2 * (T * ed)
    K, T = 0.5 * (K + K.T), 0.5 * (T + T.T)
    return K, T


def _first_layer_name(net: torch.nn.Module) -> str:
    return next(name for name, p in net.named_parameters() if p.dim() >= 2)


@register("C4", title="Masking a finite-fan-in first layer changes the NTK limit", statement=STATEMENT,
          rigour="heuristic", params=PARAMS)
def check_c4(p: dict, seed: int, *, mask_first_layer: bool = True, mixture_density: float | None = None,
             factor: float = FACTOR) -> Outcome:
    """Run C4.

    Tests use these overrides to plant a wrong ingredient: ``mask_first_layer=False``
    leaves the "masked-first" network's first layer dense; ``mixture_density`` computes
    the mixture limit with a wrong q (1.0 gives the dense kernel); ``d_in`` large removes
    the finite-fan-in premise.
    """
    depth, widths, S = p["depth"], list(p["widths"]), p["seeds"]
    kern = mlp(depth)
    g = torch.Generator().manual_seed(seed)
    x = sphere_inputs(p["n_points"], p["d_in"], g)
    dense = kern(x, get="ntk")

    rows, passed = [], True
    bar = progress_bar(len(p["densities"]) * len(widths) * S, "C4 networks")
    for iq, q in enumerate(p["densities"]):
        q_mix = q if mixture_density is None else mixture_density
        _, mix = first_layer_masked_limit(x, depth, q_mix, generator=torch.Generator().manual_seed(seed + 17))
        e_ctrl, e_first, e_mix, k_first = [], [], [], []
        for n in widths:
            c, f, m, kf = [], [], [], []
            for s in range(S):
                gs = torch.Generator().manual_seed(seed * 1_000_003 + n * 7_919 + iq * 101 + s)
                net = kern.finite((p["d_in"],), width=n, generator=gs)
                first = _first_layer_name(net)
                full = random_mask(net, q, generator=gs, skip_first=False)
                apply_mask(net, {k: v for k, v in full.items() if k != first}, rescale=True)
                c.append(float(relative_frobenius(empirical_ntk(net, x), dense)))
                if mask_first_layer:     # same weights and later masks: only the first-layer mask differs
                    apply_mask(net, {first: full[first]}, rescale=True)
                theta = empirical_ntk(net, x)
                kf.append(theta)
                f.append(float(relative_frobenius(theta, dense)))
                m.append(float(relative_frobenius(theta, mix)))
                bar.update()
            e_ctrl.append(c)
            e_first.append(f)
            e_mix.append(m)
            k_first.append(torch.stack(kf))
        s_c, ci_c = bootstrap_slope(widths, e_ctrl, seed=seed + 3 * iq)
        s_f, ci_f = bootstrap_slope(widths[-3:], e_first[-3:], seed=seed + 3 * iq + 1)
        s_f_all = loglog_slope(widths, [np.mean(v) for v in e_first])
        s_m, ci_m = bootstrap_slope(widths, e_mix, seed=seed + 3 * iq + 2)
        mc, mf, mm = ([float(np.mean(v)) for v in e] for e in (e_ctrl, e_first, e_mix))
        gap = float(relative_frobenius(mix, dense))
        z_mix = bias_z(widths, k_first, mix)  # the masked-first kernels average to the mixture
        ok = dict(control_decays=BAND[0] <= s_c <= BAND[1], first_plateaus=s_f > PLATEAU,
                  first_above_control=mf[-1] > factor * mc[-1], converges_to_mixture=BAND[0] <= s_m <= BAND[1] and z_mix <= BIAS_Z)
        passed &= all(ok.values())
        rows.append(dict(density=q, slope_control=s_c, ci_control=list(ci_c), slope_first=s_f, ci_first=list(ci_f),
                         slope_first_all_widths=s_f_all, slope_mixture=s_m, ci_mixture=list(ci_m), bias_z_mixture=z_mix, gap=gap,
                         err_control=mc, err_first=mf, err_first_vs_mixture=mm, first_over_control=mf[-1] / mc[-1],
                         plateau_over_gap=mf[-1] / gap if gap > 0 else float("inf"),
                         criteria={k: bool(v) for k, v in ok.items()},
                         per_seed=dict(control=e_ctrl, first=e_first, mixture=e_mix)))
    bar.close()
    last = rows[-1]
    return Outcome(
        parameters=dict(activation="relu", sigma_w=2 ** 0.5, sigma_b=0.0, rescale=True,
                        mask_first_layer=mask_first_layer, mixture_density=mixture_density, factor=factor,
                        mixture="exact enumeration" if 2 ** p["d_in"] <= 2 ** 16 else "Monte Carlo (2^16 rows)"),
        measured=dict(slopes_control=[r["slope_control"] for r in rows],
                      slopes_first=[r["slope_first"] for r in rows],
                      slopes_first_all_widths=[r["slope_first_all_widths"] for r in rows],
                      slopes_vs_mixture=[r["slope_mixture"] for r in rows],
                      bias_z_vs_mixture=[r["bias_z_mixture"] for r in rows],
                      first_over_control_at_max_width=[r["first_over_control"] for r in rows],
                      gaps=[r["gap"] for r in rows],
                      plateau_over_gap=[r["plateau_over_gap"] for r in rows]),
        expected=dict(slope_band=list(BAND), first_slope_above=PLATEAU, first_over_control_above=factor,
                      bias_z_vs_mixture=f"<= {BIAS_Z}"),
        passed=bool(passed),
        details=dict(widths=widths, rows=rows,
                     series=dict(x=widths, y={f"masked first, vs dense (q={last['density']:g})": last["err_first"],
                                              "first layer dense (control)": last["err_control"],
                                              "masked first, vs mixture limit": last["err_first_vs_mixture"],
                                              "gap r(mixture, dense)": [last["gap"]] * len(widths)},
                                 xlabel="width n", ylabel="relative Frobenius error", loglog=True,
                                 reference_slope=-0.5)),
    )

r"""C2: a randomly masked and rescaled network has the dense infinite-width NTK.

Statement (docs/theory.md §B.7 and §C, C2; Yang & Wang, AISTATS 2023). Take a ReLU MLP in the
NTK parameterisation with ``depth`` hidden layers of width n. Mask every weight layer
after the first (hidden-to-hidden and readout) with a uniformly random mask of density q,
and rescale the kept weights by :math:`1/\sqrt q`. The first layer, whose fan-in
:math:`d_0` stays fixed, is left dense (``skip_first``; see C4 for what goes wrong
otherwise). Then, at initialisation and for every fixed q,

.. math::  r_{n,q} = \|\hat\Theta_{n,q}(X,X) - \Theta(X,X)\|_F / \|\Theta(X,X)\|_F
           = O_P(n^{-1/2}),

where :math:`\Theta` is the closed-form NTK of the *dense* network. Yang & Wang prove the
limit, with rescaling removing the "extra scaling" (C3). The exponent -1/2 is the usual
CLT rate: every sum over a layer's fan-in has about :math:`qn` independent terms.

**Part 1 (theorem; pass criterion).** For each q, and for the dense network (q = 1), the
slope of :math:`\log \mathrm{mean}_{seeds} r_{n,q}` against :math:`\log n` is fitted, with a
bootstrap interval over seeds. Every masked slope must lie in [-0.65, -0.35], the band of C1.

**Part 2 (heuristic, "effective width"; docs/theory.md C2, our own heuristic, not from the
paper).** The masked network of width n behaves like a dense one of width qn:
:math:`r_{n,q} \approx r_{qn,1}`. The check measures the dense error directly at width
:math:`qn` and forms, for each q, the ratio of seed means

.. math::  c(q) = \mathrm{geomean}_{n:\;qn \ge n_{min}}\; \mathrm{mean}\,r_{n,q} / \mathrm{mean}\,r_{qn,1}.

It is not expected to be exactly 1. The first layer stays dense, so all n of its units
carry gradient, and its contribution to :math:`\hat\Theta` is an average over n units
rather than qn. In a dense network of width qn every such average has only qn terms. So
only part of the masked network's fluctuation variance grows like :math:`1/(qn)`, and
the rest grows like :math:`1/n`. Write :math:`r^2 \approx (a + bq)/(qn)`; then
:math:`c(q)^2 = (a + bq)/(a + b) \le 1`. This split is a heuristic: a and b are
fitted, not derived.
Measured values (depth 2, :math:`d_0 = 16`, 8 points, 24 seeds, n = 256 to 2048,
q = 1/2, 1/4, 1/8, 1/16) are c = 0.87, 0.77, 0.73, 0.76; single (n, q) cells range from
0.66 to 1.07. These values fit :math:`a/(a+b) \approx 0.55`, which predicts
0.88, 0.81, 0.78, 0.76. The heuristic passes when every c(q) lies in [0.5, 1.25]. The band is wide
enough for seed noise and for c < 1. It is narrow enough to reject a wrong effective
width :math:`q^e n`, which multiplies c by about :math:`q^{(e-1)/2}`: a factor 2 at
q = 1/4 for e = 0 (width n) or e = 2 (width :math:`q^2 n`). Effective widths below
``min_effective_width`` are left out of c. There the dense error saturates (it is
about 0.5 to 0.6 at widths 16 to 32) and the comparison says nothing about rates. As a
second, unconstrained summary the check fits
:math:`\log r = c_0 + \alpha\log q + \beta\log n` over those cells; the heuristic means
:math:`\alpha \approx \beta \approx -1/2`. Measured: :math:`\beta \approx -0.5`. Over
q = 1/2 to 1/16 (full scale), :math:`\alpha \approx -0.40` to -0.44. Over q in {1/2, 1/4}
(quick scale) it is -0.2 to -0.3, because the 1/n part matters most at large q.

Part 1 also requires the kernels to average to the limit: the Monte-Carlo bias statistic
:func:`proofs_checks.stats.bias_z` of the masked kernels (per q) and of the dense ones stays
below 2.5 (a reference 1 % off in sigma_w passes the slopes but not this test).
``passed`` is the conjunction of both parts. ``measured`` reports them separately
(``limit_passed``, ``effective_width_passed``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ntk_theory.empirical import empirical_ntk
from ntk_theory.infinite import KernelFn, mlp
from ntk_theory.masks import apply_mask, random_mask
from ntk_theory.metrics import relative_frobenius

from ..common import progress_bar, sphere_inputs
from ..registry import Outcome, register
from ..stats import BIAS_Z, bias_z, bootstrap_slope, loglog_slope

BAND = (-0.65, -0.35)
RATIO_BAND = (0.5, 1.25)

PARAMS = {
    "quick": dict(depth=2, d_in=16, n_points=16, widths=[128, 256, 512, 1024], densities=[0.5, 0.25],
                  seeds=10, min_effective_width=32),
    "full": dict(depth=2, d_in=16, n_points=16, widths=[256, 512, 1024, 2048, 4096],
                 densities=[0.5, 0.25, 0.125, 0.0625], seeds=12, min_effective_width=32),
}

STATEMENT = ("A ReLU MLP whose weight layers after the first carry random masks of density q, rescaled by "
             "1/sqrt(q), has the dense closed-form NTK as width n -> infinity: r(NTK_{n,q}, NTK) decays as "
             "n^(-1/2) for each q (log-log slope in [-0.65, -0.35]; Yang & Wang 2023). Heuristic: "
             "r(n, q) ~ c * r_dense(q n) with c in [0.5, 1.25] (effective width q n).")


def masked_kernel(kernel_fn: KernelFn, x: torch.Tensor, width: int, density: float,
                  generator: torch.Generator, *, rescale: bool = True) -> torch.Tensor:
    """Θ̂(x, x) of one network of ``kernel_fn`` at ``width``, randomly masked (first layer dense)."""
    net = kernel_fn.finite(x.shape[1:], width=width, generator=generator)
    if density < 1:
        apply_mask(net, random_mask(net, density, generator=generator, skip_first=True), rescale=rescale)
    return empirical_ntk(net, x)


def _gen(seed: int, width: int, density: float, s: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + width * 7_919 + round(density * 65_536) * 101 + s)


@register("C2", title="Masked and rescaled NTK converges to the dense limit", statement=STATEMENT,
          rigour="theorem", params=PARAMS)
def check_c2(p: dict, seed: int, *, reference: KernelFn | None = None, rescale: bool = True,
             effective_width_exponent: float = 1.0, ratio_band: tuple[float, float] = RATIO_BAND) -> Outcome:
    """Run C2.

    Tests use these overrides to plant a wrong ingredient: ``reference`` replaces the dense
    closed-form kernel; ``rescale=False`` drops the 1/sqrt(q) rescaling; and
    ``effective_width_exponent=e`` compares with the dense error at width ``q**e * n``
    instead of ``q * n``.
    """
    net_kernel = mlp(p["depth"])
    ref = net_kernel if reference is None else reference
    g = torch.Generator().manual_seed(seed)
    x = sphere_inputs(p["n_points"], p["d_in"], g)
    limit = ref(x, get="ntk")
    widths, qs, S = list(p["widths"]), list(p["densities"]), p["seeds"]
    e = float(effective_width_exponent)
    eff = {(q, n): max(1, round(q ** e * n)) for q in qs for n in widths}

    dense_widths = sorted(set(widths) | set(eff.values()))
    with progress_bar((len(qs) * len(widths) + len(dense_widths)) * S, "C2 networks") as bar:
        def kernel(width, density, s, rescale=True):
            k = masked_kernel(net_kernel, x, width, density, _gen(seed, width, density, s), rescale=rescale)
            bar.update()
            return k

        # masked networks: r(n, q) per seed
        kers = {q: [torch.stack([kernel(n, q, s, rescale) for s in range(S)]) for n in widths] for q in qs}
        # dense networks at the widths n and at the effective widths q^e n
        dense_k = {w: torch.stack([kernel(w, 1.0, s) for s in range(S)]) for w in dense_widths}
    errs = {q: [[float(relative_frobenius(k, limit)) for k in ks] for ks in kers[q]] for q in qs}
    # the masked kernels average to the dense limit (Monte-Carlo bias test, as in C1)
    zs = [bias_z(widths, kers[q], limit) for q in qs]
    dense = {w: [float(relative_frobenius(k, limit)) for k in ks] for w, ks in dense_k.items()}
    zs.append(bias_z(dense_widths, [dense_k[w] for w in dense_widths], limit))  # the dense networks too

    # part 1: n^{-1/2} for each q
    slopes, cis = [], []
    for i, q in enumerate(qs):
        sl, ci = bootstrap_slope(widths, errs[q], seed=seed + i)
        slopes.append(sl)
        cis.append(list(ci))
    s_dense = loglog_slope(widths, [np.mean(dense[w]) for w in widths])     # reported only (C1 tests it)
    limit_ok = all(BAND[0] <= s <= BAND[1] for s in slopes) and all(z <= BIAS_Z for z in zs)

    # part 2: effective width q n
    rows, ratios = [], []
    for q in qs:
        logs = []
        for j, n in enumerate(widths):
            if q * n < p["min_effective_width"]:
                continue
            r_mask, r_dense = float(np.mean(errs[q][j])), float(np.mean(dense[eff[(q, n)]]))
            logs.append(math.log(r_mask / r_dense))
            rows.append(dict(density=q, width=n, effective_width=eff[(q, n)], err_masked=r_mask,
                             err_dense_at_effective_width=r_dense, ratio=r_mask / r_dense))
        ratios.append(math.exp(float(np.mean(logs))) if logs else float("nan"))
    eff_ok = all(ratio_band[0] <= c <= ratio_band[1] for c in ratios)
    cells = [(q, n, float(np.mean(errs[q][j]))) for q in qs for j, n in enumerate(widths)
             if q * n >= p["min_effective_width"]]
    alpha = beta = float("nan")
    if len({q for q, _, _ in cells}) >= 2 and len({n for _, n, _ in cells}) >= 2:
        A = np.array([[1.0, math.log(q), math.log(n)] for q, n, _ in cells])
        _, alpha, beta = np.linalg.lstsq(A, np.log([c for _, _, c in cells]), rcond=None)[0]

    mean_err = {q: [float(np.mean(v)) for v in errs[q]] for q in qs}
    series_y = {f"q={q:g}": mean_err[q] for q in qs}
    series_y["dense"] = [float(np.mean(dense[w])) for w in widths]
    return Outcome(
        parameters=dict(activation="relu", sigma_w=2 ** 0.5, sigma_b=0.0, rescale=rescale, skip_first=True,
                        effective_width_exponent=e,
                        reference="dense closed form" if reference is None else repr(reference)),
        measured=dict(slopes=slopes, ci_low=[c[0] for c in cis], ci_high=[c[1] for c in cis],
                      slope_dense=s_dense, err_at_max_width=[mean_err[q][-1] for q in qs],
                      bias_z=zs, limit_passed=bool(limit_ok),
                      effective_width_ratios=ratios, q_exponent=float(alpha), n_exponent=float(beta),
                      effective_width_passed=bool(eff_ok)),
        expected=dict(slope_band=list(BAND), bias_z=f"<= {BIAS_Z}", effective_width_ratio_band=list(ratio_band)),
        passed=bool(limit_ok and eff_ok),
        details=dict(widths=widths, densities=qs, err_masked={str(q): errs[q] for q in qs},
                     err_dense={str(w): v for w, v in dense.items()}, effective_width_rows=rows,
                     series=dict(x=widths, y=series_y, xlabel="width n", ylabel="relative Frobenius error",
                                 loglog=True, reference_slope=-0.5)),
    )

r"""C1: the empirical NTK and NNGP of a finite network concentrate on the closed form.

Statement (docs/theory.md §C, C1; Jacot et al. 2018, Arora et al. 2019 Thm 3.1, Hanin & Nica
2020). For a ReLU MLP in the NTK parameterisation with ``depth`` hidden layers of width
n, at initialisation

.. math::  r_n = \|\hat\Theta_n(X,X) - \Theta(X,X)\|_F / \|\Theta(X,X)\|_F = O_P(n^{-1/2}),

and the same for the NNGP estimated by the readout's input Gram
:math:`\hat K = \sigma_w^2\,\phi(z^L)\phi(z^L)^\top/n + \sigma_b^2`. The check fits the
slope of :math:`\log \mathrm{mean}_{seeds} r_n` against :math:`\log n` with a bootstrap
interval over seeds and passes if both slopes lie in [-0.65, -0.35] and the kernels average
to the closed form: the Monte-Carlo bias statistic :func:`proofs_checks.stats.bias_z` (about 1
when unbiased) stays below 2.5. The slope alone cannot see a reference kernel that is a few
per cent off, as long as that error is below the finite-width error.
"""
from __future__ import annotations

import numpy as np
import torch

from ntk_theory.empirical import empirical_ntk
from ntk_theory.infinite import KernelFn, mlp

from ..common import progress_bar, sphere_inputs
from ..registry import Outcome, register
from ..stats import BIAS_Z, bias_z, bootstrap_slope

BAND = (-0.65, -0.35)

PARAMS = {
    "quick": dict(depth=2, d_in=16, n_points=8, widths=[64, 128, 256, 512, 1024, 2048], seeds=8),
    "full": dict(depth=3, d_in=32, n_points=32, widths=[128, 256, 512, 1024, 2048, 4096, 8192], seeds=8),
}

STATEMENT = ("For a ReLU MLP in the NTK parameterisation, the relative Frobenius error of the empirical "
             "NTK and NNGP at initialisation against the closed-form kernels decays as width^(-1/2): "
             "the log-log slope over widths lies in [-0.65, -0.35], and the finite kernels average to the closed "
             "form (Monte-Carlo bias z <= 2.5).")


def finite_kernels(kernel_fn: KernelFn, x: torch.Tensor, width: int, sigma_w: float, sigma_b: float,
                   generator: torch.Generator):
    """(empirical NTK, empirical NNGP) of one random network matching ``kernel_fn``."""
    net = kernel_fn.finite(x.shape[1:], width=width, generator=generator)
    theta = empirical_ntk(net, x)
    with torch.no_grad():
        feats = net[:-1](x)
    nngp = sigma_w ** 2 * feats @ feats.T / feats.shape[1] + sigma_b ** 2
    return theta, nngp


@register("C1", title="NTK/NNGP concentration at initialisation", statement=STATEMENT, rigour="theorem",
          params=PARAMS)
def check_c1(p: dict, seed: int, *, reference: KernelFn | None = None, sigma_w: float = 2 ** 0.5,
             sigma_b: float = 0.0) -> Outcome:
    """Run C1. ``reference`` replaces the closed-form kernel (tests plant a wrong one)."""
    net_kernel = mlp(p["depth"], "relu", sigma_w, sigma_b)
    ref = net_kernel if reference is None else reference
    g = torch.Generator().manual_seed(seed)
    x = sphere_inputs(p["n_points"], p["d_in"], g)
    limit = ref(x)
    errs_ntk, errs_nngp, ks_ntk, ks_nngp = [], [], [], []
    with progress_bar(len(p["widths"]) * p["seeds"], "C1 widths x seeds") as bar:
        for width in p["widths"]:
            e_t, e_k, kt, kk = [], [], [], []
            for s in range(p["seeds"]):
                gs = torch.Generator().manual_seed(seed * 100_003 + width * 101 + s)
                theta, nngp = finite_kernels(net_kernel, x, width, sigma_w, sigma_b, gs)
                kt.append(theta)
                kk.append(nngp)
                e_t.append(float((theta - limit.ntk).norm() / limit.ntk.norm()))
                e_k.append(float((nngp - limit.nngp).norm() / limit.nngp.norm()))
                bar.update()
            errs_ntk.append(e_t)
            errs_nngp.append(e_k)
            ks_ntk.append(torch.stack(kt))
            ks_nngp.append(torch.stack(kk))
    s_t, ci_t = bootstrap_slope(p["widths"], errs_ntk, seed=seed)
    s_k, ci_k = bootstrap_slope(p["widths"], errs_nngp, seed=seed + 1)
    z_t, z_k = bias_z(p["widths"], ks_ntk, limit.ntk), bias_z(p["widths"], ks_nngp, limit.nngp)
    passed = BAND[0] <= s_t <= BAND[1] and BAND[0] <= s_k <= BAND[1] and z_t <= BIAS_Z and z_k <= BIAS_Z
    mean_t = [float(np.mean(e)) for e in errs_ntk]
    mean_k = [float(np.mean(e)) for e in errs_nngp]
    return Outcome(
        parameters=dict(sigma_w=sigma_w, sigma_b=sigma_b, activation="relu",
                        reference="closed form" if reference is None else repr(reference)),
        measured=dict(slope_ntk=s_t, ci_ntk=list(ci_t), slope_nngp=s_k, ci_nngp=list(ci_k),
                      err_ntk_at_max_width=mean_t[-1], bias_z_ntk=z_t, bias_z_nngp=z_k),
        expected=dict(slope_band=list(BAND), bias_z=f"<= {BIAS_Z}"),
        passed=bool(passed),
        details=dict(widths=p["widths"], err_ntk=errs_ntk, err_nngp=errs_nngp,
                     series=dict(x=p["widths"], y={"NTK": mean_t, "NNGP": mean_k}, xlabel="width n",
                                 ylabel="relative Frobenius error", loglog=True, reference_slope=-0.5)),
    )

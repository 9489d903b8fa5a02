r"""C11: the closed-form linearised dynamics equal direct integration (algebra).

Statement (docs/theory.md §B.4 and §C, C11). For the loss :math:`L = \frac{1}{2c}\|f(X) - Y\|_F^2` and
:math:`a = \eta/c` (ntk_theory.dynamics' convention, ``c = N·O`` for ``"size"``, ``1`` for ``"none"``):

(a) **Gradient descent.** :func:`~ntk_theory.dynamics.gradient_descent_mse` with the network's
    empirical NTK :math:`\hat\Theta_0` (the full ``(N, N, O, O)`` multi-output kernel) and its
    outputs :math:`f_0` reproduces, step by step, explicit gradient descent
    :math:`\theta_{k+1} = \theta_k - \eta\nabla L` on the :class:`~ntk_theory.dynamics.LinearizedModel`
    of the same finite network, on the training and on held-out points,

    .. math:: f_k(X) = Y + (I - a\hat\Theta_0)^k (f_0(X) - Y), \quad
              f_k(x) = f_0(x) - \hat\Theta_0(x,X)\hat\Theta_0^{-1}(I - (I - a\hat\Theta_0)^k)(f_0(X) - Y),

    for both normalisations, with :math:`\eta = 0.95 \cdot 2c/\lambda_{max}` so that the top
    modes oscillate (:math:`1 - a\lambda < 0`). Tolerance: ``max|closed - explicit| <= 1e-9 · S``
    (``S = max(|f_0|, |Y|)``); float64 rounding of k steps is ~ k·eps·S ~ 1e-14·S.

(b) **Gradient flow.** :func:`~ntk_theory.dynamics.gradient_flow_mse` (closed-form infinite-width
    NTK, multi-output targets, non-zero :math:`f_0`) equals the solution of the ODE
    :math:`\dot f(X) = -a\Theta(X,X)(f(X) - Y)`, :math:`\dot f(x) = -a\Theta(x,X)(f(X) - Y)`
    integrated by classical RK4 on a ladder of step sizes :math:`h, h/2, h/4`
    (:math:`a\lambda_{max}h` = ``rk4_step``) at the output times. Richardson: for an order-4
    method :math:`e_{h/4} \approx (y_{h/4} - y_{h/2})/15`, so the check requires
    ``max|closed - y_{h/4}| <= 2 · max|y_{h/4} - y_{h/2}|/15 + floor`` (``floor = steps · eps · S``
    for rounding) and that the ladder is in its asymptotic regime: the observed
    ratio ``max|y_h - y_{h/2}| / max|y_{h/2} - y_{h/4}|`` lies in [12, 20] (16 for order 4).
    The horizon reaches :math:`\tau = 30/\lambda_{min}`, where :math:`e^{-\Theta\tau}` is below
    :math:`e^{-30}`; there the closed form at ``t = inf`` (the kernel-regression limit, a
    Cholesky solve) must equal the integrated value within
    ``||Θ(x,X)Θ^{-1}||_2 e^{-λ_min τ} ||r_0||_F`` plus the same RK4 tolerance.

(c) **Normalisation.** ``"size"`` (neural-tangents', ``c = N·O``) and ``"none"`` (Lee et al.'s,
    ``c = 1``) differ exactly by the time rescaling :math:`\tau = \eta t/c`:
    ``flow(t, "size") == flow(t/c, "none")``, ``GD(lr, "size") == GD(lr/c, "none")`` (closed forms,
    relative tolerance 1e-12), the two explicit GD runs of (a) coincide (1e-9), and the scaled
    times ``FlowResult.tau`` agree. For contrast the check reports the gap without the rescaling.

Why it can fail: a wrong time scale in the closed form (``lr_scale``), a perturbed kernel
(``kernel_shift``) or a wrong ``c`` in the rescaling (``rescale_c``, e.g. N instead of N·O)
break (a)/(b) or (c) by many orders of magnitude more than the tolerances.
"""
from __future__ import annotations

import math

import torch

from ntk_theory.dynamics import gradient_descent_mse, gradient_flow_mse, linearize, loss_scale
from ntk_theory.empirical import empirical_ntk
from ntk_theory.infinite import mlp
from ntk_theory.metrics import as_matrix

from ..common import one_intra_op_thread, progress_bar, sphere_inputs
from ..registry import Outcome, register

EPS = torch.finfo(torch.float64).eps
GD_RTOL = 1e-9          # (a), and the explicit-vs-explicit comparison of (c)
NORM_RTOL = 1e-12       # (c), closed form vs closed form
RATIO_BAND = (12.0, 20.0)   # observed RK4 convergence ratio (16 for order 4)

PARAMS = {
    "quick": dict(depth=2, d_in=8, width=64, n_train=10, n_test=6, n_out=2, sigma_b=0.1, gd_steps=40,
                  gd_lr_fraction=0.95, flow_lr=0.7, n_times=16, horizon=30.0, rk4_step=0.4),
    "full": dict(depth=3, d_in=16, width=256, n_train=32, n_test=16, n_out=3, sigma_b=0.1, gd_steps=300,
                 gd_lr_fraction=0.95, flow_lr=0.7, n_times=61, horizon=30.0, rk4_step=0.25),
}

STATEMENT = ("The closed-form linearised MSE dynamics equal direct integration: (a) gradient_descent_mse = explicit GD "
             "on the LinearizedModel (rel. 1e-9); (b) gradient_flow_mse = RK4 integration of df/dt = -(lr/c) Theta "
             "(f - y) within its Richardson error estimate; (c) normalisations 'size' (c = N*O) and 'none' (c = 1) "
             "differ exactly by tau = lr t / c.")


# --------------------------------------------------------------------------------------------- (a)
def explicit_gd(lin, x, y, xt, lr: float, c: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit GD ``θ <- θ - lr ∇[(1/2c)||f^lin(X) - Y||²]`` on a LinearizedModel (reset to θ_0 first).

    Returns the outputs on ``x`` and ``xt`` at steps ``0..steps``: ``(steps+1, N, O)``, ``(steps+1, M, O)``.
    """
    lin.reset()
    tr, te = [], []
    for k in range(steps + 1):
        out = lin(x)
        with torch.no_grad():
            tr.append(out.detach().clone())
            te.append(lin(xt).detach().clone())
        if k == steps:
            break
        lin.zero_grad(set_to_none=True)
        (0.5 * (out - y).pow(2).sum() / c).backward()
        with torch.no_grad():
            for p in lin.parameters():
                p.sub_(p.grad, alpha=lr)
    return torch.stack(tr), torch.stack(te)


# --------------------------------------------------------------------------------------------- (b)
def rk4_flow(k_train, k_test_train, y, f0, f0_test, a: float, times: torch.Tensor, substeps: int):
    r"""Classical RK4 for :math:`\dot f = -a\Theta(X,X)(f - Y)`, :math:`\dot f_* = -a\Theta(x,X)(f - Y)`.

    ``times`` is a uniform grid starting at 0; each interval is split into ``substeps`` equal steps.
    Returns the train and test outputs at ``times``: ``(T, N, O)``, ``(T, M, O)``.
    """
    def rhs(f):
        r = f - y
        return -a * (k_train @ r), -a * (k_test_train @ r)

    h = float(times[1] - times[0]) / substeps
    f, ft = f0.clone(), f0_test.clone()
    out_tr, out_te = [f.clone()], [ft.clone()]
    for _ in range(len(times) - 1):
        for _ in range(substeps):
            k1, l1 = rhs(f)
            k2, l2 = rhs(f + 0.5 * h * k1)
            k3, l3 = rhs(f + 0.5 * h * k2)
            k4, l4 = rhs(f + h * k3)
            f = f + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
            ft = ft + (h / 6) * (l1 + 2 * l2 + 2 * l3 + l4)
        out_tr.append(f.clone())
        out_te.append(ft.clone())
    return torch.stack(out_tr), torch.stack(out_te)


def _maxabs(t: torch.Tensor) -> float:
    return float(t.abs().max())


# --------------------------------------------------------------------------------------------- the check
@register("C11", title="Closed-form linearised dynamics = direct integration; NT normalisation",
          statement=STATEMENT, rigour="theorem", params=PARAMS)
def check_c11(p: dict, seed: int, *, lr_scale: float = 1.0, kernel_shift: float = 0.0,
              rescale_c: float | None = None) -> Outcome:
    """Run C11.

    Planted wrong ingredients for tests: ``lr_scale`` (the closed forms get ``lr·lr_scale``: a
    wrong time scale), ``kernel_shift`` (the closed forms get ``Θ + shift·λ_max·I``),
    ``rescale_c`` (the c used to rescale time in (c), default ``N·O``).
    """
    # thousands of tiny ops (GD and RK4 loops): see C5; parts (a) 2 GD runs, (b) 3 RK4 rungs, (c)
    with one_intra_op_thread(), progress_bar(6, "C11 parts") as bar:
        return _check_c11(p, seed, lr_scale, kernel_shift, rescale_c, bar)


def _check_c11(p, seed, lr_scale, kernel_shift, rescale_c, bar) -> Outcome:
    g = torch.Generator().manual_seed(seed)
    n, m, o = p["n_train"], p["n_test"], p["n_out"]
    x = sphere_inputs(n, p["d_in"], g)
    xt = sphere_inputs(m, p["d_in"], g)
    y = torch.randn(n, o, generator=g, dtype=torch.float64)
    kern = mlp(p["depth"], "relu", 2 ** 0.5, p["sigma_b"])
    net = kern.finite((p["d_in"],), width=p["width"], out_features=o, generator=g)
    with torch.no_grad():
        f0, f0t = net(x), net(xt)
    scale_s = max(_maxabs(f0), _maxabs(f0t), _maxabs(y))

    def shifted(k):   # the planted perturbation of the kernel handed to the closed forms
        if not kernel_shift:
            return k
        flat = as_matrix(k)
        lam_max = float(torch.linalg.eigvalsh(0.5 * (flat + flat.T))[-1])
        eye = torch.eye(flat.shape[0], dtype=flat.dtype)
        if k.dim() == 4:
            return k + kernel_shift * lam_max * eye.reshape(n, o, n, o).permute(0, 2, 1, 3)
        return k + kernel_shift * lam_max * eye

    # ---- (a) closed-form GD vs explicit GD on the LinearizedModel, both normalisations
    k_emp = empirical_ntk(net, x)                  # (N, N, O, O)
    k_emp_tx = empirical_ntk(net, xt, x)           # (M, N, O, O)
    lam_emp = torch.linalg.eigvalsh(as_matrix(k_emp))
    lin = linearize(net)
    gd = {}
    for norm in ("size", "none"):
        c = loss_scale(y, norm)
        lr = p["gd_lr_fraction"] * 2 * c / float(lam_emp[-1])
        steps = list(range(p["gd_steps"] + 1))
        closed = gradient_descent_mse(shifted(k_emp), y, steps, f0=f0, k_test_train=k_emp_tx, f0_test=f0t,
                                      lr=lr * lr_scale, normalization=norm)
        tr, te = explicit_gd(lin, x, y, xt, lr, c, p["gd_steps"])
        dev = max(_maxabs(closed.f_train - tr), _maxabs(closed.f_test - te)) / scale_s
        gd[norm] = dict(c=c, lr=lr, dev=dev, train=tr, test=te, closed=closed)
        bar.update()
    dev_a = max(gd["size"]["dev"], gd["none"]["dev"])
    pass_a = dev_a <= GD_RTOL
    oscillating = int((1 - gd["size"]["lr"] / gd["size"]["c"] * lam_emp < 0).sum())

    # ---- (b) closed-form gradient flow vs RK4 on the infinite-width kernel
    k_inf = kern(x, get="ntk")
    k_inf_tx = kern(xt, x, get="ntk")
    lam = torch.linalg.eigvalsh(k_inf)
    lam_min, lam_max = float(lam[0]), float(lam[-1])
    c = loss_scale(y, "size")
    a = p["flow_lr"] / c
    t_end = p["horizon"] / (a * lam_min)            # τ_end = horizon / λ_min
    times = torch.linspace(0.0, t_end, p["n_times"], dtype=torch.float64)
    flow = gradient_flow_mse(shifted(k_inf), y, torch.cat([times, torch.tensor([math.inf], dtype=torch.float64)]),
                             f0=f0, k_test_train=k_inf_tx, f0_test=f0t, lr=p["flow_lr"] * lr_scale,
                             normalization="size")
    h_target = p["rk4_step"] / (a * lam_max)        # a λ_max h = rk4_step on the coarsest rung
    sub0 = max(1, math.ceil(float(times[1]) / h_target))
    rungs, hs = [], []
    for mult in (1, 2, 4):
        rungs.append(rk4_flow(k_inf, k_inf_tx, y, f0, f0t, a, times, sub0 * mult))
        hs.append(float(times[1]) / (sub0 * mult))
        bar.update()
    closed_tr, closed_te = flow.f_train[:-1], flow.f_test[:-1]
    devs = [max(_maxabs(closed_tr - tr), _maxabs(closed_te - te)) for tr, te in rungs]
    diff_12 = max(_maxabs(rungs[0][0] - rungs[1][0]), _maxabs(rungs[0][1] - rungs[1][1]))
    diff_24 = max(_maxabs(rungs[1][0] - rungs[2][0]), _maxabs(rungs[1][1] - rungs[2][1]))
    est = diff_24 / 15.0
    n_steps = sub0 * 4 * (p["n_times"] - 1)
    floor = n_steps * EPS * scale_s
    tol_b = 2 * est + floor
    ratio = diff_12 / diff_24 if diff_24 > 0 else math.inf
    richardson = [rungs[2][i] + (rungs[2][i] - rungs[1][i]) / 15 for i in (0, 1)]
    dev_rich = max(_maxabs(closed_tr - richardson[0]), _maxabs(closed_te - richardson[1]))
    # t = inf: |f(inf) - f(t_end)| <= ||Θ(x,X)Θ^{-1}||_2 e^{-λ_min τ_end} ||r_0||_F (exact solution), plus RK4 error
    r0 = f0 - y
    gain = float(torch.linalg.matrix_norm(torch.linalg.solve(k_inf, k_inf_tx.T).T, ord=2))
    tail = max(gain, 1.0) * math.exp(-p["horizon"]) * float(r0.norm())
    dev_inf = max(_maxabs(flow.f_train[-1] - y), _maxabs(flow.f_test[-1] - rungs[2][1][-1]))
    tol_inf = tail + tol_b
    pass_b = devs[2] <= tol_b and RATIO_BAND[0] <= ratio <= RATIO_BAND[1] and dev_inf <= tol_inf

    # ---- (c) normalisation: "size" at t equals "none" at t/c (flow) and lr/c (GD)
    cc = float(n * o) if rescale_c is None else float(rescale_c)
    kw = dict(f0=f0, k_test_train=k_inf_tx, f0_test=f0t)
    size = gradient_flow_mse(k_inf, y, times, lr=p["flow_lr"] * lr_scale, normalization="size", **kw)
    none = gradient_flow_mse(k_inf, y, times / cc, lr=p["flow_lr"], normalization="none", **kw)
    unscaled = gradient_flow_mse(k_inf, y, times, lr=p["flow_lr"], normalization="none", **kw)
    rel = lambda u, v: max(_maxabs(u.f_train - v.f_train), _maxabs(u.f_test - v.f_test)) / scale_s
    dev_flow_c = rel(size, none)
    dev_tau = float((size.tau - none.tau).abs().max() / size.tau.abs().max())
    kw = dict(f0=f0, k_test_train=k_emp_tx, f0_test=f0t)
    steps = list(range(p["gd_steps"] + 1))
    lr_size = gd["size"]["lr"]
    gsz = gradient_descent_mse(k_emp, y, steps, lr=lr_size * lr_scale, normalization="size", **kw)
    gnn = gradient_descent_mse(k_emp, y, steps, lr=lr_size / cc, normalization="none", **kw)
    dev_gd_c = rel(gsz, gnn)
    dev_explicit_c = max(_maxabs(gd["size"]["train"] - gd["none"]["train"]),
                         _maxabs(gd["size"]["test"] - gd["none"]["test"])) / scale_s
    gap_unscaled = rel(size, unscaled)
    pass_c = (loss_scale(y, "size") == n * o and max(dev_flow_c, dev_gd_c, dev_tau) <= NORM_RTOL
              and dev_explicit_c <= GD_RTOL)

    bar.update()
    passed = pass_a and pass_b and pass_c
    return Outcome(
        parameters=dict(lr_scale=lr_scale, kernel_shift=kernel_shift, rescale_c=cc,
                        activation="relu", sigma_w=2 ** 0.5),
        measured=dict(a_gd_max_rel_dev=dev_a, b_flow_max_dev=devs[2], b_rk4_error_estimate=est,
                      b_convergence_ratio=ratio, b_t_inf_dev=dev_inf, c_flow_rel_dev=dev_flow_c,
                      c_gd_rel_dev=dev_gd_c, c_explicit_rel_dev=dev_explicit_c, c_gap_without_rescaling=gap_unscaled,
                      passed_a=bool(pass_a), passed_b=bool(pass_b), passed_c=bool(pass_c)),
        expected=dict(a_rel_tol=GD_RTOL, b_tol=tol_b, b_ratio_band=list(RATIO_BAND), b_t_inf_tol=tol_inf,
                      c_rel_tol=NORM_RTOL),
        passed=bool(passed),
        details=dict(
            gd=dict(size=dict(c=gd["size"]["c"], lr=gd["size"]["lr"], rel_dev=gd["size"]["dev"]),
                    none=dict(c=gd["none"]["c"], lr=gd["none"]["lr"], rel_dev=gd["none"]["dev"]),
                    oscillating_modes=oscillating, lambda_max=float(lam_emp[-1]), lambda_min=float(lam_emp[0])),
            flow=dict(lambda_min=lam_min, lambda_max=lam_max, t_end=t_end, tau_end=a * t_end,
                      substeps=[sub0, 2 * sub0, 4 * sub0],
                      h=hs, max_dev_per_rung=devs, diff_h_h2=diff_12, diff_h2_h4=diff_24, floor=floor,
                      richardson_dev=dev_rich, t_inf_tail_bound=tail, scale=scale_s),
            series=dict(x=hs, y={"max |closed form - RK4(h)|": devs, "RK4 error estimate |y_h - y_2h|/15":
                                 [float("nan"), diff_12 / 15, diff_24 / 15]},
                        xlabel="RK4 step h", ylabel="max deviation", loglog=True, reference_slope=4.0),
        ),
    )

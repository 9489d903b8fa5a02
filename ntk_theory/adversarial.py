r"""Adversarial NTKs and adversarial training in kernel form (THEORY.md §B.4–§B.6).

* :class:`KernelRegressor` — the infinite-width gradient-flow mean predictor
  :math:`\mu_\tau(x) = \Theta(x, X)\,\Theta^{-1}(I - e^{-\Theta\tau})\,Y` as a differentiable
  callable, so :func:`ntk_theory.attacks.pgd` can attack it through the closed-form kernel.
* :func:`adversarial_ntk` — the NTK at attacked points, :math:`\Theta(\tilde X, \tilde X)` and
  :math:`\Theta(\tilde X, X)`, for a finite network (attack the network, kernel from
  :func:`ntk_theory.empirical.empirical_ntk`, masks supported) or at infinite width (attack the
  kernel predictor, kernel from :mod:`ntk_theory.infinite`).
* :func:`adversarial_kernel_training` — adversarial training in the kernel regime (AT-2):
  every step re-attacks the current predictor and moves it with the kernel at the attacked
  points,

  .. math:: f_{k+1}(x) = f_k(x) - \frac{\eta}{c}\,\Theta(x, \tilde X_k)\,(f_k(\tilde X_k) - Y),
            \qquad \tilde X_k = \mathrm{Attack}(f_k, X, Y),

  for (a) a finite network's linearisation :math:`f_0 + J_0(\theta - \theta_0)` (the update is
  gradient descent on :math:`\theta`, which is exactly the recursion above with the empirical
  NTK :math:`\hat\Theta_0`), and (b) infinite width, where the predictor is kept as
  :math:`f_0 + \sum_s \Theta(x, \tilde X_s) a_s` over the accumulated adversarial sets
  (:math:`f_0 \equiv 0`: the ensemble mean). With ``eps = 0`` both reduce to full-batch kernel
  gradient descent, :func:`ntk_theory.dynamics.gradient_descent_mse`.

Loss convention: :math:`L = \frac1{2c}\|f(\tilde X) - Y\|_F^2` with ``c = Y.numel()``
(``normalization="size"``) or 1 (``"none"``), as everywhere in :mod:`ntk_theory.dynamics`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from ._checks import as_tensor, check_choice, check_finite, check_int, check_nonnegative, check_positive
from .attacks import _ModuleStateGuard, pgd
from .dynamics import gradient_flow_mse, linearize, loss_scale
from .empirical import empirical_ntk
from .infinite import KernelFn
from .masks import canonical_name, validate_mask

__all__ = ["KernelRegressor", "AdvNTKPredictor", "AdversarialKernels", "adversarial_ntk", "ATTrajectory",
           "adversarial_kernel_training"]

Attack = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


def _targets(y, n: int, name: str = "y_train") -> torch.Tensor:
    y = as_tensor(y, name)
    if not y.is_floating_point():
        raise ValueError(f"{name}: regression targets must be floating point (one-hot for classes), got {y.dtype}")
    check_finite(y, name)
    if y.dim() not in (1, 2) or y.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) or ({n}, O), got {tuple(y.shape)}")
    return y


class KernelRegressor(nn.Module):
    r"""Infinite-width gradient-flow mean predictor, differentiable in its input.

    .. math:: \mu_\tau(x) = \Theta(x, X)\,\Theta^{-1}(I - e^{-\Theta\tau})\,Y,
              \qquad \tau = \mathrm{lr}\cdot t / c

    (Lee et al. 2019, eq. 15; THEORY.md §B.4) with :math:`\Theta` the closed-form NTK of
    ``kernel_fn``; ``t = inf`` gives kernel regression
    :math:`\Theta(x, X)(\Theta + \mathrm{diag\_reg}\,I)^{-1}Y`. The coefficients
    :math:`A = \Theta^{-1}(I - e^{-\Theta\tau})Y` are computed once (through
    :func:`ntk_theory.dynamics.gradient_flow_mse`, stable as :math:`\lambda \to 0`); a call
    evaluates ``kernel_fn(x, X) @ A``, so input gradients flow through the closed form.

    Args:
        kernel_fn: a :class:`ntk_theory.infinite.KernelFn` (e.g. ``mlp(2)``).
        x_train: ``(N, ...)`` training inputs. y_train: ``(N,)`` or ``(N, O)`` float targets.
        t: training time ``>= 0`` or ``inf``. lr, normalization: as in :mod:`ntk_theory.dynamics`.
        diag_reg: ``>= 0`` added to :math:`\Theta(X, X)` (needed when it is near-singular).
        get: ``"ntk"`` (gradient-flow mean) or ``"nngp"`` (the NNGP posterior mean at ``t = inf``).
    """

    def __init__(self, kernel_fn: KernelFn, x_train, y_train, *, t: float = math.inf, lr: float = 1.0,
                 normalization: str = "size", diag_reg: float = 0.0, get: str = "ntk"):
        super().__init__()
        if not isinstance(kernel_fn, KernelFn):
            raise TypeError(f"kernel_fn: expected an ntk_theory.infinite.KernelFn, got {type(kernel_fn).__name__}")
        check_choice(get, "get", ("ntk", "nngp"))
        x_train = as_tensor(x_train, "x_train").to(torch.float64)
        check_finite(x_train, "x_train")
        y_train = _targets(y_train, x_train.shape[0]).to(torch.float64)
        check_nonnegative(t, "t", allow_inf=True)
        self.kernel_fn, self.get, self.t = kernel_fn, get, float(t)
        self.register_buffer("x_train", x_train.detach().clone())
        k_train = kernel_fn(x_train, get=get)
        n = x_train.shape[0]
        # A = Theta^{-1}(I - e^{-Theta tau}) Y is the test prediction with Theta(x, X) = I and f0 = 0
        flow = gradient_flow_mse(k_train, y_train, [t], k_test_train=torch.eye(n, dtype=torch.float64,
                                                                                device=k_train.device),
                                 lr=lr, normalization=normalization, diag_reg=diag_reg)
        self.register_buffer("coef", flow.f_test[0].reshape(n, -1).detach())
        self.squeeze = y_train.dim() == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kernel_fn(x.to(torch.float64), self.x_train, get=self.get) @ self.coef
        return out[:, 0] if self.squeeze else out


class AdvNTKPredictor(nn.Module):
    r"""Adv-NTK closed-form predictor with per-sample training times (Fu & Wang, ICLR 2024; THEORY.md §B.6).

    .. math:: f_\varpi(x) = \Theta(x, X)\,\Theta^{-1}\big(I - e^{-\Theta\,\mathrm{diag}(|\varpi|)}\big)\,Y

    (infinite-width ensemble mean, :math:`f_0 = 0`). ``varpi`` is a learnable ``nn.Parameter``
    with one "effective training time" per training sample (``per_class=False``, as the
    authors' code) or per (sample, class) (``per_class=True``, as their algorithm box); with
    all entries equal to :math:`\tau` it is :class:`KernelRegressor` at scaled time
    :math:`\tau`. The inverse is never formed: with :math:`A = \Theta D`,
    :math:`\Theta^{-1}(I - e^{-A}) = D\,\varphi(A)`, :math:`\varphi(z) = (1 - e^{-z})/z`,
    and :math:`\varphi(A)` is the upper-right block of
    :math:`\exp\begin{pmatrix}-A & I\\ 0 & 0\end{pmatrix}` (differentiable in ``varpi``
    through ``torch.linalg.matrix_exp``; cost :math:`O(N^3)` per output column set).
    """

    def __init__(self, kernel_fn: KernelFn, x_train, y_train, *, per_class: bool = False, init: float = 0.0):
        super().__init__()
        if not isinstance(kernel_fn, KernelFn):
            raise TypeError(f"kernel_fn: expected an ntk_theory.infinite.KernelFn, got {type(kernel_fn).__name__}")
        x_train = as_tensor(x_train, "x_train").to(torch.float64)
        check_finite(x_train, "x_train")
        y_train = _targets(y_train, x_train.shape[0]).to(torch.float64)
        check_nonnegative(init, "init")
        n = x_train.shape[0]
        self.kernel_fn = kernel_fn
        self.squeeze = y_train.dim() == 1
        y2 = y_train.reshape(n, -1)
        self.register_buffer("x_train", x_train.detach().clone())
        self.register_buffer("y_train", y2.detach().clone())
        self.register_buffer("k_train", kernel_fn(x_train, get="ntk"))
        shape = (n, y2.shape[1]) if per_class else (n,)
        self.varpi = nn.Parameter(torch.full(shape, float(init), dtype=torch.float64))

    def coefficients(self) -> torch.Tensor:
        """``Θ^{-1}(I - e^{-Θ diag|ϖ|}) Y``, shape ``(N, O)``."""
        n = self.k_train.shape[0]
        eye = torch.eye(n, dtype=torch.float64, device=self.k_train.device)
        zero = torch.zeros_like(eye)
        # |varpi| with derivative +1 at 0 (as jnp.abs in Fu & Wang's code): trainable from varpi = 0
        w = torch.where(self.varpi >= 0, self.varpi, -self.varpi)
        cols = [w] if w.dim() == 1 else list(w.unbind(1))
        out = []
        for j, d in enumerate(cols):
            big = torch.cat([torch.cat([-self.k_train * d[None, :], eye], 1), torch.cat([zero, zero], 1)], 0)
            phi = torch.linalg.matrix_exp(big)[:n, n:]
            y = self.y_train if w.dim() == 1 else self.y_train[:, j:j + 1]
            out.append(d[:, None] * (phi @ y))
        return out[0] if w.dim() == 1 else torch.cat(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kernel_fn(x.to(torch.float64), self.x_train, get="ntk") @ self.coefficients()
        return out[:, 0] if self.squeeze else out


@dataclass
class AdversarialKernels:
    """Kernels at attacked points: ``x_adv`` and ``Θ(X̃, X̃)``, ``Θ(X̃, X)``, ``Θ(X, X)``."""

    x_adv: torch.Tensor
    k_adv_adv: torch.Tensor
    k_adv_clean: torch.Tensor
    k_clean_clean: torch.Tensor

    def to_dict(self) -> dict:
        return {k: v.detach().cpu().tolist() for k, v in self.__dict__.items()}


def _attack_fn(attack: Attack | None, eps: float, norm: str, steps: int, alpha: float | None, loss,
               clamp, generator) -> Attack:
    check_nonnegative(eps, "eps")
    if attack is not None:
        if not callable(attack):
            raise TypeError(f"attack: expected a callable (f, x, y) -> x_adv, got {type(attack).__name__}")
        return attack
    check_choice(norm, "norm", ("linf", "l2"))

    def run(f, x, y):  # pgd validates every argument, then returns x itself for eps = 0
        return pgd(f, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, loss=loss, clamp=clamp,
                   generator=generator)

    return run


def _check_attack_output(x_adv, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        got = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
        raise ValueError(f"attack: must return adversarial points of x's shape {tuple(x.shape)}, got {got}")
    check_finite(x_adv, "attack")
    return x_adv.detach()


def _masked_forward(model: nn.Module, mask: Mapping[str, torch.Tensor] | None) -> Callable:
    if mask is None:
        return model
    mask = validate_mask(model, mask)            # canonical names ("0.weight")
    masked = {}
    for raw, p in model.named_parameters():      # raw names ("0.parametrizations.weight.original" if masked)
        m = mask.get(canonical_name(raw))
        masked[raw] = (p if m is None else torch.where(m.to(p.device), p, p.new_zeros(()))).detach()
    return lambda x: functional_call(model, masked, (x,))


def adversarial_ntk(model: nn.Module | KernelFn, x, y, *, eps: float, norm: str = "linf", steps: int = 10,
                    alpha: float | None = None, loss="mse", clamp=(0.0, 1.0), generator: torch.Generator | None = None,
                    attack: Attack | None = None, mask: Mapping[str, torch.Tensor] | None = None,
                    mask_mode: str = "subnetwork", mode: str = "trace", x_train=None, y_train=None,
                    t: float = math.inf, diag_reg: float = 1e-6) -> AdversarialKernels:
    r"""The NTK at the adversarial points of ``x``: :math:`\Theta(\tilde X,\tilde X)`, :math:`\Theta(\tilde X, X)`.

    Finite width (``model`` an ``nn.Module``): :math:`\tilde X` = PGD on the (masked) network
    :math:`f(m\odot\theta; \cdot)`, kernels from :func:`~ntk_theory.empirical.empirical_ntk`
    with ``mask``/``mask_mode`` and ``mode`` (default ``"trace"``, shape ``(N, N)``).

    Infinite width (``model`` a :class:`~ntk_theory.infinite.KernelFn`): :math:`\tilde X` = PGD
    on the :class:`KernelRegressor` trained on ``(x_train, y_train)`` (default ``(x, y)``) for
    time ``t`` (default ``inf``, with ``diag_reg``); kernels from the closed form.

    ``attack`` replaces the default PGD (``eps, norm, steps, alpha, loss, clamp, generator``)
    with any callable ``(f, x, y) -> x_adv``. ``y`` holds regression targets (``loss="mse"``)
    or class labels (``loss="ce"``).
    """
    x = as_tensor(x, "x")
    y = as_tensor(y, "y")
    if x.dim() < 1 or y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected one target per input of x {tuple(x.shape)}, got shape {tuple(y.shape)}")
    run = _attack_fn(attack, eps, norm, check_int(steps, "steps", minimum=0), alpha, loss, clamp, generator)
    if isinstance(model, KernelFn):
        if mask is not None:
            raise ValueError("mask: infinite-width kernels take masks through mlp(density=..., rescale=...)")
        if (x_train is None) != (y_train is None):
            raise ValueError("y_train: x_train and y_train must be given together (default: the attacked x, y)")
        xt = x if x_train is None else as_tensor(x_train, "x_train")
        yt = y if y_train is None else as_tensor(y_train, "y_train")
        if not yt.is_floating_point():
            raise ValueError("y: the infinite-width predictor regresses float targets; pass one-hot (or real) "
                             f"targets of shape (N,) or (N, O), got {yt.dtype} labels")
        f = KernelRegressor(model, xt, yt, t=t, diag_reg=diag_reg)
        x_adv = run(f, x.to(torch.float64), y)
        kernel = lambda a, b=None: model(a, b, get="ntk")
    elif isinstance(model, nn.Module):
        with _ModuleStateGuard(model):  # the masked closure is not a Module: guard the model itself
            x_adv = run(_masked_forward(model, mask), x, y)
        kernel = lambda a, b=None: empirical_ntk(model, a, b, mask=mask, mask_mode=mask_mode, mode=mode)
    else:
        raise TypeError(f"model: expected an nn.Module or an ntk_theory.infinite.KernelFn, got {type(model).__name__}")
    x_adv = _check_attack_output(x_adv, x)
    return AdversarialKernels(x_adv=x_adv, k_adv_adv=kernel(x_adv), k_adv_clean=kernel(x_adv, x),
                              k_clean_clean=kernel(x))


# --------------------------------------------------------------------------------------------- AT-2
@dataclass
class ATTrajectory:
    """Adversarial training in kernel form, recorded every ``record_every`` steps.

    ``steps`` (K,), ``tau`` (K,) the scaled time ``lr·k/c``; ``f_train`` (K, N, ...) outputs on the
    clean training points; ``f_adv`` (K, N, ...) outputs on that step's adversarial points;
    ``f_test`` (K, M, ...) on the probe points (or None); ``x_adv`` (K, N, ...) the attacked
    inputs; ``robust_loss``/``clean_loss`` (K,) ``(1/2c)||f - Y||^2`` on adversarial/clean
    training points; ``test_loss`` ``(1/2c')||f - Y_test||^2`` on the probe set (``c'`` from ``y_test``, same
    normalisation) when ``y_test`` was given.
    """

    steps: torch.Tensor
    tau: torch.Tensor
    f_train: torch.Tensor
    f_adv: torch.Tensor
    x_adv: torch.Tensor
    robust_loss: torch.Tensor
    clean_loss: torch.Tensor
    f_test: torch.Tensor | None = None
    test_loss: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {k: (None if v is None else v.detach().cpu().tolist()) for k, v in self.__dict__.items() if k != "meta"}
        out["meta"] = self.meta
        return out


class _InfinitePredictor:
    """``f(x) = sum_s Θ(x, X̃_s) a_s`` over the accumulated adversarial sets (f0 = 0)."""

    def __init__(self, kernel_fn: KernelFn, out_shape):
        self.kernel_fn = kernel_fn
        self.xs: list[torch.Tensor] = []
        self.coefs: list[torch.Tensor] = []
        self.out_shape = out_shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        if not self.xs:
            return x.new_zeros((x.shape[0],) + self.out_shape)
        centres = torch.cat(self.xs)
        coef = torch.cat(self.coefs)
        out = self.kernel_fn(x, centres, get="ntk") @ coef.reshape(coef.shape[0], -1)
        return out.reshape((x.shape[0],) + self.out_shape)

    def add(self, x_adv: torch.Tensor, a: torch.Tensor) -> None:
        self.xs.append(x_adv.detach().to(torch.float64))
        self.coefs.append(a.detach())


def adversarial_kernel_training(model: nn.Module | KernelFn, x_train, y_train, *, steps: int, lr: float,
                                eps: float, norm: str = "linf", attack_steps: int = 10, alpha: float | None = None,
                                clamp=(0.0, 1.0), generator: torch.Generator | None = None,
                                attack: Attack | None = None, x_test=None, y_test=None,
                                normalization: str = "size", record_every: int = 1,
                                progress: bool = False) -> ATTrajectory:
    r"""Simulate adversarial training in the kernel regime (THEORY.md §B.6, AT-2) with MSE.

    Each step attacks the current predictor :math:`f_k` (PGD on the MSE loss unless ``attack``
    is given), then applies :math:`f_{k+1}(x) = f_k(x) - (\mathrm{lr}/c)\,\Theta(x,\tilde X_k)(f_k(\tilde X_k) - Y)`.

    * ``model`` an ``nn.Module``: its linearisation at the current parameters is trained by
      full-batch gradient descent on :math:`\theta` (:func:`ntk_theory.dynamics.linearize`), which
      is this recursion with the empirical NTK :math:`\hat\Theta_0` (a sparse ticket: apply its
      mask with :func:`ntk_theory.masks.apply_mask` first). The caller's model is not modified.
    * ``model`` a :class:`~ntk_theory.infinite.KernelFn`: the infinite-width mean predictor,
      stored as kernel expansions over the accumulated :math:`\tilde X_k` (memory and time per
      step grow linearly with the step count).

    Returns an :class:`ATTrajectory` with outputs and losses at steps ``0, record_every, ...``
    and at ``steps``. ``lr`` should satisfy ``lr < 2c/λ_max(Θ)`` for stability.
    """
    steps = check_int(steps, "steps", minimum=0)
    record_every = check_int(record_every, "record_every", minimum=1)
    lr = check_positive(lr, "lr")
    x_train = as_tensor(x_train, "x_train")
    check_finite(x_train, "x_train")
    y = _targets(y_train, x_train.shape[0])
    c = loss_scale(y, normalization)
    run = _attack_fn(attack, eps, norm, check_int(attack_steps, "attack_steps", minimum=0), alpha, "mse", clamp,
                     generator)
    if x_test is not None:
        x_test = as_tensor(x_test, "x_test")
        check_finite(x_test, "x_test")
        if x_test.shape[1:] != x_train.shape[1:]:
            raise ValueError(f"x_test: feature shape {tuple(x_test.shape[1:])} differs from x_train's "
                             f"{tuple(x_train.shape[1:])}")
    if y_test is not None:
        if x_test is None:
            raise ValueError("y_test: given without x_test")
        y_test = _targets(y_test, x_test.shape[0], "y_test")
        if y_test.shape[1:] != y.shape[1:]:
            raise ValueError(f"y_test: trailing shape {tuple(y_test.shape[1:])} differs from y_train's {tuple(y.shape[1:])}")
        c_test = loss_scale(y_test, normalization)

    if isinstance(model, KernelFn):
        y = y.to(torch.float64)
        x_train = x_train.to(torch.float64)
        x_test = None if x_test is None else x_test.to(torch.float64)
        f = _InfinitePredictor(model, tuple(y.shape[1:]))

        def update(x_adv, resid, out_adv):
            f.add(x_adv, -(lr / c) * resid)
        kind = "infinite"
    elif isinstance(model, nn.Module):
        lin = linearize(model)
        dt = next(iter(lin.parameters())).dtype
        y, x_train = y.to(dt), x_train.to(dt)
        with torch.no_grad():
            out_shape = tuple(lin.f0(x_train[:1]).shape[1:])
        if out_shape != tuple(y.shape[1:]):
            raise ValueError(f"y_train: targets of shape {tuple(y.shape)} do not match the model's outputs "
                             f"(N, {', '.join(map(str, out_shape))}); reshape y_train (e.g. y[:, None])")
        x_test = None if x_test is None else x_test.to(dt)
        f = lin

        def update(x_adv, resid, out_adv):
            # gradient descent on (1/2c)||f_lin(X~) - Y||^2 with X~ held fixed (Danskin):
            # theta <- theta - lr J0(X~)^T r / c, i.e. f <- f - (lr/c) Theta0(., X~) r
            grads = torch.autograd.grad(out_adv, list(lin.parameters()), grad_outputs=resid / c)
            with torch.no_grad():
                for p, g in zip(lin.parameters(), grads):
                    p.sub_(lr * g)
        kind = "finite-linearised"
    else:
        raise TypeError(f"model: expected an nn.Module or an ntk_theory.infinite.KernelFn, got {type(model).__name__}")

    rec: dict[str, list] = {k: [] for k in ("steps", "f_train", "f_adv", "x_adv", "robust", "clean", "f_test", "test")}
    record = lambda k: k % record_every == 0 or k == steps
    bar = range(steps + 1)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc="adversarial kernel training", disable=None)
    for k in bar:
        if isinstance(f, _InfinitePredictor) and not f.xs:
            x_adv = x_train.clone()    # f_0 = 0: the loss is flat in x, every point is a maximiser
        else:
            x_adv = _check_attack_output(run(f, x_train, y), x_train)
        with torch.enable_grad():
            out_adv = f(x_adv)
        resid = out_adv.detach() - y
        if record(k):
            with torch.no_grad():
                rec["steps"].append(k)
                f_tr = f(x_train)
                rec["f_train"].append(f_tr.detach())
                rec["f_adv"].append(out_adv.detach())
                rec["x_adv"].append(x_adv)
                rec["robust"].append(float((resid ** 2).sum() / (2 * c)))
                rec["clean"].append(float(((f_tr - y) ** 2).sum() / (2 * c)))
                if x_test is not None:
                    ft = f(x_test).detach()
                    rec["f_test"].append(ft)
                    if y_test is not None:
                        rec["test"].append(float(((ft - y_test.to(ft.dtype)) ** 2).sum() / (2 * c_test)))
        if k < steps:
            update(x_adv, resid, out_adv)
    st = torch.tensor(rec["steps"], dtype=torch.float64)
    return ATTrajectory(
        steps=st, tau=st * lr / c, f_train=torch.stack(rec["f_train"]), f_adv=torch.stack(rec["f_adv"]),
        x_adv=torch.stack(rec["x_adv"]), robust_loss=torch.tensor(rec["robust"], dtype=torch.float64),
        clean_loss=torch.tensor(rec["clean"], dtype=torch.float64),
        f_test=torch.stack(rec["f_test"]) if rec["f_test"] else None,
        test_loss=torch.tensor(rec["test"], dtype=torch.float64) if rec["test"] else None,
        meta=dict(kind=kind, lr=lr, c=c, eps=eps, norm=norm, attack_steps=attack_steps, normalization=normalization),
    )

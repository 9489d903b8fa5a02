r"""Adversarial NTKs and adversarial training in kernel form (docs/theory.md §B.4–§B.6).

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

Names (awt's vocabulary): ``x``, ``y`` are the data a function fits or attacks, ``x_test``,
``y_test`` held-out points; ``steps`` counts attack iterations, ``train_steps`` training
iterations; ``generator`` is an int seed, a ``torch.Generator`` or ``None``.

Dtype and device (awt's rule at every public boundary): inputs may be tensors or numpy arrays;
complex values are refused (``TypeError``). For a finite network they are cast to the model's
dtype and moved to its device (:func:`ntk_theory._checks.cast_like_model`), so float64 or
numpy inputs on a float32 model work and kernels come back in the model's dtype; at infinite
width everything is float64 (the closed forms' dtype).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from ._checks import (as_generator, as_tensor, cast_like_model, check_choice, check_finite, check_int,
                      check_nonnegative, check_positive, check_real)
from .attacks import ModuleStateGuard, pgd
from .dynamics import gradient_flow_mse, linearize, loss_scale
from .empirical import empirical_ntk
from .infinite import KernelFn
from .io import Result
from .masks import canonical_name, masked_value, validate_mask
from .metrics import as_matrix

__all__ = ["KernelRegressor", "AdvNTKPredictor", "AdversarialKernels", "adversarial_ntk", "ATTrajectory",
           "adversarial_kernel_training"]

Attack = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


def _targets(y, n: int, name: str = "y") -> torch.Tensor:
    y = check_real(as_tensor(y, name), name)
    if not y.is_floating_point():
        raise ValueError(f"{name}: regression targets must be floating point (one-hot for classes), got {y.dtype}")
    check_finite(y, name)
    if y.dim() not in (1, 2) or y.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) or ({n}, O), got {tuple(y.shape)}")
    return y


def _inputs64(x, name: str, device=None, finite: bool = True) -> torch.Tensor:
    """Inputs of the infinite-width predictors: real, float64 (the closed forms' dtype), on ``device``."""
    x = check_real(as_tensor(x, name), name)
    x = x.to(dtype=torch.float64, device=x.device if device is None else device)
    if finite:
        check_finite(x, name)
    return x


class KernelRegressor(nn.Module):
    r"""Infinite-width gradient-flow mean predictor, differentiable in its input.

    .. math:: \mu_\tau(x) = \Theta(x, X)\,\Theta^{-1}(I - e^{-\Theta\tau})\,Y,
              \qquad \tau = \mathrm{lr}\cdot t / c

    (Lee et al. 2019, eq. 15; docs/theory.md §B.4) with :math:`\Theta` the closed-form NTK of
    ``kernel_fn``; ``t = inf`` gives kernel regression
    :math:`\Theta(x, X)(\Theta + \mathrm{diag\_reg}\,I)^{-1}Y`. The coefficients
    :math:`A = \Theta^{-1}(I - e^{-\Theta\tau})Y` are computed once (through
    :func:`ntk_theory.dynamics.gradient_flow_mse`, stable as :math:`\lambda \to 0`); a call
    evaluates ``kernel_fn(x, X) @ A``, so input gradients flow through the closed form.

    Args:
        kernel_fn: a :class:`ntk_theory.infinite.KernelFn` (e.g. ``mlp(2)``).
        x: ``(N, ...)`` training inputs. y: ``(N,)`` or ``(N, O)`` float targets (tensors or numpy;
            stored in float64).
        t: training time ``>= 0`` or ``inf``. lr, normalization: as in :mod:`ntk_theory.dynamics`.
        diag_reg: ``>= 0`` added to :math:`\Theta(X, X)` (needed when it is near-singular).
        get: ``"ntk"`` (gradient-flow mean) or ``"nngp"`` (the NNGP posterior mean at ``t = inf``).

    A call ``f(x)`` takes a tensor or numpy array ``(M, ...)`` (cast to float64, the closed
    forms' dtype, on the training inputs' device) and returns float64 outputs ``(M,)`` or ``(M, O)``.
    The training inputs are kept as the buffer ``x_train``, the coefficients as ``coef``.
    """

    def __init__(self, kernel_fn: KernelFn, x, y, *, t: float = math.inf, lr: float = 1.0,
                 normalization: str = "size", diag_reg: float = 0.0, get: str = "ntk"):
        super().__init__()
        if not isinstance(kernel_fn, KernelFn):
            raise TypeError(f"kernel_fn: expected an ntk_theory.infinite.KernelFn, got {type(kernel_fn).__name__}")
        check_choice(get, "get", ("ntk", "nngp"))
        x_train = _inputs64(x, "x")
        y_train = _targets(y, x_train.shape[0]).to(torch.float64)
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

    def forward(self, x) -> torch.Tensor:
        x = _inputs64(x, "x", self.x_train.device, finite=False)
        out = self.kernel_fn(x, self.x_train, get=self.get) @ self.coef
        return out[:, 0] if self.squeeze else out


class AdvNTKPredictor(nn.Module):
    r"""Adv-NTK closed-form predictor with per-sample training times (Fu & Wang, ICLR 2024; docs/theory.md §B.6).

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

    def __init__(self, kernel_fn: KernelFn, x, y, *, per_class: bool = False, init: float = 0.0):
        super().__init__()
        if not isinstance(kernel_fn, KernelFn):
            raise TypeError(f"kernel_fn: expected an ntk_theory.infinite.KernelFn, got {type(kernel_fn).__name__}")
        x_train = _inputs64(x, "x")
        y_train = _targets(y, x_train.shape[0]).to(torch.float64)
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

    def forward(self, x) -> torch.Tensor:
        x = _inputs64(x, "x", self.x_train.device, finite=False)
        out = self.kernel_fn(x, self.x_train, get="ntk") @ self.coefficients()
        return out[:, 0] if self.squeeze else out


@dataclass(frozen=True)
class AdversarialKernels(Result):
    """Kernels at attacked points (a frozen :class:`ntk_theory.io.Result`).

    Fields: ``x_adv`` the attacked inputs ``X̃`` (``x``'s shape); ``k_adv_adv`` ``Θ(X̃, X̃)``,
    ``k_adv_clean`` ``Θ(X̃, X)``, ``k_clean_clean`` ``Θ(X, X)``: ``(N, N)`` (infinite width,
    and ``mode="trace"``), ``(N, N, O, O)`` (finite width, ``mode="full"``) or ``(N,)``-diagonal
    shapes as :func:`~ntk_theory.empirical.empirical_ntk`'s ``mode`` gives them. ``to_dict()``
    gives nested lists.
    """

    x_adv: torch.Tensor
    k_adv_adv: torch.Tensor
    k_adv_clean: torch.Tensor
    k_clean_clean: torch.Tensor


def _attack_fn(attack: Attack | None, eps: float, norm: str, steps: int, alpha: float | None, loss,
               clamp, generator, device) -> Attack:
    check_nonnegative(eps, "eps")
    if attack is not None:
        if not callable(attack):
            raise TypeError(f"attack: expected a callable (f, x, y) -> x_adv, got {type(attack).__name__}")
        return attack
    check_choice(norm, "norm", ("linf", "l2"))
    # an int seed becomes one generator here, so that successive attacks continue one stream
    generator = as_generator(generator, "generator", device)

    def run(f, x, y):  # pgd validates every argument, then returns x itself for eps = 0
        return pgd(f, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, loss=loss, clamp=clamp,
                   generator=generator)

    return run


def _check_attack_output(x_adv, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        got = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
        raise ValueError(f"attack: must return adversarial points of x's shape {tuple(x.shape)}, got {got}")
    check_finite(x_adv, "attack")
    return x_adv.detach().to(dtype=x.dtype, device=x.device)


def _masked_forward(model: nn.Module, mask: Mapping[str, torch.Tensor] | None) -> Callable:
    """``x -> f(m ⊙ θ; x)``: the (further) masked network as a ``functional_call`` closure."""
    if mask is None:
        return model
    mask = validate_mask(model, mask)            # canonical names ("0.weight")
    masked = {}
    for raw, p in model.named_parameters():      # raw names ("0.parametrizations.weight.original" if masked)
        m = mask.get(canonical_name(raw))
        masked[raw] = (p if m is None else masked_value(p, m.to(p.device))).detach()
    return lambda x: functional_call(model, masked, (x,))


def adversarial_ntk(model: nn.Module | KernelFn, x, y, *, eps: float, norm: str = "linf", steps: int = 10,
                    alpha: float | None = None, loss="mse", clamp=(0.0, 1.0),
                    generator: int | torch.Generator | None = None, attack: Attack | None = None,
                    mask: Mapping[str, torch.Tensor] | None = None, mask_mode: str = "subnetwork",
                    mode: str = "full", predictor: Callable | None = None, t: float = math.inf,
                    diag_reg: float = 1e-6) -> AdversarialKernels:
    r"""The NTK at the adversarial points of ``x``: :math:`\Theta(\tilde X,\tilde X)`, :math:`\Theta(\tilde X, X)`.

    Finite width (``model`` an ``nn.Module``): :math:`\tilde X` = PGD on the (masked) network
    :math:`f(m\odot\theta; \cdot)`, kernels from :func:`~ntk_theory.empirical.empirical_ntk`
    with ``mask``/``mask_mode`` and ``mode`` (default ``"full"``, as ``empirical_ntk``: shape
    ``(N, N, O, O)``, or ``(N, N)`` for one output; ``"trace"`` gives ``(N, N)``). ``x`` (tensor
    or numpy) is cast to the model's dtype and device first, so the kernels come back in the
    model's dtype.

    Infinite width (``model`` a :class:`~ntk_theory.infinite.KernelFn`): :math:`\tilde X` = PGD
    on ``predictor`` (any differentiable callable; default the :class:`KernelRegressor` fitted
    on ``(x, y)`` for time ``t``, default ``inf``, with ``diag_reg``: pass e.g.
    ``predictor=KernelRegressor(model, x_fit, y_fit)`` to attack a predictor fitted on other
    data); kernels from the closed form, float64, ``(N, N)`` (the full kernel is
    :math:`\Theta \otimes I_O`; ``mode`` is not used).

    ``attack`` replaces the default PGD (``eps, norm, steps, alpha, loss, clamp, generator``)
    with any callable ``(f, x, y) -> x_adv``. ``y`` holds regression targets (``loss="mse"``)
    or class labels (``loss="ce"``). Complex inputs are refused.
    """
    if isinstance(model, KernelFn):
        x = _inputs64(x, "x")
    elif isinstance(model, nn.Module):
        x = cast_like_model(x, "x", model)
    else:
        raise TypeError(f"model: expected an nn.Module or an ntk_theory.infinite.KernelFn, got {type(model).__name__}")
    y = check_real(as_tensor(y, "y"), "y")
    if x.dim() < 1 or y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected one target per input of x {tuple(x.shape)}, got shape {tuple(y.shape)}")
    check_choice(mode, "mode", ("full", "trace", "diagonal"))
    run = _attack_fn(attack, eps, norm, check_int(steps, "steps", minimum=0), alpha, loss, clamp, generator,
                     x.device)
    if isinstance(model, KernelFn):
        if mask is not None:
            raise ValueError("mask: infinite-width kernels take masks through mlp(density=..., rescale=...)")
        if predictor is None:
            if not y.is_floating_point():
                raise ValueError("y: the infinite-width predictor regresses float targets; pass one-hot (or real) "
                                 f"targets of shape (N,) or (N, O), got {y.dtype} labels")
            f = KernelRegressor(model, x, y, t=t, diag_reg=diag_reg)
        elif not callable(predictor):
            raise TypeError(f"predictor: expected a callable x -> outputs, got {type(predictor).__name__}")
        else:
            f = predictor
        x_adv = run(f, x, y)
        kernel = lambda a, b=None: model(a, b, get="ntk")
    else:
        if predictor is not None:
            raise ValueError("predictor: only for infinite-width kernels; a finite network is attacked itself")
        with ModuleStateGuard(model):  # the masked closure is not a Module: guard the model itself
            x_adv = run(_masked_forward(model, mask), x, y)
        kernel = lambda a, b=None: empirical_ntk(model, a, b, mask=mask, mask_mode=mask_mode, mode=mode)
    x_adv = _check_attack_output(x_adv, x)
    return AdversarialKernels(x_adv=x_adv, k_adv_adv=kernel(x_adv), k_adv_clean=kernel(x_adv, x),
                              k_clean_clean=kernel(x))


# --------------------------------------------------------------------------------------------- AT-2
@dataclass(frozen=True)
class ATTrajectory(Result):
    """Adversarial training in kernel form, recorded every ``record_every`` training steps (a frozen
    :class:`ntk_theory.io.Result`).

    Fields (``K`` records, ``N`` training points, ``M`` probe points):

    * ``step`` ``(K,)``: the training step of each record (``0, record_every, ..., train_steps``);
    * ``tau`` ``(K,)``: the scaled time ``lr·step/c``;
    * ``f_train`` ``(K, N, ...)``: outputs on the clean training points;
    * ``f_adv`` ``(K, N, ...)``: outputs on that step's adversarial points;
    * ``x_adv`` ``(K, N, ...)``: the attacked inputs;
    * ``robust_loss`` / ``clean_loss`` ``(K,)`` float64: ``(1/2c)||f - Y||^2`` on the adversarial /
      clean training points;
    * ``f_test`` ``(K, M, ...)``: outputs on ``x_test`` (or None); ``test_loss`` ``(K,)``:
      ``(1/2c')||f - Y_test||^2`` (``c'`` from ``y_test``, same normalisation) when ``y_test`` was
      given (or None);
    * ``meta``: ``kind`` ("infinite" | "finite-linearised"), ``lr``, ``c``, ``eps``, ``norm``,
      ``steps`` (attack iterations), ``train_steps``, ``normalization`` and ``lr_limit``, the
      stability limit ``2c/λ_max`` of the kernel at the first attacked training points.
    """

    step: torch.Tensor
    tau: torch.Tensor
    f_train: torch.Tensor
    f_adv: torch.Tensor
    x_adv: torch.Tensor
    robust_loss: torch.Tensor
    clean_loss: torch.Tensor
    f_test: torch.Tensor | None = None
    test_loss: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)


class _InfinitePredictor:
    r"""``f(x) = Σ_s Θ(x, X̃_s) a_s`` over the accumulated adversarial sets (``f_0 = 0``).

    The centres and coefficients live in buffers that grow by doubling, so a call does no
    concatenation of the past sets. Outputs at points that do not move (the training and probe
    points, :meth:`track`) are kept up to date incrementally: adding the set ``X̃_k`` costs one
    block ``Θ(x, X̃_k)`` per tracked set, and the blocks against the past sets, which do not
    change, are never recomputed. An attack still needs ``Θ(z, X̃_s)`` for every past ``s`` at
    each iterate ``z``: a step's cost grows linearly with the number of past sets.
    """

    def __init__(self, kernel_fn: KernelFn, out_shape):
        self.kernel_fn = kernel_fn
        self.out_shape = tuple(out_shape)
        self.n = 0
        self.sets = 0
        self._centres: torch.Tensor | None = None
        self._coef: torch.Tensor | None = None
        self._active: torch.Tensor | None = None
        self._tracked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _empty(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((x.shape[0],) + self.out_shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        if self.n == 0:
            return self._empty(x)
        out = self.kernel_fn(x, self._active, get="ntk") @ self._coef[:self.n]
        return out.reshape((x.shape[0],) + self.out_shape)

    def track(self, name: str, x: torch.Tensor) -> None:
        """Keep ``f(x)`` up to date as sets are added (:meth:`tracked`)."""
        self._tracked[name] = (x, self(x).reshape(x.shape[0], -1))

    def tracked(self, name: str) -> torch.Tensor:
        x, out = self._tracked[name]
        return out.reshape((x.shape[0],) + self.out_shape)

    def add(self, x_adv: torch.Tensor, a: torch.Tensor, k_blocks: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add the set ``x_adv`` with coefficients ``a``; ``k_blocks[name]`` may give ``Θ(x_name, x_adv)``."""
        x_adv = x_adv.detach().to(torch.float64)
        a = a.detach().reshape(x_adv.shape[0], -1)
        m = x_adv.shape[0]
        if self._centres is None or self.n + m > self._centres.shape[0]:
            cap = max(2 * (self.n + m), 4 * m)
            centres = x_adv.new_empty((cap,) + tuple(x_adv.shape[1:]))
            coef = a.new_empty((cap, a.shape[1]))
            if self.n:
                centres[:self.n] = self._centres[:self.n]
                coef[:self.n] = self._coef[:self.n]
            self._centres, self._coef = centres, coef
        self._centres[self.n:self.n + m] = x_adv
        self._coef[self.n:self.n + m] = a
        self.n += m
        self.sets += 1
        # one view object of the centres between additions: the kernel memoises its row keys and its
        # finiteness check on the tensor object (infinite._memo), so PGD's calls reuse them
        self._active = self._centres[:self.n]
        for name, (x, out) in self._tracked.items():
            blk = None if k_blocks is None else k_blocks.get(name)
            if blk is None:
                blk = self.kernel_fn(x, x_adv, get="ntk")
            out.add_(blk @ a)


def _stability_limit(k: torch.Tensor, c: float) -> float:
    """``2c/λ_max`` of a kernel ``(N, N)`` or ``(N, N, O, O)``: gradient descent with step ``lr`` on
    ``(1/2c)||f(X) - Y||^2`` multiplies the residual by ``I - (lr/c)Θ``, which is a contraction iff
    ``lr < 2c/λ_max(Θ)`` (docs/theory.md §B.4)."""
    mat = as_matrix(k.detach()).to(torch.float64)
    lmax = float(torch.linalg.eigvalsh(0.5 * (mat + mat.mT)).max())
    return 2.0 * c / lmax if lmax > 0 else math.inf


#: A run whose robust loss exceeds this multiple of its scale (its first value, or ``||Y||^2/2c``)
#: has diverged: kernel gradient descent below the stability limit never grows the loss like this.
_DIVERGENCE_FACTOR = 1e8


def adversarial_kernel_training(model: nn.Module | KernelFn, x, y, *, train_steps: int, lr: float,
                                eps: float, norm: str = "linf", steps: int = 10, alpha: float | None = None,
                                clamp=(0.0, 1.0), generator: int | torch.Generator | None = None,
                                attack: Attack | None = None, x_test=None, y_test=None,
                                normalization: str = "size", record_every: int = 1,
                                progress: bool = False) -> ATTrajectory:
    r"""Simulate adversarial training in the kernel regime (docs/theory.md §B.6, AT-2) with MSE.

    Each of the ``train_steps`` steps attacks the current predictor :math:`f_k` (PGD with
    ``steps`` iterations on the MSE loss, unless ``attack`` is given), then applies
    :math:`f_{k+1}(x) = f_k(x) - (\mathrm{lr}/c)\,\Theta(x,\tilde X_k)(f_k(\tilde X_k) - Y)`.

    * ``model`` an ``nn.Module``: its linearisation at the current parameters is trained by
      full-batch gradient descent on :math:`\theta` (:func:`ntk_theory.dynamics.linearize`), which
      is this recursion with the empirical NTK :math:`\hat\Theta_0` (a sparse ticket: apply its
      mask with :func:`ntk_theory.masks.apply_mask` first). The caller's model is not modified.
      Inputs and targets are cast to the model's dtype and device.
    * ``model`` a :class:`~ntk_theory.infinite.KernelFn`: the infinite-width mean predictor,
      stored as kernel expansions over the accumulated :math:`\tilde X_k`, in float64. Memory
      grows linearly with the step count, and so does the cost of a step (its attack evaluates
      the kernel between the iterates and every past set); the kernel blocks between the fixed
      training/probe points and the past sets are computed once each, not at every step. The
      total cost of ``train_steps`` steps is therefore quadratic in ``train_steps``.

    Stability. Gradient descent on the kernel is stable iff ``lr < 2c/λ_max(Θ)``. The limit of
    the kernel at the first attacked training points is computed (``meta["lr_limit"]``); an
    ``lr`` above it gives a ``RuntimeWarning`` naming the limit, and a run whose robust loss
    becomes non-finite or grows by a factor ``1e8`` raises ``FloatingPointError`` naming it.

    Returns an :class:`ATTrajectory` with outputs and losses at steps ``0, record_every, ...``
    and at ``train_steps``.
    """
    train_steps = check_int(train_steps, "train_steps", minimum=0)
    record_every = check_int(record_every, "record_every", minimum=1)
    lr = check_positive(lr, "lr")
    steps = check_int(steps, "steps", minimum=0)
    if isinstance(model, KernelFn):
        x = _inputs64(x, "x")
        kind = "infinite"
    elif isinstance(model, nn.Module):
        x = cast_like_model(x, "x", model)
        check_finite(x, "x")
        kind = "finite-linearised"
    else:
        raise TypeError(f"model: expected an nn.Module or an ntk_theory.infinite.KernelFn, got {type(model).__name__}")
    y = _targets(y, x.shape[0]).to(dtype=x.dtype, device=x.device)
    c = loss_scale(y, normalization)
    run = _attack_fn(attack, eps, norm, steps, alpha, "mse", clamp, generator, x.device)
    if x_test is not None:
        x_test = _inputs64(x_test, "x_test") if kind == "infinite" else cast_like_model(x_test, "x_test", model)
        check_finite(x_test, "x_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(f"x_test: feature shape {tuple(x_test.shape[1:])} differs from x's "
                             f"{tuple(x.shape[1:])}")
    if y_test is not None:
        if x_test is None:
            raise ValueError("y_test: given without x_test")
        y_test = _targets(y_test, x_test.shape[0], "y_test").to(dtype=x.dtype, device=x.device)
        if y_test.shape[1:] != y.shape[1:]:
            raise ValueError(f"y_test: trailing shape {tuple(y_test.shape[1:])} differs from y's {tuple(y.shape[1:])}")
        c_test = loss_scale(y_test, normalization)

    if kind == "infinite":
        f = _InfinitePredictor(model, tuple(y.shape[1:]))
        f.track("train", x)
        if x_test is not None:
            f.track("test", x_test)
        blocks: dict[str, torch.Tensor] = {}

        def kernel_at(x_adv):   # Θ(X̃_0, X̃_0) = Θ(X, X) at step 0: also the block the train outputs need
            k = model(x_adv, get="ntk")
            if torch.equal(x_adv, x):
                blocks["train"] = k
            return k

        def update(x_adv, resid, out_adv):
            f.add(x_adv, -(lr / c) * resid, blocks)
            blocks.clear()

        def outputs(name, pts):
            return f.tracked(name)
    else:
        lin = linearize(model)
        with torch.no_grad():
            out_shape = tuple(lin.f0(x[:1]).shape[1:])
        if out_shape != tuple(y.shape[1:]):
            raise ValueError(f"y: targets of shape {tuple(y.shape)} do not match the model's outputs "
                             f"(N, {', '.join(map(str, out_shape))}); reshape y (e.g. y[:, None])")
        f = lin

        def kernel_at(x_adv):  # the linearised model's NTK is Θ̂_0 at the linearisation point
            return empirical_ntk(model, x_adv, mode="full")

        def update(x_adv, resid, out_adv):
            # gradient descent on (1/2c)||f_lin(X~) - Y||^2 with X~ held fixed (Danskin):
            # theta <- theta - lr J0(X~)^T r / c, i.e. f <- f - (lr/c) Theta0(., X~) r
            grads = torch.autograd.grad(out_adv, list(lin.parameters()), grad_outputs=resid / c)
            with torch.no_grad():
                for p, g in zip(lin.parameters(), grads):
                    p.sub_(lr * g)

        def outputs(name, pts):
            return f(pts).detach()

    rec: dict[str, list] = {k: [] for k in ("step", "f_train", "f_adv", "x_adv", "robust", "clean", "f_test", "test")}
    record = lambda k: k % record_every == 0 or k == train_steps
    lr_limit = None
    scale = None
    bar = range(train_steps + 1)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc="adversarial kernel training", disable=None)
    for k in bar:
        if kind == "infinite" and f.n == 0:
            x_adv = x.clone()    # f_0 = 0: the loss is flat in x, every point is a maximiser
        else:
            x_adv = _check_attack_output(run(f, x, y), x)
        with torch.enable_grad():
            out_adv = f(x_adv)
        resid = out_adv.detach() - y
        robust = float((resid.double() ** 2).sum() / (2 * c))
        if k == 0:
            lr_limit = _stability_limit(kernel_at(x_adv), c)
            scale = max(robust, float((y.double() ** 2).sum() / (2 * c)), torch.finfo(torch.float64).tiny)
            if train_steps > 0 and lr > lr_limit:
                warnings.warn(f"lr: {lr:g} exceeds the stability limit 2c/λ_max = {lr_limit:.6g} of the kernel at the "
                              "first attacked training points; kernel gradient descent diverges beyond it",
                              RuntimeWarning, stacklevel=2)
        elif not math.isfinite(robust) or robust > _DIVERGENCE_FACTOR * scale:
            raise FloatingPointError(
                f"lr: adversarial kernel training diverged at step {k} (robust loss {robust:.3g}, from {scale:.3g}); "
                f"lr = {lr:g} against the stability limit 2c/λ_max = {lr_limit:.6g} of the kernel at the first "
                "attacked points: use a smaller lr")
        if record(k):
            with torch.no_grad():
                rec["step"].append(k)
                f_tr = outputs("train", x)
                rec["f_train"].append(f_tr.detach().clone())
                rec["f_adv"].append(out_adv.detach())
                rec["x_adv"].append(x_adv)
                rec["robust"].append(robust)
                rec["clean"].append(float(((f_tr.double() - y.double()) ** 2).sum() / (2 * c)))
                if x_test is not None:
                    ft = outputs("test", x_test).detach().clone()
                    rec["f_test"].append(ft)
                    if y_test is not None:
                        rec["test"].append(float(((ft.double() - y_test.double()) ** 2).sum() / (2 * c_test)))
        if k < train_steps:
            update(x_adv, resid, out_adv)
    st = torch.tensor(rec["step"], dtype=torch.float64)
    return ATTrajectory(
        step=st, tau=st * lr / c, f_train=torch.stack(rec["f_train"]), f_adv=torch.stack(rec["f_adv"]),
        x_adv=torch.stack(rec["x_adv"]), robust_loss=torch.tensor(rec["robust"], dtype=torch.float64),
        clean_loss=torch.tensor(rec["clean"], dtype=torch.float64),
        f_test=torch.stack(rec["f_test"]) if rec["f_test"] else None,
        test_loss=torch.tensor(rec["test"], dtype=torch.float64) if rec["test"] else None,
        meta=dict(kind=kind, lr=lr, c=c, eps=eps, norm=norm, steps=steps, train_steps=train_steps,
                  normalization=normalization, lr_limit=lr_limit),
    )

"""First-order adversarial attacks, FGSM/FGM and PGD, on any callable ``f(x) -> outputs`` (docs/theory.md §B.5).

``f`` can be an ``nn.Module``, a ``torch.func.functional_call`` closure, a
linearised network (:func:`ntk_theory.dynamics.linearize`) or a kernel
predictor. The input gradient comes from reverse-mode autodiff through ``f``.

Updates (``g = grad_x loss(f(x), y)``, per sample; ``Pi`` the feasible-set map below)::

    FGSM (linf):  x~ = Pi(x + eps * sign(g))
    FGM  (l2):    x~ = Pi(x + eps * g / ||g||_2)
    PGD  (linf):  x^0 = Pi(x + U(-eps, eps)^d)  (random start),
                  x^{j+1} = Pi(x^j + alpha * sign(g(x^j)))
    PGD  (l2):    x^0 = Pi(x + eps * u^{1/d} * z/||z||_2),  z ~ N(0, I_d), u ~ U(0, 1)  (uniform in the ball),
                  x^{j+1} = Pi(x^j + alpha * g(x^j) / ||g(x^j)||_2)

Madry et al. 2018 (PGD); Goodfellow et al. 2015 (FGSM). The loss is maximised
per sample: the gradient is that of the *sum* of per-sample losses, so a
sample's step does not depend on the batch size (as long as ``f`` treats the
samples of a batch independently).

Feasible set and its exactness. With the box ``clamp=(lo, hi)`` the returned
``x~`` satisfies, evaluated in float64 with no tolerance,

* ``linf``: ``max_i |x~_i - x_i| <= eps`` and ``lo <= x~ <= hi``: ``Pi`` is the
  exact Euclidean projection onto ``B_inf(x, eps) ∩ [lo, hi]^d``, a
  coordinate-wise clip to ``[max(x - eps, lo), min(x + eps, hi)]``;
* ``l2``: ``||x~ - x||_2 <= eps`` and ``lo <= x~ <= hi``: ``Pi`` projects onto
  the ball (radial scaling), then clips to the box. Clipping keeps the point in
  the ball because ``x`` lies in the box (checked): each coordinate moves
  toward the interval ``[lo, hi]``, which contains ``x_i``, so
  ``|clip(z_i) - x_i| <= |z_i - x_i|``. This is the usual feasible map (the same as
  ``torchattacks.PGDL2``), not the exact projection onto the intersection.

Floating-point rounding of ``x + delta`` can leave a point one ulp outside the
ball; the result is therefore checked, both on the exact difference
``x~.double() - x.double()`` and on the difference ``x~ - x`` as rounded in the
input dtype, and nudged toward ``x`` (``nextafter`` for linf, a slightly
smaller radius for l2) until the constraint holds, with no tolerance, against
the float64 value of ``eps`` (for l2 the norm is taken in float64). When
``eps`` is below the resolution of the input dtype, a sample may end
unperturbed.

Losses (per sample ``i``):

* ``"ce"``: cross-entropy ``-log softmax(f(x_i))[y_i]``, ``y`` integer class
  labels ``(N,)`` (or class probabilities of the output's shape);
* ``"mse"``: ``0.5 * ||f(x_i) - y_i||^2`` (sum over output entries, the
  per-sample version of ``L = (1/(2c)) ||f(X) - Y||_F^2`` of
  :mod:`ntk_theory.dynamics` up to the positive factor ``1/c``, which changes
  neither sign nor direction of ``g``). ``y`` has the output's shape; integer
  labels ``(N,)`` with outputs ``(N, C)`` are one-hot encoded;
* a callable ``loss(outputs, y)`` returning per-sample losses ``(N,)`` (or a
  scalar, differentiated as is).

State. The attacks never change the caller's model: no ``train``/``eval``
switch (``f`` runs in whatever mode the caller set), no ``requires_grad``
change, no write to any ``.grad`` (gradients come from
``torch.autograd.grad`` with respect to the input only), and when ``f`` is an
``nn.Module`` its buffers (e.g. BatchNorm running statistics updated by a
forward in train mode) are restored afterwards (:class:`ModuleStateGuard`, which
callers that attack a closure over a module use around it). They work under
``torch.no_grad()``. The returned tensor is detached. Randomness (the PGD
random start) comes only from ``generator``: an int seed, a ``torch.Generator``, or
``None`` for torch's global RNG (:func:`ntk_theory._checks.as_generator`).

Dtype and device (awt's rule at every public boundary). ``x`` and ``y`` may be tensors,
numpy arrays or nested sequences. When ``f`` is an ``nn.Module`` holding floating
tensors, ``x`` is cast to the dtype of its first floating parameter (else buffer) and
moved to its device before anything else, so float64 or numpy inputs on a float32
model work; the feasible set is then the ball around that cast ``x``, and ``x~`` has
the model's dtype and device. For any other callable ``x`` keeps its dtype and device.
``y`` follows ``x``'s device (float targets are cast to the outputs' dtype by the loss).
Complex ``x`` or ``y`` is refused (``TypeError``), as are integer inputs ``x``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (as_generator, as_tensor, cast_like_model, check_choice, check_finite, check_int,
                      check_nonnegative, check_positive, check_real)

__all__ = ["fgsm", "pgd", "per_sample_loss", "ModuleStateGuard", "NORMS", "LOSSES"]

NORMS = ("linf", "l2")
LOSSES = ("ce", "mse")

LossArg = Any  # "ce" | "mse" | Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------- losses
def per_sample_loss(outputs: torch.Tensor, y: torch.Tensor, loss: LossArg = "ce") -> torch.Tensor:
    """Per-sample loss ``(N,)`` of ``outputs`` ``(N, ...)`` against ``y``; see the module docstring.

    ``"ce"``: ``-log softmax(outputs_i)[y_i]`` (``F.cross_entropy``, ``reduction="none"``).
    ``"mse"``: ``0.5 * sum_j (outputs_ij - y_ij)^2``. A callable is called as ``loss(outputs, y)``.
    """
    if callable(loss):
        return loss(outputs, y)
    if loss == "ce":
        if outputs.dim() != 2:
            raise ValueError(f"loss: 'ce' needs outputs of shape (N, C); f returned shape {tuple(outputs.shape)}")
        if y.is_floating_point():
            if y.shape != outputs.shape:
                raise ValueError(f"y: class probabilities for 'ce' must have the outputs' shape {tuple(outputs.shape)}, "
                                 f"got {tuple(y.shape)}")
            if bool((y < 0).any()) or not torch.allclose(y.sum(1).double(), torch.ones(y.shape[0], dtype=torch.float64,
                                                                                     device=y.device), rtol=0, atol=1e-4):
                raise ValueError("y: class probabilities for 'ce' must be >= 0 and sum to 1 in each row")
            return F.cross_entropy(outputs, y.to(outputs.dtype), reduction="none")
        if y.dim() != 1:
            raise ValueError(f"y: integer labels for 'ce' must have shape (N,), got {tuple(y.shape)}")
        c = outputs.shape[1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
            raise ValueError(f"y: labels must lie in [0, {c - 1}] for outputs with {c} classes; "
                             f"got range [{int(y.min())}, {int(y.max())}]")
        return F.cross_entropy(outputs, y.long(), reduction="none")
    # mse
    target = _mse_target(outputs, y)
    return 0.5 * (outputs - target).pow(2).reshape(outputs.shape[0], -1).sum(dim=1)


def _mse_target(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not y.is_floating_point() and y.dim() == 1 and outputs.dim() == 2 and outputs.shape[1] > 1:
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= outputs.shape[1]):
            raise ValueError(f"y: labels must lie in [0, {outputs.shape[1] - 1}] for one-hot 'mse' targets")
        return F.one_hot(y.long(), outputs.shape[1]).to(outputs.dtype)
    if y.shape != outputs.shape:
        if y.numel() == outputs.numel() and y.shape[0] == outputs.shape[0] and (y.dim() == 1 or outputs.dim() == 1):
            return y.reshape(outputs.shape).to(outputs.dtype)  # (N,) vs (N, 1)
        raise ValueError(f"y: 'mse' targets must have the outputs' shape {tuple(outputs.shape)} "
                         f"(or be integer labels (N,) for one-hot targets), got {tuple(y.shape)}")
    return y.to(outputs.dtype)


# --------------------------------------------------------------------------------------------- validation
def _validate(f, x, y, eps, norm, loss, clamp):
    if not callable(f):
        raise TypeError(f"f: expected a callable batch -> outputs (nn.Module, closure, predictor), got {type(f).__name__}")
    x = cast_like_model(x, "x", f)  # the dtype/device rule: the model's (module docstring)
    y = check_real(as_tensor(y, "y"), "y")
    if y.device != x.device:
        y = y.to(x.device)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x: expected a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    check_finite(x, "x")
    if y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y: batch size must match x's {x.shape[0]}, got shape {tuple(y.shape)}")
    if y.is_floating_point():
        check_finite(y, "y")
    eps = check_nonnegative(eps, "eps")
    check_choice(norm, "norm", NORMS)
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"loss: got {loss!r}; accepted values are 'ce', 'mse' or a callable loss(outputs, y) -> (N,)")
    box = None
    if clamp is not None:
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise ValueError(f"clamp: expected None or a pair (lo, hi), got {clamp!r}")
        try:
            lo, hi = float(clamp[0]), float(clamp[1])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"clamp: expected a pair of real numbers (lo, hi), got {clamp!r}") from exc
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"clamp: expected finite lo < hi, got {clamp!r}")
        width = hi - lo
        d = x[0].numel()
        limit = width if norm == "linf" else width * math.sqrt(d)
        if eps > limit:
            what = "the box width hi - lo" if norm == "linf" else "the box diameter (hi - lo) * sqrt(d)"
            raise ValueError(f"eps: got {eps!r}, beyond {what} = {limit:g} for clamp={clamp!r}; "
                             "a ball that large contains the whole box (units mistake? e.g. 8 instead of 8/255)")
        xd = x.detach().double()
        if bool((xd < lo).any()) or bool((xd > hi).any()):
            raise ValueError(f"x: values must lie in the box clamp={clamp!r}; got range "
                             f"[{float(xd.min()):g}, {float(xd.max()):g}]")
        box = _box_in_dtype(lo, hi, x.dtype, x.device)
    return x.detach(), y.detach(), eps, box


def _box_in_dtype(lo: float, hi: float, dtype, device):
    """The box bounds rounded *inward* to the dtype, so the float64 check ``lo <= x~ <= hi`` holds exactly."""
    lo_t = torch.tensor(lo, dtype=dtype, device=device)
    hi_t = torch.tensor(hi, dtype=dtype, device=device)
    if float(lo_t.double()) < lo:
        lo_t = torch.nextafter(lo_t, torch.tensor(math.inf, dtype=dtype, device=device))
    if float(hi_t.double()) > hi:
        hi_t = torch.nextafter(hi_t, torch.tensor(-math.inf, dtype=dtype, device=device))
    return lo_t, hi_t


# --------------------------------------------------------------------------------------------- projections
def _round_down(v: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` that is ``<= v`` (``v >= 0``)."""
    t = torch.tensor(v, dtype=dtype)
    if float(t.double()) > v:
        t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))
    return float(t.double())


def _linf_bounds(x: torch.Tensor, eps: float, box) -> tuple[torch.Tensor, torch.Tensor]:
    """``[max(x - eps, lo), min(x + eps, hi)]`` in x's dtype with ``|bound - x| <= eps`` exactly.

    The bounds are formed in float64 and rounded toward ``x`` (a plain ``x + eps`` in
    float32 would use ``float32(eps)``, which may exceed ``eps``), then checked both
    exactly (float64) and as the dtype evaluates ``bound - x``.
    """
    xd = x.double()
    pinf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
    # with eps rounded down to the dtype, |d| <= eps_t exactly implies float_dtype(d) <= eps_t <= eps as well
    eps = _round_down(eps, x.dtype)
    ud, ld = xd + eps, xd - eps
    upper, lower = ud.to(x.dtype), ld.to(x.dtype)
    upper = torch.where(upper.double() > ud, torch.nextafter(upper, -pinf), upper)
    lower = torch.where(lower.double() < ld, torch.nextafter(lower, pinf), lower)
    for _ in range(16):  # at most an ulp or two remain
        bad_u = ((upper.double() - xd) > eps) | ((upper - x).double() > eps)
        bad_l = ((xd - lower.double()) > eps) | ((x - lower).double() > eps)
        if not (bool(bad_u.any()) or bool(bad_l.any())):
            break
        upper = torch.where(bad_u, torch.nextafter(upper, x), upper)
        lower = torch.where(bad_l, torch.nextafter(lower, x), lower)
    else:  # pragma: no cover - IEEE rounding does not get here; x itself is always feasible
        upper, lower = torch.where(bad_u, x, upper), torch.where(bad_l, x, lower)
    if box is not None:
        upper = torch.minimum(upper, box[1])
        lower = torch.maximum(lower, box[0])
    return lower, upper


def _bshape(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (x.dim() - 1))


def _l2_project(x: torch.Tensor, z: torch.Tensor, eps: float, box) -> torch.Tensor:
    """Radial projection of ``z`` onto ``B_2(x, eps)``, then clip to the box."""
    delta = z - x
    n = torch.linalg.vector_norm(delta.reshape(x.shape[0], -1), dim=1)
    scale = torch.clamp(eps / torch.clamp(n, min=torch.finfo(n.dtype).tiny), max=1.0)
    z = x + delta * _bshape(scale, x)
    if box is not None:
        z = torch.clamp(z, box[0], box[1])
    return z


def _l2_enforce(x: torch.Tensor, z: torch.Tensor, eps: float, box) -> torch.Tensor:
    """Make ``||z - x||_2 <= eps`` hold exactly in float64 by shrinking the few samples that rounding pushed out."""
    u = torch.finfo(x.dtype).eps
    n_samples = x.shape[0]
    eps = _round_down(eps, x.dtype)
    for it in range(64):
        n = torch.maximum(torch.linalg.vector_norm((z.double() - x.double()).reshape(n_samples, -1), dim=1),
                          torch.linalg.vector_norm((z - x).double().reshape(n_samples, -1), dim=1))
        bad = n > eps
        if not bool(bad.any()):
            return z
        idx = bad.nonzero().squeeze(1)
        shrink = (eps / n[idx]) * max(0.0, 1.0 - 4.0 * (2.0 ** it) * u)
        xb = x[idx]
        zb = xb + (z[idx] - xb) * _bshape(shrink.to(x.dtype), xb)
        if box is not None:
            zb = torch.clamp(zb, box[0], box[1])
        z = z.clone()
        z[idx] = zb
    z = z.clone()  # pragma: no cover - the shrink factor reaches 0, i.e. z = x, well before
    z[bad] = x[bad]
    return z


# --------------------------------------------------------------------------------------------- gradients
def _input_grad(f, x_adv: torch.Tensor, y: torch.Tensor, loss: LossArg, checked: bool = False) -> torch.Tensor:
    """``grad_x sum_i loss(f(x)_i, y_i)`` at ``x_adv``. ``checked``: the labels were validated against
    ``f``'s outputs at an earlier step of the same attack (integer labels for ``"ce"``), so the
    per-step label range checks (two device syncs) are skipped; the NaN check stays exact but costs
    one reduction when the gradient has no NaN (a NaN-free sum proves it)."""
    xa = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        out = f(xa)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"f: expected f(x) to return a tensor, got {type(out).__name__}")
        if out.dim() < 1 or out.shape[0] != xa.shape[0]:
            raise ValueError(f"f: outputs must be a batch of {xa.shape[0]}, got shape {tuple(out.shape)}")
        if checked and loss == "ce" and out.dim() == 2 and not y.is_floating_point():
            ell = F.cross_entropy(out, y, reduction="none")
        else:
            ell = per_sample_loss(out, y, loss)
        if ell.dim() > 1 or (ell.dim() == 1 and ell.shape[0] != xa.shape[0]):
            raise ValueError(f"loss: must return per-sample losses of shape ({xa.shape[0]},) or a scalar, "
                             f"got shape {tuple(ell.shape)}")
        if not ell.requires_grad:
            raise ValueError("f: its outputs do not depend differentiably on the input x "
                             "(was it built under torch.no_grad() or from detached tensors?)")
        (g,) = torch.autograd.grad(ell.sum(), xa, allow_unused=True)
    if g is None:
        g = torch.zeros_like(xa)
    # a sum without NaN proves there is no NaN (only NaN, or +inf with -inf, make it NaN)
    if bool(torch.isnan(g.sum())) and bool(torch.isnan(g).any()):
        bad = int(torch.isnan(g.reshape(g.shape[0], -1)).any(1).sum())
        raise ValueError(f"f: the input gradient of the loss is NaN for {bad} sample(s) (NaN outputs or loss?); "
                         "the attack cannot proceed")
    return g.detach()


def _step(g: torch.Tensor, norm: str, size: float) -> torch.Tensor:
    if norm == "linf":
        return size * torch.sign(g)
    flat = g.reshape(g.shape[0], -1)
    inf = torch.isinf(flat)
    # an infinite component dominates: the direction is that of the infinite components
    flat = torch.where(inf.any(1, keepdim=True), torch.where(inf, torch.sign(flat), torch.zeros_like(flat)), flat)
    # scale by the max-norm first, so that ||.||_2 neither underflows (subnormal g) nor overflows
    m = flat.abs().amax(1, keepdim=True)
    u = flat / torch.where(m > 0, m, torch.ones_like(m))
    n = torch.linalg.vector_norm(u, dim=1, keepdim=True)
    # a zero gradient gives a zero step (not NaN)
    return (u * (size / torch.where(n > 0, n, torch.ones_like(n)))).reshape(g.shape)


class ModuleStateGuard:
    """Context manager that restores an ``nn.Module``'s buffers and train/eval flags on exit.

    ``with ModuleStateGuard(model): ...`` snapshots every buffer (e.g. BatchNorm running
    statistics, which a forward in training mode updates) and every submodule's ``training``
    flag, and puts them back on exit, also when the body raises; a buffer that a forward
    *reassigned* gets its original tensor object back. Parameters and gradients are not
    touched (the attacks never write them). For anything that is not an ``nn.Module`` it does
    nothing. :func:`pgd` and :func:`fgsm` use it around ``f``; a caller that attacks a closure
    over a module (e.g. a ``functional_call`` with masked parameters) wraps the module itself.
    """

    def __init__(self, f):
        self.f = f if isinstance(f, nn.Module) else None

    def __enter__(self):
        self.saved = [] if self.f is None else [(m, name, b, b.detach().clone()) for m in self.f.modules()
                                                for name, b in m._buffers.items() if b is not None]
        self.training = None if self.f is None else [(m, m.training) for m in self.f.modules()]
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            with torch.no_grad():
                for m, name, b, v in self.saved:
                    if m._buffers.get(name) is not b:  # reassigned in forward: put the original back
                        m._buffers[name] = b
                    if not torch.equal(b, v):
                        b.copy_(v)
            for m, mode in self.training:  # defensive: f itself might switch modes
                m.training = mode
        return False


# --------------------------------------------------------------------------------------------- attacks
def fgsm(f: Callable[[torch.Tensor], torch.Tensor], x, y, *, eps: float, norm: str = "linf", loss: LossArg = "ce",
         clamp: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """One-step attack: FGSM for ``norm="linf"``, FGM for ``norm="l2"`` (docs/theory.md §B.5).

    ``x~ = Pi(x + eps * sign(g))`` (linf) or ``x~ = Pi(x + eps * g/||g||_2)`` (l2), with
    ``g = grad_x loss(f(x), y)`` per sample and ``Pi`` the feasible map onto
    ``B(x, eps) ∩ box`` of the module docstring.

    Args:
        f: callable ``(N, ...) -> (N, ...)`` outputs.
        x: inputs ``(N, ...)``, real floating (tensor or numpy), inside ``clamp``; cast to
            ``f``'s dtype and device when ``f`` is an ``nn.Module`` (module docstring).
        y: labels ``(N,)`` (``"ce"``) or targets of the outputs' shape (``"mse"``).
        eps: radius ``>= 0``; at most the box width (linf) or diameter (l2).
        norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"``, ``"mse"`` or a callable ``loss(outputs, y) -> (N,)``.
        clamp: the data box ``(lo, hi)`` or ``None`` for no box.

    Returns:
        ``x~``, detached, ``x``'s shape, in the model's dtype and device (``x``'s for a closure).
    """
    x, y, eps, box = _validate(f, x, y, eps, norm, loss, clamp)
    with ModuleStateGuard(f):
        if eps == 0.0:
            return x.clone()
        g = _input_grad(f, x, y, loss)
        z = x + _step(g, norm, eps)
        if norm == "linf":
            lower, upper = _linf_bounds(x, eps, box)
            return torch.minimum(torch.maximum(z, lower), upper)
        return _l2_enforce(x, _l2_project(x, z, eps, box), eps, box)


def pgd(f: Callable[[torch.Tensor], torch.Tensor], x, y, *, eps: float, alpha: float | None = None,
        steps: int = 10, norm: str = "linf", loss: LossArg = "ce", random_start: bool = True,
        clamp: tuple[float, float] | None = (0.0, 1.0), generator: int | torch.Generator | None = None
        ) -> torch.Tensor:
    """Projected gradient ascent on the per-sample loss (Madry et al. 2018; docs/theory.md §B.5).

    ``x^{j+1} = Pi(x^j + alpha * sign(g(x^j)))`` (linf) or
    ``Pi(x^j + alpha * g(x^j)/||g(x^j)||_2)`` (l2) for ``j = 0 .. steps-1``, from
    ``x^0 = x`` or, with ``random_start``, a uniform point of the ball (linf:
    ``x + U(-eps, eps)^d``; l2: uniform in the ball), mapped into the box. The
    last iterate is returned (as in Madry et al. and ``torchattacks.PGD``).

    Args:
        f, x, y, eps, norm, loss, clamp: as in :func:`fgsm`.
        alpha: step size ``> 0``; default ``2.5 * eps / steps`` (Madry et al.: enough
            to cross the ball from any start).
        steps: number of gradient steps ``>= 0`` (0 returns the random start, or ``x``).
        random_start: start from a uniform point of the ball.
        generator: an int seed, a ``torch.Generator`` or ``None`` (torch's global RNG) for the
            random start; with a seed or a generator the attack is deterministic (for a
            deterministic model: dropout in training mode still draws from the global RNG).

    Returns:
        ``x~``, detached, ``x``'s shape, in the model's dtype and device (``x``'s for a
        closure); ``x~ ∈ B(x, eps) ∩ box`` exactly (around ``x`` as cast).
    """
    x, y, eps, box = _validate(f, x, y, eps, norm, loss, clamp)
    steps = check_int(steps, "steps", minimum=0)
    if alpha is None:
        alpha = 2.5 * eps / max(steps, 1)
    else:
        alpha = check_positive(alpha, "alpha")
    generator = as_generator(generator, "generator", x.device)
    with ModuleStateGuard(f):
        if eps == 0.0:
            return x.clone()
        lower, upper = _linf_bounds(x, eps, box) if norm == "linf" else (None, None)

        def project(z):
            if norm == "linf":
                return torch.minimum(torch.maximum(z, lower), upper)
            return _l2_project(x, z, eps, box)

        z = x.clone()
        if random_start:
            if norm == "linf":
                u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                z = project(x + (2.0 * u - 1.0) * eps)
            else:
                d = x[0].numel()
                dirn = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                dirn = dirn / _bshape(torch.clamp(torch.linalg.vector_norm(dirn.reshape(x.shape[0], -1), dim=1),
                                                  min=torch.finfo(x.dtype).tiny), x)
                r = torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device) ** (1.0 / d)
                z = project(x + dirn * _bshape(eps * r, x))
        if not y.is_floating_point():
            y = y.long()
        for j in range(steps):
            g = _input_grad(f, z, y, loss, checked=j > 0)
            if norm == "linf":  # in place on our own buffers: z <- clip(z + alpha·sign(g), lower, upper)
                z = z.add_(torch.sign(g), alpha=alpha)  # (g may be an expanded view: no in-place on it)
                z = torch.minimum(torch.maximum(z, lower, out=z), upper, out=z)
            else:
                z = project(z + _step(g, norm, alpha))
        if norm == "l2":
            z = _l2_enforce(x, z, eps, box)
        return z.detach()

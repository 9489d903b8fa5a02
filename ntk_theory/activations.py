r"""One registry of elementwise activations: adding an activation is one entry.

Each :class:`Activation` ties together everything awt needs to know about an
elementwise nonlinearity :math:`\phi`:

* ``module(alpha=...)``: the finite-width ``torch.nn`` module (what
  :func:`ntk_theory.layers.finite_mlp` and :meth:`ntk_theory.infinite.KernelFn.finite` build);
* ``phi(z, **params)`` and ``dphi(z, **params)``: :math:`\phi` and :math:`\phi'` as tensors
  (what the structured NTK engine of :mod:`ntk_theory.empirical` multiplies its backward signals by);
* ``kernel(alpha=...)``: the closed-form kernel layer of :mod:`ntk_theory.infinite` (``Relu()``,
  ``LeakyRelu(alpha)``, ``Erf()``, ``Identity()``), or ``None`` where no closed form exists.

:func:`activation_of` maps a module *instance* back to its entry (and :meth:`Activation.params`
reads the instance's parameters, e.g. ``nn.LeakyReLU(0.2)`` -> ``{"alpha": 0.2}``), so code that
walks a model finds :math:`\phi'` without a table of its own.

Closed forms (NTK parameterisation, :math:`(u, v) \sim N(0, [[K_{11}, K_{12}], [K_{12}, K_{22}]])`):

* ``relu``, ``leaky_relu``, ``identity``: the piecewise-linear family
  :math:`\phi(z) = a z 1\{z<0\} + b z 1\{z>0\}` (``(a, b) = (0, 1)``, ``(alpha, 1)``, ``(1, 1)``), whose
  expectations are the arc-cosine kernels of Cho & Saul 2009 (neural-tangents' ``ABRelu``);
* ``erf``: Williams 1997, :math:`E[\phi\phi] = \frac2\pi\arcsin(2K_{12}/\sqrt{(1+2K_{11})(1+2K_{22})})`;
* ``tanh``, ``sigmoid``: **no closed form** (:math:`E[\tanh u \tanh v]` has no elementary expression;
  neural-tangents has no ``Tanh`` kernel either). They are registered for finite networks and the
  empirical NTK only; ``kernel`` is ``None`` and :meth:`Activation.kernel_layer` refuses them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ._checks import check_choice, check_finite_number
from .layers import ErfActivation

__all__ = ["Activation", "ACTIVATIONS", "get", "names", "activation_of"]

_SQRT_PI = math.sqrt(math.pi)


@dataclass(frozen=True)
class Activation:
    """One elementwise activation (see the module docstring).

    Fields
    ------
    name : str
        The registry key (``"relu"``, ``"leaky_relu"``, ...), the ``activation=`` of
        :func:`ntk_theory.infinite.mlp` and :func:`ntk_theory.layers.finite_mlp`.
    module_type : type[nn.Module]
        The module class; :func:`activation_of` matches instances whose ``forward`` is this class's.
    make : Callable[..., nn.Module]
        ``make(alpha)``: a fresh module (``alpha`` is used by ``leaky_relu`` only).
    phi, dphi : Callable[..., torch.Tensor]
        ``phi(z, alpha=...)``, ``dphi(z, alpha=...)``, elementwise, same dtype as ``z``
        (``dphi`` at the ReLU kink ``z = 0`` is 0, autograd's convention).
    kernel : Callable[..., infinite.Layer] | None
        ``kernel(alpha)``: the closed-form kernel layer, or ``None`` (no closed form).
    slopes : Callable[[float], tuple[float, float]] | None
        ``(a, b)`` of the piecewise-linear family, or ``None`` (not piecewise linear).
    takes_alpha : bool
        Whether ``alpha`` (the negative slope) is a parameter of this activation.
    """

    name: str
    module_type: type
    make: Callable[[float], nn.Module]
    phi: Callable[..., torch.Tensor]
    dphi: Callable[..., torch.Tensor]
    kernel: Callable[[float], object] | None = None
    slopes: Callable[[float], tuple[float, float]] | None = None
    takes_alpha: bool = False
    doc: str = field(default="", compare=False)

    # -- finite side ------------------------------------------------------------------------
    def module(self, alpha: float = 0.01) -> nn.Module:
        """A fresh finite-width module (``alpha``: the negative slope, for ``leaky_relu``)."""
        return self.make(self._alpha(alpha))

    def params(self, module: nn.Module) -> dict:
        """Keyword parameters of ``phi``/``dphi`` read from a module instance (``{}`` or ``{"alpha": s}``)."""
        return {"alpha": float(module.negative_slope)} if self.takes_alpha else {}

    # -- infinite side ----------------------------------------------------------------------
    @property
    def has_kernel(self) -> bool:
        """Whether a closed-form kernel layer exists."""
        return self.kernel is not None

    def kernel_layer(self, alpha: float = 0.01):
        """The closed-form kernel layer of :mod:`ntk_theory.infinite` (``ValueError`` if none exists)."""
        if self.kernel is None:
            raise ValueError(f"activation: {self.name!r} has no closed-form NNGP/NTK kernel; activations with one are "
                             f"{', '.join(repr(n) for n in names(kernel=True))}")
        return self.kernel(self._alpha(alpha))

    def _alpha(self, alpha: float) -> float:
        return check_finite_number(alpha, "alpha", "a finite leaky-ReLU slope")

    def __repr__(self) -> str:
        return f"Activation({self.name!r})"


def _infinite():
    from . import infinite  # infinite imports this module: resolved at call time
    return infinite


def _relu_d(z, alpha=None):
    return (z > 0).to(z.dtype)


def _leaky(z, alpha=0.01):
    return torch.nn.functional.leaky_relu(z, alpha)


def _leaky_d(z, alpha=0.01):
    return torch.where(z > 0, z.new_ones(()), z.new_full((), alpha))


def _tanh_d(z, alpha=None):
    t = torch.tanh(z)
    return 1 - t * t


def _sigmoid_d(z, alpha=None):
    s = torch.sigmoid(z)
    return s * (1 - s)


def _erf_d(z, alpha=None):
    return torch.exp(-z * z) * (2 / _SQRT_PI)


_ENTRIES = (
    Activation("relu", nn.ReLU, lambda alpha: nn.ReLU(), lambda z, alpha=None: torch.relu(z), _relu_d,
               kernel=lambda alpha: _infinite().Relu(), slopes=lambda alpha: (0.0, 1.0),
               doc="max(z, 0); arc-cosine kernel of degree 1 (Cho & Saul 2009)"),
    Activation("leaky_relu", nn.LeakyReLU, lambda alpha: nn.LeakyReLU(alpha), _leaky, _leaky_d,
               kernel=lambda alpha: _infinite().LeakyRelu(alpha), slopes=lambda alpha: (alpha, 1.0), takes_alpha=True,
               doc="z for z > 0, alpha z otherwise; the (a, b) = (alpha, 1) arc-cosine kernel"),
    Activation("erf", ErfActivation, lambda alpha: ErfActivation(), lambda z, alpha=None: torch.erf(z), _erf_d,
               kernel=lambda alpha: _infinite().Erf(), doc="erf(z); Williams 1997"),
    Activation("identity", nn.Identity, lambda alpha: nn.Identity(), lambda z, alpha=None: z,
               lambda z, alpha=None: torch.ones_like(z), kernel=lambda alpha: _infinite().Identity(),
               slopes=lambda alpha: (1.0, 1.0), doc="z (a linear network)"),
    Activation("tanh", nn.Tanh, lambda alpha: nn.Tanh(), lambda z, alpha=None: torch.tanh(z), _tanh_d,
               doc="tanh(z); no closed-form kernel"),
    Activation("sigmoid", nn.Sigmoid, lambda alpha: nn.Sigmoid(), lambda z, alpha=None: torch.sigmoid(z), _sigmoid_d,
               doc="1 / (1 + exp(-z)); no closed-form kernel"),
)

#: ``name -> Activation``, in registration order.
ACTIVATIONS: dict[str, Activation] = {a.name: a for a in _ENTRIES}


def names(*, kernel: bool | None = None) -> tuple[str, ...]:
    """Registered names; ``kernel=True`` only those with a closed-form kernel, ``False`` only those without."""
    return tuple(n for n, a in ACTIVATIONS.items() if kernel is None or a.has_kernel == kernel)


def get(name: str, *, kernel: bool = False) -> Activation:
    """The entry called ``name`` (``ValueError`` naming ``activation`` and the accepted names otherwise).

    With ``kernel=True`` only activations with a closed-form kernel are accepted.
    """
    accepted = names(kernel=True) if kernel else names()
    if not isinstance(name, str) or name not in ACTIVATIONS:
        check_choice(name, "activation", accepted)
    act = ACTIVATIONS[name]
    if kernel and not act.has_kernel:
        act.kernel_layer()  # raises, naming the activations that have one
    return act


def activation_of(module: nn.Module) -> Activation | None:
    """The registry entry of a module instance, or ``None`` if it is not a registered activation.

    A module matches an entry when it is an instance of the entry's ``module_type`` and its class
    has not overridden ``forward`` (a subclass computing something else is not mistaken for it).
    ``activation_of(nn.LeakyReLU(0.2)).params(m)`` gives ``{"alpha": 0.2}`` for ``phi``/``dphi``.
    """
    fwd = getattr(type(module), "forward", None)
    for act in _ENTRIES:
        if isinstance(module, act.module_type) and fwd is act.module_type.forward:
            return act
    return None

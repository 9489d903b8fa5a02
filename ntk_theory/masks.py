"""Masks for sparse sub-networks (docs/theory.md §B.3, §B.7; DESIGN.md "Masks").

A mask is a ``dict[str, torch.BoolTensor]`` keyed by parameter name, ``True`` =
kept. A masked parameter is a fixed zero: it is absent from the NTK and receives
no update. Parameters absent from the dict are dense.

Names are the *canonical* parameter names, i.e. those of
``model.named_parameters()`` on the unmasked model (``"0.weight"``). After
:func:`apply_mask` a masked tensor lives, as with any
:mod:`torch.nn.utils.parametrize` parametrisation, under
``"0.parametrizations.weight.original"``; every function here (and
:func:`ntk_theory.empirical.empirical_ntk`) accepts both spellings and reports
canonical names. :func:`canonical_name` maps one to the other.

Names and the masked value are owned here, for every module that reads a masked model:
:func:`split_name` (``"a.b.weight"`` -> ``("a.b", "weight")``), :func:`raw_name` (canonical ->
``"a.b.parametrizations.weight.original"``), :func:`mask_buffer_name` (canonical -> the mask
buffer ``"a.b.parametrizations.weight.0.mask"``, the name in ``state_dict`` and in
``functional_call`` dicts), :func:`masked_value` (``W = where(m, θ, 0) · s``) and
:func:`validate_params` (a ``{name: tensor}`` parameter dict, raw or canonical keys, checked once
for every function that takes ``params=``).

Rescaling (docs/theory.md §B.7): with keep-probability ``q`` of a tensor, the
effective weight is ``W_eff = M ⊙ θ / sqrt(q)`` (weights x 1/sqrt(q), i.e.
variance x 1/q); this keeps every layer's forward variance and its NTK
contribution, so a randomly masked and rescaled wide network has the dense
infinite-width NTK (Yang & Wang 2023). Without rescaling, ``sigma_w^2 -> q
sigma_w^2`` on every masked layer.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._checks import as_generator, as_tensor, check_density, check_finite

__all__ = [
    "MaskParametrization",
    "MASK_BUFFER",
    "canonical_name",
    "split_name",
    "raw_name",
    "mask_buffer_name",
    "masked_value",
    "validate_params",
    "random_mask",
    "mask_density",
    "apply_mask",
    "remove_mask",
    "validate_mask",
    "get_mask",
]

_PARAMETRIZED = re.compile(r"^(?:(?P<prefix>.*)\.)?parametrizations\.(?P<tensor>[^.]+)\.original$")

#: Name of the bool buffer of :class:`MaskParametrization` (``state_dict`` key ``"...parametrizations.weight.0.mask"``).
MASK_BUFFER = "mask"


def masked_value(theta: torch.Tensor, mask: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The effective tensor of a masked parameter, ``W = where(m, θ, 0) · s`` (docs/theory.md §B.7).

    ``torch.where`` rather than ``m ⊙ θ`` keeps pruned coordinates exactly zero even where ``θ``
    is not finite; ``∂W/∂θ = s m``, so pruned coordinates get no gradient. ``scale`` is ``1/sqrt(q)``
    for a rescaled mask of density ``q``, else 1 (no multiplication then: the value is bit-identical
    to the unscaled one). Shapes: ``theta`` and ``mask`` broadcast (normally equal); the result has
    ``theta``'s dtype.
    """
    w = torch.where(mask, theta, theta.new_zeros(()))
    return w * scale if scale != 1.0 else w


class MaskParametrization(nn.Module):
    """``W_eff = scale * (mask ⊙ θ)``: the parametrisation that :func:`apply_mask` registers.

    ``mask`` is a bool buffer (saved in the ``state_dict``), ``scale`` a float
    (``1/sqrt(q)`` with rescaling, else 1). ``torch.where`` rather than a product
    keeps pruned coordinates exactly zero even if the raw value is not finite;
    the derivative w.r.t. ``θ`` is ``scale * mask``, so pruned coordinates get no
    gradient and are never updated.
    """

    def __init__(self, mask: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.register_buffer(MASK_BUFFER, mask.detach().clone().to(torch.bool))
        self.scale = float(scale)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return masked_value(theta, self.mask, self.scale)

    def extra_repr(self) -> str:
        return f"density={float(self.mask.float().mean()):.4g}, scale={self.scale:.6g}"


def canonical_name(name: str) -> str:
    """``"a.parametrizations.weight.original"`` -> ``"a.weight"``; other names unchanged."""
    m = _PARAMETRIZED.match(name)
    if m is None:
        return name
    return f"{m['prefix']}.{m['tensor']}" if m["prefix"] else m["tensor"]


def split_name(name: str) -> tuple[str, str]:
    """``"a.b.weight"`` (or its raw spelling) -> (module path ``"a.b"``, tensor name ``"weight"``);
    the module path is ``""`` for a parameter of the root module."""
    prefix, _, tensor = canonical_name(name).rpartition(".")
    return prefix, tensor


def raw_name(canonical: str) -> str:
    """``"a.b.weight"`` -> ``"a.b.parametrizations.weight.original"``: the name under which
    ``named_parameters()`` lists the raw tensor ``θ`` once :func:`apply_mask` has masked it."""
    prefix, tensor = split_name(canonical)
    return (f"{prefix}." if prefix else "") + f"parametrizations.{tensor}.original"


def mask_buffer_name(canonical: str) -> str:
    """``"a.b.weight"`` -> ``"a.b.parametrizations.weight.0.mask"``: the name of the mask buffer of a
    tensor masked by :func:`apply_mask` (in ``state_dict`` and ``named_buffers()``; a
    ``functional_call`` dict may override it)."""
    prefix, tensor = split_name(canonical)
    return (f"{prefix}." if prefix else "") + f"parametrizations.{tensor}.0.{MASK_BUFFER}"




def get_mask(module: nn.Module, tensor_name: str) -> tuple[torch.Tensor, float] | None:
    """``(mask, scale)`` of an awt mask on ``module.<tensor_name>``, or ``None`` if it is unmasked.

    Raises ``ValueError`` if that tensor carries other parametrisations (awt's
    mask must be the only one, so that the kernel code can read it).
    """
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    plist = module.parametrizations[tensor_name]
    if len(plist) != 1 or not isinstance(plist[0], MaskParametrization):
        raise ValueError(f"{type(module).__name__}.{tensor_name}: carries parametrizations "
                         f"{[type(p).__name__ for p in plist]}; awt masks must be the only parametrization")
    return plist[0].mask, plist[0].scale


def _shapes(model_or_params) -> dict[str, torch.Size]:
    """Canonical name -> shape of every parameter of a model (or of a parameter dict)."""
    if isinstance(model_or_params, nn.Module):
        items = model_or_params.named_parameters()
    elif isinstance(model_or_params, Mapping):
        items = model_or_params.items()
    else:
        raise TypeError(f"model: expected an nn.Module or a dict of parameters, got {type(model_or_params).__name__}")
    return {canonical_name(k): torch.Size(v.shape) for k, v in items}


def validate_mask(model_or_params, mask) -> dict[str, torch.Tensor]:
    """Check a mask against a model (or a ``{name: tensor}`` dict) and return it with canonical keys.

    Raises ``ValueError`` naming ``mask`` for: a non-dict, an empty dict, keys that
    are not parameters of the model, non-boolean values, shape mismatches, or a
    mask that keeps no entry at all.
    """
    if not isinstance(mask, Mapping):
        raise ValueError(f"mask: expected a dict[str, torch.BoolTensor] keyed by parameter name, "
                         f"got {type(mask).__name__}")
    if len(mask) == 0:
        raise ValueError("mask: got an empty dict; pass mask=None for the dense network")
    shapes = _shapes(model_or_params)
    out: dict[str, torch.Tensor] = {}
    for key, m in mask.items():
        name = canonical_name(key) if isinstance(key, str) else key
        if name not in shapes:
            known = ", ".join(sorted(shapes)[:8]) + (" ..." if len(shapes) > 8 else "")
            raise ValueError(f"mask: key {key!r} is not a parameter of the model (parameters: {known})")
        if name in out:
            raise ValueError(f"mask: parameter {name!r} is given twice (as {key!r} and its canonical name)")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            what = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"mask: entry {key!r} must be a torch.bool tensor (True = kept), got {what}")
        if m.shape != shapes[name]:
            raise ValueError(f"mask: entry {key!r} has shape {tuple(m.shape)}, "
                             f"but the parameter has shape {tuple(shapes[name])}")
        out[name] = m
    if not any(bool(m.any()) for m in out.values()):
        raise ValueError("mask: keeps no entry at all (every value is False)")
    return out


def validate_params(model: nn.Module, params, name: str = "params") -> dict[str, torch.Tensor]:
    """Check a ``{parameter name: tensor}`` dict against ``model``; return it keyed by *raw* names.

    The one validation of parameter dicts (``empirical_ntk(params=)``, ``linearize(params=)``, ...).
    Keys may be raw names (``model.named_parameters()``: ``"2.parametrizations.weight.original"`` on
    a masked model) or canonical ones (``"2.weight"``); the result maps the raw names that
    ``torch.func.functional_call`` needs to the given tensors (numpy arrays are converted, nothing is
    cast or copied), in the order given. Raises ``TypeError`` naming ``name`` for a non-dict, a
    non-string key or a value that is not a tensor / array, and ``ValueError`` for a key that is not
    a parameter of the model, a parameter given twice (raw and canonical), a shape mismatch, a value
    that is not real floating point, or a value that is not finite.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"{name}: expected a dict of parameter name -> tensor, got {type(params).__name__}")
    named = dict(model.named_parameters())
    canon_to_raw = {canonical_name(r): r for r in named}
    out: dict[str, torch.Tensor] = {}
    for key, v in params.items():
        if not isinstance(key, str):
            raise TypeError(f"{name}: keys must be parameter names (str), got {type(key).__name__}")
        raw = key if key in named else canon_to_raw.get(key)
        if raw is None:
            known = ", ".join(sorted(canon_to_raw)[:8]) + (" ..." if len(canon_to_raw) > 8 else "")
            raise ValueError(f"{name}: key {key!r} is not a parameter of the model (parameters: {known})")
        if raw in out:
            raise ValueError(f"{name}: parameter {canonical_name(raw)!r} is given twice (raw and canonical name)")
        t = as_tensor(v, f"{name}[{key!r}]")
        if not t.is_floating_point():
            raise ValueError(f"{name}[{key!r}]: expected a real floating tensor, got dtype {t.dtype}")
        if t.shape != named[raw].shape:
            raise ValueError(f"{name}[{key!r}]: has shape {tuple(t.shape)}, "
                             f"the model's parameter has shape {tuple(named[raw].shape)}")
        check_finite(t, f"{name}[{key!r}]")
        out[raw] = t
    return out


def mask_density(mask: Mapping[str, torch.Tensor]) -> float:
    """Fraction of kept entries over all masked tensors: ``sum(m) / sum(numel(m))`` (parameters
    absent from the mask are not counted). For one tensor's density pass ``{name: m}``."""
    if not isinstance(mask, Mapping) or len(mask) == 0:
        raise ValueError("mask: expected a non-empty dict[str, torch.BoolTensor]")
    kept = total = 0
    for key, m in mask.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise ValueError(f"mask: entry {key!r} must be a torch.bool tensor")
        kept += int(m.sum())
        total += m.numel()
    return kept / max(total, 1)


def _maskable(model: nn.Module, include_bias: bool) -> list[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """Maskable tensors grouped by module, in registration order: weights (``ndim >= 2``) and,
    with ``include_bias``, the 1-D ``bias`` of the same modules."""
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for raw, p in model.named_parameters():
        name = canonical_name(raw)
        prefix, tensor = split_name(name)
        if p.dim() >= 2 or (include_bias and tensor == "bias" and p.dim() == 1):
            groups.setdefault(prefix, []).append((name, p))
    # a module counts as a layer only if it has a maskable weight (a lone bias is not a layer)
    return [(k, v) for k, v in groups.items() if any(p.dim() >= 2 for _, p in v)]


def _as_generator(generator) -> torch.Generator:
    """awt's one randomness rule (:func:`ntk_theory._checks.as_generator`), without the global-RNG ``None``:
    a mask is a result, so its randomness is always explicit."""
    if generator is None:
        raise TypeError("generator: expected a torch.Generator or an int seed, got NoneType")
    return as_generator(generator, "generator")


def random_mask(model: nn.Module, density: float, *, generator, layerwise: bool = True,
                skip_first: bool = True, include_bias: bool = False) -> dict[str, torch.Tensor]:
    """Uniformly random mask of the given density (docs/theory.md §B.7).

    Masked tensors are the weights (parameters with ``ndim >= 2``: ``nn.Linear`` /
    ``nn.Conv2d`` weights) and, with ``include_bias``, the biases of the same
    modules. With ``layerwise`` every masked tensor keeps exactly
    ``max(1, round(density * numel))`` entries chosen uniformly; otherwise
    ``round(density * total)`` entries are chosen uniformly among all maskable
    entries of the model (per-layer densities then vary). With ``skip_first`` the
    first layer (the first module, in registration order, with a weight) is left
    dense: masking a layer of finite fan-in changes the infinite-width limit
    (docs/theory.md §B.7, "first-layer gotcha").

    ``generator`` (a ``torch.Generator`` or an int seed) is the only source of
    randomness. Returns ``{canonical name: BoolTensor}`` on each parameter's device.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    q = check_density(density, "density")
    gen = _as_generator(generator)
    groups = _maskable(model, include_bias)
    if skip_first and groups:
        groups = groups[1:]
    tensors = [(name, p) for _, group in groups for name, p in group]
    if not tensors:
        raise ValueError("model: has no maskable parameter (weights with ndim >= 2"
                         + (" beyond the first layer" if skip_first else "") + ")")

    def draw(n: int, k: int) -> torch.Tensor:
        keep = torch.zeros(n, dtype=torch.bool, device=gen.device)
        keep[torch.randperm(n, generator=gen, device=gen.device)[:k]] = True
        return keep

    out: dict[str, torch.Tensor] = {}
    if layerwise:
        for name, p in tensors:
            k = min(p.numel(), max(1, round(q * p.numel())))
            out[name] = draw(p.numel(), k).reshape(p.shape).to(p.device)
    else:
        sizes = [p.numel() for _, p in tensors]
        total = sum(sizes)
        flat = draw(total, min(total, max(1, round(q * total))))
        for (name, p), chunk in zip(tensors, torch.split(flat, sizes)):
            out[name] = chunk.reshape(p.shape).to(p.device)
    return out


def apply_mask(model: nn.Module, mask: Mapping[str, torch.Tensor], rescale: bool = False) -> nn.Module:
    """Make ``model`` train as the masked network ``f(m ⊙ θ)`` (in place; returns ``model``).

    Registers a :class:`MaskParametrization` on every masked tensor through
    :func:`torch.nn.utils.parametrize.register_parametrization`: ``module.weight``
    is then ``scale * (m ⊙ θ)`` with ``θ`` the same ``Parameter`` object as before
    (now named ``"<module>.parametrizations.weight.original"``), so existing
    optimisers keep working and pruned coordinates receive zero gradient. With
    ``rescale`` the kept weights of a tensor of density ``q`` are multiplied by
    ``1/sqrt(q)`` (docs/theory.md §B.7). A tensor that already carries an awt mask has
    it replaced; other parametrisations on a masked tensor are refused.

    This is the one helper that applies masks for training (DESIGN.md).
    :func:`ntk_theory.empirical.empirical_ntk` on the result gives the
    sub-network kernel with the mask (and scale) read from the parametrisation.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    mask = validate_mask(model, mask)
    targets = []
    for name, m in mask.items():  # every check before the first change: a refusal leaves the model as it was
        prefix, tensor = split_name(name)
        module = model.get_submodule(prefix) if prefix else model
        targets.append((module, tensor, m, get_mask(module, tensor) is not None))
    for module, tensor, m, masked in targets:
        if masked:
            order = module.parametrizations[tensor][0].param_order
            _remove(module, tensor)
        else:
            order = list(module._parameters)
        current = getattr(module, tensor)
        q = float(m.sum()) / m.numel()
        scale = 1.0 / math.sqrt(q) if (rescale and q > 0) else 1.0
        p = MaskParametrization(m.to(current.device), scale)
        p.param_order = order  # the module's parameter order before masking, restored by remove_mask
        parametrize.register_parametrization(module, tensor, p)
    return model


def _remove(module: nn.Module, tensor: str) -> None:
    """``remove_parametrizations`` on a private copy of the injected class (a deepcopy shares it with its
    original, and torch deletes the tensor's property from that class), then the original parameter order."""
    order = getattr(module.parametrizations[tensor][0], "param_order", None)
    cls = module.__class__
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    parametrize.remove_parametrizations(module, tensor, leave_parametrized=False)
    if order is not None:
        rank = {k: i for i, k in enumerate(order)}
        items = sorted(module._parameters.items(), key=lambda kv: rank.get(kv[0], len(rank)))
        module._parameters.clear()
        module._parameters.update(items)


def remove_mask(model: nn.Module) -> dict[str, torch.Tensor]:
    """Undo :func:`apply_mask`: remove every awt mask, restoring the dense raw parameters.

    The parameters get back their raw values ``θ`` (pruned coordinates keep the
    values they had, kept ones any trained values). Returns the removed mask (canonical
    names), so ``apply_mask(model, remove_mask(model))`` restores the masked model
    (up to ``rescale``). To keep the masked function instead, copy the effective
    weights (``module.weight``) before calling this.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    removed: dict[str, torch.Tensor] = {}
    for prefix, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        for tensor, plist in list(module.parametrizations.items()):
            if len(plist) != 1 or not isinstance(plist[0], MaskParametrization):
                continue  # not an awt mask: left alone
            removed[f"{prefix}.{tensor}" if prefix else tensor] = plist[0].mask.clone()
            _remove(module, tensor)
    return removed

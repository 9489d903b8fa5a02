"""Masks for sparse sub-networks (THEORY.md §B.3, §B.7; DESIGN.md "Masks").

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

Rescaling (THEORY.md §B.7): with keep-probability ``q`` of a tensor, the
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

from ._checks import check_density

__all__ = [
    "MaskParametrization",
    "canonical_name",
    "random_mask",
    "mask_density",
    "apply_mask",
    "remove_mask",
    "validate_mask",
    "get_mask",
]

_PARAMETRIZED = re.compile(r"^(?:(?P<prefix>.*)\.)?parametrizations\.(?P<tensor>[^.]+)\.original$")


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
        self.register_buffer("mask", mask.detach().clone().to(torch.bool))
        self.scale = float(scale)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        w = torch.where(self.mask, theta, theta.new_zeros(()))
        return w * self.scale if self.scale != 1.0 else w

    def extra_repr(self) -> str:
        return f"density={float(self.mask.float().mean()):.4g}, scale={self.scale:.6g}"


def canonical_name(name: str) -> str:
    """``"a.parametrizations.weight.original"`` -> ``"a.weight"``; other names unchanged."""
    m = _PARAMETRIZED.match(name)
    if m is None:
        return name
    return f"{m['prefix']}.{m['tensor']}" if m["prefix"] else m["tensor"]


def _split(name: str) -> tuple[str, str]:
    """Canonical ``"a.b.weight"`` -> (module path ``"a.b"``, tensor name ``"weight"``)."""
    prefix, _, tensor = name.rpartition(".")
    return prefix, tensor


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
        prefix, tensor = _split(name)
        if p.dim() >= 2 or (include_bias and tensor == "bias" and p.dim() == 1):
            groups.setdefault(prefix, []).append((name, p))
    # a module counts as a layer only if it has a maskable weight (a lone bias is not a layer)
    return [(k, v) for k, v in groups.items() if any(p.dim() >= 2 for _, p in v)]


def _as_generator(generator) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"generator: expected a torch.Generator or an int seed, got {type(generator).__name__}")


def random_mask(model: nn.Module, density: float, *, generator, layerwise: bool = True,
                skip_first: bool = True, include_bias: bool = False) -> dict[str, torch.Tensor]:
    """Uniformly random mask of the given density (THEORY.md §B.7).

    Masked tensors are the weights (parameters with ``ndim >= 2``: ``nn.Linear`` /
    ``nn.Conv2d`` weights) and, with ``include_bias``, the biases of the same
    modules. With ``layerwise`` every masked tensor keeps exactly
    ``max(1, round(density * numel))`` entries chosen uniformly; otherwise
    ``round(density * total)`` entries are chosen uniformly among all maskable
    entries of the model (per-layer densities then vary). With ``skip_first`` the
    first layer (the first module, in registration order, with a weight) is left
    dense: masking a layer of finite fan-in changes the infinite-width limit
    (THEORY.md §B.7, "first-layer gotcha").

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
    ``1/sqrt(q)`` (THEORY.md §B.7). A tensor that already carries an awt mask has
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
        prefix, tensor = _split(name)
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

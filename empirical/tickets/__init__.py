"""Ticket search at initialisation: Adversarial Winning Tickets and seven baselines (issue 10).

One interface, :func:`find_ticket`, and one module per method in this folder, discovered as the checks
of ``proofs_checks/checks`` are (adding a method is adding a file): ``random``, ``magnitude``, ``snip``,
``grasp``, ``synflow``, ``adv_imp``, ``hydra``, ``awt``. A method module defines

* ``HPARAMS``: its hyper-parameters and their defaults (any other keyword is refused by name);
* ``search(ctx, **hparams) -> SearchOutput``: the mask (and, for AWT ``mode="ntt"``, new initial weights),
  given a :class:`~empirical.tickets._common.Context` (a private copy of the dense initialisation, the
  data, the exact kept counts per layer or overall, a seeded generator, a diagnostics log).

Conventions (docs/theory.md §B.7, §B.8): masks are :mod:`ntk_theory.masks` dicts (canonical names, True =
kept) over the weights (``ndim >= 2``) of every layer but the first (``skip_first=True``); the kept count
is exact, ``round(q n_l)`` per tensor for ``scope="layerwise"`` and ``round(q Σ n_l)`` overall for
``scope="global"``; a mask that keeps no weight of some layer (layer collapse) raises
:class:`LayerCollapseError` (SynFlow's iterative conservation is the documented way around it).
"""
from __future__ import annotations

import copy
import importlib
import pkgutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ntk_theory._checks import check_bool, check_choice, check_density, check_device, check_int
from ntk_theory.io import Result, atomic_torch_save
from ntk_theory.masks import masked_value

from ._common import (Context, LayerCollapseError, SearchOutput, check_collapse, flops_and_nonzeros, layer_counts,
                      prunable)

__all__ = ["find_ticket", "TicketResult", "methods", "get", "check_hparams", "load_ticket", "LayerCollapseError",
           "SCOPES", "SearchOutput"]

SCOPES = ("layerwise", "global")


def methods() -> tuple[str, ...]:
    """Names of the discovered methods (the modules of this folder not starting with ``_``)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def get(method: str):
    """The module of ``method`` (``ValueError`` naming ``method`` and the known ones otherwise)."""
    known = methods()
    if not isinstance(method, str) or method not in known:
        raise ValueError(f"method: got {method!r}; known methods are {', '.join(known)}")
    return importlib.import_module(f"{__name__}.{method}")


def check_hparams(method: str, **hparams) -> dict[str, Any]:
    """``method``'s hyper-parameters: its defaults updated with ``hparams``; an unknown name (a
    misspelt keyword) raises ``ValueError`` naming it and the accepted ones, and each method's own
    ``validate`` checks values, all before any work."""
    mod = get(method)
    unknown = sorted(set(hparams) - set(mod.HPARAMS))
    if unknown:
        raise ValueError(f"hparams: unknown hyper-parameter(s) {', '.join(map(repr, unknown))} for method "
                         f"{method!r}; accepted: {', '.join(sorted(mod.HPARAMS)) or '(none)'}")
    hp = {**mod.HPARAMS, **hparams}
    if hasattr(mod, "validate"):
        mod.validate(hp)
    return hp


@dataclass(frozen=True)
class TicketResult(Result):
    """A ticket: the mask and the weights it starts training from, with what the search logged.

    Fields: ``method``, ``hparams`` (all of them, defaults filled in), ``mask`` (canonical name ->
    BoolTensor), ``init_state`` (the plain model's state dict to train from: the dense init, except AWT
    ``mode="ntt"``'s learned weights), ``rescale`` (train with ``apply_mask(rescale=True)``), ``scope``,
    ``skip_first``, ``seed``, ``density`` (achieved, over the masked tensors), ``nonzeros`` (non-zero
    parameters of the sparse network, unmasked ones included), ``flops`` / ``dense_flops`` (one example's
    forward pass), ``layers`` (per parameter: numel, nonzeros, density, flops), ``diagnostics``
    (``history``: the objective terms per iteration, and whatever else the method logged),
    ``search_seconds``."""

    method: str
    hparams: dict
    mask: dict
    init_state: dict
    rescale: bool
    scope: str
    skip_first: bool
    seed: int
    density: float
    nonzeros: int
    flops: int
    dense_flops: int
    layers: dict
    diagnostics: dict = field(default_factory=dict)
    search_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form without the tensors (``mask``/``init_state`` become their shapes; :meth:`save` keeps them)."""
        d = super().to_dict()
        d["mask"] = {k: list(v.shape) for k, v in self.mask.items()}
        d["init_state"] = {k: list(v.shape) for k, v in self.init_state.items()}
        return d

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The plain model's state dict computing the ticket: ``init_state`` with pruned weights set to
        zero (and kept ones times ``1/sqrt(q_l)`` when ``rescale``); loads with ``load_state_dict``."""
        out = {}
        for k, v in self.init_state.items():
            if k in self.mask:
                m = self.mask[k].to(v.device)
                s = (m.numel() / max(int(m.sum()), 1)) ** 0.5 if self.rescale else 1.0
                v = masked_value(v, m, s)
            out[k] = v.clone()
        return out

    def save(self, path) -> Path:
        """Write the ticket (mask, init_state, rescale, method, hparams, densities) with
        :func:`ntk_theory.io.atomic_torch_save`; :func:`load_ticket` reads it back."""
        return atomic_torch_save(path, {"mask": {k: v.cpu() for k, v in self.mask.items()},
                                        "init_state": {k: v.cpu() for k, v in self.init_state.items()},
                                        **{k: v for k, v in self.to_dict().items()
                                           if k not in ("mask", "init_state")}})


def load_ticket(path) -> dict:
    """The dict written by :meth:`TicketResult.save`."""
    return torch.load(path, weights_only=False)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError("model: is already masked or parametrised; pass the plain dense model at initialisation")
    if not any(p.dim() >= 2 for p in model.parameters()):
        raise ValueError("model: has no prunable layer (no parameter with ndim >= 2)")


def _check_data(data) -> None:
    for a in ("x_train", "y_train", "x_test", "y_test"):
        if not hasattr(data, a):
            raise TypeError(f"data: expected an empirical.data.Dataset (with x_train, y_train, x_test, y_test), "
                            f"got {type(data).__name__} without {a!r}")


def find_ticket(method: str, model: nn.Module, data, density: float, *, scope: str = "layerwise",
                skip_first: bool = True, seed: int = 0, device="auto", progress: bool = True,
                **hparams) -> TicketResult:
    """Search a ticket of ``model`` (the dense network at initialisation) with ``method``.

    Args:
        method: one of :func:`methods` (``"awt"``, ``"random"``, ``"magnitude"``, ``"snip"``, ``"grasp"``,
            ``"synflow"``, ``"adv_imp"``, ``"hydra"``).
        model: the plain dense model at initialisation (not mutated; the search runs on a copy).
        data: an :class:`empirical.data.Dataset` (methods that need data use its training split; AWT
            logs held-out figures on its test split).
        density: kept fraction ``q`` in (0, 1], exact by count (per tensor for ``layerwise``, overall
            for ``global``).
        scope: ``"layerwise"`` or ``"global"``.
        skip_first: leave the first layer dense (docs/theory.md §B.7).
        seed: the search's one seed (its generator, its PGD starts, its minibatch order).
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` (:func:`ntk_theory._checks.check_device`).
        progress: a tqdm bar (silent off a terminal).
        **hparams: the method's hyper-parameters (``get(method).HPARAMS`` lists them with defaults).

    Raises (before any work): ``ValueError`` for an unknown method or hyper-parameter, a density
    outside (0, 1], an unknown scope, a model without prunable layer, ``skip_first=True`` on a
    one-layer model, a density that keeps no weight of a layer (layerwise); ``TypeError`` for wrong
    types. :class:`LayerCollapseError` (a ``ValueError``) when a method's mask removes a whole layer.
    """
    mod = get(method)
    hp = check_hparams(method, **hparams)
    q = check_density(density, "density")
    check_choice(scope, "scope", SCOPES)
    check_bool(skip_first, "skip_first")
    check_bool(progress, "progress")
    seed = check_int(seed, "seed", minimum=0)
    dev = check_device(device, "device")
    _check_model(model)
    _check_data(data)
    names_all = prunable(model, skip_first=False)
    if skip_first and len(names_all) < 2:
        raise ValueError("skip_first: the model has a single prunable layer; with skip_first=True nothing is left "
                         "to prune (pass skip_first=False)")
    names = prunable(model, skip_first)
    counts, total = layer_counts(model, names, q)
    if scope == "layerwise":
        small = [n for n in names if counts[n] == 0]
        if small:
            raise ValueError(f"density: {q:g} keeps round(q n) = 0 weights of {', '.join(small)} (layer collapse); "
                             "use a larger density")
    elif total == 0:
        raise ValueError(f"density: {q:g} keeps no weight at all")
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    work = copy.deepcopy(model).to(dev)
    for p in work.parameters():  # a frozen caller's model (requires_grad=False) is still searchable
        p.requires_grad_(True)
    ctx = Context(model=work, data=data, density=q, scope=scope, skip_first=skip_first, seed=seed, device=dev,
                  progress=progress, names=names, counts=counts, total=total,
                  generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    out = mod.search(ctx, **hp)
    seconds = time.perf_counter() - t0
    mask = {n: out.mask[n].detach().to("cpu", torch.bool) for n in names}
    check_collapse(mask, method)
    state = init if out.init_state is None else {k: v.detach().cpu().clone() for k, v in out.init_state.items()}
    shape = tuple(torch.as_tensor(data.x_train[:1]).shape[1:])
    layers, nnz, flops, dense = flops_and_nonzeros(model, mask, shape)
    kept = sum(int(m.sum()) for m in mask.values())
    return TicketResult(method=method, hparams=hp, mask=mask, init_state=state, rescale=bool(out.rescale),
                        scope=scope, skip_first=skip_first, seed=seed,
                        density=kept / sum(m.numel() for m in mask.values()), nonzeros=nnz, flops=flops,
                        dense_flops=dense, layers=layers,
                        diagnostics={"history": ctx.history, **out.diagnostics}, search_seconds=seconds)

"""Shared pieces of the ticket methods: the search context, prunable tensors, exact top-k masks,
straight-through masks, FLOP counts (not a method: modules whose name starts with ``_`` are not discovered)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ntk_theory._checks import check_choice, check_int, check_nonnegative, check_positive
from ntk_theory.attacks import NORMS
from ntk_theory.masks import canonical_name, split_name


class LayerCollapseError(ValueError):
    """A mask would remove every weight of a layer (the network would compute a constant)."""


@dataclass
class Context:
    """What a method's ``search(ctx, **hparams)`` receives (built and validated by ``find_ticket``).

    ``model`` is a private copy of the dense initialisation on ``device`` (a method may change it);
    ``names`` the canonical names of the prunable weights in order; ``counts`` the kept count of each
    (layerwise) and ``total`` the overall kept count (global); ``generator`` a CPU generator seeded with
    ``seed``; ``log(**values)`` appends a row to the diagnostics."""

    model: nn.Module
    data: Any
    density: float
    scope: str
    skip_first: bool
    seed: int
    device: torch.device
    progress: bool
    names: list[str]
    counts: dict[str, int]
    total: int
    generator: torch.Generator
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def param(self, name: str) -> torch.Tensor:
        return dict(self.model.named_parameters())[name]

    def log(self, **values) -> None:
        self.history.append({k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in values.items()})

    def topk(self, scores: dict[str, torch.Tensor], *, largest: bool = True) -> dict[str, torch.Tensor]:
        return topk_mask(scores, self.counts if self.scope == "layerwise" else self.total, largest=largest)


@dataclass
class SearchOutput:
    """What ``search`` returns: the mask, optionally new initial weights (AWT ``ntt`` mode) and extra
    diagnostics; ``rescale`` is whether the ticket is meant to train with the ``1/sqrt(q)`` scale."""

    mask: dict[str, torch.Tensor]
    init_state: dict[str, torch.Tensor] | None = None
    rescale: bool = False
    diagnostics: dict = field(default_factory=dict)


def prunable(model: nn.Module, skip_first: bool) -> list[str]:
    """Canonical names of the weights (``ndim >= 2``) of the model's layers, first layer left out with
    ``skip_first`` (docs/theory.md §B.7: masking a layer of finite fan-in changes the limit kernel)."""
    names = [canonical_name(n) for n, p in model.named_parameters() if p.dim() >= 2]
    return names[1:] if skip_first else names


def layer_counts(model: nn.Module, names: list[str], density: float) -> tuple[dict[str, int], int]:
    """Exact kept counts: ``round(q n_l)`` per tensor (layerwise) and ``round(q Σ n_l)`` (global)."""
    shapes = {canonical_name(n): p.numel() for n, p in model.named_parameters()}
    counts = {n: int(round(density * shapes[n])) for n in names}
    total = int(round(density * sum(shapes[n] for n in names)))
    return counts, total


def topk_mask(scores: dict[str, torch.Tensor], k, *, largest: bool = True) -> dict[str, torch.Tensor]:
    """Keep exactly ``k[name]`` entries of each tensor (``k`` a dict: layerwise) or ``k`` entries over all
    tensors (``k`` an int: global) with the largest (or smallest) scores. Ties are broken by index
    (``torch.topk`` on the flattened scores), so the count is exact."""
    out = {}
    if isinstance(k, dict):
        for n, s in scores.items():
            flat = s.detach().reshape(-1).to(torch.float64)
            m = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            if k[n] > 0:
                m[torch.topk(flat, k[n], largest=largest, sorted=False).indices] = True
            out[n] = m.reshape(s.shape)
        return out
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64) for s in scores.values()])
    m = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        m[torch.topk(flat, k, largest=largest, sorted=False).indices] = True
    for (n, s), chunk in zip(scores.items(), torch.split(m, [s.numel() for s in scores.values()])):
        out[n] = chunk.reshape(s.shape)
    return out


def check_collapse(mask: dict[str, torch.Tensor], method: str) -> None:
    """``LayerCollapseError`` naming the layers a mask removes entirely."""
    dead = [n for n, m in mask.items() if not bool(m.any())]
    if dead:
        raise LayerCollapseError(
            f"density: method {method!r} keeps no weight of layer(s) {', '.join(dead)} (layer collapse); "
            "use a larger density, scope='layerwise', or a method that avoids it (synflow)")


def ste_mask(scores: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Straight-through top-k: the value is the 0/1 mask ``hard``, the gradient w.r.t. ``scores`` is the
    identity (Bengio et al. 2013; edge-popup, Ramanujan et al. 2020; HYDRA, Sehwag et al. 2020)."""
    return hard.to(scores.dtype) + (scores - scores.detach())


def flops_and_nonzeros(model: nn.Module, mask: dict[str, torch.Tensor], in_shape) -> tuple[dict, int, int, int]:
    """Per layer ``{numel, nonzeros, density, flops}``, total non-zero parameters, sparse and dense FLOPs
    of one example's forward pass (2 per multiply-add of a kept weight, times the output positions of
    a convolution; 1 per kept bias and output position)."""
    positions: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            def hook(mod, args, out, name=name):
                positions[name] = int(out[0].numel() // out.shape[1]) if out.dim() > 2 else 1
            hooks.append(m.register_forward_hook(hook))
    p0 = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros((1, *in_shape), dtype=p0.dtype, device=p0.device))
    finally:
        for h in hooks:
            h.remove()
    layers, nnz_total, flops, dense = {}, 0, 0, 0
    for raw, p in model.named_parameters():
        name = canonical_name(raw)
        prefix, tensor = split_name(name)
        kept = int(mask[name].sum()) if name in mask else p.numel()
        nnz_total += kept
        pos = positions.get(prefix, 1)
        f = (2 if p.dim() >= 2 else 1) * kept * pos
        fd = (2 if p.dim() >= 2 else 1) * p.numel() * pos
        flops += f
        dense += fd
        layers[name] = {"numel": p.numel(), "nonzeros": kept, "density": kept / p.numel(), "flops": f}
    return layers, nnz_total, flops, dense


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False)


def xy(data, n: int | None, generator: torch.Generator, split: str = "train"):
    """``n`` seeded examples (all with ``None``) of ``data``'s training (or test) split."""
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if n is not None and n < x.shape[0]:
        idx = torch.randperm(x.shape[0], generator=generator)[:n]
        x, y = x[idx], y[idx]
    return x, y


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def exp_schedule(density: float, rounds: int) -> list[float]:
    """SynFlow's exponential schedule: ``q_k = q^{k/rounds}``, ``k = 1..rounds`` (Tanaka et al. 2020)."""
    return [density ** ((k + 1) / rounds) for k in range(rounds)]


def imp_schedule(density: float, rate: float = 0.2) -> list[float]:
    """Iterative magnitude pruning: each round keeps ``1 - rate`` of what is left until ``density``:
    ``(1-rate)^r`` for ``r = 1..R-1``, then ``density`` (``R = ceil(log q / log(1-rate))``)."""
    if density >= 1.0:
        return [1.0]
    R = max(1, math.ceil(math.log(density) / math.log(1 - rate) - 1e-9))
    return [(1 - rate) ** r for r in range(1, R)] + [density]


Search = Callable[..., SearchOutput]


def check_attack_hparams(hp: dict, min_steps: int = 0) -> None:
    """The attack hyper-parameters of a method that runs PGD (``eps >= 0``, ``norm``, ``steps >=
    min_steps``, ``alpha > 0`` or ``None``), each refused by name before any work."""
    check_nonnegative(hp["eps"], "eps")
    check_choice(hp["norm"], "norm", NORMS)
    check_int(hp["steps"], "steps", minimum=min_steps)
    if hp["alpha"] is not None:
        check_positive(hp["alpha"], "alpha")

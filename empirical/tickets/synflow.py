r"""SynFlow (Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020): iterative synaptic-flow pruning, data-free.

Each of ``rounds`` rounds (100 in the paper) takes the absolute value of every parameter and floating
buffer (the network is "linearised"; the caller's signs are untouched: the rounds run on a float64
copy), applies the current mask, feeds one all-ones example and scores

    S(θ) = |θ ⊙ ∂R/∂θ|,    R = 1ᵀ f(1; |m ⊙ θ|)

(for a bias-free ReLU MLP ``R = 1ᵀ (∏_l g_l |M_l ⊙ W_l|) 1``, so ``S_l[i, j] = |W_l[i, j]| ·
(1ᵀ ∏_{k>l} g_k|W_k|)_i · g_l · (∏_{k<l} g_k|W_k| 1)_j``, ``g_l`` the layer's weight gain); the mask is
then the top-``k_r`` of the scores with the exponential schedule ``q_r = q^{r/rounds}``
(``r = 1..rounds``, exact counts ``round(q_r n)``, the last round the requested counts). Pruned
weights are given the score ``-1`` and so stay pruned (the reference code multiplies them to zero,
which gives them the score 0). Conservation of synaptic flow (every layer carries the same total
score ``R``, their Theorem 2) is what avoids layer collapse under ``scope="global"``, where magnitude
pruning removes a layer of small weights entirely (:class:`~empirical.tickets.LayerCollapseError`).

Checked against the authors' code (ganguli-lab/Synaptic-Flow, ``Pruners/pruners.py`` class SynFlow
and ``prune.py``'s ``prune_loop``: eval mode, ``sparse = sparsity**((epoch + 1) / epochs)``).
Computed in float64 (``R`` is a product of layer norms and overflows float32 in deep nets).
"""
from __future__ import annotations

import copy

import torch

from ntk_theory._checks import check_int
from ntk_theory.masks import canonical_name

from ._common import SearchOutput, exp_schedule, layer_counts, progress_bar, topk_mask

HPARAMS = {"rounds": 100}


def validate(hp: dict) -> None:
    check_int(hp["rounds"], "rounds", minimum=1)


def scores(model, names, mask, in_shape) -> dict:
    """One round's ``|θ ⊙ ∂R/∂θ|`` for the tensors ``names`` at the masked, absolute-valued parameters."""
    net = copy.deepcopy(model).double().eval()
    params = {canonical_name(k): p for k, p in net.named_parameters()}
    with torch.no_grad():
        for n, p in params.items():
            p.abs_()
            if n in mask:
                p.mul_(mask[n].to(p.device, p.dtype))
        for b in net.buffers():
            if b.is_floating_point():
                b.abs_()
    R = net(torch.ones((1, *in_shape), dtype=torch.float64, device=next(net.parameters()).device)).sum()
    grads = torch.autograd.grad(R, [params[n] for n in names])
    return {n: (g * params[n]).detach().abs() for n, g in zip(names, grads)}


def search(ctx, *, rounds: int) -> SearchOutput:
    in_shape = tuple(torch.as_tensor(ctx.data.x_train[:1]).shape[1:])
    mask = {n: torch.ones(ctx.param(n).shape, dtype=torch.bool, device=ctx.device) for n in ctx.names}
    bar = progress_bar(rounds, "synflow", ctx.progress)
    for r, q in enumerate(exp_schedule(ctx.density, rounds)):
        counts, total = layer_counts(ctx.model, ctx.names, q)
        if r == rounds - 1:
            counts, total = ctx.counts, ctx.total
        s = scores(ctx.model, ctx.names, mask, in_shape)
        s = {n: torch.where(mask[n], v, torch.full_like(v, -1.0)) for n, v in s.items()}
        mask = topk_mask(s, counts if ctx.scope == "layerwise" else total)
        ctx.log(round=r + 1, density=q, kept=sum(int(m.sum()) for m in mask.values()),
                flow=float(sum(float(v.clamp_min(0).sum()) for v in s.values())))
        bar.update()
    bar.close()
    return SearchOutput(mask)

"""SynFlow (Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020): iterative synaptic-flow pruning, data-free.

Each of ``rounds`` rounds (100 in the paper) replaces every parameter by its absolute value (the
network is "linearised"; the signs are restored afterwards), feeds an all-ones input of one example,
and scores ``S = |∂R/∂θ ⊙ θ|`` with ``R = 1ᵀ f(1; |m ⊙ θ|)``; the mask is then the top-``k_r`` of
the scores with the exponential schedule ``k_r = round(q^{r/rounds} n)`` (``r = 1..rounds``). Pruned
weights have score 0 and stay pruned. Conservation of synaptic flow is what avoids layer collapse
(their Theorem 2); it is the documented repair for global pruning at extreme densities. Computed in
float64 (``R`` is a product of layer norms and overflows float32 in deep nets); the model is put in
eval mode (BatchNorm running statistics, as the reference code)."""
from __future__ import annotations

import torch

from ntk_theory._checks import check_int

from ._common import SearchOutput, exp_schedule, layer_counts

HPARAMS = {"rounds": 100}


def validate(hp: dict) -> None:
    check_int(hp["rounds"], "rounds", minimum=1)


def scores(model, names, mask, in_shape) -> dict:
    """One round's ``|∂R/∂θ ⊙ θ|`` for the tensors ``names`` at the masked, absolute-valued parameters."""
    import copy
    net = copy.deepcopy(model).double().eval()
    params = dict(net.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            p.abs_()
            if n in mask:
                p.mul_(mask[n].to(p.device, p.dtype))
    R = net(torch.ones((1, *in_shape), dtype=torch.float64, device=next(net.parameters()).device)).sum()
    grads = torch.autograd.grad(R, [params[n] for n in names])
    return {n: (g * params[n]).detach().abs() for n, g in zip(names, grads)}


def search(ctx, *, rounds: int) -> SearchOutput:
    from ._common import progress_bar, topk_mask
    in_shape = tuple(torch.as_tensor(ctx.data.x_train[:1]).shape[1:])
    mask = {n: torch.ones(ctx.param(n).shape, dtype=torch.bool, device=ctx.device) for n in ctx.names}
    bar = progress_bar(rounds, "synflow", ctx.progress)
    for r, q in enumerate(exp_schedule(ctx.density, rounds)):
        counts, total = layer_counts(ctx.model, ctx.names, q)
        if r == rounds - 1:
            counts, total = ctx.counts, ctx.total
        s = scores(ctx.model, ctx.names, mask, in_shape)
        mask = topk_mask(s, counts if ctx.scope == "layerwise" else total)
        ctx.log(round=r + 1, density=q, kept=sum(int(m.sum()) for m in mask.values()))
        bar.update()
    bar.close()
    return SearchOutput(mask)

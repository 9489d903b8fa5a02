"""GraSP (Wang, Zhang & Grosse, ICLR 2020): gradient signal preservation at initialisation.

Score ``S = -θ ⊙ (H g)`` with ``g = ∂L/∂θ`` and ``H`` the Hessian of ``L``, ``L`` the cross-entropy of the
logits divided by a temperature ``T`` (200 in the reference code) on ``n`` labelled training examples;
``H g`` is a Hessian-vector product (the gradient of ``g_detached · ∂L/∂θ``). Removing weights with a
*large* score reduces the gradient flow least, so GraSP **removes the highest scores**: it keeps the
``k`` lowest values of ``S`` (the reference implementation, alecwangcq/GraSP ``GraSP.py``, keeps
``S / |Σ S| <= threshold`` with the threshold the smallest of the ``(1-q)`` fraction largest scores)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ntk_theory._checks import check_int, check_positive

from ._common import SearchOutput, model_dtype, xy

HPARAMS = {"n": 256, "temperature": 200.0}


def validate(hp: dict) -> None:
    check_int(hp["n"], "n", minimum=1)
    check_positive(hp["temperature"], "temperature")


def scores(model, names, x, y, temperature: float) -> dict:
    """``S = -θ ⊙ H g`` of the tensors ``names`` (all parameters take part in ``g`` and ``H``)."""
    params = dict(model.named_parameters())
    allp = list(params.values())
    g = torch.autograd.grad(F.cross_entropy(model(x) / temperature, y), allp)
    g = [t.detach() for t in g]
    grads = torch.autograd.grad(F.cross_entropy(model(x) / temperature, y), allp, create_graph=True)
    z = sum((a * b).sum() for a, b in zip(g, grads))
    hg = dict(zip(params, torch.autograd.grad(z, allp)))
    return {n: -(params[n] * hg[n]).detach() for n in names}


def search(ctx, *, n: int, temperature: float) -> SearchOutput:
    x, y = xy(ctx.data, n, ctx.generator)
    x = x.to(ctx.device, model_dtype(ctx.model))
    s = scores(ctx.model, ctx.names, x, y.to(ctx.device), temperature)
    return SearchOutput(ctx.topk(s, largest=False))

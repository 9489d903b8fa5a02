"""GraSP (Wang, Zhang & Grosse, ICLR 2020): gradient signal preservation at initialisation.

Score ``S = -θ ⊙ (H g)``, ``g = ∂L/∂θ`` and ``H = ∂²L/∂θ²`` taken over the **weight tensors** of every
layer (``ndim >= 2``, the first layer included even with ``skip_first``; biases are constants, as in
both reference implementations), ``L`` the mean cross-entropy of the logits divided by a temperature
``T`` (200 in the reference code) on ``n`` labelled training examples. ``H g`` is a Hessian-vector
product: the gradient of ``sg(g) · ∂L/∂θ``.

Sign convention (checked against the authors' code, alecwangcq/GraSP ``pruner/GraSP.py``, and
Synaptic-Flow's ``Pruners/pruners.py``): a weight with a *large* ``S`` is one whose removal reduces
the gradient norm ``gᵀg`` least (or increases it), so GraSP **removes the highest scores**: the
authors' code computes ``-θ ⊙ Hg``, finds the threshold of the ``(1-q)`` fraction largest (normalised)
scores and keeps ``S <= threshold``; Synaptic-Flow stores ``+θ ⊙ Hg`` and keeps the largest. Here
``S = -θ ⊙ Hg`` and the mask keeps the ``k`` *lowest* values of ``S`` (exact count, ties by index).
The normalisation by ``|Σ S|`` of both references is a positive factor and does not change the mask.
Differences from the reference: the examples are ``n`` random training points (the reference takes
``samples_per_class`` per class), no Xavier re-initialisation of the linear layers (the ticket must be
a sub-network of the given initialisation), and layerwise scope is available (the reference is global).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ntk_theory._checks import check_int, check_positive
from ntk_theory.masks import canonical_name

from ._common import SearchOutput, model_dtype, xy

HPARAMS = {"n": 256, "temperature": 200.0}


def validate(hp: dict) -> None:
    check_int(hp["n"], "n", minimum=1)
    check_positive(hp["temperature"], "temperature")


def scores(model, names, x, y, temperature: float) -> dict:
    """``S = -θ ⊙ H g`` of the tensors ``names`` (``g`` and ``H`` over all weight tensors, biases fixed)."""
    params = {canonical_name(k): p for k, p in model.named_parameters()}
    weights = [n for n, p in params.items() if p.dim() >= 2]
    wp = [params[n] for n in weights]
    g = [t.detach() for t in torch.autograd.grad(F.cross_entropy(model(x) / temperature, y), wp)]
    grads = torch.autograd.grad(F.cross_entropy(model(x) / temperature, y), wp, create_graph=True)
    z = sum((a * b).sum() for a, b in zip(g, grads))
    hg = dict(zip(weights, torch.autograd.grad(z, wp)))
    return {n: -(params[n] * hg[n]).detach() for n in names}


def search(ctx, *, n: int, temperature: float) -> SearchOutput:
    x, y = xy(ctx.data, n, ctx.generator)
    x = x.to(ctx.device, model_dtype(ctx.model))
    s = scores(ctx.model, ctx.names, x, y.to(ctx.device), temperature)
    return SearchOutput(ctx.topk(s, largest=False))

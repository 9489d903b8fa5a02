"""SNIP (Lee, Ajanthan & Torr, ICLR 2019): connection sensitivity at initialisation.

With the weights written ``W = c ⊙ θ`` and indicator variables ``c = 1``, SNIP scores each connection
by ``S = |∂L/∂c| = |∂L/∂θ ⊙ θ|`` (the magnitude of the first-order change of ``L`` when the connection
is removed), ``L`` the mean cross-entropy on one batch of ``n`` labelled training examples, and keeps
the largest scores. The paper's normalisation ``S / Σ S`` is a positive factor and does not change the
mask. Checked against Synaptic-Flow's implementation (ganguli-lab/Synaptic-Flow ``Pruners/pruners.py``
class SNIP: the gradient with respect to the mask variables, ``|m.grad|``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ntk_theory._checks import check_int

from ._common import SearchOutput, model_dtype, xy

HPARAMS = {"n": 256}


def validate(hp: dict) -> None:
    check_int(hp["n"], "n", minimum=1)


def scores(model, names, x, y) -> dict:
    """``|∂L/∂θ ⊙ θ|`` of the tensors ``names``, ``L`` the mean cross-entropy on ``(x, y)``."""
    params = dict(model.named_parameters())
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return {n: (g * params[n]).detach().abs() for n, g in zip(names, grads)}


def search(ctx, *, n: int) -> SearchOutput:
    x, y = xy(ctx.data, n, ctx.generator)
    x = x.to(ctx.device, model_dtype(ctx.model))
    return SearchOutput(ctx.topk(scores(ctx.model, ctx.names, x, y.to(ctx.device))))

"""Magnitude pruning at initialisation: keep the largest ``|θ|`` (of the trainable raw parameter; under
the NTK parameterisation every layer's raw weights are N(0, 1), so ``scope="global"`` then allocates
kept weights about uniformly across layers; under the standard parameterisation wide layers have small
weights and global magnitude pruning collapses them, Tanaka et al. 2020, Fig. 1)."""
from __future__ import annotations

from ._common import SearchOutput

HPARAMS: dict = {}


def search(ctx) -> SearchOutput:
    return SearchOutput(ctx.topk({n: ctx.param(n).detach().abs() for n in ctx.names}))

"""Random pruning at initialisation: a uniformly random mask of the exact count, with or without the
``1/sqrt(q)`` weight rescaling (docs/theory.md §B.7; Yang & Wang 2023: with it, a randomly pruned wide
network keeps the dense infinite-width NTK). ``rescale=True`` is carried by the ticket
(:attr:`TicketResult.rescale`) and applied at training time by ``apply_mask(rescale=True)``."""
from __future__ import annotations

import torch

from ntk_theory._checks import check_bool

from ._common import SearchOutput

HPARAMS = {"rescale": False}


def validate(hp: dict) -> None:
    check_bool(hp["rescale"], "rescale")


def search(ctx, *, rescale: bool) -> SearchOutput:
    # i.i.d. uniform scores: top-k of them is a uniformly random k-subset (per tensor or over all)
    scores = {n: torch.rand(ctx.param(n).shape, generator=ctx.generator, dtype=torch.float64) for n in ctx.names}
    return SearchOutput(ctx.topk(scores), rescale=rescale)

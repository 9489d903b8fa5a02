r"""Adversarial iterative magnitude pruning with rewinding (the lottery-ticket procedure of Frankle &
Carbin, ICLR 2019, with rewinding to an early epoch of Frankle et al., ICML 2020 "Linear mode
connectivity and the lottery ticket hypothesis", and PGD adversarial training between rounds as in
the robust-ticket literature, e.g. Gui et al. 2019; open_lth's ``sparse_global`` / ``lottery`` is the
reference implementation of the un-robust procedure).

With ``R = ceil(log q / log(1 - rate))`` rounds (``rate = 0.2``: each round prunes 20 % of the weights
that are left) and the densities ``q_r = (1 - rate)^r`` for ``r < R``, ``q_R = q`` (exact counts
``round(q_r n)`` per tensor or overall, the last round the requested ones; see
:func:`~empirical.tickets._common.imp_schedule`):

1. train the dense network adversarially from ``θ_0`` for ``epochs`` epochs
   (:func:`empirical.train.adversarial_train`: PGD-``steps`` at ``eps``/``norm``); the state after
   ``rewind_epoch`` epochs of this run (``θ_0`` itself for ``rewind_epoch=0``) is the rewinding point
   ``θ_k`` (captured by ``adversarial_train``'s ``track`` callback);
2. round ``r``: keep the ``k_r`` largest ``|θ_T|`` of the trained network among the weights kept so far
   (pruned weights stay pruned), rewind to ``θ_k`` with the new mask, and, unless it was the last
   round, train the masked network adversarially for ``epochs - rewind_epoch`` epochs (the rest of
   the dense schedule, as in weight rewinding) and repeat.

The ticket is the last mask at the rewinding point: its ``init_state`` is ``θ_0`` (``rewind_epoch=0``)
or ``θ_k``. Diagnostics: ``history`` has one row per round (density, kept count, the last epoch's
train loss, robust train accuracy and test accuracy, seconds) and ``rounds``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ntk_theory._checks import check_choice, check_int, check_nonnegative, check_positive
from ntk_theory.masks import canonical_name, split_name

from ._common import SearchOutput, check_attack_hparams, imp_schedule, layer_counts, progress_bar, topk_mask

HPARAMS = {"epochs": 3, "rewind_epoch": 0, "rate": 0.2, "lr": 0.05, "batch_size": 128, "optimizer": "sgd",
           "momentum": 0.9, "weight_decay": 0.0, "schedule": None, "eps": 0.1, "norm": "linf", "steps": 10,
           "alpha": None}


def validate(hp: dict) -> None:
    check_int(hp["epochs"], "epochs", minimum=1)
    check_int(hp["rewind_epoch"], "rewind_epoch", minimum=0)
    if hp["rewind_epoch"] >= hp["epochs"]:
        raise ValueError(f"rewind_epoch: got {hp['rewind_epoch']!r}; it must be below epochs={hp['epochs']!r} "
                         "(the rewinding point is an epoch of the dense run)")
    r = check_positive(hp["rate"], "rate")
    if r >= 1:
        raise ValueError(f"rate: got {r!r}; expected the fraction pruned per round, in (0, 1)")
    check_positive(hp["lr"], "lr")
    check_int(hp["batch_size"], "batch_size", minimum=1)
    check_choice(hp["optimizer"], "optimizer", ("sgd", "adam"))
    m = check_nonnegative(hp["momentum"], "momentum")
    if m >= 1:
        raise ValueError(f"momentum: got {m!r}; expected a value in [0, 1)")
    check_nonnegative(hp["weight_decay"], "weight_decay")
    check_attack_hparams(hp, min_steps=1)


def rounds_for(density: float, rate: float = 0.2) -> int:
    """``ceil(log q / log(1 - rate))`` (1 for ``q = 1``): the number of prune-and-retrain rounds."""
    return len(imp_schedule(density, rate))


def effective_weights(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """``{canonical name: the weight the (possibly masked) model computes with}`` (pruned entries 0)."""
    out = {}
    for n in names:
        prefix, tensor = split_name(n)
        module = model.get_submodule(prefix) if prefix else model
        out[n] = getattr(module, tensor).detach().cpu().clone()
    return out


def search(ctx, *, epochs, rewind_epoch, rate, lr, batch_size, optimizer, momentum, weight_decay, schedule, eps,
           norm, steps, alpha) -> SearchOutput:
    from empirical.train import adversarial_train

    base = ctx.model.to("cpu")
    init = {k: v.detach().clone() for k, v in base.state_dict().items()}
    schedule_q = imp_schedule(ctx.density, rate)
    captured: dict = {}

    def capture(epoch: int, model: nn.Module) -> dict:
        if epoch == rewind_epoch:
            captured.update({canonical_name(k): v.detach().cpu().clone() for k, v in model.state_dict().items()})
        return {}

    train_kw = dict(eps=eps, norm=norm, steps=steps, alpha=alpha, batch_size=batch_size, optimizer=optimizer, lr=lr,
                    momentum=momentum, weight_decay=weight_decay, schedule=schedule, device=ctx.device,
                    progress=False)
    bar = progress_bar(len(schedule_q), "adv_imp", ctx.progress)
    res = adversarial_train(base, ctx.data, epochs=epochs, seed=ctx.seed, track=capture, **train_kw)
    rewind = {k: captured[k] for k in init} if rewind_epoch > 0 else init
    start = copy.deepcopy(base)
    start.load_state_dict(rewind)
    mask = None
    for r, q in enumerate(schedule_q):
        last = r == len(schedule_q) - 1
        counts, total = layer_counts(base, ctx.names, q)
        if last:
            counts, total = ctx.counts, ctx.total
        w = effective_weights(res.model, ctx.names)
        s = {n: w[n].abs().to(torch.float64) if mask is None else
             torch.where(mask[n], w[n].abs().to(torch.float64), torch.full(w[n].shape, -1.0, dtype=torch.float64))
             for n in ctx.names}
        mask = topk_mask(s, counts if ctx.scope == "layerwise" else total)
        h = res.history[-1]
        ctx.log(round=r + 1, density=q, kept=sum(int(m.sum()) for m in mask.values()),
                train_loss=h.get("train_loss"), robust_train_acc=h.get("robust_train_acc"),
                test_acc=h.get("test_acc"), seconds=res.seconds)
        bar.update()
        if not last:
            res = adversarial_train(start, ctx.data, mask=mask, epochs=epochs - rewind_epoch,
                                    seed=ctx.seed + r + 1, **train_kw)
    bar.close()
    return SearchOutput(mask, init_state=None if rewind_epoch == 0 else rewind,
                        diagnostics={"rounds": len(schedule_q), "rewind_epoch": rewind_epoch})

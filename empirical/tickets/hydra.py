r"""HYDRA (Sehwag, Wang, Mittal & Jana, NeurIPS 2020, "HYDRA: Pruning Adversarially Robust Neural
Networks"): importance scores optimised under the adversarial loss with the weights frozen.

Every prunable weight ``θ`` gets a score ``s``; the network computes with ``W = θ ⊙ M(s)``,
``M(s) = topk(|s|)`` the exact top-``k`` of the absolute scores (per tensor for ``scope="layerwise"``,
HYDRA's setting, or over all tensors for ``"global"``), and the straight-through estimator passes
``∂L/∂M`` to ``|s|`` unchanged (``M = topk(|s|) + |s| - sg(|s|)``; Ramanujan et al. 2020's edge-popup,
which HYDRA's ``GetSubnet`` follows), so ``∂L/∂s = sign(s) ⊙ θ ⊙ ∂L/∂W``. The scores are trained by
SGD (momentum, weight decay, cosine schedule per epoch) on the PGD adversarial loss

    L(s) = mean_i CE(f(θ ⊙ M(s); x~_i), y_i),    x~ = PGD(f(θ ⊙ sg M(s)), x, y; eps, alpha, steps, norm)

(:func:`ntk_theory.attacks.pgd`, the attack against the current sub-network, as in Madry-style
adversarial training), and the ticket is ``topk(|s|)`` at the initial weights.

Score initialisation (``score_init``): ``"scaled"`` (HYDRA's proposed ``--scaled-score-init``,
``utils/model.py::initialize_scaled_score`` in inspire-group/hydra) sets
``s = sqrt(6 / fan_in) · θ / max|θ|`` per tensor, proportional to the weights and "close to Kaiming
uniform" in scale: the initial mask is then exactly the magnitude mask (layerwise); ``"kaiming"``
draws ``s ~ U(-sqrt(6/fan_in), sqrt(6/fan_in))`` (seeded), HYDRA's default without the flag.

Differences from HYDRA as published: HYDRA prunes a *pre-trained* network and fine-tunes the kept
weights afterwards; issue 10 asks for the mask at initialisation, so here the weights are the dense
initialisation (as in edge-popup's search for sub-networks of random weights). HYDRA's ``adv``
trainer uses the TRADES loss; this uses the PGD cross-entropy of Madry et al. (the same attack and loss
as :func:`empirical.train.adversarial_train`). Defaults follow HYDRA's prune step (SGD, lr 0.1,
momentum 0.9, weight decay 1e-4, cosine), with fewer epochs (small CPU problems).

Diagnostics: ``history`` has one row per iteration (``epoch``, ``iter``, ``adv_loss`` and
``adv_acc`` on the minibatch, ``lr``) and per epoch the fraction of the mask changed (``mask_change``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ntk_theory._checks import check_choice, check_int, check_nonnegative, check_positive
from ntk_theory.attacks import pgd

from ._common import SearchOutput, check_attack_hparams, model_dtype, progress_bar, topk_mask, xy

HPARAMS = {"epochs": 5, "lr": 0.1, "batch_size": 128, "momentum": 0.9, "weight_decay": 1e-4,
           "schedule": "cosine", "eps": 0.1, "norm": "linf", "steps": 10, "alpha": None, "n_train": None,
           "score_init": "scaled"}


def validate(hp: dict) -> None:
    check_int(hp["epochs"], "epochs", minimum=1)
    check_positive(hp["lr"], "lr")
    check_int(hp["batch_size"], "batch_size", minimum=1)
    m = check_nonnegative(hp["momentum"], "momentum")
    if m >= 1:
        raise ValueError(f"momentum: got {m!r}; expected a value in [0, 1)")
    check_nonnegative(hp["weight_decay"], "weight_decay")
    check_choice(hp["schedule"], "schedule", ("cosine", "constant"))
    check_attack_hparams(hp, min_steps=0)
    if hp["n_train"] is not None:
        check_int(hp["n_train"], "n_train", minimum=1)
    check_choice(hp["score_init"], "score_init", ("scaled", "kaiming"))


def init_scores(params: dict, names, how: str, generator: torch.Generator) -> dict:
    """HYDRA's initial scores of the tensors ``names`` (module docstring), ``fan_in = numel / shape[0]``."""
    out = {}
    for n in names:
        t = params[n].detach()
        bound = math.sqrt(6.0 / (t.numel() // t.shape[0]))
        if how == "scaled":
            s = bound * t / t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)
        else:
            s = (2 * torch.rand(t.shape, generator=generator, dtype=t.dtype) - 1).to(t.device) * bound
        out[n] = s.clone().requires_grad_(True)
    return out


def masked_weights(params: dict, scores: dict, k, *, detach: bool = False) -> dict:
    """``{name: θ ⊙ M(s)}`` with the straight-through top-``k`` of ``|s|`` (``k`` a dict: per tensor)."""
    a = {n: s.abs() for n, s in scores.items()}
    hard = topk_mask(a, k)
    out = {}
    for n, v in a.items():
        M = hard[n].to(v.dtype) if detach else hard[n].to(v.dtype) + (v - v.detach())
        out[n] = params[n].detach() * M
    return out


def adversarial_loss(model, params: dict, scores: dict, k, xa, y) -> torch.Tensor:
    """``mean CE(f(θ ⊙ M(s); x~), y)``, differentiable w.r.t. the scores."""
    return F.cross_entropy(functional_call(model, masked_weights(params, scores, k), (xa,)), y)


def search(ctx, *, epochs, lr, batch_size, momentum, weight_decay, schedule, eps, norm, steps, alpha, n_train,
           score_init) -> SearchOutput:
    model = ctx.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters())
    dt, dev = model_dtype(model), ctx.device
    x, y = xy(ctx.data, n_train, ctx.generator)
    x, y = x.to(dev, dt), y.to(dev)
    k = ctx.counts if ctx.scope == "layerwise" else ctx.total
    scores = init_scores(params, ctx.names, score_init, ctx.generator)
    opt = torch.optim.SGD(scores.values(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = x.shape[0]
    per_epoch = math.ceil(n / batch_size)
    bar = progress_bar(epochs * per_epoch, "hydra", ctx.progress)
    it = 0
    for epoch in range(epochs):
        rate = lr * (0.5 * (1 + math.cos(math.pi * epoch / epochs)) if schedule == "cosine" else 1.0)
        for group in opt.param_groups:
            group["lr"] = rate
        before = topk_mask({nn_: s.abs() for nn_, s in scores.items()}, k)
        order = torch.randperm(n, generator=ctx.generator).to(dev)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            frozen = masked_weights(params, scores, k, detach=True)
            xa = pgd(lambda z: functional_call(model, frozen, (z,)), xb, yb, eps=eps, alpha=alpha, steps=steps,
                     norm=norm, generator=ctx.seed * 1_000_003 + it)
            out = functional_call(model, masked_weights(params, scores, k), (xa,))
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
            ctx.log(epoch=epoch + 1, iter=it, adv_loss=loss.detach(),
                    adv_acc=float((out.detach().argmax(1) == yb).float().mean()), lr=rate)
            bar.update()
        after = topk_mask({nn_: s.abs() for nn_, s in scores.items()}, k)
        changed = sum(int((before[m] != after[m]).sum()) for m in after) / max(
            2 * sum(int(after[m].sum()) for m in after), 1)
        ctx.log(epoch=epoch + 1, mask_change=changed)
    bar.close()
    mask = topk_mask({n_: s.detach().abs() for n_, s in scores.items()}, k)
    return SearchOutput(mask, diagnostics={"iterations": it})

"""Adversarial training of dense and masked networks (Madry PGD-AT), on CPU or GPU, resumable.

The objective is Madry et al.'s saddle point (docs/theory.md §B.5)

    min_θ  E_(x,y) [ max_{x~ ∈ B_p(x, eps) ∩ [0,1]^d}  ℓ(f(m ⊙ θ; x~), y) ],

with the inner maximum approximated by PGD-k (:func:`ntk_theory.attacks.pgd`, the one attack loop of
awt) on every minibatch and the outer one by SGD (with momentum, weight decay) or Adam on the raw
parameters. ``eps = 0`` is standard training (no attack is run). A ``mask`` (canonical name ->
BoolTensor, :mod:`ntk_theory.masks`) is applied with :func:`ntk_theory.masks.apply_mask`, the one
mask helper: the network computes ``f(s m ⊙ θ)`` with ``s = 1/sqrt(q_l)`` under ``rescale``
(docs/theory.md §B.7), and the pruned raw coordinates are set to zero before the first step. Their
gradient is ``s m ⊙ ∂ℓ/∂W = 0``, so momentum buffers, weight decay ``λ θ`` and Adam's moments stay
zero there too: pruned weights are exactly zero, raw and effective, after every step (tested).

Conventions, chosen where the issue is silent (and configurable where a choice matters):

* The attack runs with the model in eval mode (``attack_mode="eval"``; the attack does not update
  BatchNorm statistics, as in HYDRA and most robust-training code); the update with the model in
  train mode. For MLPs and CNNs without BatchNorm or dropout the two coincide.
* One seed drives the run: epoch ``t`` draws its minibatch order (:func:`empirical.data.batches`) and
  its PGD random starts from a generator seeded by ``SeedSequence([seed, t])`` (on CUDA, a CPU generator
  of the same seed draws the order), so a run resumed at an epoch boundary draws the
  same numbers as an uninterrupted one. The generator state and torch's global RNG state (dropout)
  are in the checkpoint as well.
* Checkpoints are written once an epoch (``checkpoint_dir/checkpoint.pt``, atomically with
  :func:`ntk_theory.io.atomic_torch_save`): raw parameters and masks, optimiser and schedule state,
  history, RNG states, the tracker's state (``track.state_dict()`` where it has one) and the run's
  configuration. A rerun with the same configuration resumes from it (bit-identical on CPU: tested by
  killing a subprocess); a different configuration is refused rather than silently mixed.
* The learning-rate schedule is per epoch: ``None``/``"constant"``, ``"cosine"`` (to 0 at the last
  epoch), ``"step"`` (x0.1 at 50 % and 75 % of the epochs, Madry et al.'s and HYDRA's shape) or a
  callable ``epoch -> factor``.

The ``history`` has one row per epoch, epoch 0 being the initialisation (``test_acc`` and the
tracker's values there): ``epoch``, ``lr``, ``train_loss`` (mean adversarial loss), ``train_acc``
(clean accuracy after the epoch on a fixed seeded subset of ``TRAIN_ACC_POINTS`` = 2048 training points,
all of them when there are fewer; with ``eps = 0``, the accuracy on the batches as they were trained),
``robust_train_acc`` (accuracy on the PGD points of each batch, before its update), ``test_acc``
(clean, after the epoch), ``seconds``, plus
whatever ``track(epoch, model)`` returns (e.g. :class:`empirical.tracking.KernelTracker`).

References: Madry et al. 2018, "Towards deep learning models resistant to adversarial attacks";
Sehwag et al. 2020 (HYDRA) for training pruned networks adversarially; Frankle & Carbin 2019 for
training masked networks from their initialisation.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ntk_theory._checks import (as_tensor, check_bool, check_choice, check_device, check_finite, check_int,
                                check_nonnegative, check_positive)
from ntk_theory.attacks import NORMS, pgd, per_sample_loss
from ntk_theory.io import Result, atomic_torch_save, to_jsonable
from ntk_theory.masks import MaskParametrization, apply_mask, validate_mask

from .data import batches

__all__ = ["adversarial_train", "TrainResult", "OPTIMIZERS", "SCHEDULES", "LOSSES", "epoch_generator",
           "zero_pruned_", "pruned_nonzeros"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")
LOSSES = ("ce", "mse")
CHECKPOINT = "checkpoint.pt"
TRAIN_ACC_POINTS = 2048
_FORMAT = 1


@dataclass(frozen=True)
class TrainResult(Result):
    """What :func:`adversarial_train` returns.

    ``model``: the trained network on the CPU (masked ones keep their mask, so the model computes the
    sparse network; :func:`ntk_theory.masks.remove_mask` gives the raw tensors back), ``history`` (one
    dict per epoch, epoch 0 = init; module docstring), ``config`` (the run's settings), ``device``
    (where it ran), ``seconds`` (training time of this call, epochs resumed from a checkpoint not
    counted), ``resumed_from`` (the epoch a checkpoint resumed at, or ``None``)."""

    model: Any
    history: list
    config: dict
    device: str
    seconds: float
    resumed_from: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form without the model (its ``state_dict`` is in the checkpoint)."""
        return {"history": to_jsonable(self.history), "config": to_jsonable(self.config), "device": self.device,
                "seconds": self.seconds, "resumed_from": self.resumed_from, "extra": to_jsonable(self.extra)}


# ---------------------------------------------------------------------------------------------- helpers
def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of epoch ``epoch`` of a run seeded ``seed`` (minibatch order and PGD starts):
    seeded by ``SeedSequence([seed, epoch])``, independent of how many epochs ran before."""
    s = int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=torch.device(device)).manual_seed(s)


def _masked_tensors(model: nn.Module):
    """(module, tensor name, raw parameter, mask) of every awt-masked tensor of ``model``."""
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor, plist in module.parametrizations.items():
            if len(plist) == 1 and isinstance(plist[0], MaskParametrization):
                yield module, tensor, plist.original, plist[0].mask


@torch.no_grad()
def zero_pruned_(model: nn.Module) -> nn.Module:
    """Set the raw pruned coordinates of every awt-masked tensor to zero (in place)."""
    for _, _, raw, m in _masked_tensors(model):
        raw.masked_fill_(~m.to(raw.device), 0.0)
    return model


@torch.no_grad()
def pruned_nonzeros(model: nn.Module) -> int:
    """How many pruned coordinates (raw or effective) of ``model`` are not exactly zero (0 after every
    step of :func:`adversarial_train`)."""
    n = 0
    for module, tensor, raw, m in _masked_tensors(model):
        off = ~m.to(raw.device)
        n += int((raw[off] != 0).sum()) + int((getattr(module, tensor)[off] != 0).sum())
    return n


def _check_data(data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    missing = [a for a in ("x_train", "y_train", "x_test", "y_test") if not hasattr(data, a)]
    if missing:
        raise TypeError(f"data: expected an empirical.data.Dataset (x_train, y_train, x_test, y_test), got "
                        f"{type(data).__name__} without {', '.join(missing)}")
    out = []
    for split in ("train", "test"):
        x = as_tensor(getattr(data, f"x_{split}"), f"data.x_{split}")
        y = as_tensor(getattr(data, f"y_{split}"), f"data.y_{split}")
        if not x.is_floating_point():
            raise TypeError(f"data.x_{split}: expected floating-point inputs, got dtype {x.dtype}")
        if y.is_floating_point() or y.dim() != 1:
            raise TypeError(f"data.y_{split}: expected integer class labels of shape (N,), got dtype {y.dtype} "
                            f"shape {tuple(y.shape)}")
        if x.dim() < 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"data.x_{split}: shape {tuple(x.shape)} does not match data.y_{split}'s "
                             f"{tuple(y.shape)} (expected (N, ...) and (N,))")
        if split == "train" and x.shape[0] == 0:
            raise ValueError("data.x_train: is empty")
        check_finite(x, f"data.x_{split}")
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError(f"data.x_{split}: inputs must lie in [0, 1] (the attack box); got range "
                             f"[{float(x.min()):g}, {float(x.max()):g}]")
        out += [x, y.long()]
    return tuple(out)


def _schedule_fn(schedule, epochs: int) -> Callable[[int], float]:
    """``epoch index t (0-based, the epoch being trained) -> lr factor``."""
    if schedule is None or schedule == "constant":
        return lambda t: 1.0
    if callable(schedule):
        def user(t: int) -> float:
            v = schedule(t)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"schedule: schedule({t}) returned {v!r}; expected a finite factor >= 0")
            return float(v)
        return user
    if schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * t / max(epochs, 1)))
    if schedule == "step":
        return lambda t: 0.1 ** ((t >= 0.5 * epochs) + (t >= 0.75 * epochs))
    raise ValueError(f"schedule: got {schedule!r}; accepted values are None, {', '.join(map(repr, SCHEDULES))} "
                     "or a callable epoch -> factor")


def _make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float | None:
    if x.shape[0] == 0:
        return None
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was)
    return correct / x.shape[0]


def _config_fingerprint(cfg: Mapping[str, Any]) -> dict:
    """The settings that must agree between a checkpoint and the call resuming it (not ``progress``,
    ``device`` or ``track``: a run may resume elsewhere or with another display)."""
    return {k: v for k, v in cfg.items() if k not in ("progress", "device", "checkpoint_dir", "track")}


# ---------------------------------------------------------------------------------------------- training
def adversarial_train(model: nn.Module, data, *, mask: Mapping[str, torch.Tensor] | None = None,
                      rescale: bool = False, eps: float, norm: str = "linf", steps: int = 10,
                      alpha: float | None = None, epochs: int, batch_size: int = 128, optimizer: str = "sgd",
                      lr: float, momentum: float = 0.9, weight_decay: float = 0.0, schedule=None,
                      loss: str = "ce", seed: int = 0, device="auto", checkpoint_dir=None,
                      track: Callable[[int, nn.Module], Mapping] | None = None, progress: bool = True,
                      attack_mode: str = "eval") -> TrainResult:
    """Madry PGD adversarial training of ``model`` (or of its sub-network ``mask``) on ``data``.

    Each step draws a minibatch ``(x, y)``, computes ``x~ = PGD_k(f, x, y; eps, alpha, norm)`` with the
    model in ``attack_mode``, and takes an optimiser step on ``mean_i ℓ(f(x~_i), y_i)`` (module
    docstring). ``model`` is not changed: a copy is trained and returned in the result.

    Args:
        model: any ``nn.Module`` mapping a batch of ``data``'s inputs to ``(N, classes)`` logits.
        data: an :class:`empirical.data.Dataset` (``x_train``, ``y_train``, ``x_test``, ``y_test``;
            inputs in ``[0, 1]``).
        mask: canonical name -> BoolTensor (True = kept) or ``None`` (dense); applied with
            :func:`ntk_theory.masks.apply_mask` and pruned raw weights zeroed.
        rescale: multiply kept weights of a tensor of density ``q`` by ``1/sqrt(q)``.
        eps: attack radius ``>= 0`` (0: standard training); ``norm``: ``"linf"`` or ``"l2"``.
        steps: PGD iterations ``>= 1``; ``alpha``: PGD step (default ``2.5 eps / steps``).
        epochs: epochs ``>= 0``; ``batch_size``: minibatch size ``>= 1``.
        optimizer: ``"sgd"`` (``momentum`` in [0, 1), ``weight_decay >= 0``) or ``"adam"``; ``lr > 0``.
        schedule: per-epoch learning-rate factor (module docstring).
        loss: ``"ce"`` or ``"mse"`` (one-hot targets), the same per-sample loss the attack ascends.
        seed: the run's one seed (``>= 0``).
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` (:func:`ntk_theory._checks.check_device`).
        checkpoint_dir: folder of the per-epoch checkpoint (resumed from when present), or ``None``.
        track: ``track(epoch, model) -> dict`` called at epoch 0 (init) and after each epoch, with the
            model in eval mode (it must not change the parameters); its values go into that epoch's history row.
        progress: a tqdm bar over epochs (silent off a terminal).
        attack_mode: ``"eval"`` or ``"train"``: the model's mode while PGD runs.

    Raises (before any training and before anything is written): ``ValueError`` / ``TypeError`` naming
    the argument for a bad value (eps < 0, unknown norm/optimizer/loss/schedule, batch_size < 1, a mask
    that does not fit the model, data outside [0, 1] or with NaN, ``device="cuda"`` without CUDA, a
    checkpoint written by a different configuration). ``FloatingPointError`` when the training loss
    becomes non-finite (lower ``lr``).
    """
    from tqdm.auto import tqdm

    # ---- validation: everything before any work or any file
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    x_tr, y_tr, x_te, y_te = _check_data(data)
    eps = check_nonnegative(eps, "eps")
    check_choice(norm, "norm", NORMS)
    steps = check_int(steps, "steps", minimum=1)
    if alpha is not None:
        alpha = check_positive(alpha, "alpha")
    epochs = check_int(epochs, "epochs", minimum=0)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    lr = check_positive(lr, "lr")
    momentum = check_nonnegative(momentum, "momentum")
    if momentum >= 1.0:
        raise ValueError(f"momentum: got {momentum!r}; expected a value in [0, 1)")
    weight_decay = check_nonnegative(weight_decay, "weight_decay")
    sched = _schedule_fn(schedule, epochs)
    check_choice(loss, "loss", LOSSES)
    seed = check_int(seed, "seed", minimum=0)
    dev = check_device(device, "device")
    check_bool(rescale, "rescale")
    check_bool(progress, "progress")
    check_choice(attack_mode, "attack_mode", ("eval", "train"))
    if track is not None and not callable(track):
        raise TypeError(f"track: expected a callable track(epoch, model) -> dict or None, got {type(track).__name__}")
    if mask is not None:
        mask = validate_mask(model, mask)
    ckpt_path = None if checkpoint_dir is None else Path(os.fspath(checkpoint_dir)) / CHECKPOINT
    config = {"eps": eps, "norm": norm, "steps": steps, "alpha": alpha, "epochs": epochs, "batch_size": batch_size,
              "optimizer": optimizer, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
              "schedule": schedule if (schedule is None or isinstance(schedule, str)) else repr(schedule),
              "loss": loss, "seed": seed, "rescale": rescale, "attack_mode": attack_mode,
              "masked": mask is not None, "n_train": int(x_tr.shape[0]),
              "density": None if mask is None else sum(int(m.sum()) for m in mask.values())
              / max(sum(m.numel() for m in mask.values()), 1)}
    ckpt = None
    if ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        if ckpt.get("format") != _FORMAT or ckpt.get("fingerprint") != _config_fingerprint(config):
            raise ValueError(f"checkpoint_dir: {ckpt_path} was written by a run with another configuration "
                             f"({_diff(ckpt.get('fingerprint') or {}, _config_fingerprint(config))}); use another "
                             "folder or delete it")

    # ---- set-up
    work = copy.deepcopy(model)
    if mask is not None:
        apply_mask(work, mask, rescale=rescale)
    zero_pruned_(work)
    work.to(dev)
    dtype = next((p.dtype for p in work.parameters() if p.is_floating_point()), torch.float32)
    x_tr, y_tr = x_tr.to(dev, dtype), y_tr.to(dev)
    x_te, y_te = x_te.to(dev, dtype), y_te.to(dev)
    opt = _make_optimizer(optimizer, [p for p in work.parameters() if p.requires_grad], lr, momentum, weight_decay)
    history: list[dict] = []
    start = 1
    if ckpt is not None:
        work.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        history = list(ckpt["history"])
        start = int(ckpt["epoch"]) + 1
        torch.set_rng_state(ckpt["rng"]["torch"])
        if dev.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], dev)
        if track is not None and hasattr(track, "load_state_dict") and ckpt.get("track") is not None:
            track.load_state_dict(ckpt["track"])

    def tracked(epoch: int) -> dict:
        if track is None:
            return {}
        was = work.training
        work.eval()
        try:
            out = track(epoch, work)
        finally:
            work.train(was)
        if out is None:
            return {}
        if not isinstance(out, Mapping):
            raise TypeError(f"track: returned {type(out).__name__}; expected a dict of values (or None)")
        return dict(out)

    def save(epoch: int) -> None:
        if ckpt_path is None:
            return
        atomic_torch_save(ckpt_path, {
            "format": _FORMAT, "fingerprint": _config_fingerprint(config), "epoch": epoch,
            "model": {k: v.detach().cpu() for k, v in work.state_dict().items()},
            "optimizer": opt.state_dict(), "history": history,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None},
            "track": track.state_dict() if track is not None and hasattr(track, "state_dict") else None})

    t0 = time.perf_counter()
    if ckpt is None:
        history.append({"epoch": 0, "lr": None, "train_loss": None, "train_acc": None, "robust_train_acc": None,
                        "test_acc": _accuracy(work, x_te, y_te, max(batch_size, 256)), "seconds": 0.0,
                        **tracked(0)})
        save(0)
    n = x_tr.shape[0]
    # clean training accuracy after each epoch on a fixed subset (all points up to TRAIN_ACC_POINTS): one
    # forward pass over at most that many points instead of an extra forward per minibatch
    probe = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:TRAIN_ACC_POINTS].to(dev)
    bar = tqdm(range(start, epochs + 1), desc="adversarial training" if eps > 0 else "training", unit="epoch",
               initial=start - 1, total=epochs, disable=None if progress else True, leave=False)
    for epoch in bar:
        e0 = time.perf_counter()
        factor = sched(epoch - 1)
        for group in opt.param_groups:
            group["lr"] = lr * factor
        gen = epoch_generator(seed, epoch, dev)   # the PGD starts (and, on the CPU, the minibatch order)
        order_gen = gen if dev.type == "cpu" else epoch_generator(seed, epoch, "cpu")
        work.train()
        loss_sum, robust, seen = 0.0, 0, 0
        for step, (xb, yb) in enumerate(batches(x_tr, y_tr, batch_size, shuffle=True, generator=order_gen)):
            # one evaluation of every masked weight per batch: the attack's forwards and the update's
            # forward and backward share it (it is recomputed after the step)
            with parametrize.cached():
                if eps > 0:
                    work.train(attack_mode == "train")
                    try:
                        xa = pgd(work, xb, yb, eps=eps, alpha=alpha, steps=steps, norm=norm, loss=loss,
                                 generator=gen)
                    except ValueError:
                        with torch.no_grad():
                            finite = all(bool(torch.isfinite(p).all()) for p in work.parameters()) and bool(
                                torch.isfinite(work(xb)).all())
                        if not finite:
                            raise FloatingPointError(
                                f"adversarial_train: the parameters or outputs became non-finite at epoch {epoch}, "
                                f"step {step} (lr={lr * factor:g}); lower lr") from None
                        raise
                    work.train()
                else:
                    xa = xb
                out = work(xa)
                ell = per_sample_loss(out, yb, loss).mean()
                if not torch.isfinite(ell):
                    raise FloatingPointError(f"adversarial_train: the training loss became {float(ell)} at epoch "
                                             f"{epoch}, step {step} (lr={lr * factor:g}); lower lr")
                opt.zero_grad(set_to_none=True)
                ell.backward()
                opt.step()
            b = yb.shape[0]
            loss_sum += float(ell.detach()) * b
            robust += int((out.detach().argmax(1) == yb).sum())
            seen += b
        row = {"epoch": epoch, "lr": lr * factor, "train_loss": loss_sum / seen,
               "train_acc": robust / seen if eps == 0 else _accuracy(work, x_tr[probe], y_tr[probe], 1024),
               "robust_train_acc": robust / seen, "test_acc": _accuracy(work, x_te, y_te, max(batch_size, 256)),
               "seconds": time.perf_counter() - e0}
        row.update(tracked(epoch))
        history.append(row)
        save(epoch)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", rob=f"{row['robust_train_acc']:.3f}",
                        test=f"{row['test_acc']:.3f}" if row["test_acc"] is not None else "-")
    bar.close()
    work.eval()
    work.to("cpu")
    return TrainResult(model=work, history=history, config=config, device=str(dev),
                       seconds=time.perf_counter() - t0, resumed_from=None if ckpt is None else start - 1)


def _diff(old: Mapping, new: Mapping) -> str:
    keys = sorted(set(old) | set(new))
    bad = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(bad[:4]) or "format"

"""Robust evaluation: clean accuracy, FGSM, PGD-k with random restarts, reference attacks.

For a classifier ``f: [0, 1]^d -> R^C`` (logits), a point ``(x, y)`` and an attack ``A`` that maps
it to ``A(x) ∈ B_p(x, eps) ∩ [0, 1]^d`` (``p = inf`` or ``2``), the point is *robust to A* when
``argmax_c f(A(x))_c = y``. :func:`evaluate` runs, in minibatches of ``batch_size`` points,

* clean:  ``A(x) = x``;
* FGSM (``norm="linf"``) / FGM (``"l2"``), one signed (normalised) gradient step of size ``eps``
  (Goodfellow et al. 2015);
* PGD-k (Madry et al. 2018): ``restarts`` runs of ``steps`` projected steps of size ``alpha``
  (default ``2.5 eps / steps``), each from its own uniform random start in the ball; a point is
  PGD-robust when it is robust to *every* restart (the worst case over restarts per example);
* optionally torchattacks' ``PGD`` / ``PGDL2`` (Kim 2020) on the same model, points, ``eps``,
  ``alpha``, ``steps`` with a random start (``cross_check=True``), and AutoAttack's standard
  ensemble APGD-CE, APGD-T, FAB-T, Square (Croce & Hein 2020) through ``pyautoattack``
  (``autoattack=True``).

Every attack of awt's own goes through :func:`ntk_theory.attacks.fgsm` / :func:`~ntk_theory.attacks.pgd`
(the one attack loop). The result keeps per-example flags of every attack run; the **robust
accuracy** is the fraction of points robust to *all* of them (clean included)::

    robust_i = clean_i ∧ fgsm_i ∧ (∧_r pgd_{i,r}) [∧ crosscheck_i] [∧ autoattack_i]
    robust_acc = (1/n) Σ_i robust_i

which is never larger than any single attack's accuracy (an average over attacks would be).
A reference attack whose accuracy differs from awt's PGD accuracy by more than 2 points
(``|pgd_acc - ref_acc| > 0.02``) sets ``cross_check_flagged`` / ``autoattack_flagged`` (and
``flagged``): a disagreement is reported, never hidden.

Model state: the attacks and the predictions run with the model in eval mode (``model.eval()``,
recorded as ``model_mode="eval"``): BatchNorm uses its running statistics, dropout is off, and
the attack sees the same function that is scored. The caller's train/eval flags, buffers and
``requires_grad`` flags are restored afterwards (:class:`ntk_theory.attacks.ModuleStateGuard`);
no ``.grad`` is written (the attacks differentiate with respect to the input only).

Device: ``device`` is explicit (``"auto"`` picks CUDA when present). The model is moved there for
the evaluation and moved back afterwards; a model without parameters or buffers (e.g.
``nn.Sequential(nn.Flatten(), FixedFunction())``) is simply called on inputs on ``device``.

Determinism and resume: the random starts of batch ``b``, restart ``r`` come from a generator
seeded with ``SeedSequence([seed, b, r])`` (torchattacks, which draws from torch's global RNG, runs
under a forked RNG seeded the same way with ``r = restarts``), so the flags of a batch do not
depend on which batches ran before. With ``checkpoint=path`` the per-example flags and the
``evaluated`` mask are written atomically (:func:`ntk_theory.io.atomic_torch_save`) after each
batch; a rerun with the same arguments skips the finished batches and gives identical flags.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ntk_theory._checks import (as_tensor, check_bool, check_choice, check_device, check_finite, check_int,
                                check_nonnegative, check_positive, check_real, module_dtype_device)
from ntk_theory.attacks import ModuleStateGuard, pgd
from ntk_theory.attacks import fgsm as _fgsm  # the argument ``fgsm`` of evaluate is a switch
from ntk_theory.io import Result, atomic_torch_save

__all__ = ["EvalResult", "evaluate", "FLAG_TOLERANCE", "on_device"]

#: |pgd_acc - reference_acc| above which a reference attack disagrees (2 points of accuracy).
FLAG_TOLERANCE = 0.02
_CKPT_VERSION = 1


@dataclass(frozen=True)
class EvalResult(Result):
    """Figures of :func:`evaluate` (accuracies are fractions of the ``n`` points in ``[0, 1]``).

    ``flags`` maps names to per-example ``BoolTensor`` s ``(n,)`` on the CPU: ``clean_correct``,
    ``fgsm_robust`` (when FGSM ran), ``pgd_robust`` (robust to every restart), ``pgd_robust/<r>``
    (restart ``r``), ``cross_check_robust``, ``autoattack_robust`` (when run), ``robust`` (the AND
    of all of them) and ``evaluated`` (True for every point of a finished evaluation).
    """

    clean_acc: float
    fgsm_acc: float | None
    pgd_acc: float
    robust_acc: float
    cross_check_acc: float | None
    cross_check_flagged: bool | None
    autoattack_acc: float | None
    autoattack_flagged: bool | None
    flagged: bool
    flags: dict = field(repr=False)
    attacks: tuple
    eps: float
    norm: str
    steps: int
    alpha: float
    restarts: int
    n: int
    batch_size: int
    seed: int
    device: str
    model_mode: str
    resumed_batches: int
    seconds: float
    note: str


# --------------------------------------------------------------------------------------------- helpers
def _seed_for(seed: int, batch: int, stream: int) -> int:
    """A 63-bit seed for (seed, batch, stream): numpy's SeedSequence hashing, so nearby triples give
    unrelated streams and a batch's randomness does not depend on the batches before it."""
    return int(np.random.SeedSequence([seed, batch, stream]).generate_state(1, np.uint64)[0]) >> 1


def _module_devices(model: nn.Module) -> set:
    return {t.device for t in list(model.parameters()) + list(model.buffers())}


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Move ``model`` to ``device`` for the body and back to its own device afterwards.

    A model with no parameters and no buffers is left alone (its inputs carry the device).
    ``ValueError`` naming ``model`` when its tensors sit on several devices (there is no single
    device to move it back to).
    """
    devs = _module_devices(model)
    if len(devs) > 1:
        raise ValueError(f"model: its parameters and buffers sit on several devices {sorted(map(str, devs))}; "
                         "move it to one device first")
    home = next(iter(devs)) if devs else None
    if home is None or home == device:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def _check_inputs(model, x, y, device):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module returning logits (N, C), got {type(model).__name__}")
    x = check_real(as_tensor(x, "x"), "x")
    if not x.is_floating_point():
        raise TypeError(f"x: expected floating-point inputs in [0, 1], got dtype {x.dtype}")
    y = as_tensor(y, "y")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y: expected integer class labels (N,), got dtype {y.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x: expected a non-empty batch (N, ...) with N >= 1, got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected labels of shape ({x.shape[0]},) to match x's first dimension, "
                         f"got {tuple(y.shape)}")
    check_finite(x, "x")
    xmin, xmax = float(x.min()), float(x.max())
    if xmin < 0.0 or xmax > 1.0:
        raise ValueError(f"x: inputs must lie in the attack box [0, 1]; got range [{xmin:g}, {xmax:g}] "
                         "(nothing is clipped: rescale the data first)")
    if int(y.min()) < 0:
        raise ValueError(f"y: labels must be >= 0, got minimum {int(y.min())}")
    dtype, _ = module_dtype_device(model)
    x = x.to(device=device, dtype=dtype if dtype is not None else x.dtype)
    return x, y.to(device=device, dtype=torch.long)


def _predict(model, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model: must return logits of shape (N, C) = ({x.shape[0]}, C), got {shape}")
    return out.argmax(dim=1)


def _torchattacks_pgd(model, x, y, *, eps, alpha, steps, norm, seed):
    """torchattacks' PGD (linf) or PGDL2 on a batch: the independent reference implementation.

    torchattacks draws its random start from torch's global RNG; it runs under ``fork_rng`` seeded
    with ``seed`` so the caller's RNG is untouched and the result is reproducible. Its loss is the
    batch *mean* cross-entropy, whose gradient is ours (the sum) divided by N: the signed (linf) and
    per-sample normalised (l2) steps are the same. ``set_model_training_mode(False)`` (its default)
    evaluates the model in eval mode, as we do.
    """
    try:
        import torchattacks
    except ImportError as exc:  # pragma: no cover - installed in the test extra
        raise ImportError("cross_check=True needs the optional package torchattacks "
                          "(pip install torchattacks)") from exc
    # torchattacks prints a notice when the model has no parameters to take a device from
    with contextlib.redirect_stdout(io.StringIO()):
        if norm == "linf":
            atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        else:
            atk = torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    atk.set_device(x.device)
    atk.set_model_training_mode(model_training=False)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return atk(x, y).detach()


def _autoattack(model, x, y, *, eps, norm, seed):
    """AutoAttack's standard ensemble (Croce & Hein 2020) on a batch; per-example robust flags."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:
        raise ImportError("autoattack=True needs the optional package pyautoattack "
                          "(pip install pyautoattack; it is in awt's test extra)") from exc
    aa = AutoAttack(model, eps=eps, norm="Linf" if norm == "linf" else "L2", version="standard",
                    device=x.device, seed=seed)
    aa.verbose = False
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        _, y_adv = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
    return y_adv.to(y.device) == y


def _flag_names(fgsm_on, restarts, cross_check, autoattack):
    names = ["clean_correct"] + (["fgsm_robust"] if fgsm_on else [])
    names += [f"pgd_robust/{r}" for r in range(restarts)] + ["pgd_robust"]
    names += (["cross_check_robust"] if cross_check else []) + (["autoattack_robust"] if autoattack else [])
    return names + ["robust", "evaluated"]


def _load_flags(flags, names, n):
    """Flags to resume from: a dict of ``(n,)`` BoolTensors, or the path of a checkpoint of :func:`evaluate`."""
    config = None
    if isinstance(flags, (str, os.PathLike)):
        state = torch.load(Path(flags), weights_only=False)
        if not isinstance(state, Mapping) or "flags" not in state:
            raise ValueError(f"flags: {os.fspath(flags)!r} is not a checkpoint written by evaluate")
        config, flags = state.get("config"), state["flags"]
    if not isinstance(flags, Mapping):
        raise TypeError(f"flags: expected None, a dict of per-example BoolTensors (EvalResult.flags) or a "
                        f"checkpoint path, got {type(flags).__name__}")
    missing = [k for k in names if k not in flags]
    if missing:
        raise ValueError(f"flags: missing {missing}; they must come from an evaluation with the same attacks "
                         f"(expected keys {names})")
    out = {}
    for k in names:
        v = as_tensor(flags[k], f"flags[{k!r}]")
        if v.dtype != torch.bool or tuple(v.shape) != (n,):
            raise ValueError(f"flags[{k!r}]: expected a BoolTensor of shape ({n},), got {v.dtype} {tuple(v.shape)}")
        out[k] = v.detach().cpu().clone()
    return out, config


# --------------------------------------------------------------------------------------------- evaluate
def evaluate(model: nn.Module, x, y, *, eps: float, norm: str = "linf", steps: int = 10, alpha: float | None = None,
             restarts: int = 1, fgsm: bool = True, batch_size: int = 256, device: Any = "auto",
             cross_check: bool = False, autoattack: bool = False, seed: int = 0, flags=None,
             checkpoint: str | os.PathLike | None = None, progress: bool = False) -> EvalResult:
    """Clean, FGSM and PGD-k robust accuracy of ``model`` on ``(x, y)``, worst case over every attack.

    Args:
        model: an ``nn.Module`` mapping ``(N, ...)`` inputs to logits ``(N, C)``; any module,
            parameter-free ones included. Evaluated in eval mode; its mode, buffers and device
            are restored afterwards.
        x: inputs ``(N, ...)``, real floating, in the attack box ``[0, 1]`` (checked, never clipped).
        y: integer labels ``(N,)`` in ``[0, C-1]``.
        eps: attack radius ``>= 0`` in the ``norm`` (``<= 1`` for linf, ``<= sqrt(d)`` for l2: a
            larger ball contains the box). ``eps = 0``: the feasible set is ``{x}``, no attack is
            run and every attack's flags equal the clean ones (``attacks == ()``, said in ``note``).
        norm: ``"linf"`` or ``"l2"``.
        steps: PGD steps ``>= 1``.
        alpha: PGD step size ``> 0``; default ``2.5 * eps / steps`` (Madry et al. 2018).
        restarts: PGD random restarts ``>= 1``; a point is PGD-robust when robust to all of them.
        fgsm: also run FGSM (linf) / FGM (l2).
        batch_size: points per minibatch ``>= 1``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        cross_check: also run torchattacks' PGD/PGDL2 with the same settings and flag a
            disagreement of more than 2 points with awt's PGD accuracy.
        autoattack: also run AutoAttack (standard version, via ``pyautoattack``); slow on CPU.
        seed: int ``>= 0`` seeding every random start (per batch and restart, module docstring).
        flags: resume from the flags of an earlier, possibly partial, evaluation with the same
            arguments: a dict like ``EvalResult.flags`` (with ``evaluated``) or a checkpoint path.
            Batches whose points are all ``evaluated`` are skipped.
        checkpoint: path of a checkpoint file written atomically after each batch; when it exists
            (and ``flags`` is None) the evaluation resumes from it, after checking that it was
            written with the same arguments and data.
        progress: show a tqdm bar over batches (silent off a terminal).

    Returns:
        :class:`EvalResult`.

    Raises:
        ValueError / TypeError naming the argument, before any attack, for: ``eps < 0`` or beyond the
        box, ``norm`` not in (linf, l2), ``steps``, ``restarts`` or ``batch_size`` < 1, ``alpha <= 0``,
        mismatching ``x``/``y`` shapes, non-finite ``x``, ``x`` outside ``[0, 1]``, labels outside
        ``[0, C-1]``, a model not returning ``(N, C)`` logits, ``device="cuda"`` without CUDA, a
        checkpoint of another evaluation. ImportError for ``autoattack=True`` without ``pyautoattack``.
    """
    t0 = time.perf_counter()
    dev = check_device(device, "device")
    eps = check_nonnegative(eps, "eps")
    check_choice(norm, "norm", ("linf", "l2"))
    steps = check_int(steps, "steps", minimum=1)
    restarts = check_int(restarts, "restarts", minimum=1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    fgsm_on = check_bool(fgsm, "fgsm")
    cross_check = check_bool(cross_check, "cross_check")
    autoattack = check_bool(autoattack, "autoattack")
    progress = check_bool(progress, "progress")
    alpha = 2.5 * eps / steps if alpha is None else check_positive(alpha, "alpha")
    x, y = _check_inputs(model, x, y, dev)
    n, d = x.shape[0], x[0].numel()
    limit = 1.0 if norm == "linf" else math.sqrt(d)
    if eps > limit:
        raise ValueError(f"eps: got {eps!r}, beyond the diameter of the box [0, 1]^d in {norm} ({limit:g}); "
                         "a ball that large contains the whole box (units mistake? e.g. 8 instead of 8/255)")
    if autoattack and eps > 0:
        try:
            import pyautoattack  # noqa: F401  (fail before any work)
        except ImportError as exc:
            raise ImportError("autoattack=True needs the optional package pyautoattack "
                              "(pip install pyautoattack; it is in awt's test extra)") from exc
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint: expected None or a file path, got {type(checkpoint).__name__}")

    attacking = eps > 0
    cc_on, aa_on = cross_check and attacking, autoattack and attacking
    names = _flag_names(fgsm_on and attacking, restarts if attacking else 0, cc_on, aa_on)
    config = {"version": _CKPT_VERSION, "eps": eps, "norm": norm, "steps": steps, "alpha": alpha,
              "restarts": restarts, "fgsm": fgsm_on, "cross_check": cc_on, "autoattack": aa_on, "seed": seed,
              "batch_size": batch_size, "n": n, "device": dev.type,
              "data": [float(x.double().sum()), float((x.double() ** 2).sum()), int(y.sum())]}
    if flags is None and checkpoint is not None and Path(checkpoint).exists():
        flags = checkpoint
    if flags is not None:
        state, saved = _load_flags(flags, names, n)
        if saved is not None and saved != config:
            diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            raise ValueError(f"flags: the checkpoint was written by an evaluation with other arguments or data "
                             f"(differs in {diff}); remove it or use the same arguments")
    else:
        state = {k: torch.zeros(n, dtype=torch.bool) for k in names}

    n_batches = math.ceil(n / batch_size)
    todo = [b for b in range(n_batches) if not bool(state["evaluated"][b * batch_size:(b + 1) * batch_size].all())]
    resumed = n_batches - len(todo)

    from tqdm.auto import tqdm

    with ModuleStateGuard(model), on_device(model, dev):
        model.eval()
        with torch.no_grad():  # the output shape and the label range, before any attack
            out = model(x[:1])
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model: must return logits of shape (N, C); for one input it returned {shape}")
        c = out.shape[1]
        if int(y.max()) >= c:
            raise ValueError(f"y: labels must lie in [0, {c - 1}] for a model with {c} outputs; "
                             f"got maximum {int(y.max())}")
        bar = tqdm(total=len(todo), desc="evaluate", unit="batch", disable=None if progress else True)
        try:
            for b in todo:
                sl = slice(b * batch_size, min(n, (b + 1) * batch_size))
                xb, yb = x[sl], y[sl]
                got = {"clean_correct": _predict(model, xb) == yb}
                if attacking:
                    if fgsm_on:
                        got["fgsm_robust"] = _predict(model, _fgsm(model, xb, yb, eps=eps, norm=norm)) == yb
                    for r in range(restarts):
                        xa = pgd(model, xb, yb, eps=eps, alpha=alpha, steps=steps, norm=norm,
                                 random_start=True, generator=_seed_for(seed, b, r))
                        got[f"pgd_robust/{r}"] = _predict(model, xa) == yb
                    got["pgd_robust"] = torch.stack([got[f"pgd_robust/{r}"] for r in range(restarts)]).all(0)
                    if cc_on:
                        xa = _torchattacks_pgd(model, xb, yb, eps=eps, alpha=alpha, steps=steps, norm=norm,
                                               seed=_seed_for(seed, b, restarts))
                        got["cross_check_robust"] = _predict(model, xa) == yb
                    if aa_on:
                        got["autoattack_robust"] = _autoattack(model, xb, yb, eps=eps, norm=norm,
                                                               seed=_seed_for(seed, b, restarts + 1) % (2 ** 31))
                robust = torch.stack(list(got.values())).all(0)  # the AND over every attack run
                got["robust"] = robust
                got["evaluated"] = torch.ones_like(robust)
                for k, v in got.items():
                    state[k][sl] = v.detach().cpu()
                if checkpoint is not None:
                    atomic_torch_save(checkpoint, {"config": config, "flags": state, "next_batch": b + 1})
                bar.update()
        finally:
            bar.close()

    def acc(k):
        return float(state[k].double().mean())

    clean_acc = acc("clean_correct")
    if attacking:
        fgsm_acc = acc("fgsm_robust") if fgsm_on else None
        pgd_acc = acc("pgd_robust")
        attacks = tuple(["fgsm" if norm == "linf" else "fgm"] if fgsm_on else []) + (f"pgd-{steps}x{restarts}",)
        attacks += (("torchattacks-pgd",) if cc_on else ()) + (("autoattack-standard",) if aa_on else ())
        note = ("attacks run with the model in eval mode; robust = robust to every attack run "
                "(clean, " + ", ".join(attacks) + ")")
    else:
        fgsm_acc = clean_acc if fgsm_on else None
        pgd_acc = clean_acc
        for k in ("fgsm_robust",) if fgsm_on else ():
            state[k] = state["clean_correct"].clone()
        state["pgd_robust"] = state["clean_correct"].clone()
        attacks = ()
        note = "eps = 0: the feasible set is {x}, so no attack was run; every robust figure equals the clean one"
    cc_acc = acc("cross_check_robust") if cc_on else (clean_acc if cross_check else None)
    aa_acc = acc("autoattack_robust") if aa_on else (clean_acc if autoattack else None)
    cc_flag = None if cc_acc is None else bool(abs(pgd_acc - cc_acc) > FLAG_TOLERANCE)
    aa_flag = None if aa_acc is None else bool(abs(pgd_acc - aa_acc) > FLAG_TOLERANCE)
    return EvalResult(clean_acc=clean_acc, fgsm_acc=fgsm_acc, pgd_acc=pgd_acc, robust_acc=acc("robust"),
                      cross_check_acc=cc_acc, cross_check_flagged=cc_flag, autoattack_acc=aa_acc,
                      autoattack_flagged=aa_flag, flagged=bool(cc_flag or aa_flag), flags=state, attacks=attacks,
                      eps=eps, norm=norm, steps=steps, alpha=float(alpha), restarts=restarts, n=n,
                      batch_size=batch_size, seed=seed, device=str(dev), model_mode="eval",
                      resumed_batches=resumed, seconds=time.perf_counter() - t0, note=note)


"""Kernel tracking: a network's empirical NTK and outputs on a fixed probe set during training.

The protocol to confirm an adversarial winning ticket (docs/theory.md §B.8) trains the ticket
adversarially with the dense network's schedule and follows, on a fixed **probe set** of clean
and adversarial points,

* its empirical NTK ``Θ̂_t(x, x') = Σ_p ∂f(x)/∂θ_p · ∂f(x')/∂θ_p`` (Jacot et al. 2018), computed
  by the one NTK of awt, :func:`ntk_theory.empirical.empirical_ntk` (structured path; ``mode="trace"``
  by default: ``(1/O) Σ_o Θ̂[:, :, o, o]``, an ``(N, N)`` matrix);
* its drift from its own initial kernel, the relative Frobenius distance of docs/theory.md §C
  (the quantity of Lee et al. 2019's lazy-training theorem, check C5)::

      kernel_distance_to_init = r(Θ̂_t, Θ̂_0) = ||Θ̂_t - Θ̂_0||_F / ||Θ̂_0||_F

* against a reference network (the dense run at the same epoch), with ``Θ̂_m`` the tracked
  (ticket's) kernel and ``Θ̂_d`` the reference's:

      kernel_distance          = 1 - <Θ̂_m, Θ̂_d>_F / (||Θ̂_m||_F ||Θ̂_d||_F)     (Tsilivis & Kempe 2022;
                                                                              ntk_theory.metrics.kernel_distance)
      kernel_alignment         = CKA(Θ̂_m, Θ̂_d) = <HΘ̂_mH, HΘ̂_dH>_F / (||HΘ̂_mH||_F ||HΘ̂_dH||_F)
                                                                             (Kornblith et al. 2019; metrics.cka)
      kernel_relative_distance = ||Θ̂_m - Θ̂_d||_F / ||Θ̂_d||_F   (the scale-sensitive form of §B.8's kernel term
                                                                 ||Θ̂_m - Θ̂_0||²_F: the cosine distance is blind to
                                                                 the q^k scaling of unrescaled masks, §B.7)
      output_gap               = ||f_m(X) - f_d(X)||_F / ||f_d(X)||_F    (empirical/report.py's definition)
      output_rms_gap           = ||f_m(X) - f_d(X)||_F / sqrt(N)         (§B.8's output term ||f_m - f_0||²/size,
                                                                          square-rooted)

Each is also given on the clean block (``.../clean``: the probe's clean points, ``Θ̂[:n_c, :n_c]``)
and the adversarial block (``.../adv``: ``Θ̂[n_c:, n_c:]``). Values are plain floats (JSON-ready);
a figure undefined on a block (CKA of a single point, a zero kernel) is ``None``.

The probe set (:class:`ProbeSet`) is drawn from the **test split**: the kernel is followed on
held-out points, which training does not fit directly, as in §B.8's "kernel distance and output
distance on held-out clean and adversarial points". Its adversarial points are PGD points
(Madry et al. 2018; :func:`ntk_theory.attacks.pgd`) against the *dense network at initialisation*,
so every run of a sweep is tracked on the same points.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ntk_theory import metrics
from ntk_theory._checks import cast_like_model, check_choice, check_device, check_int, check_nonnegative
from ntk_theory.attacks import ModuleStateGuard, pgd
from ntk_theory.empirical import empirical_ntk
from ntk_theory.io import Result

from .evaluate import on_device

__all__ = ["ProbeSet", "KernelTracker", "probe_record", "TRACK_MODES"]

TRACK_MODES = ("trace", "full")


# --------------------------------------------------------------------------------------------- probe set
@dataclass(frozen=True)
class ProbeSet(Result):
    """A fixed probe set: ``n_clean`` clean test points and ``n_adv`` PGD points of further test points.

    Fields: ``x_clean (n_clean, ...)``, ``y_clean``; ``x_adv (n_adv, ...)`` the PGD points against
    the dense network at initialisation, ``y_adv`` their labels, ``x_adv_origin`` the clean test
    points they were computed from (``||x_adv - x_adv_origin|| <= eps`` in ``norm``, both in
    ``[0, 1]``); ``idx_clean``, ``idx_adv`` their indices in the test split; the attack's ``eps``,
    ``norm``, ``steps``, ``alpha`` and ``seed``; ``split`` = ``"test"``; ``note``. Tensors on the CPU.
    """

    x_clean: torch.Tensor
    y_clean: torch.Tensor
    x_adv: torch.Tensor
    y_adv: torch.Tensor
    x_adv_origin: torch.Tensor
    idx_clean: torch.Tensor
    idx_adv: torch.Tensor
    eps: float
    norm: str
    steps: int
    alpha: float
    seed: int
    split: str
    note: str

    @property
    def x(self) -> torch.Tensor:
        """All probe points: ``cat(x_clean, x_adv)``, clean first."""
        return torch.cat([self.x_clean, self.x_adv])

    @property
    def y(self) -> torch.Tensor:
        return torch.cat([self.y_clean, self.y_adv])

    @property
    def n_clean(self) -> int:
        return int(self.x_clean.shape[0])

    @property
    def n_adv(self) -> int:
        return int(self.x_adv.shape[0])

    @classmethod
    def make(cls, dense_model: nn.Module, data, *, n_clean: int = 64, n_adv: int = 64, eps: float,
             steps: int = 10, norm: str = "linf", alpha: float | None = None, seed: int = 0,
             device: Any = "cpu") -> "ProbeSet":
        """Draw the probe set from ``data``'s test split and attack it with the dense network.

        ``n_clean + n_adv`` distinct test indices are drawn by a seeded permutation
        (``torch.randperm`` with a generator seeded by ``seed``); the first ``n_clean`` are the clean
        points, the next ``n_adv`` are attacked with PGD-``steps`` (random start from the same seed)
        against ``dense_model`` in eval mode (its mode, buffers and device are restored). ``eps = 0``
        gives adversarial points equal to their clean origins (no attack is run; ``note`` says so).

        Args:
            dense_model: the dense network at initialisation (any ``nn.Module`` returning logits).
            data: an :class:`empirical.data.Dataset` or any object with tensors ``x_test`` (in
                ``[0, 1]``) and ``y_test``.
            n_clean: clean points ``>= 1``. n_adv: adversarial points ``>= 0``.
            eps, steps, norm, alpha: the attack (:func:`ntk_theory.attacks.pgd`); ``steps >= 1``.
            seed: int ``>= 0``. device: where the attack runs.
        """
        if not isinstance(dense_model, nn.Module):
            raise TypeError(f"dense_model: expected an nn.Module, got {type(dense_model).__name__}")
        for attr in ("x_test", "y_test"):
            if not isinstance(getattr(data, attr, None), torch.Tensor):
                raise TypeError(f"data: expected a Dataset-like object with tensors x_test and y_test, "
                                f"got {type(data).__name__} without a tensor {attr!r}")
        n_clean = check_int(n_clean, "n_clean", minimum=1)
        n_adv = check_int(n_adv, "n_adv", minimum=0)
        eps = check_nonnegative(eps, "eps")
        steps = check_int(steps, "steps", minimum=1)
        check_choice(norm, "norm", ("linf", "l2"))
        seed = check_int(seed, "seed", minimum=0)
        dev = check_device(device, "device")
        x_all, y_all = data.x_test, data.y_test
        n_test = int(x_all.shape[0])
        if y_all.shape[:1] != x_all.shape[:1]:
            raise ValueError(f"data: y_test has shape {tuple(y_all.shape)}, x_test {tuple(x_all.shape)}")
        if n_clean + n_adv > n_test:
            raise ValueError(f"n_clean, n_adv: n_clean + n_adv = {n_clean + n_adv} exceeds the {n_test} test points")
        perm = torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))
        idx_c, idx_a = perm[:n_clean], perm[n_clean:n_clean + n_adv]
        x_c, y_c = x_all[idx_c].detach().cpu().clone(), y_all[idx_c].detach().cpu().clone()
        x_o, y_a = x_all[idx_a].detach().cpu().clone(), y_all[idx_a].detach().cpu().clone()
        if alpha is None:
            alpha = 2.5 * eps / steps
        if eps == 0.0 or n_adv == 0:
            x_a = x_o.clone()
            note = ("eps = 0: no attack was run, the adversarial points equal their clean origins"
                    if eps == 0.0 else "no adversarial points (n_adv = 0)")
        else:
            with ModuleStateGuard(dense_model), on_device(dense_model, dev):
                dense_model.eval()
                x_a = pgd(dense_model, x_o.to(dev), y_a.to(dev), eps=eps, alpha=alpha, steps=steps, norm=norm,
                          random_start=True, generator=seed).detach().cpu().to(x_o.dtype)
            note = (f"test split; adversarial points: PGD-{steps} ({norm}, eps={eps:g}, alpha={alpha:g}, random start, "
                    f"seed {seed}) against the dense network at init in eval mode")
        return cls(x_clean=x_c, y_clean=y_c, x_adv=x_a, y_adv=y_a, x_adv_origin=x_o, idx_clean=idx_c,
                   idx_adv=idx_a, eps=eps, norm=norm, steps=steps, alpha=float(alpha), seed=seed, split="test",
                   note=note)


# --------------------------------------------------------------------------------------------- kernels
def _model_device(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def probe_record(probe: ProbeSet, model: nn.Module, *, mode: str = "trace", block_size: int | None = None,
                 device: Any = "cpu") -> dict[str, torch.Tensor]:
    """``{"kernel": Θ̂(X, X), "outputs": f(X)}`` of ``model`` on ``probe.x``, float64 on the CPU.

    The model runs in eval mode (mode and buffers restored, nothing of it changed); a model on
    another device than ``device`` is evaluated through a copy moved there. ``kernel`` is
    ``(N, N)`` for ``mode="trace"`` and ``(N, N, O, O)`` for ``mode="full"``; ``outputs`` ``(N, O)``.
    A reference computed once with this function can be given to :class:`KernelTracker`.
    """
    if not isinstance(probe, ProbeSet):
        raise TypeError(f"probe: expected an empirical.tracking.ProbeSet, got {type(probe).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_choice(mode, "mode", TRACK_MODES)
    dev = check_device(device, "device")
    home = _model_device(model)
    net = model if home is None or home == dev else copy.deepcopy(model).to(dev)
    x = probe.x.to(dev)
    with ModuleStateGuard(net):
        net.eval()
        k = empirical_ntk(net, x, mode=mode, block_size=block_size)
        with torch.no_grad():
            f = net(cast_like_model(x, "probe.x", net))
    return {"kernel": k.detach().to("cpu", torch.float64),
            "outputs": f.detach().reshape(f.shape[0], -1).to("cpu", torch.float64)}


def _blocks(probe: ProbeSet):
    nc, n = probe.n_clean, probe.n_clean + probe.n_adv
    out = [("", slice(0, n)), ("/clean", slice(0, nc))]
    if probe.n_adv:
        out.append(("/adv", slice(nc, n)))
    return out


def _safe(fn, *args) -> float | None:
    try:
        v = float(fn(*args))
    except ValueError:  # the metric is undefined here (a zero kernel, a centred kernel of one point)
        return None
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------------------------- tracker
class KernelTracker:
    """``track(epoch, model) -> dict`` for :func:`empirical.train.adversarial_train` (module docstring).

    Args:
        probe: the :class:`ProbeSet`.
        reference: ``None`` (own drift only); an ``nn.Module`` (the dense network at the same
            epoch); a callable ``epoch -> nn.Module``; a record ``{"kernel", "outputs"}`` of
            :func:`probe_record` (a fixed reference); or a mapping ``epoch -> record``.
        mode: ``"trace"`` (default, ``(N, N)`` kernels) or ``"full"`` (``(N, N, O, O)``).
        every: track epochs that are multiples of ``every`` (epoch 0, the initialisation, always);
            other epochs return ``{}``.
        block_size: forwarded to :func:`~ntk_theory.empirical.empirical_ntk` (bounded memory).
        device: where the kernels are computed.

    ``last_record`` holds the :func:`probe_record` of the last tracked call: a dense run can store it
    per epoch, and a ticket run can then take ``reference={epoch: record}`` (or a callable returning
    a record) instead of recomputing the dense kernel from saved weights.

    Cost (``mode="trace"``, ``N`` probe points, widths ``n_l``): one structured NTK per tracked model,
    about ``Σ_l N² (O n_l + n_{l-1})`` multiply-adds for a dense MLP; a masked layer adds
    ``N² n_l n_{l-1}`` (the sub-network kernel needs ``Σ_ij m_ij² h_j h'_j`` for every pair, see
    :mod:`ntk_theory.empirical`), which dominates for wide masked layers. A module ``reference``
    costs a second kernel per call. ``every`` spreads the cost.

    The first call at epoch 0 keeps the model's kernel as its initial kernel; without it (a
    tracker first called later) ``kernel_distance_to_init`` is left out. :meth:`state_dict` /
    :meth:`load_state_dict` carry that kernel through a checkpoint (``adversarial_train`` saves
    and restores them), so a resumed run still reports its drift. The model's train/eval flags,
    buffers, ``requires_grad`` flags and ``.grad`` are unchanged by a call.
    """

    def __init__(self, probe: ProbeSet, reference=None, *, mode: str = "trace", every: int = 1,
                 block_size: int | None = None, device: Any = "cpu"):
        if not isinstance(probe, ProbeSet):
            raise TypeError(f"probe: expected an empirical.tracking.ProbeSet, got {type(probe).__name__}")
        check_choice(mode, "mode", TRACK_MODES)
        if not (reference is None or isinstance(reference, (nn.Module, Mapping)) or callable(reference)):
            raise TypeError(f"reference: expected None, an nn.Module, a callable epoch -> module, or a "
                            f"probe_record dict (or epoch -> record), got {type(reference).__name__}")
        if isinstance(reference, Mapping) and {"kernel", "outputs"} <= set(reference):
            reference = self._check_record(dict(reference), probe, mode, "reference")
        self.probe, self.reference, self.mode = probe, reference, mode
        self.every = check_int(every, "every", minimum=1)
        self.block_size = None if block_size is None else check_int(block_size, "block_size", minimum=1)
        self.device = check_device(device, "device")
        self.init_kernel: torch.Tensor | None = None
        self.last_record: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict:
        """``{"init_kernel": Θ̂_0 or None, "mode": mode, "n": probe size}`` (for checkpoints)."""
        return {"init_kernel": self.init_kernel, "mode": self.mode, "n": self.probe.n_clean + self.probe.n_adv}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` naming ``state`` if it is another probe's or mode's."""
        if not isinstance(state, Mapping) or "init_kernel" not in state:
            raise TypeError(f"state: expected a KernelTracker.state_dict(), got {type(state).__name__}")
        n = self.probe.n_clean + self.probe.n_adv
        if state.get("mode") != self.mode or state.get("n") != n:
            raise ValueError(f"state: written for mode={state.get('mode')!r} and {state.get('n')} probe points, "
                             f"this tracker has mode={self.mode!r} and {n}")
        k = state["init_kernel"]
        self.init_kernel = None if k is None else k.detach().to("cpu", torch.float64)

    @staticmethod
    def _check_record(rec, probe, mode, name):
        k, f = rec.get("kernel"), rec.get("outputs")
        n = probe.n_clean + probe.n_adv
        if not isinstance(k, torch.Tensor) or not isinstance(f, torch.Tensor):
            raise TypeError(f"{name}: a record needs tensors 'kernel' and 'outputs'")
        want = 2 if mode == "trace" else 4
        if k.dim() != want or k.shape[0] != n or k.shape[1] != n:
            raise ValueError(f"{name}: kernel of shape {tuple(k.shape)} does not fit the probe of {n} points in "
                             f"mode {mode!r} (expected {'(N, N)' if want == 2 else '(N, N, O, O)'})")
        if f.shape[0] != n:
            raise ValueError(f"{name}: outputs of shape {tuple(f.shape)} do not fit the probe of {n} points")
        return {"kernel": k.detach().to("cpu", torch.float64),
                "outputs": f.detach().reshape(n, -1).to("cpu", torch.float64)}

    def _reference(self, epoch: int):
        ref = self.reference
        if ref is None:
            return None
        if isinstance(ref, nn.Module):
            return self._record(ref)
        if isinstance(ref, Mapping):
            if "kernel" in ref:
                return ref
            if epoch not in ref:
                return None
            return self._check_record(dict(ref[epoch]), self.probe, self.mode, f"reference[{epoch}]")
        got = ref(epoch)
        if got is None:
            return None
        if isinstance(got, nn.Module):
            return self._record(got)
        return self._check_record(dict(got), self.probe, self.mode, f"reference({epoch})")

    def _record(self, model):
        return probe_record(self.probe, model, mode=self.mode, block_size=self.block_size, device=self.device)

    def __call__(self, epoch: int, model: nn.Module) -> dict[str, float | None]:
        epoch = check_int(epoch, "epoch", minimum=0)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if epoch % self.every != 0 and epoch != 0:
            return {}
        rec = self._record(model)
        self.last_record = rec
        k, f = rec["kernel"], rec["outputs"]
        if epoch == 0:
            self.init_kernel = k
        out: dict[str, float | None] = {"kernel_norm": float(torch.linalg.vector_norm(k))}
        blocks = _blocks(self.probe)
        if self.init_kernel is not None:
            for suf, s in blocks:
                out["kernel_distance_to_init" + suf] = _safe(metrics.relative_frobenius, k[s, s],
                                                             self.init_kernel[s, s])
        ref = self._reference(epoch)
        if ref is not None:
            kr, fr = ref["kernel"], ref["outputs"]
            if fr.shape != f.shape or kr.shape != k.shape:
                raise ValueError(f"reference: outputs {tuple(fr.shape)} / kernel {tuple(kr.shape)} do not match "
                                 f"the model's {tuple(f.shape)} / {tuple(k.shape)}")
            for suf, s in blocks:
                km, kd = k[s, s], kr[s, s]
                out["kernel_distance" + suf] = _safe(metrics.kernel_distance, km, kd)
                out["kernel_alignment" + suf] = _safe(metrics.cka, km, kd)
                out["kernel_relative_distance" + suf] = _safe(metrics.relative_frobenius, km, kd)
                out["output_gap" + suf] = _safe(metrics.relative_frobenius, f[s], fr[s])
                out["output_rms_gap" + suf] = float(torch.linalg.vector_norm(f[s] - fr[s]) / math.sqrt(f[s].shape[0]))
        return out

"""Sweeps of Adversarial-Winning-Ticket runs: configuration -> runs -> files (``awt experiment``).

A sweep is the Cartesian product of its axes (dataset, model, method, density, seed, eps). One *run*
is a pure function of its :class:`RunSpec`:

1. **search** the ticket at the dense initialisation of the run's seed
   (:func:`empirical.tickets.find_ticket`);
2. **train** it adversarially (Madry PGD-AT, :func:`empirical.train.adversarial_train`) from the
   ticket's initial weights with the dense network's schedule (same epochs, optimiser, learning rate,
   batch order seed);
3. **evaluate** it (:func:`empirical.evaluate.evaluate`: clean, FGSM, PGD-k with restarts and the
   torchattacks cross-check);
4. **track** its empirical NTK and outputs on a fixed probe set of clean and adversarial points
   (:mod:`empirical.tracking`) against the dense run of the same seed, epoch by epoch:
   ``d_Theta(t) = kernel_distance(Theta_ticket,t, Theta_dense,t)`` (docs/theory.md §B.8) and the output gap
   ``||f_ticket,t(x~) - f_dense,t(x~)|| / ||f_dense,t(x~)||``.

The dense run of each (dataset, model, eps, seed, training settings) is a run of its own
(``method="dense"``, ``density=1``) done once and shared by every ticket of that seed: it writes the
probe set and its per-epoch probe records (kernel and outputs), which the tickets' trackers compare against.

Files (DESIGN.md "Scale-out"): every run lives in a content-addressed folder
``runs/<method>-d<density>-<hash>/seed-<seed>/`` where ``<hash>`` is a SHA-256 of the run's
configuration *without* the seed (:meth:`RunSpec.key`), so that adding a density or a seed to a sweep
reuses every finished run. Each run writes an atomic ``status.json`` (state, phase, epoch), its
training checkpoints (``checkpoint/``, RNG state included, written by ``adversarial_train``), its
ticket (``ticket.pt``) once searched, and finally ``result.json`` (atomic): a run with a
``result.json`` is finished and is skipped on a re-run; one without is resumed from its checkpoint,
so a killed sweep loses at most one epoch of one run. Results are gathered by scanning run folders
(:func:`gather`). Executors (:mod:`empirical.executors`) only decide *where* a run executes; every
one of them gives the same files and numbers for the same seeds on CPU.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ntk_theory.io import Result, atomic_torch_save, atomic_write_json, to_jsonable

__all__ = [
    "ConfigError", "ExperimentConfig", "RunSpec", "PRESETS", "preset", "plan", "run_dir", "dense_spec",
    "execute", "run_one", "gather", "run_experiment", "ExperimentResult", "validate",
]

NORMS = ("linf", "l2")
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("ce", "mse")
SCOPES = ("layerwise", "global")
PARAMETERIZATIONS = ("ntk", "standard")
TRACK_MODES = ("trace", "full", "diagonal")


class ConfigError(ValueError):
    """A sweep configuration that cannot run (unknown name, out-of-range value, unknown key,
    missing data): raised before any run starts and before anything is written."""


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExperimentConfig(Result):
    """One sweep. Axes (tuples) span the runs; everything else is shared by all of them.

    Axes: ``datasets``, ``models``, ``methods`` (``"dense"`` plus any of
    :func:`empirical.tickets.methods`), ``densities`` (each in (0, 1]; the dense run ignores it),
    ``seeds``, ``eps`` (attack radii, each >= 0; ``0`` is standard training).

    Shared: data (``n_train``/``n_test`` for a stratified subset, ``data_seed`` for its draw,
    ``data_root`` for files), model (``parameterization``, ``model_options[model]`` keyword
    arguments for :func:`empirical.models.build`), ticket search (``scope``, ``skip_first``,
    ``hparams[method]`` keyword arguments for ``find_ticket``), attack (``norm``, ``steps``,
    ``alpha``), training (``epochs``, ``batch_size``, ``optimizer``, ``lr``, ``momentum``,
    ``weight_decay``, ``schedule``, ``loss``), evaluation (``eval_steps`` and ``eval_restarts`` of
    PGD, ``n_eval`` test points, ``cross_check``), tracking (``probe_clean``, ``probe_adv`` points,
    ``track_mode`` of the kernel), and ``device`` (``"auto"``/``"cpu"``/``"cuda"``; not part of a
    run's identity).
    """

    datasets: tuple[str, ...] = ("digits",)
    models: tuple[str, ...] = ("mlp",)
    methods: tuple[str, ...] = ("dense", "awt", "random", "magnitude", "snip", "hydra")
    densities: tuple[float, ...] = (0.5, 0.2, 0.1, 0.05)
    seeds: tuple[int, ...] = (0, 1, 2)
    eps: tuple[float, ...] = (0.1,)
    # data
    n_train: int | None = None
    n_test: int | None = None
    data_seed: int = 0
    data_root: str | None = None
    # model
    parameterization: str = "ntk"
    model_options: dict = field(default_factory=dict)
    # ticket search
    scope: str = "layerwise"
    skip_first: bool = True
    hparams: dict = field(default_factory=dict)
    # attack (training)
    norm: str = "linf"
    steps: int = 10
    alpha: float | None = None
    # training (SGD in the NTK parameterisation needs learning rates of order one: 5 epochs of PGD-10 AT
    # of the digits MLP reach PGD accuracy 0.65 / 0.74 / 0.77 at lr 0.5 / 2 / 5; the whole default
    # sweep takes 5.5 min on one core of this project's machine)
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str | None = None
    loss: str = "ce"
    # evaluation
    eval_steps: int | None = None
    eval_restarts: int = 1
    n_eval: int | None = None
    cross_check: bool = True
    # tracking
    probe_clean: int = 64
    probe_adv: int = 64
    track_mode: str = "trace"
    # execution (not part of a run's identity)
    device: str = "cpu"

    AXES = ("datasets", "models", "methods", "densities", "seeds", "eps")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base: "ExperimentConfig | None" = None) -> "ExperimentConfig":
        """``base`` (default: the defaults) with the entries of ``d`` replaced; an unknown key is a
        :class:`ConfigError` naming it and the accepted keys (a typo is an error, not ignored)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"config: expected a table of settings, got {type(d).__name__}")
        known = cls.keys()
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"config: unknown key(s) {', '.join(map(repr, unknown))}; accepted keys: "
                              f"{', '.join(known)}")
        base = base or cls()
        return dataclasses.replace(base, **{k: _normalise(k, v) for k, v in d.items()})

    def replace(self, **changes) -> "ExperimentConfig":
        return self.from_dict(changes, base=self)


def _normalise(key: str, value: Any) -> Any:
    """Coerce TOML / CLI values into the field's form (tuples for axes, plain dicts for tables)."""
    if key in ExperimentConfig.AXES:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config: {key} must be a list, got {value!r}")
        return tuple(value)
    if key in ("model_options", "hparams"):
        if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
            raise ConfigError(f"config: {key} must be a table of tables ({key}.<name> = {{...}}), got {value!r}")
        return {str(k): {str(a): (tuple(b) if isinstance(b, list) else b) for a, b in v.items()}
                for k, v in value.items()}
    return value


#: Hyper-parameters a sweep gives a method unless its ``hparams`` say otherwise: the random baseline
#: with the 1/sqrt(q) rescaling (docs/theory.md §B.7), the stronger of the two (without it the kernel of a
#: 5 %-dense ticket of the digits MLP is 60x smaller than the dense one and it trains to PGD accuracy
#: 0.10 in the default sweep; set ``hparams.random.rescale = false`` for that variant).
DEFAULT_HPARAMS: dict[str, dict] = {"random": {"rescale": True}}


def method_hparams(config: "ExperimentConfig", method: str) -> dict:
    """``DEFAULT_HPARAMS[method]`` updated with the sweep's ``hparams[method]``."""
    return {**DEFAULT_HPARAMS.get(method, {}), **dict(config.hparams.get(method, {}))}


def _preset_default() -> ExperimentConfig:
    # Sized for the budget (the whole default sweep in at most 10 minutes on 2 CPU cores;
    # measured: 63 runs in 330 s, one thread, README "Experiments"): digits, the 64-512-512-10 MLP.
    return ExperimentConfig()


def _preset_mnist() -> ExperimentConfig:
    # Adam 3e-3: SGD at the digits MLP's lr 2.0 collapses LeNet-300-100 on MNIST at eps 0.1 (constant
    # predictor, accuracy 0.114); SGD 0.1-1.0 reaches PGD accuracy 0.00-0.19 in 3 epochs, Adam 1e-3 0.11,
    # Adam 3e-3 0.44 (500 test points, seed 0)
    return ExperimentConfig(
        datasets=("mnist",), models=("lenet300_100",),
        methods=("dense", "awt", "random", "magnitude", "snip", "grasp", "synflow", "adv_imp", "hydra"),
        densities=(0.2, 0.1, 0.05, 0.02), seeds=(0, 1, 2), eps=(0.1,), epochs=6, optimizer="adam", lr=3e-3,
        data_root=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"),
    )


PRESETS: dict[str, Callable[[], ExperimentConfig]] = {"default": _preset_default, "mnist": _preset_mnist}


def preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------
_SHARED = ("n_train", "n_test", "data_seed", "parameterization", "norm", "steps", "alpha", "epochs",
           "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule", "loss", "eval_steps",
           "eval_restarts", "n_eval", "cross_check", "probe_clean", "probe_adv", "track_mode")


@dataclass(frozen=True)
class RunSpec(Result):
    """One run: (dataset, model, method, density, seed, eps) and the shared settings it uses.

    ``settings`` holds the shared training / evaluation / tracking settings, ``model_options`` and
    ``hparams`` only this run's model's and method's entries, so that two sweeps that differ in an
    unrelated method's hyper-parameters share runs. ``data_root`` and ``device`` say where to find
    the data and where to compute; they are not part of the run's identity (:meth:`key`).
    """

    dataset: str
    model: str
    method: str
    density: float
    seed: int
    eps: float
    settings: dict
    model_options: dict
    hparams: dict
    scope: str = "layerwise"
    skip_first: bool = True
    data_root: str | None = None
    device: str = "cpu"

    def identity(self, *, with_seed: bool = True) -> dict:
        d = {"dataset": self.dataset, "model": self.model, "method": self.method,
             "density": float(self.density), "eps": float(self.eps), "settings": self.settings,
             "model_options": self.model_options, "hparams": self.hparams}
        if self.method != "dense":
            d.update(scope=self.scope, skip_first=self.skip_first)
        if with_seed:
            d["seed"] = int(self.seed)
        return to_jsonable(d)

    def key(self) -> str:
        """SHA-256 (first 12 hex digits) of the canonical JSON of the run without its seed."""
        text = json.dumps(self.identity(with_seed=False), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def folder(self) -> str:
        """``<method>-d<density>-<key>/seed-<seed>``, relative to ``<out>/runs``."""
        return f"{self.method}-d{self.density:g}-{self.key()}/seed-{self.seed}"

    def label(self) -> str:
        return (f"{self.dataset}/{self.model} {self.method} d={self.density:g} eps={self.eps:g} "
                f"seed={self.seed}")


def dense_spec(spec: RunSpec) -> RunSpec:
    """The dense run that ``spec`` is tracked against: same data, model, eps, seed and settings."""
    return dataclasses.replace(spec, method="dense", density=1.0, hparams={}, scope="layerwise",
                               skip_first=True)


def plan(config: ExperimentConfig) -> list[RunSpec]:
    """Every run of the sweep, dense runs first (one per dataset, model, eps, seed), each once."""
    shared = {k: getattr(config, k) for k in _SHARED}
    dense, tickets = [], []
    for dataset in config.datasets:
        for model in config.models:
            mopts = dict(config.model_options.get(model, {}))
            for eps in config.eps:
                for method in config.methods:
                    densities = (1.0,) if method == "dense" else config.densities
                    for density in densities:
                        for seed in config.seeds:
                            spec = RunSpec(
                                dataset=dataset, model=model, method=method, density=float(density),
                                seed=int(seed), eps=float(eps), settings=dict(shared), model_options=mopts,
                                hparams=method_hparams(config, method) if method != "dense" else {},
                                scope=config.scope, skip_first=config.skip_first,
                                data_root=config.data_root, device=config.device)
                            (dense if method == "dense" else tickets).append(spec)
    if tickets:                       # every ticket needs its dense reference, asked for or not
        have = {s.folder() for s in dense}
        for t in tickets:
            d = dense_spec(t)
            if d.folder() not in have:
                have.add(d.folder())
                dense.append(d)
    return dense + tickets


def run_dir(out: str | os.PathLike, spec: RunSpec) -> Path:
    return Path(out) / "runs" / spec.folder()


# ----------------------------------------------------------------------------------------------
# validation (before anything runs or is written)
# ----------------------------------------------------------------------------------------------
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(config: ExperimentConfig, *, deep: bool = True) -> ExperimentConfig:
    """Raise :class:`ConfigError` (one line naming the setting, the value and what is accepted) for
    anything that would make a run fail on its inputs. With ``deep`` it also loads every dataset
    (so a data root without files fails here), builds every model and asks the ticket package for the
    methods it has and the hyper-parameters each accepts."""
    c = config
    for axis in ExperimentConfig.AXES:
        _check(len(getattr(c, axis)) > 0, f"{axis}: must not be empty")
        vals = getattr(c, axis)
        _check(len(set(vals)) == len(vals), f"{axis}: repeated entries in {list(vals)}")
    for d in c.densities:
        _check(_is_num(d) and 0 < d <= 1, f"densities: {d!r} is outside (0, 1]")
    for e in c.eps:
        _check(_is_num(e) and e >= 0, f"eps: {e!r} must be a finite number >= 0")
    for s in c.seeds:
        _check(_is_int(s) and s >= 0, f"seeds: {s!r} must be an integer >= 0")
    for name in ("datasets", "models", "methods"):
        for v in getattr(c, name):
            _check(isinstance(v, str) and v, f"{name}: {v!r} must be a name")
    _check(c.norm in NORMS, f"norm: {c.norm!r} is not one of {', '.join(NORMS)}")
    _check(c.optimizer in OPTIMIZERS, f"optimizer: {c.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    _check(c.loss in LOSSES, f"loss: {c.loss!r} is not one of {', '.join(LOSSES)}")
    _check(c.scope in SCOPES, f"scope: {c.scope!r} is not one of {', '.join(SCOPES)}")
    _check(c.parameterization in PARAMETERIZATIONS,
           f"parameterization: {c.parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")
    _check(c.track_mode in TRACK_MODES, f"track_mode: {c.track_mode!r} is not one of {', '.join(TRACK_MODES)}")
    _check(isinstance(c.skip_first, bool), f"skip_first: {c.skip_first!r} must be true or false")
    _check(isinstance(c.cross_check, bool), f"cross_check: {c.cross_check!r} must be true or false")
    for name, minimum in (("steps", 0), ("epochs", 1), ("batch_size", 1), ("eval_restarts", 1),
                          ("probe_clean", 1), ("probe_adv", 0), ("data_seed", 0)):
        v = getattr(c, name)
        _check(_is_int(v) and v >= minimum, f"{name}: {v!r} must be an integer >= {minimum}")
    for name in ("n_train", "n_test", "n_eval", "eval_steps"):
        v = getattr(c, name)
        _check(v is None or (_is_int(v) and v >= (0 if name == "eval_steps" else 1)),
               f"{name}: {v!r} must be a positive integer or unset")
    _check(_is_num(c.lr) and c.lr > 0, f"lr: {c.lr!r} must be a finite number > 0")
    _check(c.alpha is None or (_is_num(c.alpha) and c.alpha > 0), f"alpha: {c.alpha!r} must be > 0 or unset")
    _check(_is_num(c.momentum) and 0 <= c.momentum < 1, f"momentum: {c.momentum!r} must be in [0, 1)")
    _check(_is_num(c.weight_decay) and c.weight_decay >= 0, f"weight_decay: {c.weight_decay!r} must be >= 0")
    _check(c.schedule is None or isinstance(c.schedule, str), f"schedule: {c.schedule!r} must be a name or unset")
    _check(c.device in ("auto", "cpu", "cuda") or str(c.device).startswith("cuda:"),
           f"device: {c.device!r} is not one of auto, cpu, cuda")
    for m in c.hparams:
        _check(m in c.methods, f"hparams: {m!r} is not one of this sweep's methods ({', '.join(c.methods)})")
    for m in c.model_options:
        _check(m in c.models, f"model_options: {m!r} is not one of this sweep's models ({', '.join(c.models)})")
    if c.data_root is not None:
        _check(isinstance(c.data_root, str), f"data_root: {c.data_root!r} must be a path")
        _check(Path(c.data_root).expanduser().is_dir(), f"data_root: {c.data_root!r} is not a folder")
    if deep:
        _validate_deep(c)
    return c


#: the modules a run is made of; ``awt experiment`` refuses to start (exit 2) while one is missing
COMPONENTS = ("data", "models", "train", "evaluate", "tracking", "tickets")


def _require_components() -> None:
    """One clear line, before any run, when a module a run needs cannot be imported (e.g. not built yet)."""
    import importlib

    missing = []
    for name in COMPONENTS:
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ImportError as exc:
            missing.append(f"empirical.{name} ({_one_line(exc)})")
    if missing:
        raise ConfigError("awt experiment needs modules that cannot be imported: " + "; ".join(missing))


def _validate_deep(c: ExperimentConfig) -> None:
    from ntk_theory._checks import check_device

    try:
        check_device(c.device, "device")
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    _require_components()
    from . import models as models_mod

    shapes = {}
    for name in c.datasets:
        try:
            ds = _load_data(name, c.data_root, c.n_train, c.n_test, c.data_seed)
        except (ValueError, TypeError, FileNotFoundError, OSError) as exc:
            raise ConfigError(f"datasets: {name!r}: {_one_line(exc)}") from None
        shapes[name] = (tuple(ds.input_shape), int(ds.num_classes))
    for model in c.models:
        for name, (shape, k) in shapes.items():
            try:
                models_mod.build(model, in_shape=shape, num_classes=k, parameterization=c.parameterization,
                                 seed=0, **c.model_options.get(model, {}))
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"models: {model!r} on {name!r}: {_one_line(exc)}") from None
    ticket_methods = [m for m in c.methods if m != "dense"]
    if ticket_methods:
        from . import tickets

        known = list(tickets.methods())
        for m in ticket_methods:
            _check(m in known, f"methods: {m!r} is not one of dense, {', '.join(known)}")
        check = getattr(tickets, "check_hparams", None)
        for m in ticket_methods:
            hp = method_hparams(c, m)
            if check is not None:
                try:
                    check(m, **hp)
                except (ValueError, TypeError) as exc:
                    raise ConfigError(f"hparams.{m}: {_one_line(exc)}") from None
            else:
                _check_hparams_by_signature(tickets, m, hp)


def _check_hparams_by_signature(tickets, method: str, hp: Mapping[str, Any]) -> None:
    """Unknown hyper-parameter names through the method's search function's signature, where the
    ticket package exposes one (``tickets.get(method)`` or ``tickets.method(method)``)."""
    import inspect

    if not hp:
        return
    getter = getattr(tickets, "get", None) or getattr(tickets, "get_method", None)
    if getter is None:
        return
    try:
        entry = getter(method)
    except Exception:  # noqa: BLE001 - only used to find a signature
        return
    fn = getattr(entry, "search", None) or getattr(entry, "find", None) or entry
    if not callable(fn):
        return
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    bad = sorted(set(hp) - set(sig.parameters))
    _check(not bad, f"hparams.{method}: unknown hyper-parameter(s) {', '.join(bad)}; accepted: "
                    f"{', '.join(p for p in sig.parameters if sig.parameters[p].kind is inspect.Parameter.KEYWORD_ONLY)}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ----------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------
PHASES = ("data", "search", "train", "evaluate", "write")


def _status(rdir: Path, spec: RunSpec, state: str, **extra) -> None:
    atomic_write_json(rdir / "status.json", {
        "state": state, "run": spec.label(), "key": spec.key(), "seed": spec.seed,
        "updated": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **extra})


def _read_json(rdir: str | os.PathLike, name: str) -> dict | None:
    """``rdir/name`` parsed, or ``None`` while it does not exist (files are written atomically, so a file
    that exists is whole; an unparsable one counts as absent)."""
    try:
        return json.loads((Path(rdir) / name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_status(rdir: str | os.PathLike) -> dict | None:
    return _read_json(rdir, "status.json")


def read_result(rdir: str | os.PathLike) -> dict | None:
    return _read_json(rdir, "result.json")


RunFn = Callable[..., Mapping[str, Any]]


def execute(spec: RunSpec, out: str, *, run_fn: RunFn | None = None, progress: bool = False,
            threads: int | None = 1) -> dict:
    """Run ``spec`` in its folder under ``out`` unless it is finished; return its record.

    This is what every executor calls (a module-level function, so that Ray and submitit can ship
    it). It owns the run's bookkeeping: ``config.json`` and ``status.json`` (``running`` with the
    current phase, ``done`` or ``failed`` with the error), and the atomic ``result.json``, the file
    that marks a run finished. ``run_fn(spec, run_dir, dense_dir=..., progress=..., status=...)``
    does the work and returns the record (default :func:`run_one`); tests inject a small one here.
    ``threads`` fixes torch's intra-op threads for the run, so that a run's numbers do not depend on
    the executor that ran it. A failing run is recorded and its record returned with
    ``state="failed"``; other runs go on.
    """
    rdir = run_dir(out, spec)
    done = read_result(rdir)
    if done is not None and done.get("state") == "done":
        return done
    run_fn = run_fn or run_one
    rdir.mkdir(parents=True, exist_ok=True)
    cfg_path = rdir.parent / "config.json"
    if not cfg_path.exists():
        atomic_write_json(cfg_path, spec.identity(with_seed=False))
    dense_dir = None if spec.method == "dense" else run_dir(out, dense_spec(spec))
    started = time.time()
    resumed = (rdir / "status.json").exists()

    def status(phase: str, **extra) -> None:
        _status(rdir, spec, "running", phase=phase, started=started, resumed=resumed, **extra)

    old_threads = None
    try:
        import torch

        if threads is not None:
            old_threads = torch.get_num_threads()
            torch.set_num_threads(int(threads))
        status("start")
        record = dict(run_fn(spec, rdir, dense_dir=dense_dir, progress=progress, status=status))
    except Exception as exc:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
        tb = traceback.format_exc()
        _status(rdir, spec, "failed", error=_one_line(exc), traceback=tb, started=started)
        return {**_base_record(spec, rdir, out), "state": "failed", "error": _one_line(exc)}
    finally:
        if old_threads is not None:
            torch.set_num_threads(old_threads)
    record = {**_base_record(spec, rdir, out), **record, "state": "done",
              "wall_seconds": time.time() - started, "resumed": resumed}
    atomic_write_json(rdir / "result.json", to_jsonable(record))
    _status(rdir, spec, "done", started=started, finished=time.time())
    return record


def _base_record(spec: RunSpec, rdir: Path, out: str) -> dict:
    return {"dataset": spec.dataset, "model": spec.model, "method": spec.method, "density": spec.density,
            "seed": spec.seed, "eps": spec.eps, "key": spec.key(),
            "run_dir": os.path.relpath(rdir, out)}


# ---- the production run function -------------------------------------------------------------
def _load_data(name: str, root: str | None, n_train: int | None, n_test: int | None, seed: int):
    from . import data as data_mod

    kwargs = {} if root is None or name in ("digits", "synthetic") else {"root": root}
    ds = data_mod.load(name, seed=seed, **kwargs)
    if n_train is not None or n_test is not None:
        ds = ds.subset(n_train=n_train, n_test=n_test, seed=seed)
    return ds


def _build_model(spec: RunSpec, ds):
    from . import models as models_mod

    return models_mod.build(spec.model, in_shape=tuple(ds.input_shape), num_classes=int(ds.num_classes),
                            parameterization=spec.settings["parameterization"], seed=spec.seed,
                            **spec.model_options)


def _train_kwargs(spec: RunSpec) -> dict:
    s = spec.settings
    return dict(eps=spec.eps, norm=s["norm"], steps=s["steps"], alpha=s["alpha"], epochs=s["epochs"],
                batch_size=s["batch_size"], optimizer=s["optimizer"], lr=s["lr"], momentum=s["momentum"],
                weight_decay=s["weight_decay"], schedule=s["schedule"], loss=s["loss"], seed=spec.seed)


def _eval(model, ds, spec: RunSpec, device) -> dict:
    from .evaluate import evaluate

    s = spec.settings
    x, y = ds.x_test, ds.y_test
    if s["n_eval"] is not None:
        x, y = x[: s["n_eval"]], y[: s["n_eval"]]
    # eps = 0 has no attack to evaluate; the robust accuracy at the training radius is the clean one
    ev = evaluate(model, x, y, eps=spec.eps, norm=s["norm"],
                  steps=s["eval_steps"] if s["eval_steps"] is not None else s["steps"],
                  restarts=s["eval_restarts"], device=device,
                  cross_check=bool(s["cross_check"] and spec.eps > 0), seed=spec.seed)
    d = ev.to_dict()
    rec = {"clean_acc": _f(d.get("clean_acc")), "fgsm_acc": _f(d.get("fgsm_acc")),
           "pgd_acc": _f(d.get("pgd_acc"))}
    cc = _find(d, ("cross_check_acc", "crosscheck_acc", "torchattacks_acc", "reference_acc",
                   "cross_check_pgd_acc"))
    rec["crosscheck_pgd_acc"] = _f(cc)
    flag = _find(d, ("cross_check_flagged", "flagged", "cross_check_flag", "mismatch", "disagrees"))
    rec["crosscheck_flagged"] = bool(flag) if flag is not None else None
    return rec


def _find(d: Mapping, names: Sequence[str]):
    for n in names:
        if n in d and not isinstance(d[n], (dict, list)):
            return d[n]
    for v in d.values():
        if isinstance(v, Mapping):
            got = _find(v, names)
            if got is not None:
                return got
    return None


def _f(v) -> float | None:
    return None if v is None else float(v)


def run_one(spec: RunSpec, rdir: Path, *, dense_dir: Path | None, progress: bool = False,
            status: Callable[..., None] = lambda phase, **kw: None) -> dict:
    """The production run (module docstring, steps 1-4); returns the run's record (one row of
    ``results.csv`` plus its ``history``). Dense runs (``dense_dir is None``) also write the probe
    set (``probe.pt``) and their per-epoch probe records (``records/epoch-<t>.pt``) that tickets track
    against."""
    import torch
    from tqdm.auto import tqdm

    from ntk_theory._checks import check_device

    from . import tracking
    from .train import adversarial_train

    device = check_device(spec.device, "device")
    bar = tqdm(total=len(PHASES), desc=spec.label(), leave=False, disable=None if progress else True)

    def phase(name: str, **kw) -> None:
        bar.set_postfix_str(name)
        status(name, **kw)

    try:
        phase("data")
        ds = _load_data(spec.dataset, spec.data_root, spec.settings["n_train"], spec.settings["n_test"],
                        spec.settings["data_seed"])
        model = _build_model(spec, ds)
        bar.update()
        s = spec.settings
        probe_kw = dict(n_clean=s["probe_clean"], n_adv=s["probe_adv"], eps=spec.eps,
                        steps=s["steps"], norm=s["norm"], seed=spec.seed)
        rec: dict[str, Any] = {"device": str(device)}
        mask, rescale, search_seconds, diagnostics, ticket_meta = None, False, 0.0, None, {}
        phase("search")
        if dense_dir is None:
            probe_path = rdir / "probe.pt"
            if probe_path.exists():
                probe = torch.load(probe_path, weights_only=False)
            else:
                probe = tracking.ProbeSet.make(model, ds, **probe_kw)
                atomic_torch_save(probe_path, probe)
            reference = None
        else:
            dres = read_result(dense_dir)
            if dres is None:
                raise RuntimeError(f"the dense reference run {dense_dir} has not finished")
            probe = torch.load(dense_dir / "probe.pt", weights_only=False)
            ticket_path = rdir / "ticket.pt"
            if not ticket_path.exists():
                from . import tickets as tickets_mod

                # a method that attacks during its search (awt, hydra, adv_imp) attacks at the run's radius
                # unless its hyper-parameters say otherwise
                hp = dict(spec.hparams)
                accepted = getattr(tickets_mod.get(spec.method), "HPARAMS", {})
                for k, v in (("eps", spec.eps), ("norm", s["norm"]), ("steps", s["steps"])):
                    if k in accepted and k not in hp:
                        hp[k] = v
                tickets_mod.find_ticket(spec.method, model, ds, spec.density, scope=spec.scope,
                                        skip_first=spec.skip_first, seed=spec.seed, device=device, progress=False,
                                        **hp).save(ticket_path)
            from .tickets import load_ticket

            ticket = load_ticket(ticket_path)
            ticket["meta"] = {"density": ticket.get("density"), "nonzero": ticket.get("nonzeros"),
                              "flops": ticket.get("flops"), "dense_flops": ticket.get("dense_flops")}
            mask, rescale = ticket["mask"], ticket["rescale"]
            model.load_state_dict(ticket["init_state"])
            search_seconds, diagnostics, ticket_meta = ticket["search_seconds"], ticket["diagnostics"], ticket["meta"]
            reference = dense_dir
        bar.update()

        phase("train", epoch=0)
        tracker = _Tracker(tracking, probe, spec, rdir, reference, mode=s["track_mode"],
                           on_epoch=lambda e: phase("train", epoch=e))
        tres = adversarial_train(model, ds, mask=mask, rescale=rescale, device=device,
                                 checkpoint_dir=rdir / "checkpoint", track=tracker, progress=False,
                                 **_train_kwargs(spec))
        bar.update()
        phase("evaluate")
        rec.update(_eval(tres.model, ds, spec, device))
        bar.update()
        phase("write")
        history = to_jsonable(tres.history)
        rec.update(_summarise_history(history))
        rec.update(search_seconds=search_seconds, train_seconds=float(tres.seconds),
                   epochs=s["epochs"], nonzero=ticket_meta.get("nonzero"),
                   achieved_density=ticket_meta.get("density", 1.0 if dense_dir is None else None))
        atomic_write_json(rdir / "history.json", {"history": history, "search_diagnostics": diagnostics})
        rec["history"] = history
        rec["search_diagnostics"] = diagnostics
        bar.update()
        return rec
    finally:
        bar.close()


class _Tracker:
    """``track(epoch, model)`` for ``adversarial_train``: one :class:`empirical.tracking.KernelTracker`
    per run, so one empirical NTK per tracked epoch. Dense runs store their probe record (kernel and
    outputs on the probe set, ``records/epoch-<t>.pt``, atomic) each epoch and compare with themselves
    (distance 0, no second kernel); a ticket compares with the record its dense run stored at the same
    epoch. The tracker's state (its initial kernel) goes into the training checkpoint through
    :meth:`state_dict`, so a resumed run still reports its drift."""

    REF_KEYS = ("kernel_distance", "kernel_alignment", "kernel_relative_distance", "output_gap", "output_rms_gap")

    def __init__(self, tracking, probe, spec: RunSpec, rdir: Path, dense_dir: Path | None, *, mode: str,
                 on_epoch: Callable[[int], None]):
        self.rdir, self.dense_dir, self.on_epoch = rdir, dense_dir, on_epoch
        self.kt = tracking.KernelTracker(probe, reference=self._reference, mode=mode)

    def _reference(self, epoch: int):
        import torch

        if self.dense_dir is None:
            return self.kt.last_record          # the dense run against itself
        path = self.dense_dir / "records" / f"epoch-{epoch}.pt"
        return torch.load(path, weights_only=False) if path.exists() else None

    def state_dict(self) -> dict:
        return self.kt.state_dict()

    def load_state_dict(self, state) -> None:
        self.kt.load_state_dict(state)

    def __call__(self, epoch: int, model) -> dict:
        out = dict(self.kt(epoch, model))
        if self.dense_dir is None and self.kt.last_record is not None:
            atomic_torch_save(self.rdir / "records" / f"epoch-{epoch}.pt", self.kt.last_record)
        for k in list(out):
            if k.split("/")[0] in self.REF_KEYS:
                out[f"vs_dense/{k}"] = out[k]
        self.on_epoch(epoch)
        return to_jsonable(out)


def _summarise_history(history: list[dict]) -> dict:
    """Dense-vs-ticket kernel distance and output gap at init and at the end, kernel drift to own
    init at the end, from the tracked history (keys of :class:`empirical.tracking.KernelTracker`)."""
    def get(h: dict, names: Sequence[str]):
        for n in names:
            if n in h and h[n] is not None:
                return _f(h[n])
        return None

    kd = ("vs_dense/kernel_distance", "kernel_distance_to_reference", "dense_kernel_distance")
    og = ("vs_dense/output_gap", "output_gap_to_reference", "output_gap")
    drift = ("kernel_distance_to_init", "kernel_drift", "own_kernel_distance")
    first = history[0] if history else {}
    last = history[-1] if history else {}
    kr = ("vs_dense/kernel_relative_distance",)
    return {"kernel_distance_init": get(first, kd), "kernel_distance_final": get(last, kd),
            "kernel_relative_init": get(first, kr), "kernel_relative_final": get(last, kr),
            "output_gap_init": get(first, og), "output_gap_final": get(last, og),
            "kernel_drift_final": get(last, drift),
            "train_acc_final": get(last, ("train_acc",)), "robust_train_acc_final": get(last, ("robust_train_acc",))}


# ----------------------------------------------------------------------------------------------
# sweep
# ----------------------------------------------------------------------------------------------
def gather(out: str | os.PathLike, specs: Iterable[RunSpec] | None = None) -> list[dict]:
    """Records of the finished runs found by scanning ``<out>/runs/*/seed-*/result.json``; with
    ``specs``, only those runs, in that order."""
    root = Path(out) / "runs"
    found = {}
    for p in sorted(root.glob("*/seed-*/result.json")):
        rec = read_result(p.parent)
        if rec is not None and rec.get("state") == "done":
            found[os.path.relpath(p.parent, root)] = rec
    if specs is None:
        return list(found.values())
    return [found[s.folder()] for s in specs if s.folder() in found]


@dataclass(frozen=True)
class ExperimentResult(Result):
    out: str
    records: list
    failed: list
    skipped: int
    seconds: float
    files: dict


def run_experiment(config: ExperimentConfig, out: str | os.PathLike, *, executor: Any = "local",
                   resume: bool = True, run_fn: RunFn | None = None, progress: bool = True,
                   report: bool = True, threads: int | None = 1, executor_options: Mapping | None = None,
                   validated: bool = False) -> ExperimentResult:
    """Run the sweep ``config`` into ``out`` and write the report (:mod:`empirical.report`).

    ``executor`` is a name (``"local"``, ``"ray"``, ``"slurm"``; options in ``executor_options``) or
    an :class:`empirical.executors.Executor`. ``resume=False`` deletes ``out/runs`` first.
    ``run_fn`` replaces :func:`run_one` (tests inject a small deterministic one; it must be a
    module-level function for the Ray and Slurm executors). Dense runs execute first (every ticket
    is tracked against one), then the tickets; each stage's runs are independent.
    """
    from tqdm.auto import tqdm

    from . import executors as ex

    t0 = time.time()
    if not validated:
        validate(config, deep=run_fn is None)
    out = Path(out)
    own_executor = not isinstance(executor, ex.Executor)
    if own_executor:
        opts = {"device": config.device, **dict(executor_options or {})}
        if executor == "slurm":
            opts.setdefault("folder", out / "submitit")
        exe = ex.make_executor(executor, **opts)
    else:
        exe = executor
    specs = plan(config)
    try:
        if not resume and (out / "runs").exists():
            import shutil

            shutil.rmtree(out / "runs")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "experiment.json", {"config": config.to_dict(), "runs": len(specs)})
        todo = [s for s in specs if (read_result(run_dir(out, s)) or {}).get("state") != "done"]
        skipped = len(specs) - len(todo)
        bar = tqdm(total=len(specs), initial=skipped, desc="awt experiment", unit="run",
                   disable=None if progress else True)
        failed = []
        try:
            dense = [s for s in todo if s.method == "dense"]
            tickets = [s for s in todo if s.method != "dense"]
            for stage in (dense, tickets):
                if stage is tickets and failed:   # a ticket whose dense reference failed cannot run
                    bad = {f["run_dir"] for f in failed}
                    keep = []
                    for t in stage:
                        if os.path.relpath(run_dir(out, dense_spec(t)), out) in bad:
                            failed.append({**_base_record(t, run_dir(out, t), str(out)), "state": "failed",
                                           "error": "its dense reference run failed"})
                            bar.update()
                        else:
                            keep.append(t)
                    stage = keep
                for rec in exe.map(execute, [((s, str(out)), {"run_fn": run_fn, "progress": progress,
                                                             "threads": threads}) for s in stage]):
                    if rec.get("state") != "done":
                        failed.append(rec)
                    bar.update()
        finally:
            bar.close()
    finally:
        if own_executor:
            exe.close()
    records = gather(out, specs)
    files = {}
    if report:
        from .report import write_report

        files = write_report(records, out, config=config, failed=failed)
    return ExperimentResult(out=str(out), records=records, failed=failed, skipped=skipped,
                            seconds=time.time() - t0, files={k: str(v) for k, v in files.items()})

"""Registry of numerical checks of the theorems and bounds awt relies on (docs/theory.md §C).

A check module declares its check once::

    PARAMS = {"quick": dict(widths=[64, 128], seeds=4), "full": dict(widths=[64, 128, 256], seeds=8)}

    @register("C1", title="...", statement=STATEMENT, rigour="theorem", params=PARAMS)
    def check_c1(p: dict, seed: int, *, reference=None) -> Outcome:
        ...
        return Outcome(parameters=..., measured=..., expected=..., passed=..., details=...)

and ``register`` turns the body into the public callable ``check_c1(scale="quick", seed=0,
**overrides) -> CheckResult``: ``scale`` picks ``PARAMS[scale]`` (``"quick"``: seconds, the default
of ``awt verify``; ``"full"``: the sweep grids of docs/theory.md §C), each override either replaces a
``PARAMS`` entry or sets one of the body's keyword-only parameters (tests plant a wrong ingredient
that way), and any other key is refused. The runner fills the check's id, statement and rigour into
its :class:`CheckResult`, with ``parameters = {**p, "seed": seed, **outcome.parameters}`` and the wall
time. A body that declares a keyword-only ``device`` gets the ``torch.device`` of ``awt verify
--device`` from :func:`run_checks`.
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from ntk_theory.io import Result, to_jsonable

__all__ = ["CheckResult", "Outcome", "Check", "register", "registry", "get_check", "run_checks", "SCALES",
           "RIGOUR", "SEED_MAX", "check_seed"]

SCALES = ("quick", "full")
RIGOUR = ("theorem", "heuristic")
SEED_MAX = 2 ** 32 - 1      # checks combine the seed with sweep indices; this keeps torch/numpy seeds in range


@dataclass(frozen=True)
class Outcome:
    """What a check body measures; :func:`register`'s runner adds id, statement, rigour and time."""

    parameters: dict[str, Any]
    measured: dict[str, Any]
    expected: dict[str, Any]
    passed: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckResult(Result):
    """Outcome of one check.

    ``measured`` holds the headline numbers (e.g. a fitted slope and its bootstrap
    interval); ``expected`` the bound or band they are compared with; ``details`` the raw
    sweep (per width, per seed) so a reader can recompute everything, and ``details["series"]``
    the figure. ``seconds`` is the wall time of the check (NaN when unknown; ``None`` in JSON).
    """

    id: str
    statement: str
    rigour: str
    parameters: dict[str, Any]
    measured: dict[str, Any]
    expected: dict[str, Any]
    passed: bool
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: to_jsonable(getattr(self, f.name)) for f in fields(self)}
        d["seconds"] = None if math.isnan(self.seconds) else round(self.seconds, 3)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CheckResult":
        """Inverse of :meth:`to_dict` (a result read back from ``report.json``)."""
        d = dict(d)
        secs = d.pop("seconds", None)
        names = {f.name for f in fields(cls)} - {"seconds"}
        missing = sorted(names - set(d))
        if missing:
            raise KeyError(f"check result lacks {', '.join(missing)}")
        return cls(**{k: d[k] for k in names}, seconds=float("nan") if secs is None else float(secs))

    def summary(self) -> str:
        """One line: the measured headline against the expectation."""
        m = ", ".join(f"{k}={_fmt(v)}" for k, v in self.measured.items() if not isinstance(v, dict))
        e = ", ".join(f"{k}={_fmt(v)}" for k, v in self.expected.items())
        return f"{m}  vs  {e}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
        return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
    return str(v)


@dataclass(frozen=True)
class Check:
    """A registered check. ``run(scale="quick", seed=0, **overrides) -> CheckResult`` runs it;
    ``params`` are its sweeps per scale, ``keywords`` the names of its planted ingredients."""

    id: str
    title: str
    statement: str
    rigour: str
    params: Mapping[str, Mapping[str, Any]]
    keywords: tuple[str, ...]
    takes_device: bool
    run: Callable[..., CheckResult]


_REGISTRY: dict[str, Check] = {}


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, SEED_MAX]``, else a ValueError/TypeError naming ``name``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name}: expected an int in [0, {SEED_MAX}], got {type(seed).__name__} {seed!r}")
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{name}: got {seed}; accepted values are integers in [0, {SEED_MAX}]")
    return seed


def _keywords(fn: Callable) -> tuple[tuple[str, ...], bool]:
    sig = inspect.signature(fn)
    ps = list(sig.parameters.values())
    if len(ps) < 2 or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in ps[:2]):
        raise TypeError(f"{fn.__qualname__}: a check body takes (p, seed, *, planted...) ")
    rest = ps[2:]
    bad = [p.name for p in rest if p.kind != p.KEYWORD_ONLY]
    if bad:
        raise TypeError(f"{fn.__qualname__}: parameters after (p, seed) must be keyword-only, got {bad}")
    names = tuple(p.name for p in rest)
    return names, "device" in names


def register(id: str, *, title: str, statement: str, rigour: str, params: Mapping[str, Mapping[str, Any]]):
    """Decorator adding a check body ``fn(p, seed, *, planted...) -> Outcome`` to the registry under
    ``id`` (e.g. ``"C1"``); returns the public callable ``(scale="quick", seed=0, **overrides) -> CheckResult``.

    ``params`` maps each scale of :data:`SCALES` to the sweep's parameters (the same keys for both).
    """
    if not isinstance(id, str) or not id:
        raise ValueError(f"id: expected a non-empty string like 'C1', got {id!r}")
    if rigour not in RIGOUR:
        raise ValueError(f"rigour: got {rigour!r}; accepted values are {RIGOUR}")
    for name, text in (("title", title), ("statement", statement)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name}: expected a non-empty string, got {text!r}")
    if not isinstance(params, Mapping) or set(params) != set(SCALES):
        raise ValueError(f"params: expected a dict with exactly the keys {SCALES}, got {params!r:.80}")
    keys = set(params[SCALES[0]])
    if any(set(params[s]) != keys for s in SCALES):
        raise ValueError(f"params: the scales {SCALES} must have the same keys, got "
                         + "; ".join(f"{s}: {sorted(params[s])}" for s in SCALES))

    def deco(fn: Callable[..., Outcome]) -> Callable[..., CheckResult]:
        if id in _REGISTRY:
            raise ValueError(f"id: check {id!r} is already registered")
        names, takes_device = _keywords(fn)
        clash = sorted(keys & set(names))
        if clash:
            raise ValueError(f"params: {clash} are both sweep parameters and keyword parameters of {fn.__qualname__}")

        def run(scale: str = "quick", seed: int = 0, **overrides) -> CheckResult:
            if scale not in SCALES:
                raise ValueError(f"scale: got {scale!r}; accepted values are {SCALES}")
            seed = check_seed(seed)
            unknown = [k for k in overrides if k not in keys and k not in names]
            if unknown:
                raise ValueError(f"{unknown[0]}: not a parameter of check {id}; accepted: "
                                 f"{', '.join(params[scale]) or 'none'} (sweep); {', '.join(names) or 'none'} (keyword)")
            p = dict(params[scale])
            kw = {}
            for k, v in overrides.items():
                if k in keys:
                    p[k] = v
                else:
                    kw[k] = v
            if takes_device:
                from ntk_theory._checks import check_device
                kw["device"] = check_device(kw.get("device", "cpu"), "device")
            t0 = time.perf_counter()
            out = fn(p, seed, **kw)
            secs = time.perf_counter() - t0
            if not isinstance(out, Outcome):
                raise TypeError(f"check {id}: the body returned {type(out).__name__}, expected an Outcome")
            return CheckResult(id=id, statement=statement, rigour=rigour,
                               parameters={**p, "seed": seed, **out.parameters}, measured=dict(out.measured),
                               expected=dict(out.expected), passed=bool(out.passed), details=dict(out.details),
                               seconds=secs)

        run.__name__ = fn.__name__
        run.__qualname__ = fn.__qualname__
        run.__module__ = fn.__module__
        run.__doc__ = fn.__doc__
        run.__wrapped_body__ = fn
        _REGISTRY[id] = Check(id, title, statement, rigour, params, names, takes_device, run)
        return run

    return deco


def _load_all() -> None:
    # importing the check modules registers them
    from . import checks  # noqa: F401


def _order(k: str):
    return k.rstrip("0123456789"), int("".join(c for c in k if c.isdigit()) or 0)


def registry() -> dict[str, Check]:
    """All registered checks, sorted by id (C1, C2, ..., C10, ...)."""
    _load_all()
    return {k: _REGISTRY[k] for k in sorted(_REGISTRY, key=_order)}


def get_check(id: str) -> Check:
    """The check registered as ``id``; a ValueError listing the registered ids otherwise."""
    reg = registry()
    if id not in reg:
        raise ValueError(f"id: unknown check {id!r}; registered ids are {', '.join(reg)}")
    return reg[id]


def run_checks(ids: list[str] | None = None, *, scale: str = "quick", seed: int = 0, device: Any = "cpu",
               done: Mapping[str, CheckResult] | None = None,
               on_start: Callable[[Check], None] | None = None,
               on_result: Callable[[list[CheckResult]], None] | None = None) -> list[CheckResult]:
    """Run the checks ``ids`` (all if None; duplicates count once) and return their results in registry order.

    ``done``: results already at hand (a resumed run), used instead of running those checks.
    ``on_start``: called with each check about to run. ``on_result``: called with the results
    so far after each check that ran (the CLI writes its report there, so an interrupted run
    keeps every finished check). ``device`` goes to the checks that declare one.
    """
    if scale not in SCALES:
        raise ValueError(f"scale: got {scale!r}; accepted values are {SCALES}")
    seed = check_seed(seed)
    reg = registry()
    wanted = set(reg) if not ids else {get_check(i).id for i in ids}
    dev = None
    results: list[CheckResult] = []
    for cid in (c for c in reg if c in wanted):
        chk = reg[cid]
        if done and cid in done:
            results.append(done[cid])
            continue
        if on_start is not None:
            on_start(chk)
        kw = {}
        if chk.takes_device:
            if dev is None:
                from ntk_theory._checks import check_device
                dev = check_device(device, "device")
            kw["device"] = dev
        res = chk.run(scale=scale, seed=seed, **kw)
        results.append(res)
        if on_result is not None:
            on_result(list(results))
    return results


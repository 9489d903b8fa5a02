"""Registry of numerical checks of the theorems and bounds awt relies on.

A check is a function ``fn(scale: str, seed: int, **overrides) -> CheckResult``
registered with :func:`register`. ``scale`` is ``"quick"`` (seconds, the default of
``awt verify``) or ``"full"`` (the sweep grids of THEORY.md §C). Keyword overrides let
tests plant a wrong ingredient (for instance a wrong reference kernel) and see the
check fail.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

__all__ = ["CheckResult", "Check", "register", "registry", "get_check", "run_checks", "progress", "SCALES", "RIGOUR"]

SCALES = ("quick", "full")
RIGOUR = ("theorem", "heuristic")


@dataclass
class CheckResult:
    """Outcome of one check.

    ``measured`` holds the headline numbers (e.g. a fitted slope and its bootstrap
    interval); ``expected`` the bound or band they are compared with; ``details`` the raw
    sweep (per width, per seed) so a reader can recompute everything.
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
        d = asdict(self)
        d["seconds"] = None if math.isnan(self.seconds) else round(self.seconds, 3)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CheckResult":
        """Inverse of :meth:`to_dict` (a result read back from ``report.json``)."""
        d = dict(d)
        secs = d.pop("seconds", None)
        res = cls(**d)
        res.seconds = float("nan") if secs is None else float(secs)
        return res

    def summary(self) -> str:
        """One line: the measured headline against the expectation."""
        m = ", ".join(f"{k}={_fmt(v)}" for k, v in self.measured.items() if not isinstance(v, dict))
        e = ", ".join(f"{k}={_fmt(v)}" for k, v in self.expected.items())
        return f"{m}  vs  {e}"


def progress(iterable, desc: str):
    """A tqdm bar over a check's sweep; silent when stderr is not a terminal."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False, disable=None)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
        return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
    return str(v)


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    statement: str
    rigour: str
    fn: Callable[..., CheckResult]


_REGISTRY: dict[str, Check] = {}


def register(id: str, title: str, statement: str, rigour: str):
    """Decorator adding a check function to the registry under ``id`` (e.g. ``"C1"``)."""
    if rigour not in RIGOUR:
        raise ValueError(f"rigour: got {rigour!r}; accepted values are {RIGOUR}")

    def deco(fn: Callable[..., CheckResult]) -> Callable[..., CheckResult]:
        if id in _REGISTRY:
            raise ValueError(f"id: check {id!r} is already registered")
        _REGISTRY[id] = Check(id, title, statement, rigour, fn)
        return fn

    return deco


def _load_all() -> None:
    # importing the check modules registers them
    from . import checks  # noqa: F401


def registry() -> dict[str, Check]:
    """All registered checks, sorted by id (C1, C2, ..., C10, ...)."""
    _load_all()
    key = lambda k: (k.rstrip("0123456789"), int("".join(c for c in k if c.isdigit()) or 0))
    return {k: _REGISTRY[k] for k in sorted(_REGISTRY, key=key)}


def get_check(id: str) -> Check:
    reg = registry()
    if id not in reg:
        raise ValueError(f"only: unknown check id {id!r}; registered ids are {', '.join(reg)}")
    return reg[id]


def run_checks(ids: list[str] | None = None, *, scale: str = "quick", seed: int = 0,
               progress: Callable[[str], None] | None = None,
               done: dict[str, CheckResult] | None = None,
               on_result: Callable[[list[CheckResult]], None] | None = None) -> list[CheckResult]:
    """Run the checks ``ids`` (all if None) and return their results in registry order.

    ``done``: results already at hand (a resumed run), used instead of running those checks.
    ``on_result``: called with the results so far after each check (the CLI writes its
    report there, so an interrupted run keeps every finished check).
    """
    if scale not in SCALES:
        raise ValueError(f"scale: got {scale!r}; accepted values are {SCALES}")
    reg = registry()
    chosen = list(reg) if not ids else [get_check(i).id for i in ids]
    results = []
    for cid in chosen:
        chk = reg[cid]
        if done and cid in done:
            results.append(done[cid])
            continue
        if progress is not None:
            progress(f"{cid}: {chk.title}")
        t0 = time.perf_counter()
        res = chk.fn(scale=scale, seed=seed)
        res.seconds = time.perf_counter() - t0
        results.append(res)
        if on_result is not None:
            on_result(list(results))
    return results

"""Reports of verification runs: a terminal table, ``report.json``, ``report.md`` and figures."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ntk_theory.io import atomic_write, atomic_write_json, atomic_write_text

from .registry import CheckResult

__all__ = ["format_table", "write_report", "figure", "plot_result", "read_resumable", "merge_results"]


def format_table(results: list[CheckResult]) -> str:
    rows = [("id", "rigour", "result", "seconds", "measured vs expected")]
    for r in results:
        rows.append((r.id, r.rigour, "PASS" if r.passed else "FAIL", f"{r.seconds:.1f}", r.summary()))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(row[i].ljust(widths[i]) for i in range(4)) + "  " + row[4])
        if j == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 20)
    n_fail = sum(not r.passed for r in results)
    lines.append(f"\n{len(results) - n_fail} passed, {n_fail} failed")
    return "\n".join(lines)


def _environment() -> dict:
    return dict(python=sys.version.split()[0], torch=torch.__version__, platform=platform.platform(),
                threads=torch.get_num_threads(), time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _tick_label(v: float) -> str:
    """Plain tick text: integers as integers (widths: ``1024``, never ``1.02e+03``), else ``%g``."""
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:g}"


def figure(result: CheckResult):
    """The matplotlib figure of ``result.details["series"]`` (None without a series or matplotlib).

    The series' first curve is solid, the others dashed; ``reference_slope`` adds a dashed power
    law through the first point; on a log x axis the ticks are the x values themselves when they
    are integers (widths) or span less than a decade, written plainly.
    """
    series = result.details.get("series")
    if not series:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # figures are optional (extra "plot")
        return None
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    x = series["x"]
    for i, (label, y) in enumerate(series["y"].items()):
        ax.plot(x, y, "o-" if i == 0 else "s--", mfc="none" if i else None, label=label)
    ref = series.get("reference_slope")
    if ref is not None:
        y0 = next(iter(series["y"].values()))[0]
        ax.plot(x, [y0 * (xi / x[0]) ** ref for xi in x], "k--", lw=1, label=f"slope {ref:g}")
    xs = [float(v) for v in x]
    integers = all(v.is_integer() for v in xs)
    if series.get("loglog"):
        from matplotlib.ticker import NullFormatter
        ax.set_xscale("log")
        ax.set_yscale("log")
        pos = [v for v in xs if v > 0]
        if pos and (integers or max(pos) < 10 * min(pos)):  # widths, or less than a decade: label the points
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(pos)
            ax.set_xticklabels([_tick_label(v) for v in pos], rotation=45 if len(pos) > 5 else 0)
    elif integers:
        ax.set_xticks(xs)
        ax.set_xticklabels([_tick_label(v) for v in xs], rotation=45 if len(xs) > 8 else 0)
    ax.set_xlabel(series.get("xlabel", ""))
    ax.set_ylabel(series.get("ylabel", ""))
    ax.set_title(f"{result.id}: {'PASS' if result.passed else 'FAIL'}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_result(result: CheckResult, path: str | Path) -> Path | None:
    """Write ``result``'s figure (:func:`figure`) as a PNG to ``path`` atomically; None if it has none."""
    fig = figure(result)
    if fig is None:
        return None
    import matplotlib.pyplot as plt
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120), mode="wb")
    finally:
        plt.close(fig)
    return Path(path)


def write_report(results: list[CheckResult], out_dir: str | Path, *, scale: str, seed: int,
                 complete: bool = True, figures: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and one ``<id>.png`` per check with a series.

    ``complete=False`` marks a report written part-way through a run (``"complete": false``
    in the JSON, a note in the markdown); ``awt verify --resume`` continues from it. Every file
    is written atomically, so a report on disk is never half-written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(scale=scale, seed=seed, complete=complete, environment=_environment(),
                   passed=all(r.passed for r in results), checks=[r.to_dict() for r in results])
    paths = {"json": atomic_write_json(out / "report.json", payload)}
    md = [f"# awt verify ({scale}, seed {seed})", ""]
    if not complete:
        md += ["*Partial report: the run has not finished (`awt verify --resume` continues it).*", ""]
    md += ["| id | rigour | result | measured vs expected |", "|---|---|---|---|"]
    for r in results:
        md.append(f"| {r.id} | {r.rigour} | {'PASS' if r.passed else 'FAIL'} | {r.summary()} |")
    md.append("")
    for r in results:
        md += [f"## {r.id}", "", r.statement, "", f"Parameters: `{r.parameters}`", ""]
        fig = plot_result(r, out / f"{r.id}.png") if figures else None
        if fig is None and not figures and (out / f"{r.id}.png").exists():
            fig = out / f"{r.id}.png"
        if fig is not None:
            paths[r.id] = fig
            md += [f"![{r.id}]({fig.name})", ""]
    paths["md"] = atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return paths


def read_resumable(out_dir: str | Path, *, scale: str, seed: int) -> tuple[dict[str, CheckResult], str]:
    """Results of an earlier run in ``out_dir`` that a resumed run reuses, and a one-line account.

    No ``report.json`` gives no results. A report of another scale or seed measures something
    else, and an unreadable one cannot be merged: both raise ``ValueError`` (naming ``out_dir``),
    because continuing would overwrite the results they hold.
    """
    path = Path(out_dir) / "report.json"
    if not path.exists():
        return {}, f"no report in {out_dir}: running every check asked for"
    try:
        rep = json.loads(path.read_text())
        results = {d["id"]: CheckResult.from_dict(d) for d in rep["checks"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"out_dir: {path} is not a readable awt report ({type(exc).__name__}: {exc}); "
                         "move it away or write to another folder") from None
    if rep.get("scale") != scale or rep.get("seed") != seed:
        raise ValueError(f"out_dir: {path} holds results for scale {rep.get('scale')!r}, seed {rep.get('seed')!r}, "
                         f"not {scale!r}, {seed!r}; write to another folder to keep them")
    return results, f"resuming from {path}: {', '.join(results) or 'no check'} done"


def merge_results(earlier: Mapping[str, CheckResult], new: Iterable[CheckResult],
                  order: Iterable[str] = ()) -> list[CheckResult]:
    """``earlier`` results updated by ``new`` ones (same id: the new one wins), sorted by ``order``
    (ids not in it keep their place after those that are). A resumed run writes this, so no
    finished result is ever dropped."""
    merged = dict(earlier)
    for r in new:
        merged[r.id] = r
    rank = {cid: i for i, cid in enumerate(order)}
    ids = sorted(merged, key=lambda c: (rank.get(c, len(rank)), list(merged).index(c)))
    return [merged[c] for c in ids]

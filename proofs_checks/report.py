"""Reports of verification runs: a terminal table, ``report.json``, ``report.md`` and figures."""
from __future__ import annotations

import json

import datetime as _dt
import platform
import sys
from pathlib import Path

import torch

from ntk_theory.io import atomic_write, atomic_write_json, atomic_write_text

from .registry import CheckResult

__all__ = ["format_table", "write_report"]


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


def _plot(result: CheckResult, path: Path) -> Path | None:
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
    if series.get("loglog"):
        from matplotlib.ticker import NullFormatter
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        xs = [float(v) for v in x if float(v) > 0]
        if xs and max(xs) < 10 * min(xs):  # less than a decade: no major tick would be labelled
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{v:.3g}" for v in xs])
    ax.set_xlabel(series.get("xlabel", ""))
    ax.set_ylabel(series.get("ylabel", ""))
    ax.set_title(f"{result.id}: {'PASS' if result.passed else 'FAIL'}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120), mode="wb")
    plt.close(fig)
    return path


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
        fig = _plot(r, out / f"{r.id}.png") if figures else None
        if fig is None and not figures and (out / f"{r.id}.png").exists():
            fig = out / f"{r.id}.png"
        if fig is not None:
            paths[r.id] = fig
            md += [f"![{r.id}]({fig.name})", ""]
    paths["md"] = atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return paths


def read_resumable(out_dir: str | Path, *, scale: str, seed: int) -> tuple[dict[str, CheckResult], str]:
    """Results of an earlier run in ``out_dir`` that ``--resume`` may reuse, and a one-line reason.

    Only a ``report.json`` of the same scale and seed counts (another scale or seed measures
    something else); a missing or unreadable report gives no results.
    """
    path = Path(out_dir) / "report.json"
    if not path.exists():
        return {}, f"no report in {out_dir}: running every check"
    try:
        rep = json.loads(path.read_text())
        results = {d["id"]: CheckResult.from_dict(d) for d in rep["checks"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {}, f"{path} is not a readable awt report ({exc}): running every check"
    if rep.get("scale") != scale or rep.get("seed") != seed:
        return {}, (f"{path} is for scale {rep.get('scale')!r}, seed {rep.get('seed')!r}, not {scale!r}, {seed!r}: "
                    "running every check")
    return results, f"resuming from {path}: {', '.join(results) or 'no check'} done"

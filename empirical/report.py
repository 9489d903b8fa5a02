"""The files of a sweep: ``results.json``, ``results.csv``, figures and ``summary.md``.

Input: the records of the finished runs (:func:`empirical.experiment.gather`), one dict per run with
the scalar fields of :data:`CSV_FIELDS` plus ``history`` (per-epoch dicts from ``adversarial_train``
with the tracker's entries) and ``search_diagnostics`` (the ticket search's logged objective terms).

Aggregates are over seeds: mean and sample standard deviation (``ddof=1``; 0 for one seed) of each
field per (dataset, model, eps, method, density). Figures (matplotlib, Agg backend):

* ``robust_accuracy.png``: PGD robust test accuracy against density per method, error bars one
  standard deviation over seeds, the dense network as a horizontal band;
* ``kernel_distance.png``: dense-versus-ticket kernel distance
  ``1 - <Theta_m, Theta_0>_F / (||Theta_m||_F ||Theta_0||_F)`` on the probe set against epoch, one
  panel per density, one line per method (mean over seeds, shaded +- std);
* ``output_gap.png``: the output gap ``||f_m(x~) - f_0(x~)|| / ||f_0(x~)||`` against epoch, likewise;
* ``awt_objective.png``: the AWT search's objective terms (output and kernel term, total) against
  search iteration, one line per density.

With several (dataset, model, eps) groups each figure gets the group as a suffix.
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ntk_theory.io import atomic_write, atomic_write_json, atomic_write_text, to_jsonable

__all__ = ["CSV_FIELDS", "SUMMARY_FIELDS", "aggregate", "write_csv", "write_report", "figures", "claims",
           "KERNEL_KEY", "OUTPUT_KEY"]

CSV_FIELDS = (
    "dataset", "model", "method", "density", "seed", "eps", "clean_acc", "fgsm_acc", "pgd_acc",
    "crosscheck_pgd_acc", "crosscheck_flagged", "kernel_distance_init", "kernel_distance_final",
    "kernel_relative_init", "kernel_relative_final", "output_gap_init", "output_gap_final", "kernel_drift_final", "search_seconds", "train_seconds",
    "wall_seconds", "epochs", "achieved_density", "nonzero", "device", "resumed", "key", "run_dir",
)
SUMMARY_FIELDS = ("clean_acc", "fgsm_acc", "pgd_acc", "crosscheck_pgd_acc", "kernel_distance_init",
                  "kernel_distance_final", "kernel_relative_init", "kernel_relative_final", "output_gap_init", "output_gap_final", "kernel_drift_final",
                  "search_seconds", "train_seconds")
# history keys of the dense-versus-ticket trajectories (written by experiment._Tracker)
KERNEL_KEY = "vs_dense/kernel_distance"
OUTPUT_KEY = "vs_dense/output_gap"
BASELINE_ORDER = ("dense", "awt", "random", "magnitude", "snip", "grasp", "synflow", "adv_imp", "hydra")


def _num(v) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    xs = [x for x in (_num(v) for v in values) if x is not None]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s, len(xs)


def _method_key(m: str) -> tuple[int, str]:
    return (BASELINE_ORDER.index(m) if m in BASELINE_ORDER else len(BASELINE_ORDER), m)


def _group(r: Mapping) -> tuple:
    return (r["dataset"], r["model"], float(r["eps"]))


def _group_tag(g: tuple) -> str:
    return f"{g[0]}-{g[1]}-eps{g[2]:g}"


def aggregate(records: Sequence[Mapping]) -> list[dict]:
    """Mean, std and count over seeds of :data:`SUMMARY_FIELDS` per (dataset, model, eps, method,
    density), sorted by group, method (dense first) and decreasing density."""
    cells: dict[tuple, list] = defaultdict(list)
    for r in records:
        cells[(*_group(r), r["method"], float(r["density"]))].append(r)
    rows = []
    for (ds, model, eps, method, density), rs in sorted(
            cells.items(), key=lambda kv: (kv[0][:3], _method_key(kv[0][3]), -kv[0][4])):
        row: dict[str, Any] = {"dataset": ds, "model": model, "eps": eps, "method": method, "density": density,
                               "seeds": sorted(int(r["seed"]) for r in rs)}
        for f in SUMMARY_FIELDS:
            m, s, n = _mean_std(r.get(f) for r in rs)
            row[f] = {"mean": m, "std": s, "n": n}
        rows.append(row)
    return rows


def _csv_text(records: Sequence[Mapping]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in sorted(records, key=lambda r: (_group(r), _method_key(r["method"]), -float(r["density"]),
                                            int(r["seed"]))):
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def write_csv(records: Sequence[Mapping], path: str | os.PathLike) -> Path:
    return atomic_write_text(path, _csv_text(records))


# ---- the paper's claims, checked on the numbers ------------------------------------------------
def _curve(records: Sequence[Mapping], key: str) -> dict[int, tuple[float, float, int]]:
    by_epoch: dict[int, list] = defaultdict(list)
    for r in records:
        for h in r.get("history") or []:
            v = _num(h.get(key))
            if v is not None and "epoch" in h:
                by_epoch[int(h["epoch"])].append(v)
    return {e: _mean_std(vs) for e, vs in sorted(by_epoch.items())}


def claims(records: Sequence[Mapping], densities: Sequence[float] = (0.1, 0.05), tolerance: float = 0.02) -> list[dict]:
    """The paper's implication, tested on the sweep's numbers (issue 11): at each density, (a) AWT's
    mean PGD robust accuracy is within ``tolerance`` (2 points) of the dense network's, and (b) its
    mean dense-versus-ticket kernel distance is below every other method's at every tracked epoch.
    Each entry holds the numbers it was decided on; a claim with no AWT run at that density is
    reported as not tested."""
    out = []
    groups = sorted({_group(r) for r in records})
    for g in groups:
        rs = [r for r in records if _group(r) == g]
        dense = [r for r in rs if r["method"] == "dense"]
        for q in densities:
            awt = [r for r in rs if r["method"] == "awt" and abs(float(r["density"]) - q) < 1e-12]
            others = sorted({r["method"] for r in rs if r["method"] not in ("awt", "dense")
                             and abs(float(r["density"]) - q) < 1e-12}, key=_method_key)
            entry: dict[str, Any] = {"group": _group_tag(g), "density": q}
            if not awt or not dense:
                entry.update(tested=False, why="no AWT or no dense run at this density")
                out.append(entry)
                continue
            d_m, _, _ = _mean_std(r.get("pgd_acc") for r in dense)
            a_m, _, _ = _mean_std(r.get("pgd_acc") for r in awt)
            entry["dense_pgd_acc"], entry["awt_pgd_acc"] = d_m, a_m
            entry["accuracy_holds"] = (d_m is not None and a_m is not None and a_m >= d_m - tolerance)
            awt_curve = _curve(awt, KERNEL_KEY)
            worst = {}
            holds = bool(awt_curve) and bool(others)
            for m in others:
                mc = _curve([r for r in rs if r["method"] == m and abs(float(r["density"]) - q) < 1e-12], KERNEL_KEY)
                common = sorted(set(mc) & set(awt_curve))
                margins = [mc[e][0] - awt_curve[e][0] for e in common]
                if not margins:
                    holds = False
                    worst[m] = None
                    continue
                worst[m] = min(margins)
                holds = holds and min(margins) > 0
            entry["kernel_margin_min"] = worst   # min over epochs of (baseline - AWT) mean kernel distance
            entry["awt_kernel_distance"] = {e: v[0] for e, v in awt_curve.items()}
            entry["kernel_holds"] = holds
            entry["tested"] = True
            out.append(entry)
    return out


# ---- figures ------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    def write(fh):
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")

    atomic_write(path, write, mode="wb")
    return path


def _methods_colors(methods: Sequence[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted(methods, key=_method_key))}


def _fig_robust(rs: Sequence[Mapping], title: str, path: Path) -> Path:
    plt = _plt()
    methods = sorted({r["method"] for r in rs}, key=_method_key)
    colors = _methods_colors(methods)
    fig, ax = plt.subplots(figsize=(6, 4))
    densities = sorted({float(r["density"]) for r in rs if r["method"] != "dense"})
    for m in methods:
        mr = [r for r in rs if r["method"] == m]
        if m == "dense":
            mean, std, _ = _mean_std(r.get("pgd_acc") for r in mr)
            if mean is not None:
                ax.axhline(mean, color="k", ls="--", lw=1, label=f"dense ({mean:.3f})")
                if std:
                    ax.axhspan(mean - std, mean + std, color="k", alpha=0.1)
            continue
        xs, ys, es = [], [], []
        for q in densities:
            mean, std, n = _mean_std(r.get("pgd_acc") for r in mr if abs(float(r["density"]) - q) < 1e-12)
            if mean is not None:
                xs.append(q), ys.append(mean), es.append(std)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=colors[m], label=m)
    if densities:
        ax.set_xscale("log")
        ax.set_xticks(densities)
        ax.set_xticklabels([f"{q:g}" for q in densities])
        from matplotlib.ticker import NullFormatter

        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("density (fraction of weights kept)")
    ax.set_ylabel("PGD robust test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def _fig_curves(rs: Sequence[Mapping], key: str, ylabel: str, title: str, path: Path) -> Path | None:
    plt = _plt()
    tickets = [r for r in rs if r["method"] != "dense"]
    densities = sorted({float(r["density"]) for r in tickets}, reverse=True)
    if not densities or not any(_curve([r], key) for r in tickets):
        return None
    methods = sorted({r["method"] for r in tickets}, key=_method_key)
    colors = _methods_colors(sorted({r["method"] for r in rs}))
    fig, axes = plt.subplots(1, len(densities), figsize=(3.6 * len(densities), 3.4), squeeze=False, sharey=True)
    for ax, q in zip(axes[0], densities):
        for m in methods:
            c = _curve([r for r in tickets if r["method"] == m and abs(float(r["density"]) - q) < 1e-12], key)
            if not c:
                continue
            es = list(c)
            mean = [c[e][0] for e in es]
            std = [c[e][1] for e in es]
            ax.plot(es, mean, marker=".", color=colors[m], label=m)
            ax.fill_between(es, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color=colors[m], alpha=0.15)
        ax.set_title(f"density {q:g}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, y=1.03)  # above the panel titles (bbox_inches="tight" keeps it in the file)
    out = _save(fig, path)
    plt.close(fig)
    return out


#: per-iteration diagnostics that are bookkeeping, not objective terms (not plotted)
NOT_TERMS = ("iteration", "step", "iter", "seconds", "time", "lr")


def _diagnostic_series(diag: Any) -> dict[str, list[float]]:
    """Objective terms per iteration from a search's diagnostics: either a dict of lists or a list
    of per-iteration dicts (``{"kernel": ..., "output": ..., ...}``), possibly under a ``history`` /
    ``log`` / ``objective`` key."""
    if isinstance(diag, Mapping):
        for k in ("history", "log", "objective", "iterations", "trace"):
            if k in diag and isinstance(diag[k], (list, Mapping)):
                got = _diagnostic_series(diag[k])
                if got:
                    return got
        series = {k: [float(x) for x in v] for k, v in diag.items()
                  if k not in NOT_TERMS and isinstance(v, list) and len(v) > 1 and all(_num(x) is not None for x in v)}
        return series
    if isinstance(diag, list) and diag and all(isinstance(d, Mapping) for d in diag):
        keys = [k for k in diag[0] if k not in NOT_TERMS and _num(diag[0][k]) is not None]
        return {k: [float(d[k]) for d in diag if _num(d.get(k)) is not None] for k in keys}
    return {}


def _fig_objective(rs: Sequence[Mapping], title: str, path: Path) -> Path | None:
    awt = [r for r in rs if r["method"] == "awt" and r.get("search_diagnostics")]
    if not awt:
        return None
    plt = _plt()
    by_q: dict[float, dict[str, list]] = {}
    for r in sorted(awt, key=lambda r: (-float(r["density"]), int(r["seed"]))):
        q = float(r["density"])
        if q in by_q:   # one seed per density: the lowest
            continue
        s = _diagnostic_series(r["search_diagnostics"])
        if s:
            by_q[q] = s
    if not by_q:
        return None
    terms = sorted({k for s in by_q.values() for k in s})
    fig, axes = plt.subplots(1, len(terms), figsize=(3.6 * len(terms), 3.4), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, term in zip(axes[0], terms):
        for i, (q, s) in enumerate(sorted(by_q.items(), reverse=True)):
            if term in s and s[term]:
                ax.plot(range(len(s[term])), s[term], color=cmap(i / max(1, len(by_q) - 1)), label=f"d={q:g}")
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("search iteration")
        if all(v > 0 for s in by_q.values() for v in s.get(term, [])):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, y=1.03)  # above the panel titles (bbox_inches="tight" keeps it in the file)
    out = _save(fig, path)
    plt.close(fig)
    return out


def figures(records: Sequence[Mapping], folder: str | os.PathLike) -> dict[str, Path]:
    """Write the figures (module docstring) into ``folder``; returns name -> path of those written
    (a figure without data, e.g. the AWT objective in a sweep without AWT, is left out)."""
    folder = Path(folder)
    groups = sorted({_group(r) for r in records})
    written: dict[str, Path] = {}
    for g in groups:
        rs = [r for r in records if _group(r) == g]
        suffix = "" if len(groups) == 1 else f"-{_group_tag(g)}"
        title = f"{g[0]}, {g[1]}, eps={g[2]:g}"
        made = {
            "robust_accuracy": _fig_robust(rs, title, folder / f"robust_accuracy{suffix}.png"),
            "kernel_distance": _fig_curves(rs, KERNEL_KEY, "kernel distance to dense", title,
                                           folder / f"kernel_distance{suffix}.png"),
            "output_gap": _fig_curves(rs, OUTPUT_KEY, "output gap to dense", title, folder / f"output_gap{suffix}.png"),
            "awt_objective": _fig_objective(rs, f"AWT search objective, {title}", folder / f"awt_objective{suffix}.png"),
        }
        for k, p in made.items():
            if p is not None:
                written[k + suffix] = p
    return written


# ---- summary.md ---------------------------------------------------------------------------------
def _pm(cell: Mapping, digits: int = 3) -> str:
    if cell.get("mean") is None:
        return "–"
    if cell.get("n", 0) <= 1:
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def _summary(records, rows, claim_list, figs, out: Path, config, failed) -> str:
    lines = ["# awt experiment: summary", ""]
    n_seeds = sorted({int(r["seed"]) for r in records})
    lines += [f"{len(records)} finished runs; seeds {n_seeds}; mean ± std over seeds (sample std).",
              "Accuracies are fractions of the test points; PGD is the robust accuracy at the training radius "
              "(worst case over restarts), cross-check is torchattacks' PGD on the same points; kernel distance is "
              "1 − ⟨Θ_m, Θ_dense⟩_F / (‖Θ_m‖_F ‖Θ_dense‖_F) on the probe set at the same epoch (it ignores the "
              "kernel's scale), krel the relative distance ‖Θ_m − Θ_dense‖_F / ‖Θ_dense‖_F (it does not), output gap "
              "‖f_m − f_dense‖ / ‖f_dense‖ on the probe points, drift the ticket's kernel distance to its own init.", ""]
    if failed:
        lines += [f"**{len(failed)} run(s) failed**: " + "; ".join(
            f"{f.get('method')} d={f.get('density')} seed={f.get('seed')}: {f.get('error')}" for f in failed), ""]
    devices = sorted({str(r.get("device")) for r in records})
    total_search = sum(_num(r.get("search_seconds")) or 0 for r in records)
    total_train = sum(_num(r.get("train_seconds")) or 0 for r in records)
    lines += [f"Devices: {', '.join(devices)}. Search time {total_search:.1f} s, training time {total_train:.1f} s "
              f"in total over runs.", ""]
    cols = [("clean", "clean_acc"), ("FGSM", "fgsm_acc"), ("PGD", "pgd_acc"), ("cross-check", "crosscheck_pgd_acc"),
            ("kdist init", "kernel_distance_init"), ("kdist end", "kernel_distance_final"),
            ("krel init", "kernel_relative_init"), ("krel end", "kernel_relative_final"),
            ("gap init", "output_gap_init"), ("gap end", "output_gap_final"), ("drift end", "kernel_drift_final"),
            ("search s", "search_seconds"), ("train s", "train_seconds")]
    for g in sorted({(r["dataset"], r["model"], r["eps"]) for r in rows}):
        lines += [f"## {g[0]}, {g[1]}, eps = {g[2]:g}", "",
                  "| method | density | " + " | ".join(c for c, _ in cols) + " |",
                  "|---|---:|" + "---:|" * len(cols)]
        for row in rows:
            if (row["dataset"], row["model"], row["eps"]) != g:
                continue
            digits = {"search_seconds": 1, "train_seconds": 1}
            lines.append(f"| {row['method']} | {row['density']:g} | " + " | ".join(
                _pm(row[f], digits.get(f, 3)) for _, f in cols) + " |")
        lines.append("")
    if claim_list:
        lines += ["## The paper's implication, checked", "",
                  "AWT's PGD robust accuracy within 2 points of dense, and its dense-vs-ticket kernel distance below "
                  "every other method's at every tracked epoch (means over seeds):", ""]
        for c in claim_list:
            if not c.get("tested"):
                lines.append(f"- {c['group']}, density {c['density']:g}: not tested ({c['why']}).")
                continue
            margins = ", ".join(f"{m} {v:+.4f}" if v is not None else f"{m} n/a"
                                for m, v in c["kernel_margin_min"].items())
            lines.append(
                f"- {c['group']}, density {c['density']:g}: accuracy "
                f"{'HOLDS' if c['accuracy_holds'] else 'FAILS'} (AWT {c['awt_pgd_acc']:.3f} vs dense "
                f"{c['dense_pgd_acc']:.3f}); kernel distance {'HOLDS' if c['kernel_holds'] else 'FAILS'} "
                f"(smallest margin over epochs, baseline − AWT: {margins or 'no baseline'}).")
        lines.append("")
    if figs:
        lines += ["## Figures", ""]
        for name, p in figs.items():
            lines += [f"![{name}]({os.path.relpath(p, out)})", ""]
    lines += ["Files: `results.json` (config, every run with its history, aggregates, claims), `results.csv` "
              "(one row per run), `runs/<method>-d<density>-<hash>/seed-<seed>/` (status, checkpoint, "
              "history, result).", ""]
    return "\n".join(lines)


def write_report(records: Sequence[Mapping], out: str | os.PathLike, *, config=None,
                 failed: Sequence[Mapping] = (), figure_folder: str = "figures") -> dict[str, Path]:
    """Write ``results.json``, ``results.csv``, the figures and ``summary.md`` into ``out``
    (every file atomically); returns name -> path."""
    out = Path(out)
    records = list(records)
    rows = aggregate(records)
    claim_list = claims(records)
    figs = figures(records, out / figure_folder) if records else {}
    paths: dict[str, Path] = {}
    paths["json"] = atomic_write_json(out / "results.json", to_jsonable({
        "config": config.to_dict() if hasattr(config, "to_dict") else config,
        "runs": records, "aggregates": rows, "claims": claim_list, "failed": list(failed)}))
    paths["csv"] = write_csv(records, out / "results.csv")
    paths["summary"] = atomic_write_text(out / "summary.md", _summary(records, rows, claim_list, figs, out,
                                                                      config, failed))
    paths.update({f"figure:{k}": v for k, v in figs.items()})
    return paths

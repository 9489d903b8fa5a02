"""empirical.report: aggregates (against numpy), the CSV, the figures, the claims and summary.md on
planted records whose answers are known."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from empirical import report


def _rec(method, density, seed, pgd, kd_curve, gap_curve=None, **kw):
    hist = [{"epoch": e, report.KERNEL_KEY: k, report.OUTPUT_KEY: (gap_curve or kd_curve)[e]}
            for e, k in enumerate(kd_curve)]
    r = {"dataset": "digits", "model": "mlp", "method": method, "density": density, "seed": seed, "eps": 0.1,
         "clean_acc": pgd + 0.2, "fgsm_acc": pgd + 0.05, "pgd_acc": pgd, "crosscheck_pgd_acc": pgd,
         "kernel_distance_init": kd_curve[0], "kernel_distance_final": kd_curve[-1],
         "output_gap_init": (gap_curve or kd_curve)[0], "output_gap_final": (gap_curve or kd_curve)[-1],
         "kernel_drift_final": 0.1, "search_seconds": 1.0, "train_seconds": 2.0, "device": "cpu",
         "key": f"{method}{density}", "run_dir": f"runs/{method}-d{density}/seed-{seed}", "history": hist}
    r.update(kw)
    return r


def _records(awt_pgd=(0.60, 0.62, 0.61), awt_kd=0.05):
    rs = []
    for s, p in enumerate((0.62, 0.63, 0.61)):
        rs.append(_rec("dense", 1.0, s, p, [0.0, 0.0, 0.0]))
    for s in range(3):
        rs.append(_rec("awt", 0.1, s, awt_pgd[s], [awt_kd, awt_kd + 0.01, awt_kd + 0.02],
                       search_diagnostics=[{"kernel": 1.0 / (i + 1), "output": 0.5 / (i + 1)} for i in range(6)]))
        rs.append(_rec("random", 0.1, s, 0.50 + 0.01 * s, [0.2, 0.21, 0.22]))
        rs.append(_rec("random", 0.5, s, 0.58, [0.1, 0.11, 0.12]))
    return rs


def test_aggregate_mean_and_sample_std_over_seeds():
    rows = report.aggregate(_records())
    assert [(r["method"], r["density"]) for r in rows] == [("dense", 1.0), ("awt", 0.1), ("random", 0.5), ("random", 0.1)]
    awt = rows[1]
    assert awt["pgd_acc"]["mean"] == pytest.approx(np.mean([0.60, 0.62, 0.61]))
    assert awt["pgd_acc"]["std"] == pytest.approx(np.std([0.60, 0.62, 0.61], ddof=1))
    assert awt["pgd_acc"]["n"] == 3 and awt["seeds"] == [0, 1, 2]
    one = report.aggregate(_records()[:1])[0]
    assert one["pgd_acc"]["std"] == 0.0 and one["pgd_acc"]["n"] == 1


def test_none_values_are_left_out_not_zero():
    rs = _records()
    for r in rs:
        if r["method"] == "random":
            r["crosscheck_pgd_acc"] = None
    rows = {(r["method"], r["density"]): r for r in report.aggregate(rs)}
    assert rows[("random", 0.1)]["crosscheck_pgd_acc"] == {"mean": None, "std": None, "n": 0}


def test_claims_hold_and_fail_on_planted_numbers():
    ok = [c for c in report.claims(_records()) if c["density"] == 0.1][0]
    assert ok["tested"] and ok["accuracy_holds"] and ok["kernel_holds"]
    assert ok["kernel_margin_min"]["random"] == pytest.approx(0.2 - 0.05)
    # 3 points below dense: the accuracy claim fails
    low = [c for c in report.claims(_records(awt_pgd=(0.59, 0.59, 0.59))) if c["density"] == 0.1][0]
    assert not low["accuracy_holds"] and low["kernel_holds"]
    # AWT's kernel distance above the baseline's at some epoch: the kernel claim fails
    far = [c for c in report.claims(_records(awt_kd=0.205)) if c["density"] == 0.1][0]
    assert not far["kernel_holds"] and far["kernel_margin_min"]["random"] < 0
    untested = [c for c in report.claims(_records()) if c["density"] == 0.05][0]
    assert untested["tested"] is False


def test_write_report_files(tmp_path):
    rs = _records()
    paths = report.write_report(rs, tmp_path, config={"note": "planted"})
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"] == {"note": "planted"} and len(data["runs"]) == 12 and len(data["aggregates"]) == 4
    with open(tmp_path / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and tuple(rows[0]) == report.CSV_FIELDS
    assert rows[0]["method"] == "dense" and float(rows[0]["pgd_acc"]) == 0.62
    for name in ("robust_accuracy", "kernel_distance", "output_gap", "awt_objective"):
        png = tmp_path / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert paths[f"figure:{name}"] == png
    md = (tmp_path / "summary.md").read_text()
    assert "| awt | 0.1 | 0.810 ± 0.010 |" in md           # clean = pgd + 0.2, over three seeds
    assert "![robust_accuracy](figures/robust_accuracy.png)" in md
    assert "density 0.1: accuracy HOLDS" in md and "density 0.05: not tested" in md


def test_figures_without_tracking_or_awt_are_left_out(tmp_path):
    rs = [r for r in _records() if r["method"] != "awt"]
    for r in rs:
        r["history"] = []
    figs = report.figures(rs, tmp_path)
    assert set(figs) == {"robust_accuracy"}


def test_several_groups_get_suffixes(tmp_path):
    rs = _records() + [{**r, "eps": 0.2} for r in _records()]
    figs = report.figures(rs, tmp_path)
    assert "robust_accuracy-digits-mlp-eps0.1" in figs and "kernel_distance-digits-mlp-eps0.2" in figs


@pytest.mark.parametrize("diag, keys", [
    ([{"iteration": 0, "kernel": 1.0, "output": 2.0}, {"iteration": 1, "kernel": 0.5, "output": 1.0}], {"kernel", "output"}),
    ({"kernel": [1.0, 0.5], "output": [2.0, 1.0], "final": 3}, {"kernel", "output"}),
    ({"history": {"total": [1.0, 0.5, 0.2]}}, {"total"}),
    ({"time": 3.0}, set()),
])
def test_diagnostic_series_shapes(diag, keys):
    assert set(report._diagnostic_series(diag)) == keys

"""proofs_checks: registry, C1 (passes and can fail), the `awt verify` command end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ntk_theory.infinite import mlp
from proofs_checks.cli import main
from proofs_checks.checks.c01_ntk_concentration import check_c1
from proofs_checks.registry import CheckResult, get_check, registry, run_checks
from proofs_checks.stats import bootstrap_slope, loglog_slope

SMALL = dict(widths=[64, 128, 256, 512], seeds=4, n_points=6)


def test_registry_lists_c1():
    reg = registry()
    assert "C1" in reg and reg["C1"].rigour == "theorem"
    with pytest.raises(ValueError, match="only"):
        get_check("C999")
    with pytest.raises(ValueError, match="scale"):
        run_checks(["C1"], scale="huge")


def test_loglog_slope_and_bootstrap_recover_a_known_power_law():
    rng = np.random.default_rng(0)
    x = np.array([64, 128, 256, 512, 1024])
    samples = [3.0 * xi ** -0.5 * np.exp(0.05 * rng.standard_normal(8)) for xi in x]
    slope, (lo, hi) = bootstrap_slope(x, samples, n_boot=500)
    assert abs(slope + 0.5) < 0.05 and lo < slope < hi
    assert loglog_slope(x, 2.0 * x ** 1.5) == pytest.approx(1.5)


def test_c1_passes_with_the_closed_form():
    res = check_c1(scale="quick", seed=0, **SMALL)
    assert isinstance(res, CheckResult)
    assert res.passed, res.summary()
    assert -0.65 <= res.measured["slope_ntk"] <= -0.35
    lo, hi = res.measured["ci_ntk"]
    assert lo <= res.measured["slope_ntk"] <= hi
    json.dumps(res.to_dict())


@pytest.mark.parametrize("wrong", [
    mlp(2, "relu", sigma_w=1.1 * 2 ** 0.5),    # sigma_w off by 10 %
    mlp(3, "relu"),                            # one layer too deep
    mlp(2, "relu", sigma_b=0.3),               # a bias that the network does not have
])
def test_c1_fails_with_a_planted_wrong_kernel(wrong):
    res = check_c1(scale="quick", seed=0, reference=wrong, **SMALL)
    assert not res.passed
    assert res.measured["slope_ntk"] > -0.35    # the error plateaus instead of decaying


def test_awt_verify_cli_end_to_end(tmp_path, capsys, monkeypatch):
    import proofs_checks.checks.c01_ntk_concentration as c1
    monkeypatch.setitem(c1.PARAMS, "quick", dict(c1.PARAMS["quick"], **SMALL))
    out = tmp_path / "rep"
    assert main(["verify", "--list"]) == 0
    assert "C1" in capsys.readouterr().out
    code = main(["verify", "--only", "C1", "--out", str(out), "--seed", "1"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "PASS" in text and "1 passed, 0 failed" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] and rep["checks"][0]["id"] == "C1" and rep["seed"] == 1
    assert (out / "report.md").exists()
    assert not list(out.glob(".*.tmp"))          # atomic writes leave no temporaries
    assert main(["verify", "--only", "C42", "--out", str(out)]) == 2


def test_awt_verify_exits_nonzero_when_a_check_fails(tmp_path, monkeypatch, capsys):
    import proofs_checks.checks.c01_ntk_concentration as c1
    from proofs_checks import registry as reg_mod
    orig = reg_mod._REGISTRY["C1"]
    planted = lambda scale, seed: c1.check_c1(scale, seed, reference=mlp(3), **SMALL)
    monkeypatch.setitem(reg_mod._REGISTRY, "C1", reg_mod.Check("C1", orig.title, orig.statement, orig.rigour, planted))
    assert main(["verify", "--only", "C1", "--out", str(tmp_path)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_console_script_runs(tmp_path):
    exe = Path(sys.executable).with_name("awt")     # the installed console script (make install)
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "proofs_checks.cli"]
    proc = subprocess.run(cmd + ["verify", "--list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "C1" in proc.stdout


def test_c3_passes_and_fails_with_a_wrong_exponent():
    from proofs_checks.checks.c03_masked_scaling import check_c3
    small = dict(width=512, seeds=4, densities=[0.5, 0.2])
    res = check_c3(seed=0, **small)
    assert res.passed, res.summary()
    for row in res.details["rows"]:
        assert row["tolerance"] < 0.5 * row["predicted"]     # the tolerance is tight enough to fail
    wrong = check_c3(seed=0, exponent=3, **small)
    assert not wrong.passed


def test_c6_holds_and_a_too_tight_bound_fails():
    from proofs_checks.checks.c06_dynamics_perturbation import check_c6
    res = check_c6(seed=0)
    assert res.passed and res.measured["violations"] == 0
    assert 0.05 < res.measured["max_gap_over_bound"] <= 1.0     # non-trivial: the bound is not vacuous
    assert not check_c6(seed=0, bound_factor=0.1).passed


def test_registry_order_is_numeric():
    ids = list(registry())
    assert {"C1", "C3", "C6", "C7"} <= set(ids)
    nums = [int(i[1:]) for i in ids]
    assert nums == sorted(nums)  # C2 before C10, not after C1x


def test_c7_linear_in_eps_and_a_quadratic_claim_fails():
    from proofs_checks.checks.c07_adversarial_ntk_lipschitz import check_c7
    for seed in range(3):
        res = check_c7(seed=seed)
        assert res.passed, res.summary()
    assert abs(res.measured["slope"] - 1.0) < 0.05
    assert not check_c7(seed=0, band=(1.9, 2.1)).passed


def test_awt_verify_checkpoints_after_each_check_and_resumes(tmp_path, monkeypatch, capsys):
    """An interrupted run leaves a complete, atomic partial report; --resume reruns only the rest,
    and only for the same scale and seed."""
    from proofs_checks import registry as reg_mod
    calls = {"C6": 0, "C7": 0}

    def wrap(cid, interrupt):
        orig = reg_mod._REGISTRY[cid]

        def fn(scale, seed):
            calls[cid] += 1
            if interrupt["on"]:
                raise KeyboardInterrupt
            return orig.fn(scale=scale, seed=seed)
        monkeypatch.setitem(reg_mod._REGISTRY, cid, reg_mod.Check(cid, orig.title, orig.statement, orig.rigour, fn))

    stop7 = {"on": True}
    wrap("C6", {"on": False})
    wrap("C7", stop7)
    out = tmp_path / "rep"
    with pytest.raises(KeyboardInterrupt):
        main(["verify", "--only", "C6", "--only", "C7", "--out", str(out)])
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] is False and [c["id"] for c in rep["checks"]] == ["C6"]
    assert "Partial report" in (out / "report.md").read_text() and (out / "C6.png").exists()
    assert not list(out.glob(".*.tmp"))
    stop7["on"] = False
    assert main(["verify", "--only", "C6", "--only", "C7", "--out", str(out), "--resume"]) == 0
    assert calls == {"C6": 1, "C7": 2}  # C6 reused from the partial report, C7 run again
    assert "resuming from" in capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] is True and [c["id"] for c in rep["checks"]] == ["C6", "C7"] and rep["passed"]
    # another seed measures something else: nothing is reused
    assert main(["verify", "--only", "C6", "--out", str(out), "--resume", "--seed", "1"]) == 0
    assert calls["C6"] == 2 and "running every check" in capsys.readouterr().err
    # a file that is not a report is not trusted
    (out / "report.json").write_text("{not json")
    assert main(["verify", "--only", "C7", "--out", str(out), "--resume"]) == 0
    assert calls["C7"] == 3 and "not a readable awt report" in capsys.readouterr().err


@pytest.mark.parametrize("factor", [1.01, 0.99])
def test_c1_bias_test_catches_a_reference_one_percent_off(factor):
    """A reference with sigma_w 1 % off (NTK about 6 % off) keeps the slope in band (the finite-width
    error dominates it), but the Monte-Carlo bias statistic sees it."""
    wrong = mlp(2, "relu", factor * 2 ** 0.5)
    res = check_c1(scale="quick", seed=0, reference=wrong)
    assert -0.65 <= res.measured["slope_ntk"] <= -0.35  # the slope alone would pass
    assert res.measured["bias_z_ntk"] > 2.5 and not res.passed
    good = check_c1(scale="quick", seed=0)
    assert good.passed and good.measured["bias_z_ntk"] < 2.0


def test_bias_z_is_about_one_without_bias_and_grows_with_it():
    import torch
    from proofs_checks.stats import bias_z
    g = torch.Generator().manual_seed(0)
    widths = [64, 256, 1024]
    limit = torch.zeros(20)
    ks = [torch.randn(8, 20, generator=g, dtype=torch.float64) / w ** 0.5 for w in widths]
    z0 = bias_z(widths, ks, limit)
    assert 0.5 < z0 < 1.6
    assert bias_z(widths, ks, limit + 0.05) > 3 * z0


def test_bias_z_rejects_mismatched_inputs():
    import torch
    from proofs_checks.stats import bias_z
    k = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="kernels"):
        bias_z([64, 128], [k], torch.zeros(3))
    with pytest.raises(ValueError, match=r"kernels\[0\]"):
        bias_z([64], [k], torch.zeros(2))
    with pytest.raises(ValueError, match=r"kernels\[0\]"):
        bias_z([64], [k[:1]], torch.zeros(3))  # one seed: no standard error

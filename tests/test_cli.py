"""The ``awt`` command line as a user runs it: the dispatcher, ``awt verify``'s argument checks
(exit 2 with one line, before any check runs), its exit statuses, the report, checkpoints,
``--resume`` (which never loses a finished result), ``--list``/``--only`` and Ctrl-C.

Tests marked ``# Was:`` are regressions of issue 13's defects."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

from proofs_checks import registry as reg_mod
from proofs_checks.cli import main
from proofs_checks.registry import Outcome, register, registry

TEN = ["C1", "C2", "C3", "C4", "C5", "C6", "C7", "C10", "C11", "C12"]


@pytest.fixture
def fake(monkeypatch):
    """Replace the registry by fake checks C1..C12 (ids of the real ones) that log their runs.

    ``fake.fail`` holds ids that fail, ``fake.interrupt`` ids that raise KeyboardInterrupt,
    ``fake.log`` the ids run, in order.
    """
    registry()
    monkeypatch.setattr(reg_mod, "_REGISTRY", {})
    state = types.SimpleNamespace(log=[], fail=set(), interrupt=set(), probe=None)
    params = {"quick": dict(n=1), "full": dict(n=2)}
    for cid in TEN:
        def body(p, seed, cid=cid):
            state.log.append(cid)
            if state.probe is not None:
                state.probe(cid)
            if cid in state.interrupt:
                raise KeyboardInterrupt
            return Outcome(parameters={}, measured=dict(value=float(p["n"]), nan=math.nan), expected=dict(value=1.0),
                           passed=cid not in state.fail,
                           details=dict(series=dict(x=[64, 128], y={"v": [1.0, 0.5]}, loglog=True))
                           if cid in ("C1", "C2") else {})
        register(cid, title=f"fake {cid}", statement=f"fake statement {cid}", rigour="theorem", params=params)(
            _positional(body))
    return state


def _positional(body):
    def check(p, seed):
        return body(p, seed)
    return check


def _report(out):
    return json.loads((Path(out) / "report.json").read_text())


def _ids(out):
    return [c["id"] for c in _report(out)["checks"]]


def _one_line(text):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in text
    return lines[0]


# --------------------------------------------------------------------------------------------- the run
def test_verify_end_to_end_writes_the_report(fake, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["verify", "--out", str(out), "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "10 passed, 0 failed" in text and text.count("PASS") == 10
    rep = _report(out)
    assert rep["passed"] and rep["complete"] and rep["seed"] == 1 and rep["scale"] == "quick"
    assert [c["id"] for c in rep["checks"]] == TEN
    assert rep["checks"][0]["statement"] == "fake statement C1" and rep["checks"][0]["parameters"]["seed"] == 1
    assert math.isnan(rep["checks"][0]["measured"]["nan"])
    assert (out / "report.md").exists() and (out / "C1.png").exists() and (out / "C2.png").exists()
    assert "![C2](C2.png)" in (out / "report.md").read_text() and not (out / "C3.png").exists()
    assert not list(out.glob(".*.tmp"))          # atomic writes leave no temporaries


def test_exit_status_is_1_when_a_check_fails(fake, tmp_path, capsys):
    fake.fail = {"C3"}
    assert main(["verify", "--out", str(tmp_path)]) == 1
    assert "9 passed, 1 failed" in capsys.readouterr().out


def test_real_check_through_the_cli(tmp_path, capsys):
    assert main(["verify", "--only", "C7", "--out", str(tmp_path)]) == 0
    assert "1 passed, 0 failed" in capsys.readouterr().out and _ids(tmp_path) == ["C7"]


# --------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("args, word", [
    (["--seed", "-1"], "--seed"),                      # Was: a numpy traceback from C1's bootstrap, exit 1
    (["--seed", str(2 ** 32)], "--seed"),
    (["--seed", "abc"], "--seed"),
    (["--only", "C42"], "--only"),
    (["--only", "C7", "--only", "nope"], "--only"),
    (["--scale", "huge"], "--scale"),
    (["--frobnicate"], "unrecognized"),
])
def test_bad_arguments_exit_2_with_one_line_before_any_check(fake, tmp_path, capsys, args, word):
    assert main(["verify", "--out", str(tmp_path / "r")] + args) == 2
    cap = capsys.readouterr()
    assert word in _one_line(cap.err) and cap.out == ""
    assert fake.log == [] and not (tmp_path / "r").exists()


def test_seed_minus_one_with_only_c7_is_refused_too(fake, tmp_path, capsys):
    # Was: `--only C7 --seed -1` passed (C7 does not use numpy's seeding), `--seed -1` alone crashed
    assert main(["verify", "--only", "C7", "--seed", "-1", "--out", str(tmp_path)]) == 2
    assert "--seed" in _one_line(capsys.readouterr().err) and fake.log == []


def test_cuda_without_cuda_is_a_usage_error(fake, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["verify", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device" in _one_line(capsys.readouterr().err) and fake.log == []


@pytest.mark.parametrize("kind", ["existing file", "under a file"])
def test_unusable_out_exits_2_before_any_check(fake, tmp_path, capsys, kind):
    # Was: a traceback and exit 1, the second one after the check had already run
    f = tmp_path / "file"
    f.write_text("not a folder")
    out = f if kind == "existing file" else f / "sub" / "rep"
    assert main(["verify", "--only", "C7", "--out", str(out)]) == 2
    assert "--out" in _one_line(capsys.readouterr().err)
    assert fake.log == [] and f.read_text() == "not a folder"


def test_help_exits_0(capsys):
    assert main(["verify", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "130" in out


# --------------------------------------------------------------------------------------------- --only, --list
def test_duplicate_only_runs_once(fake, tmp_path, capsys):
    # Was: `--only C7 --only C7` ran C7 twice and reported "2 passed"
    assert main(["verify", "--only", "C7", "--only", "C7", "--only", "c7", "--out", str(tmp_path)]) == 0
    assert fake.log == ["C7"] and "1 passed, 0 failed" in capsys.readouterr().out and _ids(tmp_path) == ["C7"]


def test_only_runs_in_registry_order(fake, tmp_path, capsys):
    assert main(["verify", "--only", "C10", "--only", "C2", "--out", str(tmp_path)]) == 0
    assert fake.log == ["C2", "C10"] and _ids(tmp_path) == ["C2", "C10"]


def test_list_honours_only(fake, capsys):
    # Was: `--list --only C1` listed every check
    assert main(["verify", "--list", "--only", "C1"]) == 0
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()] == ["C1"]
    assert main(["verify", "--list"]) == 0
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()] == TEN
    assert fake.log == []


# --------------------------------------------------------------------------------------------- checkpoints, resume
def test_the_partial_report_is_rewritten_after_each_check(fake, tmp_path, capsys):
    out = tmp_path / "rep"
    seen = []

    def probe(cid):
        if cid == "C3":      # runs third: the report on disk holds exactly the two finished checks
            rep = _report(out)
            seen.append(([c["id"] for c in rep["checks"]], rep["complete"]))
            assert not list(out.glob(".*.tmp"))
    fake.probe = probe
    assert main(["verify", "--only", "C1", "--only", "C2", "--only", "C3", "--out", str(out)]) == 0
    assert seen == [(["C1", "C2"], False)]
    assert _report(out)["complete"] is True and _ids(out) == ["C1", "C2", "C3"]


def test_ctrl_c_prints_one_line_on_how_to_resume_and_exits_130(fake, tmp_path, capsys):
    # Was: a full KeyboardInterrupt traceback
    out = tmp_path / "rep"
    fake.interrupt = {"C3"}
    assert main(["verify", "--out", str(out)]) == 130
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("running ")]
    assert len(err) == 1 and "--resume" in err[0] and "2 result(s) kept" in err[0]
    rep = _report(out)
    assert rep["complete"] is False and _ids(out) == ["C1", "C2"]
    assert "Partial report" in (out / "report.md").read_text() and (out / "C2.png").exists()
    fake.interrupt = set()
    fake.log.clear()
    assert main(["verify", "--out", str(out), "--resume"]) == 0
    assert fake.log == TEN[2:]                         # C1, C2 reused
    assert "resuming from" in capsys.readouterr().err
    assert _report(out)["complete"] is True and _ids(out) == TEN


def test_resume_with_only_on_a_complete_report_keeps_every_result(fake, tmp_path, capsys):
    # Was: `--resume --only C7` on a complete ten-check report rewrote it with C7 alone
    out = tmp_path / "rep"
    assert main(["verify", "--out", str(out)]) == 0
    before = _report(out)["checks"]
    fake.log.clear()
    assert main(["verify", "--resume", "--only", "C7", "--out", str(out)]) == 0
    assert fake.log == []                                # C7 is done: reused
    after = _report(out)
    assert [c["id"] for c in after["checks"]] == TEN and after["complete"]
    assert [c["measured"]["value"] for c in after["checks"]] == [c["measured"]["value"] for c in before]
    assert "C12" in (out / "report.md").read_text()


def test_resume_merges_new_checks_into_an_earlier_report(fake, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["verify", "--only", "C1", "--only", "C5", "--out", str(out)]) == 0
    assert main(["verify", "--resume", "--only", "C3", "--out", str(out)]) == 0
    assert fake.log == ["C1", "C5", "C3"] and _ids(out) == ["C1", "C3", "C5"]
    assert "2 earlier result(s) kept" in capsys.readouterr().out


def test_resume_twice_keeps_reused_results_and_reports_a_reused_failure(fake, tmp_path, capsys):
    out = tmp_path / "rep"
    fake.fail = {"C1"}
    fake.interrupt = {"C2", "C3"}
    args = ["verify", "--only", "C1", "--only", "C2", "--only", "C3", "--out", str(out)]
    assert main(args) == 130
    fake.interrupt = {"C3"}
    assert main(args + ["--resume"]) == 130             # interrupted again, one check further
    assert _ids(out) == ["C1", "C2"] and _report(out)["complete"] is False
    fake.interrupt = set()
    assert main(args + ["--resume"]) == 1               # the reused C1 failed: the run fails
    assert fake.log == ["C1", "C2", "C2", "C3", "C3"]
    rep = _report(out)
    assert rep["complete"] is True and rep["passed"] is False
    assert [(c["id"], c["passed"]) for c in rep["checks"]] == [("C1", False), ("C2", True), ("C3", True)]


@pytest.mark.parametrize("change", [["--scale", "full"], ["--seed", "1"]])
def test_resume_refuses_a_report_of_another_scale_or_seed(fake, tmp_path, capsys, change):
    # a resumed run that overwrote it would lose every result it holds
    out = tmp_path / "rep"
    assert main(["verify", "--only", "C1", "--out", str(out)]) == 0
    saved = (out / "report.json").read_text()
    capsys.readouterr()
    assert main(["verify", "--only", "C1", "--out", str(out), "--resume"] + change) == 2
    assert "--resume" in _one_line(capsys.readouterr().err)
    assert (out / "report.json").read_text() == saved and fake.log == ["C1"]


def test_resume_refuses_an_unreadable_report(fake, tmp_path, capsys):
    (tmp_path / "report.json").write_text("{not json")
    assert main(["verify", "--out", str(tmp_path), "--resume"]) == 2
    assert "not a readable awt report" in _one_line(capsys.readouterr().err) and fake.log == []


def test_resume_without_a_report_runs_everything(fake, tmp_path, capsys):
    assert main(["verify", "--only", "C7", "--out", str(tmp_path / "new"), "--resume"]) == 0
    assert fake.log == ["C7"] and "no report" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- the dispatcher
def test_experiment_is_dispatched_to_empirical_cli(monkeypatch):
    seen = []
    mod = types.ModuleType("empirical.cli")
    mod.main = lambda argv: seen.append(list(argv)) or 3
    monkeypatch.setitem(sys.modules, "empirical.cli", mod)
    assert main(["experiment", "run", "--config", "x.toml", "--help"]) == 3
    assert seen == [["run", "--config", "x.toml", "--help"]]
    mod.main = lambda argv: None
    assert main(["experiment"]) == 0


def test_experiment_without_empirical_cli_prints_one_line_and_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "empirical.cli", None)     # import raises ImportError (name empirical.cli)
    assert main(["experiment", "--help"]) == 2
    assert "empirical.cli" in _one_line(capsys.readouterr().err)


def test_top_level_help_names_both_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "verify" in out and "experiment" in out
    assert main([]) == 2                                  # no subcommand: a usage error
    assert "awt" in _one_line(capsys.readouterr().err)


# --------------------------------------------------------------------------------------------- as a process
def _awt():
    exe = Path(sys.executable).with_name("awt")     # the installed console script (make install)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "proofs_checks.cli"]


def test_console_script_lists_and_validates(tmp_path):
    proc = subprocess.run(_awt() + ["verify", "--list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "C1" in proc.stdout
    proc = subprocess.run(_awt() + ["verify", "--seed", "-1", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--seed" in _one_line(proc.stderr)


def test_sigint_ends_a_real_run_with_130_and_no_traceback(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "proofs_checks.cli", "verify", "--only", "C5", "--scale", "full",
                             "--out", str(tmp_path)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stderr.readline()              # "running C5: ..." : the check has started
        assert line.startswith("running C5"), line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err

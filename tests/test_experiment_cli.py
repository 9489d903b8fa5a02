"""``awt experiment`` (empirical.cli.main): settings precedence, bad input (status 2, one line,
nothing written), and end-to-end sweeps on tiny settings with the real data, models, tickets,
training, evaluation and tracking, through the local and Ray executors, reading the files."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from empirical import cli
from empirical.experiment import ExperimentConfig, plan, run_dir

REPO = Path(__file__).resolve().parents[1]


def _args(argv):
    return cli.config_from_args(cli.build_parser().parse_args(argv))


# ---- settings -------------------------------------------------------------------------------------

def test_no_arguments_is_the_default_sweep():
    config, out, executor, address = _args([])
    assert config == ExperimentConfig() and out == "awt-experiment" and executor == "local" and address is None
    assert len(plan(config)) == 3 * (1 + 5 * 4)


def test_flags_override_toml_override_preset(tmp_path):
    toml = tmp_path / "exp.toml"
    toml.write_text('preset = "mnist"\nmethods = ["dense", "awt"]\nepochs = 3\nout = "from-toml"\n'
                    'executor = "ray"\n[hparams.awt]\niterations = 5\n[model_options.lenet300_100]\n')
    config, out, executor, _ = _args(["--config", str(toml), "--epochs", "2", "--densities", "0.1,0.05"])
    assert config.models == ("lenet300_100",)                      # from the preset
    assert config.methods == ("dense", "awt") and config.hparams == {"awt": {"iterations": 5}}   # from the file
    assert config.epochs == 2 and config.densities == (0.1, 0.05)  # from the flags
    assert out == "from-toml" and executor == "ray"
    config, out, executor, _ = _args(["--config", str(toml), "--preset", "default", "--out", "o", "--executor", "local"])
    assert config.models == ("mlp",) and out == "o" and executor == "local"
    config, *_ = _args(["--widths", "32,16", "--preset", "mnist", "--data-root", str(tmp_path)])
    assert config.model_options["mlp"]["widths"] == (32, 16) and config.data_root == str(tmp_path)


def test_help_returns_zero(capsys):
    assert cli.main(["--help"]) == 0
    assert "--executor" in capsys.readouterr().out


# ---- bad input: one line, status 2, nothing written ---------------------------------------------

def _bad(tmp_path, argv, match, capsys):
    out = tmp_path / "out"
    assert cli.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("awt experiment: error:") and match in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv, match", [
    (["--densities", "0"], "densities: 0.0 is outside (0, 1]"),
    (["--densities", "1.2"], "outside (0, 1]"),
    (["--eps", "-0.1"], "eps: -0.1"),
    (["--executor", "dask"], "--executor: 'dask' is not one of local, ray, slurm"),
    (["--norm", "l3"], "norm"),
    (["--epochs", "x"], "--epochs"),
    (["--densities", "a,b"], "comma-separated numbers"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--config", "/nonexistent/exp.toml"], "is not a file"),
])
def test_bad_input_shallow(tmp_path, capsys, argv, match):
    _bad(tmp_path, argv, match, capsys)


def test_unknown_config_key(tmp_path, capsys):
    toml = tmp_path / "exp.toml"
    toml.write_text("densitys = [0.1]\n")
    _bad(tmp_path, ["--config", str(toml)], "unknown key(s) 'densitys'", capsys)
    toml.write_text("densities = [0.1\n")
    _bad(tmp_path, ["--config", str(toml)], "not valid TOML", capsys)


@pytest.mark.parametrize("argv, match", [
    (["--methods", "dense,awt,nonsense"], "methods: 'nonsense' is not one of"),
    (["--datasets", "imagenet"], "datasets: 'imagenet'"),
    (["--models", "resnet9000"], "models: 'resnet9000'"),
    (["--device", "cuda"], "cuda"),
])
def test_bad_names(tmp_path, capsys, argv, match):
    if "cuda" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is present")
    _bad(tmp_path, argv, match, capsys)


def test_data_root_without_files(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(tmp_path, ["--preset", "mnist", "--data-root", str(empty)], "datasets: 'mnist'", capsys)


def test_missing_executor_package(tmp_path, capsys, monkeypatch):
    import importlib

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda m, *a, **k: (_ for _ in ()).throw(ModuleNotFoundError(m)) if m == "ray" else real(m, *a, **k))
    _bad(tmp_path, ["--executor", "ray"], "needs the 'ray' package", capsys)


# ---- end to end on tiny settings ----------------------------------------------------------------

TINY = ["--n-train", "240", "--n-test", "80", "--widths", "32,32", "--epochs", "2", "--steps", "2",
        "--eval-steps", "3", "--probe-clean", "8", "--probe-adv", "8", "--batch-size", "60", "--no-progress"]


def _tiny_toml(tmp_path, methods=("dense", "awt", "random"), densities=(0.2,), seeds=(0,)):
    toml = tmp_path / "tiny.toml"
    toml.write_text(
        f"methods = {json.dumps(list(methods))}\ndensities = {json.dumps(list(densities))}\n"
        f"seeds = {json.dumps(list(seeds))}\n" + TINY_HPARAMS)
    return toml


# the search budget of each method on tiny settings (names from empirical.tickets)
TINY_HPARAMS = ""


def _read(out: Path):
    res = json.loads((out / "results.json").read_text())
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    return res, rows


def _numbers(out: Path):
    res, rows = _read(out)
    drop = ("wall_seconds", "search_seconds", "train_seconds", "resumed", "history", "search_diagnostics")
    scal = sorted(({k: v for k, v in r.items() if k not in drop} for r in res["runs"]), key=lambda r: r["run_dir"])
    hist = {r["run_dir"]: [{k: v for k, v in h.items() if k != "seconds" and not k.endswith("seconds")}
                           for h in r["history"]] for r in res["runs"]}
    return scal, hist


def test_end_to_end_local(tmp_path):
    out = tmp_path / "out"
    rc = cli.main(["--config", str(_tiny_toml(tmp_path)), *TINY, "--out", str(out)])
    assert rc == 0
    res, rows = _read(out)
    assert len(rows) == 3 and {r["method"] for r in rows} == {"dense", "awt", "random"}
    for r in rows:
        for f in ("clean_acc", "fgsm_acc", "pgd_acc", "kernel_distance_final", "output_gap_final",
                  "kernel_drift_final", "search_seconds", "train_seconds", "device"):
            assert r[f] != "", (r["method"], f)
        assert 0 <= float(r["pgd_acc"]) <= float(r["clean_acc"]) <= 1
        assert r["device"] == "cpu"
    dense = [r for r in rows if r["method"] == "dense"][0]
    assert float(dense["kernel_distance_final"]) == pytest.approx(0, abs=1e-6)   # dense vs itself
    tickets = [r for r in rows if r["method"] != "dense"]
    assert all(float(r["kernel_distance_init"]) > 0 for r in tickets)
    assert all(abs(float(r["achieved_density"]) - 0.2) < 0.05 for r in tickets)
    for run in res["runs"]:
        assert [h["epoch"] for h in run["history"]] == [0, 1, 2]
        assert (out / run["run_dir"] / "status.json").is_file()
    for f in ("summary.md", "figures/robust_accuracy.png", "figures/kernel_distance.png",
              "figures/output_gap.png", "figures/awt_objective.png"):
        assert (out / f).is_file(), f
    # a second call reuses every run
    mt = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    assert cli.main(["--config", str(_tiny_toml(tmp_path)), *TINY, "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == mt


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_end_to_end_ray_equals_local(tmp_path, ray_local):
    toml = _tiny_toml(tmp_path, methods=("dense", "awt", "magnitude"), seeds=(0, 1))
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert cli.main(["--config", str(toml), *TINY, "--out", str(local)]) == 0
    assert cli.main(["--config", str(toml), *TINY, "--out", str(ray_out), "--executor", "ray"]) == 0
    assert ray_local.is_initialized()          # the CLI used the running instance and left it
    assert _numbers(ray_out) == _numbers(local)
    assert len(_read(local)[1]) == 6


def test_refuses_while_components_are_missing(tmp_path, capsys, monkeypatch):
    # a module a run needs that cannot be imported: one line naming it, exit 2, nothing written
    monkeypatch.setitem(sys.modules, "empirical.train", None)
    out = tmp_path / "out"
    assert cli.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empirical.train" in err[0], err
    assert not out.exists()


def test_module_entry_point(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "empirical.cli", "--densities", "2", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "outside (0, 1]" in r.stderr and not out.exists()


@pytest.mark.slow
def test_kill_and_resume_loses_at_most_one_epoch(tmp_path):
    """Kill the CLI (SIGKILL) once a ticket run has checkpointed an epoch; the re-run resumes that
    run from its checkpoint, and every number and history equals an uninterrupted sweep's."""
    toml = _tiny_toml(tmp_path, methods=("dense", "random"))
    argv = ["--config", str(toml), *TINY, "--epochs", "40"]   # long enough to be caught mid-run
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "empirical.cli", *argv, "--out", str(killed)], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ticket = [s for s in plan(cli.config_from_args(cli.build_parser().parse_args(argv))[0]) if s.method == "random"][0]
    rdir = run_dir(killed, ticket)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            st = _status(rdir)
            if st and st.get("phase") == "train" and st.get("epoch", 0) >= 2:
                break
            assert p.poll() is None, p.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("the ticket run never reached epoch 2")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (rdir / "result.json").exists()
    epoch_at_kill = _status(rdir)["epoch"]
    assert cli.main([*argv, "--out", str(killed)]) == 0
    rec = json.loads((rdir / "result.json").read_text())
    assert rec["resumed"] is True
    assert cli.main([*argv, "--out", str(clean)]) == 0
    assert _numbers(killed) == _numbers(clean)
    assert epoch_at_kill >= 2


def _status(rdir: Path):
    try:
        return json.loads((rdir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None

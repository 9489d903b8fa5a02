"""empirical.experiment: configuration, run specs, content-addressed run folders, status files,
resume, the dense-first order, gathering. The sweep machinery is tested with a small deterministic
run function injected through ``run_experiment(run_fn=...)``; the real pieces end to end in
test_experiment_cli.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from empirical import experiment as ex
from empirical.experiment import ConfigError, ExperimentConfig, RunSpec, plan, run_experiment, validate

# ---- a small, deterministic run function with real checkpoints (injected, never in production) ----


def fake_run(spec: RunSpec, rdir: Path, *, dense_dir, progress=False, status=lambda *a, **k: None):
    """A run in ``epochs`` steps of a seeded random walk, checkpointed after each step with its RNG
    state (as adversarial_train does), so that an interrupted run resumes to the same numbers.
    ``AWT_FAKE_DIE_AT=<epoch>`` kills the process right after that epoch's checkpoint (kill tests)."""
    if dense_dir is not None:
        dense = json.loads((Path(dense_dir) / "result.json").read_text())   # the dense run finished first
        base = dense["pgd_acc"]
    else:
        base = None
    epochs = spec.settings["epochs"]
    ck = rdir / "checkpoint" / "state.pt"
    if ck.exists():
        state = torch.load(ck, weights_only=False)
        g = torch.Generator()
        g.set_state(state["rng"])
        epoch, history = state["epoch"], state["history"]
    else:
        seed = zlib.crc32(f"{spec.key()}:{spec.seed}".encode())
        g = torch.Generator().manual_seed(seed)
        epoch, history = 0, [{"epoch": 0, "vs_dense/kernel_distance": 0.5 * (1 - spec.density),
                              "vs_dense/output_gap": 1 - spec.density}]
    die_at = int(os.environ.get("AWT_FAKE_DIE_AT", "-1"))
    while epoch < epochs:
        epoch += 1
        noise = float(torch.rand((), generator=g))
        awt = 0.5 if spec.method == "awt" else 1.0
        history.append({"epoch": epoch, "train_loss": noise,
                        "vs_dense/kernel_distance": awt * (1 - spec.density) * (1 + 0.1 * epoch) + 0.01 * noise,
                        "vs_dense/output_gap": awt * (1 - spec.density) + 0.01 * noise})
        ex.atomic_torch_save(ck, {"epoch": epoch, "rng": g.get_state(), "history": history})
        status("train", epoch=epoch)
        if epoch == die_at:
            os._exit(9)
    acc = 0.5 + 0.4 * spec.density + 0.01 * float(torch.rand((), generator=g))
    return {"clean_acc": acc + 0.1, "fgsm_acc": acc + 0.02, "pgd_acc": acc, "crosscheck_pgd_acc": acc,
            "kernel_distance_init": history[0]["vs_dense/kernel_distance"],
            "kernel_distance_final": history[-1]["vs_dense/kernel_distance"],
            "output_gap_init": history[0]["vs_dense/output_gap"], "output_gap_final": history[-1]["vs_dense/output_gap"],
            "kernel_drift_final": 0.1, "search_seconds": 0.0, "train_seconds": 0.0, "device": "cpu",
            "dense_pgd_acc": base, "history": history,
            "search_diagnostics": [{"kernel": 1.0 / (i + 1), "output": 2.0 / (i + 1)} for i in range(5)]
            if spec.method == "awt" else None}


def failing_run(spec, rdir, *, dense_dir, progress=False, status=None):
    if spec.method == "random":
        raise RuntimeError("planted failure")
    return fake_run(spec, rdir, dense_dir=dense_dir)


def tiny(**kw) -> ExperimentConfig:
    base = dict(methods=("dense", "awt", "random"), densities=(0.5, 0.1), seeds=(0, 1), epochs=3)
    base.update(kw)
    return ExperimentConfig(**base)


# ---- configuration -------------------------------------------------------------------------------

def test_defaults_match_the_issue():
    c = ExperimentConfig()
    assert c.datasets == ("digits",) and c.models == ("mlp",)
    assert c.methods == ("dense", "awt", "random", "magnitude", "snip", "hydra")
    assert c.densities == (0.5, 0.2, 0.1, 0.05) and c.seeds == (0, 1, 2)
    assert c.eps == (0.1,) and c.steps == 10 and c.norm == "linf"
    m = ex.preset("mnist")
    assert m.models == ("lenet300_100",) and m.datasets == ("mnist",)
    assert {"grasp", "synflow", "adv_imp"} <= set(m.methods) and m.densities == (0.2, 0.1, 0.05, 0.02)


def test_from_dict_rejects_unknown_keys_and_normalises():
    with pytest.raises(ConfigError, match="unknown key.*'densitys'"):
        ExperimentConfig.from_dict({"densitys": [0.1]})
    c = ExperimentConfig.from_dict({"densities": [0.1, 0.2], "eps": 0.0, "hparams": {"awt": {"x": [1, 2]}}})
    assert c.densities == (0.1, 0.2) and c.eps == (0.0,) and c.hparams == {"awt": {"x": (1, 2)}}
    with pytest.raises(ConfigError, match="hparams"):
        ExperimentConfig.from_dict({"hparams": {"awt": 3}})


@pytest.mark.parametrize("changes, match", [
    ({"densities": (0.0,)}, r"densities: 0.0 is outside \(0, 1\]"),
    ({"densities": (1.5,)}, r"outside \(0, 1\]"),
    ({"eps": (-0.1,)}, "eps: -0.1"),
    ({"seeds": (-1,)}, "seeds"),
    ({"norm": "l3"}, "norm"),
    ({"epochs": 0}, "epochs"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"methods": ()}, "methods: must not be empty"),
    ({"densities": (0.1, 0.1)}, "repeated"),
    ({"hparams": {"snip": {}}}, "hparams: 'snip' is not one of this sweep's methods"),
    ({"device": "tpu"}, "device"),
    ({"data_root": "/nonexistent/awt"}, "data_root"),
])
def test_validate_shallow_errors(changes, match):
    with pytest.raises(ConfigError, match=match):
        validate(tiny(**changes), deep=False)


def test_validate_accepts_tiny():
    assert validate(tiny(), deep=False) == tiny()


# ---- runs ----------------------------------------------------------------------------------------

def test_plan_dense_first_once_per_seed_and_content_addressed():
    specs = plan(tiny())
    dense = [s for s in specs if s.method == "dense"]
    assert [s.seed for s in dense] == [0, 1]
    assert all(s.method == "dense" for s in specs[:2]) and len(specs) == 2 + 2 * 2 * 2
    folders = [s.folder() for s in specs]
    assert len(set(folders)) == len(folders)
    # the key is the config without the seed: same key across seeds, different across densities
    awt = [s for s in specs if s.method == "awt"]
    assert len({s.key() for s in awt if s.density == 0.5}) == 1
    assert len({s.key() for s in awt}) == 2
    # adding a seed or a density keeps every existing folder
    more = {s.folder() for s in plan(tiny(seeds=(0, 1, 2), densities=(0.5, 0.1, 0.05)))}
    assert set(folders) <= more
    # an unrelated method's hyper-parameters do not move a run; its own do
    a = {s.folder() for s in plan(tiny(hparams={"random": {"rescale": True}})) if s.method == "awt"}
    assert a == {s.folder() for s in awt}
    b = {s.folder() for s in plan(tiny(hparams={"awt": {"iterations": 7}})) if s.method == "awt"}
    assert not (b & {s.folder() for s in awt})
    # the device is not part of a run's identity; the training schedule is
    assert {s.folder() for s in plan(tiny(device="cuda"))} == set(folders)
    assert not ({s.folder() for s in plan(tiny(lr=0.2))} & set(folders))


def test_plan_adds_the_dense_reference_when_not_asked_for():
    specs = plan(tiny(methods=("awt",)))
    assert [s.method for s in specs[:2]] == ["dense", "dense"]
    assert ex.dense_spec(specs[-1]).folder() == specs[1].folder()


def test_key_is_a_hash_of_the_canonical_identity():
    import hashlib

    s = plan(tiny())[3]
    text = json.dumps(s.identity(with_seed=False), sort_keys=True, separators=(",", ":"))
    assert s.key() == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert "seed" not in s.identity(with_seed=False) and s.identity()["seed"] == s.seed


# ---- sweeps --------------------------------------------------------------------------------------

def _mtimes(out: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/seed-*/result.json")}


def test_sweep_writes_runs_status_and_report(tmp_path):
    res = run_experiment(tiny(), tmp_path, run_fn=fake_run, progress=False)
    assert not res.failed and len(res.records) == 10 and res.skipped == 0
    for s in plan(tiny()):
        rdir = ex.run_dir(tmp_path, s)
        assert json.loads((rdir / "status.json").read_text())["state"] == "done"
        rec = json.loads((rdir / "result.json").read_text())
        assert rec["method"] == s.method and rec["seed"] == s.seed and rec["key"] == s.key()
        assert json.loads((rdir.parent / "config.json").read_text()) == s.identity(with_seed=False)
        if s.method != "dense":   # the dense run of its seed had finished before the ticket ran
            d = json.loads((ex.run_dir(tmp_path, ex.dense_spec(s)) / "result.json").read_text())
            assert rec["dense_pgd_acc"] == d["pgd_acc"]
    for f in ("results.json", "results.csv", "summary.md", "experiment.json"):
        assert (tmp_path / f).is_file()
    assert len(ex.gather(tmp_path)) == 10


def test_rerun_skips_finished_runs_and_extends(tmp_path):
    run_experiment(tiny(), tmp_path, run_fn=fake_run, progress=False)
    before = _mtimes(tmp_path)
    res = run_experiment(tiny(), tmp_path, run_fn=fake_run, progress=False)
    assert res.skipped == 10 and _mtimes(tmp_path) == before
    res = run_experiment(tiny(seeds=(0, 1, 2)), tmp_path, run_fn=fake_run, progress=False)
    assert res.skipped == 10 and len(res.records) == 15
    after = _mtimes(tmp_path)
    assert all(after[p] == t for p, t in before.items())
    # results are gathered for this sweep's runs only
    res = run_experiment(tiny(seeds=(0,)), tmp_path, run_fn=fake_run, progress=False)
    assert len(res.records) == 5 and len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 5
    # --fresh starts over
    res = run_experiment(tiny(), tmp_path, run_fn=fake_run, progress=False, resume=False)
    assert res.skipped == 0 and len(list((tmp_path / "runs").glob("*/seed-2"))) == 0


def test_failed_run_is_recorded_and_others_go_on(tmp_path):
    res = run_experiment(tiny(), tmp_path, run_fn=failing_run, progress=False)
    assert len(res.failed) == 4 and {f["method"] for f in res.failed} == {"random"}
    assert len(res.records) == 6
    st = json.loads((tmp_path / res.failed[0]["run_dir"] / "status.json").read_text())
    assert st["state"] == "failed" and "planted failure" in st["error"] and "Traceback" in st["traceback"]
    assert "failed" in (tmp_path / "summary.md").read_text()
    # a re-run retries the failed ones only
    res = run_experiment(tiny(), tmp_path, run_fn=fake_run, progress=False)
    assert res.skipped == 6 and not res.failed


def test_killed_sweep_resumes_and_loses_at_most_one_epoch(tmp_path):
    """Kill a sweep in a subprocess right after a checkpoint; the re-run resumes that run from its
    checkpoint and every number equals an uninterrupted sweep's."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_experiment import fake_run, tiny
        from empirical.experiment import run_experiment
        run_experiment(tiny(epochs=4), sys.argv[1], run_fn=fake_run, progress=False)
    """)
    killed = tmp_path / "killed"
    env = {**os.environ, "AWT_FAKE_DIE_AT": "2"}
    r = subprocess.run([sys.executable, "-c", script, str(killed)], env=env, capture_output=True, timeout=120)
    assert r.returncode == 9, r.stderr.decode()
    first = plan(tiny(epochs=4))[0]
    rdir = ex.run_dir(killed, first)
    st = json.loads((rdir / "status.json").read_text())
    assert st["state"] == "running" and st["epoch"] == 2 and not (rdir / "result.json").exists()
    assert torch.load(rdir / "checkpoint" / "state.pt", weights_only=False)["epoch"] == 2
    run_experiment(tiny(epochs=4), killed, run_fn=fake_run, progress=False)
    rec = json.loads((rdir / "result.json").read_text())
    assert rec["resumed"] is True
    clean = tmp_path / "clean"
    run_experiment(tiny(epochs=4), clean, run_fn=fake_run, progress=False)

    def numbers(out):
        rs = json.loads((out / "results.json").read_text())["runs"]
        return [{k: v for k, v in r.items() if k not in ("wall_seconds", "resumed")} for r in rs]

    assert numbers(killed) == numbers(clean)

    def rows(out):
        import csv

        with open(out / "results.csv") as fh:
            return [{k: v for k, v in r.items() if k not in ("wall_seconds", "resumed")} for r in csv.DictReader(fh)]

    assert rows(killed) == rows(clean) and len(rows(clean)) == 10


def test_progress_bars_are_silent_off_a_terminal(tmp_path, capsys):
    run_experiment(tiny(seeds=(0,)), tmp_path, run_fn=fake_run, progress=True)
    cap = capsys.readouterr()
    assert "awt experiment" not in cap.err and "%|" not in cap.err


def failing_dense(spec, rdir, *, dense_dir, progress=False, status=None):
    if spec.method == "dense" and spec.seed == 1:
        raise RuntimeError("dense planted failure")
    return fake_run(spec, rdir, dense_dir=dense_dir)


def test_tickets_of_a_failed_dense_run_are_not_started(tmp_path):
    res = run_experiment(tiny(), tmp_path, run_fn=failing_dense, progress=False)
    assert len(res.failed) == 1 + 4 and len(res.records) == 5
    assert {f["seed"] for f in res.failed} == {1}
    assert sum("dense reference run failed" in f["error"] for f in res.failed) == 4
    assert not any((tmp_path / f["run_dir"]).exists() for f in res.failed if f["method"] != "dense")


def test_random_baseline_is_rescaled_unless_the_sweep_says_otherwise():
    c = ExperimentConfig(methods=("dense", "random"), densities=(0.1,), seeds=(0,))
    assert [s.hparams for s in plan(c) if s.method == "random"] == [{"rescale": True}]
    off = c.replace(hparams={"random": {"rescale": False}})
    assert [s.hparams for s in plan(off) if s.method == "random"] == [{"rescale": False}]
    # the two variants are different runs (content-addressed by their hyper-parameters)
    assert {s.key() for s in plan(c) if s.method == "random"} != {s.key() for s in plan(off) if s.method == "random"}

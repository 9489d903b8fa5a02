"""empirical.executors: local, Ray (a local instance started once for the module) and Slurm
(through submitit's local executor) give the same files and numbers for the same sweep; results
come back as they finish; a missing package is a clear error."""
from __future__ import annotations

import csv
import importlib
import json
import sys
import time
from pathlib import Path

import pytest

from empirical import executors as exs
from empirical.experiment import plan, run_experiment

sys.path.insert(0, str(Path(__file__).parent))
import test_experiment  # noqa: E402  (the injected run function lives there)
from test_experiment import fake_run, tiny  # noqa: E402


def _by_value(module) -> None:
    """Ship the test's run function by value: Ray workers and submitit's subprocesses cannot import
    this test module by name."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(module)
    try:
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(module)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    _by_value(test_experiment)
    _by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _slow_square(x, delay):
    time.sleep(delay)
    return x * x


def test_local_executor_in_order():
    with exs.make_executor("local") as e:
        assert list(e.map(_slow_square, [((i, 0), {}) for i in range(4)])) == [0, 1, 4, 9]


def test_ray_executor_gathers_as_they_finish(ray_local):
    e = exs.make_executor("ray")
    assert not e._started              # an instance already running is used, and left running
    got = list(e.map(_slow_square, [((3, 1.5), {}), ((2, 0.0), {})]))
    assert got == [4, 9]               # the quick one first
    e.close()
    assert ray_local.is_initialized()


def test_slurm_executor_through_submitit_local(tmp_path):
    pytest.importorskip("submitit")
    _by_value(sys.modules[__name__])
    e = exs.make_executor("slurm", folder=tmp_path / "sub", cluster="local", parameters={"timeout_min": 5})
    assert sorted(e.map(_slow_square, [((i, 0), {}) for i in range(3)])) == [0, 1, 4]
    assert any((tmp_path / "sub").rglob("*.out"))          # submitit's per-job logs


def _numbers(out: Path):
    rs = json.loads((out / "results.json").read_text())["runs"]
    drop = ("wall_seconds",)
    runs = sorted(({k: v for k, v in r.items() if k not in drop} for r in rs), key=lambda r: r["run_dir"])
    with open(out / "results.csv") as fh:
        rows = sorted(({k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(fh)),
                      key=lambda r: r["run_dir"])
    files = sorted(str(p.relative_to(out)) for p in (out / "runs").rglob("*") if p.is_file())
    return runs, rows, files


def test_same_files_and_numbers_local_ray_slurm(tmp_path, ray_local):
    cfg = tiny(seeds=(0, 1), densities=(0.5,), epochs=2)
    local, ray_out, slurm_out = tmp_path / "local", tmp_path / "ray", tmp_path / "slurm"
    run_experiment(cfg, local, run_fn=fake_run, progress=False)
    run_experiment(cfg, ray_out, executor="ray", run_fn=fake_run, progress=False)
    run_experiment(cfg, slurm_out, executor="slurm", run_fn=fake_run, progress=False,
                   executor_options={"cluster": "local", "parameters": {"timeout_min": 5}})
    ref = _numbers(local)
    assert len(ref[0]) == len(plan(cfg)) == 6
    assert _numbers(ray_out) == ref
    assert _numbers(slurm_out) == ref
    assert (slurm_out / "submitit").is_dir()


def test_unknown_executor():
    with pytest.raises(ValueError, match="executor: 'dask' is not one of local, ray, slurm"):
        exs.make_executor("dask")


@pytest.mark.parametrize("name, module, extra", [("ray", "ray", "ray"), ("slurm", "submitit", "slurm")])
def test_missing_package_is_a_clear_error(monkeypatch, tmp_path, name, module, extra):
    real = importlib.import_module

    def fake_import(mod, *a, **k):
        if mod == module or mod.startswith(module + "."):
            raise ModuleNotFoundError(f"No module named {mod!r}")
        return real(mod, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(exs.ExecutorUnavailable, match=rf"executor '{name}' needs the '{module}' package.*awt\[{extra}\]"):
        exs.make_executor(name, folder=tmp_path)
    # nothing was started or written
    assert not any(tmp_path.iterdir())


def test_cuda_runs_ask_ray_for_a_gpu_per_task(monkeypatch):
    class FakeRay:
        @staticmethod
        def is_initialized():
            return True

    monkeypatch.setattr(exs, "_require", lambda *a: FakeRay)
    e = exs.make_executor("ray", device="cuda")
    assert e.num_gpus == 1 and e.num_cpus_per_task == 1
    assert exs.make_executor("ray", device="cpu").num_gpus == 0
    s = exs.make_executor("slurm", device="cuda", folder="x")
    assert s.parameters["gpus_per_node"] == 1

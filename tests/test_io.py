"""ntk_theory.io: the result base and JSON conversion; ntk_theory._checks: device and generator rules."""
from __future__ import annotations

import json
import os
import stat
from dataclasses import FrozenInstanceError, dataclass

import numpy as np
import pytest
import torch

from ntk_theory._checks import as_generator, check_device
from ntk_theory.io import Result, atomic_torch_save, atomic_write, atomic_write_json, atomic_write_text, to_jsonable
from ntk_theory.layers import finite_mlp
from ntk_theory.masks import apply_mask, random_mask


@dataclass(frozen=True)
class _R(Result):
    a: torch.Tensor
    b: dict
    c: float | None = None


def test_result_to_dict_converts_tensors_nested_and_round_trips_json(tmp_path):
    r = _R(torch.tensor([1.0, 2.5]), {"k": torch.tensor(3), "n": np.float64(0.5), "l": (1, torch.ones(1))})
    d = r.to_dict()
    assert d == {"a": [1.0, 2.5], "b": {"k": 3, "n": 0.5, "l": [1, [1.0]]}, "c": None}
    path = atomic_write_json(tmp_path / "r.json", r)
    assert json.loads(path.read_text()) == d


def test_result_is_frozen():
    r = _R(torch.zeros(1), {})
    with pytest.raises(FrozenInstanceError):
        r.c = 1.0  # type: ignore[misc]


def test_to_jsonable_nested_results_and_dtypes():
    inner = _R(torch.zeros(2), {})
    assert to_jsonable({"r": inner, "d": torch.float32}) == {"r": {"a": [0.0, 0.0], "b": {}, "c": None},
                                                          "d": "torch.float32"}


def test_check_device_auto_and_cpu():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert check_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "tpu", 3.5, "meta"])
def test_check_device_rejects_unknown(bad):
    with pytest.raises(ValueError, match="device"):
        check_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal on a machine without CUDA")
def test_check_device_refuses_cuda_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        check_device("cuda", "device")


def test_as_generator_seed_generator_none():
    g = as_generator(5)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(5)))
    h = torch.Generator()
    assert as_generator(h) is h
    assert as_generator(None) is None
    with pytest.raises(TypeError, match="generator"):
        as_generator(1.5)
    with pytest.raises(TypeError, match="generator"):
        as_generator(True)
    with pytest.raises(ValueError, match="seed"):
        as_generator(-1)

# --------------------------------------------------------------------------------------------- review regressions
# Moved from the core review file; tests marked ``# Was:`` are regressions: each names a defect a
# review found (fixed since) and fails if it comes back.
def _mlp_rv(seed=0, sigma_b=0.1, width=12, out=3):
    return finite_mlp(4, width, 2, out, sigma_b=sigma_b, generator=torch.Generator().manual_seed(seed))


def test_atomic_write_leaves_no_partial_or_temp_file(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")

    def bad(fh):
        fh.write("partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        atomic_write(target, bad)
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["r.json"]
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "k.txt", lambda fh: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert sorted(os.listdir(tmp_path)) == ["r.json"]
    masked = apply_mask(_mlp_rv(), random_mask(_mlp_rv(), 0.5, generator=0))  # not picklable: torch.save raises mid-write
    with pytest.raises(RuntimeError):
        atomic_torch_save(tmp_path / "m.pt", masked)
    assert sorted(os.listdir(tmp_path)) == ["r.json"]
    atomic_write_json(tmp_path / "sub" / "j.json", {"x": torch.tensor([1.0, 2.0])})
    assert (tmp_path / "sub" / "j.json").read_text().replace(" ", "").replace("\n", "") == '{"x":[1.0,2.0]}'
    assert sorted(os.listdir(tmp_path / "sub")) == ["j.json"]


def test_atomic_write_honours_umask_and_existing_permissions(tmp_path):
    # Was: mkstemp creates the temp file 0600 and os.replace keeps that mode, so every result file awt writes
    # is owner-only (and rewriting a 0644 file silently makes it 0600)
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.txt", "x")
        assert stat.S_IMODE(os.stat(tmp_path / "new.txt").st_mode) == 0o644
        existing = tmp_path / "old.txt"
        existing.write_text("a")
        os.chmod(existing, 0o664)
        atomic_write_text(existing, "b")
        assert stat.S_IMODE(os.stat(existing).st_mode) == 0o664
    finally:
        os.umask(old)

"""ntk_theory.io: the result base and JSON conversion; ntk_theory._checks: device and generator rules."""
from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, dataclass

import numpy as np
import pytest
import torch

from ntk_theory._checks import as_generator, check_device
from ntk_theory.io import Result, atomic_write_json, to_jsonable


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

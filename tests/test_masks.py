"""Tests of ntk_theory.masks: random masks, densities, validation, apply/remove for training."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from ntk_theory.layers import finite_cnn, finite_mlp
from ntk_theory.masks import (MaskParametrization, apply_mask, canonical_name, mask_density, random_mask,
                              remove_mask, validate_mask)

D = torch.float64


def _mlp(seed=0, bias=True):
    return finite_mlp(5, 16, 2, 3, sigma_b=0.1 if bias else 0.0, generator=torch.Generator().manual_seed(seed))


def test_canonical_name():
    assert canonical_name("0.parametrizations.weight.original") == "0.weight"
    assert canonical_name("a.b.parametrizations.bias.original") == "a.b.bias"
    assert canonical_name("parametrizations.weight.original") == "weight"
    assert canonical_name("0.weight") == "0.weight"
    assert canonical_name("0.parametrizations.weight.original0") == "0.parametrizations.weight.original0"


def test_random_mask_layerwise_exact_density_and_skip_first():
    model = _mlp()
    m = random_mask(model, 0.25, generator=0)
    assert set(m) == {"2.weight", "4.weight"}  # first layer and biases left dense
    for k, v in m.items():
        p = dict(model.named_parameters())[k]
        assert v.dtype == torch.bool and v.shape == p.shape
        assert int(v.sum()) == round(0.25 * p.numel())
    m_all = random_mask(model, 0.25, generator=0, skip_first=False, include_bias=True)
    assert set(m_all) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert abs(mask_density(m_all) - 0.25) < 0.02


def test_random_mask_global_density_and_determinism():
    model = _mlp()
    m = random_mask(model, 0.3, generator=1, layerwise=False)
    total = sum(v.numel() for v in m.values())
    assert sum(int(v.sum()) for v in m.values()) == round(0.3 * total)
    again = random_mask(model, 0.3, generator=torch.Generator().manual_seed(1), layerwise=False)
    assert all(torch.equal(m[k], again[k]) for k in m)
    other = random_mask(model, 0.3, generator=2, layerwise=False)
    assert any(not torch.equal(m[k], other[k]) for k in m)
    # per-layer densities vary in global mode but average to q
    dens = [mask_density({k: v}) for k, v in m.items()]
    assert min(dens) > 0.15 and max(dens) < 0.45


@given(shape=st.lists(st.integers(1, 6), min_size=2, max_size=4), q=st.floats(0.01, 1.0), seed=st.integers(0, 999))
def test_random_mask_density_property(shape, q, seed):
    model = nn.Sequential(nn.Linear(3, 3), nn.Conv2d(1, 1, 1))
    model.add_module("w", nn.Linear(2, 2))
    model.w.weight = nn.Parameter(torch.zeros(*shape))
    m = random_mask(model, q, generator=seed, skip_first=False)
    v = m["w.weight"]
    assert int(v.sum()) == min(v.numel(), max(1, round(q * v.numel())))


def test_random_mask_errors():
    model = _mlp()
    with pytest.raises(ValueError, match="density"):
        random_mask(model, 0.0, generator=0)
    with pytest.raises(ValueError, match="density"):
        random_mask(model, 1.5, generator=0)
    with pytest.raises(TypeError, match="generator"):
        random_mask(model, 0.5, generator="seed")
    with pytest.raises(ValueError, match="model"):
        random_mask(nn.Sequential(nn.Linear(2, 2)), 0.5, generator=0)  # only a first layer


def test_mask_density_and_validate_mask():
    model = _mlp()
    m = {"2.weight": torch.zeros(16, 16, dtype=torch.bool)}
    m["2.weight"][:4] = True
    assert mask_density(m) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="mask"):
        mask_density({})
    with pytest.raises(ValueError, match="mask"):
        mask_density({"a": torch.ones(2)})
    assert set(validate_mask(model, m)) == {"2.weight"}
    bad = [
        {"9.weight": torch.ones(2, dtype=torch.bool)},
        {"2.weight": torch.ones(16, 15, dtype=torch.bool)},
        {"2.weight": torch.ones(16, 16)},
        {"2.weight": [[True]]},
        {},
        {"2.weight": torch.zeros(16, 16, dtype=torch.bool)},
        "2.weight",
    ]
    for b in bad:
        with pytest.raises(ValueError, match="mask"):
            validate_mask(model, b)
    # also against a parameter dict, with canonical or raw names
    params = {"0.parametrizations.weight.original": torch.zeros(3, 2)}
    assert set(validate_mask(params, {"0.weight": torch.ones(3, 2, dtype=torch.bool)})) == {"0.weight"}


@pytest.mark.parametrize("rescale", [False, True])
def test_apply_mask_forward_gradients_and_names(rescale):
    model = _mlp()
    ref = copy.deepcopy(model)
    m = random_mask(model, 0.3, generator=3, include_bias=True)
    weight_objs = {k: p for k, p in model.named_parameters()}
    out = apply_mask(model, m, rescale=rescale)
    assert out is model
    # the same Parameter objects, now under the parametrize names
    raw = dict(model.named_parameters())
    for k, p in weight_objs.items():
        rk = k if k not in m else f"{k.rpartition('.')[0]}.parametrizations.{k.rpartition('.')[2]}.original"
        assert raw[rk] is p
    # the forward is the model at W = s (m ⊙ θ)
    with torch.no_grad():
        for k, p in ref.named_parameters():
            if k in m:
                s = 1 / math.sqrt((int(m[k].sum()) / m[k].numel())) if rescale else 1.0
                p.mul_(m[k].to(p.dtype) * s)
    x = torch.randn(7, 5, dtype=D)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-12, atol=1e-12)
    # pruned coordinates get no gradient; SGD keeps the effective weights sparse
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        for k, mm in m.items():
            g = raw[f"{k.rpartition('.')[0]}.parametrizations.{k.rpartition('.')[2]}.original"].grad
            assert bool((g[~mm] == 0).all())
        opt.step()
    for k, mm in m.items():
        prefix, _, t = k.rpartition(".")
        eff = getattr(model.get_submodule(prefix), t)
        assert bool((eff[~mm] == 0).all()) and bool((eff[mm] != 0).any())
    # state_dict carries the mask; a fresh masked model loads it
    sd = model.state_dict()
    assert any(k.endswith("parametrizations.weight.0.mask") for k in sd)
    twin = apply_mask(_mlp(seed=9), m, rescale=rescale)
    twin.load_state_dict(sd)
    torch.testing.assert_close(twin(x), model(x))


def test_remove_mask_restores_dense_and_reapply_replaces():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = random_mask(model, 0.5, generator=0)
    apply_mask(model, m, rescale=True)
    m2 = random_mask(model, 0.2, generator=1)  # canonical names on a masked model
    assert set(m2) == set(m)
    apply_mask(model, m2)  # replaces the first mask
    prefix = "2"
    assert torch.equal(model.get_submodule(prefix).parametrizations.weight[0].mask, m2["2.weight"])
    assert len(model.get_submodule(prefix).parametrizations.weight) == 1
    removed = remove_mask(model)
    assert set(removed) == set(m2) and all(torch.equal(removed[k], m2[k]) for k in m2)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(parametrize.is_parametrized(mod) for mod in model.modules())
    assert remove_mask(model) == {}


def test_apply_mask_refuses_foreign_parametrizations_and_bad_masks():
    model = _mlp()

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(model[2], "weight", Double())
    with pytest.raises(ValueError, match="parametrization"):
        apply_mask(model, {"2.weight": torch.ones(16, 16, dtype=torch.bool)})
    assert remove_mask(model) == {}  # foreign parametrisations are left alone
    assert parametrize.is_parametrized(model[2], "weight")
    with pytest.raises(ValueError, match="mask"):
        apply_mask(_mlp(), {"2.weight": torch.ones(3, dtype=torch.bool)})


def test_masks_on_cnn_and_parametrization_module():
    model = finite_cnn(1, 4, 2, (6, 6), 2, generator=torch.Generator().manual_seed(0))
    m = random_mask(model, 0.5, generator=0)
    assert set(m) == {"2.weight", "5.weight"}
    apply_mask(model, m, rescale=True)
    p = model[2].parametrizations.weight[0]
    assert isinstance(p, MaskParametrization)
    assert p.scale == pytest.approx(1 / math.sqrt(mask_density({"2.weight": m["2.weight"]})))
    assert "density" in repr(p)
    theta = torch.full((3,), float("nan"))
    assert torch.equal(MaskParametrization(torch.tensor([True, False, True]))(theta).isnan(),
                       torch.tensor([True, False, True]))

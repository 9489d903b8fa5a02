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

from ntk_theory.layers import NTKLinear, finite_cnn, finite_mlp
from ntk_theory.masks import (
    MaskParametrization,
    apply_mask,
    canonical_name,
    get_mask,
    mask_buffer_name,
    mask_density,
    masked_value,
    random_mask,
    raw_name,
    remove_mask,
    split_name,
    validate_mask,
    validate_params,
)

D = torch.float64


def _mlp(seed=0, bias=True):
    return finite_mlp(5, 16, 2, 3, sigma_b=0.1 if bias else 0.0, generator=torch.Generator().manual_seed(seed))


def test_canonical_name():
    assert canonical_name("0.parametrizations.weight.original") == "0.weight"
    assert canonical_name("a.b.parametrizations.bias.original") == "a.b.bias"
    assert canonical_name("parametrizations.weight.original") == "weight"
    assert canonical_name("0.weight") == "0.weight"
    assert canonical_name("0.parametrizations.weight.original0") == "0.parametrizations.weight.original0"


def test_names_owned_by_masks_are_the_ones_torch_uses():
    """raw_name / mask_buffer_name / split_name against the names parametrize actually gives."""
    assert split_name("a.b.weight") == ("a.b", "weight") == split_name("a.b.parametrizations.weight.original")
    assert split_name("bias") == ("", "bias")
    assert raw_name("weight") == "parametrizations.weight.original"
    assert mask_buffer_name("bias") == "parametrizations.bias.0.mask"
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)).to(D)
    m = random_mask(model, 0.5, generator=0, include_bias=True, skip_first=False)
    apply_mask(model, m)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    for k in m:
        assert canonical_name(raw_name(k)) == k and raw_name(raw_name(k)) == raw_name(k)
        assert raw_name(k) in params and mask_buffer_name(k) in buffers
        assert torch.equal(buffers[mask_buffer_name(k)], m[k])
    assert set(buffers) == {mask_buffer_name(k) for k in m}
    assert set(params) == {raw_name(k) for k in m}  # every tensor of the model masked (biases included)


def test_masked_value_is_the_parametrization_formula():
    theta = torch.tensor([1.5, float("nan"), -2.0, float("inf")], dtype=D)
    keep = torch.tensor([True, False, True, False])
    out = masked_value(theta, keep, 2.0)
    assert torch.equal(out, torch.tensor([3.0, 0.0, -4.0, 0.0], dtype=D))  # pruned non-finite values: exact zeros
    assert torch.equal(masked_value(theta, keep), torch.tensor([1.5, 0.0, -2.0, 0.0], dtype=D))
    assert torch.equal(MaskParametrization(keep, 2.0)(theta), out)
    g = torch.tensor([1.0, 2.0, 3.0], dtype=D, requires_grad=True)
    masked_value(g, torch.tensor([True, False, True]), 0.5).sum().backward()
    assert torch.equal(g.grad, torch.tensor([0.5, 0.0, 0.5], dtype=D))  # dW/dθ = s m


def test_validate_params_one_rule_for_raw_and_canonical_names():
    model = _mlp()
    m = random_mask(model, 0.5, generator=1)
    apply_mask(model, m)
    w = torch.zeros(16, 16, dtype=D)
    # canonical and raw names both resolve to the raw name functional_call needs
    assert list(validate_params(model, {"2.weight": w})) == [raw_name("2.weight")]
    assert list(validate_params(model, {raw_name("2.weight"): w, "0.bias": torch.zeros(16, dtype=D)})) == [
        raw_name("2.weight"), "0.bias"]
    got = validate_params(model, {"2.weight": w.numpy()})  # numpy at the edge, converted
    assert isinstance(got[raw_name("2.weight")], torch.Tensor)
    assert validate_params(model, {"2.weight": w})[raw_name("2.weight")] is w  # neither copied nor cast
    bad_values = [
        ({"9.weight": w}, ValueError, "not a parameter"),
        ({"2.weight": w, raw_name("2.weight"): w}, ValueError, "twice"),
        ({"2.weight": torch.zeros(16, 15, dtype=D)}, ValueError, "shape"),
        ({"2.weight": torch.zeros(16, 16, dtype=torch.int64)}, ValueError, "floating"),
        ({"2.weight": torch.zeros(16, 16, dtype=torch.complex128)}, ValueError, "floating"),
        ({"2.weight": torch.full((16, 16), float("nan"), dtype=D)}, ValueError, "finite|NaN|nan"),
        ({"2.weight": "w"}, TypeError, "2.weight"),
        ({2: w}, TypeError, "str"),
    ]
    for params, exc, what in bad_values:
        with pytest.raises(exc, match="params0") as info:
            validate_params(model, params, "params0")
        assert info.match(what), (params, info.value)
    with pytest.raises(TypeError, match="params"):
        validate_params(model, [("2.weight", w)])


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
        rk = k if k not in m else raw_name(k)
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
            g = raw[raw_name(k)].grad
            assert bool((g[~mm] == 0).all())
        opt.step()
    for k, mm in m.items():
        prefix, _, t = k.rpartition(".")
        eff = getattr(model.get_submodule(prefix), t)
        assert bool((eff[~mm] == 0).all()) and bool((eff[mm] != 0).any())
    # state_dict carries the mask; a fresh masked model loads it
    sd = model.state_dict()
    assert all(mask_buffer_name(k) in sd for k in m)
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
    model = finite_cnn((1, 6, 6), 4, 2, 2, generator=torch.Generator().manual_seed(0))
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

# --------------------------------------------------------------------------------------------- review regressions
# Moved from the core review file; tests marked ``# Was:`` are regressions: each names a defect a
# review found (fixed since) and fails if it comes back.
def _mlp_rv(seed=0, sigma_b=0.1, width=12, out=3):
    return finite_mlp(4, width, 2, out, sigma_b=sigma_b, generator=torch.Generator().manual_seed(seed))


_raw_name_rv = raw_name


@given(q=st.floats(0.01, 1.0), seed=st.integers(0, 1000), include_bias=st.booleans(), skip_first=st.booleans())
def test_random_mask_exact_layerwise_density_and_skip_first(q, seed, include_bias, skip_first):
    model = finite_cnn((2, 4, 4), 3, 2, 2, sigma_b=0.1, generator=torch.Generator().manual_seed(0))
    m = random_mask(model, q, generator=seed, include_bias=include_bias, skip_first=skip_first)
    params = dict(model.named_parameters())
    expected = {"0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias"}
    if skip_first:
        expected -= {"0.weight", "0.bias"}
    if not include_bias:
        expected = {k for k in expected if k.endswith("weight")}
    assert set(m) == expected
    for k, v in m.items():
        assert v.dtype == torch.bool and v.shape == params[k].shape
        assert int(v.sum()) == min(v.numel(), max(1, round(q * v.numel())))


def test_random_mask_does_not_touch_model_or_global_rng():
    model = _mlp_rv()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    ref = torch.rand(3)
    torch.manual_seed(123)
    random_mask(model, 0.3, generator=5, layerwise=False)
    assert torch.equal(torch.rand(3), ref)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("rescale", [False, True])
def test_apply_mask_rescale_is_exactly_inverse_sqrt_q_and_remove_restores(rescale):
    model = finite_cnn((1, 5, 5), 4, 2, 2, sigma_b=0.3, generator=torch.Generator().manual_seed(1))
    m = random_mask(model, 0.3, generator=0, include_bias=True)
    m["0.weight"] = torch.ones_like(model[0].weight, dtype=torch.bool)  # an all-True layer
    objs = {k: p for k, p in model.named_parameters()}
    vals = {k: p.detach().clone() for k, p in model.named_parameters()}
    names = [k for k, _ in model.named_parameters()]
    user_mask = {k: v.clone() for k, v in m.items()}
    apply_mask(model, m, rescale=rescale)
    for k, mk in m.items():
        prefix, _, t = k.rpartition(".")
        eff = getattr(model.get_submodule(prefix), t)
        q = int(mk.sum()) / mk.numel()
        s = 1.0 / math.sqrt(q) if rescale else 1.0
        assert torch.equal(eff, torch.where(mk, vals[k], 0.0) * s if s != 1.0 else torch.where(mk, vals[k], 0.0))
        mask_k, scale_k = get_mask(model.get_submodule(prefix), t)
        assert scale_k == s and torch.equal(mask_k, mk)
    assert all(torch.equal(m[k], user_mask[k]) for k in m)  # caller's mask not mutated
    removed = remove_mask(model)
    assert sorted(k for k, _ in model.named_parameters()) == sorted(names)
    for k, p in model.named_parameters():
        assert p is objs[k] and torch.equal(p, vals[k])
    assert set(removed) == set(m)


def test_training_masked_model_never_moves_pruned_weights():
    model = _mlp_rv(2)
    x = torch.randn(8, 4, dtype=D, generator=torch.Generator().manual_seed(1))
    m = random_mask(model, 0.25, generator=3, include_bias=True)
    apply_mask(model, m, rescale=True)
    raw0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    for opt in (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True),
                torch.optim.Adam(model.parameters(), lr=1e-2)):
        for _ in range(5):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    raw = dict(model.named_parameters())
    for k, mk in m.items():
        rk = _raw_name_rv(k)
        assert torch.equal(raw[rk][~mk], raw0[rk][~mk])  # raw pruned values untouched
        prefix, _, t = k.rpartition(".")
        assert bool((getattr(model.get_submodule(prefix), t)[~mk] == 0).all())
        assert not torch.equal(raw[rk][mk], raw0[rk][mk])  # kept ones did train


def test_apply_mask_twice_deepcopy_and_state_dict_round_trip():
    model = _mlp_rv(3)
    x = torch.randn(4, 4, dtype=D, generator=torch.Generator().manual_seed(2))
    apply_mask(model, random_mask(model, 0.5, generator=0), rescale=True)
    m2 = random_mask(model, 0.2, generator=1)
    apply_mask(model, m2, rescale=True)
    assert all(len(model.get_submodule(k.rpartition(".")[0]).parametrizations.weight) == 1 for k in m2)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    with torch.no_grad():
        twin[2].parametrizations.weight.original.add_(1.0)
    assert not torch.equal(twin(x), model(x))  # deep copy does not share storage
    fresh = apply_mask(_mlp_rv(9), m2, rescale=True)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("action", ["remove_mask", "apply_mask"])
def test_unmasking_a_deepcopy_leaves_the_original_working(action):
    # Was: torch's parametrize deepcopy shares the injected class (ParametrizedNTKLinear) between original and
    # copy; remove_parametrizations then deletes the `weight` property from that shared class, so remove_mask
    # (or apply_mask replacing a mask) on a deepcopy breaks the original: AttributeError '... has no attribute weight'
    model = _mlp_rv(3)
    x = torch.randn(4, 4, dtype=D, generator=torch.Generator().manual_seed(2))
    apply_mask(model, random_mask(model, 0.5, generator=0), rescale=True)
    want = model(x).detach()
    twin = copy.deepcopy(model)
    if action == "remove_mask":
        remove_mask(twin)
    else:
        apply_mask(twin, random_mask(twin, 0.2, generator=1))
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    assert get_mask(model[2], "weight") is not None


def test_remove_mask_restores_parameter_order():
    # Was: remove_parametrizations re-registers `weight` after `bias`, so after apply_mask + remove_mask the
    # order of model.parameters() changes ('0.bias' before '0.weight'): flat parameter vectors
    # (parameters_to_vector) and index-keyed optimizer state no longer line up with the original model
    model = finite_cnn((1, 5, 5), 4, 2, 2, sigma_b=0.3, generator=torch.Generator().manual_seed(1))
    names = [k for k, _ in model.named_parameters()]
    vec = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
    apply_mask(model, random_mask(model, 0.3, generator=0))  # weights of layers 2 and 5
    remove_mask(model)
    assert [k for k, _ in model.named_parameters()] == names
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), vec)


def test_apply_mask_is_atomic_when_it_refuses():
    # Was: apply_mask validates per tensor while registering; when a later tensor carries a foreign
    # parametrisation it raises after earlier tensors were already masked, leaving the caller's model half-masked
    model = _mlp_rv(4)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(model[4], "weight", Double())
    m = random_mask(model, 0.5, generator=0)
    assert list(m) == ["2.weight", "4.weight"]
    with pytest.raises(ValueError, match="parametrization"):
        apply_mask(model, m)
    assert not parametrize.is_parametrized(model[2], "weight")


@pytest.mark.parametrize("bad", [
    {"2.weight": torch.ones(12, 12, dtype=torch.bool), "2.parametrizations.weight.original":
        torch.ones(12, 12, dtype=torch.bool)},  # given twice
    {"2.bias": torch.ones(12, dtype=torch.uint8)},
    {"0.weight": torch.zeros(12, 4, dtype=torch.bool)},  # keeps nothing at all
    {"2.weight": torch.ones(12, 12, 1, dtype=torch.bool)},
    {"running_mean": torch.ones(3, dtype=torch.bool)},
])
def test_validate_mask_rejects_mismatched_masks(bad):
    with pytest.raises(ValueError, match="mask"):
        validate_mask(_mlp_rv(), bad)
    with pytest.raises(ValueError, match="mask"):
        apply_mask(_mlp_rv(), bad)


def test_random_mask_density_validation():
    model = _mlp_rv()
    for q in (0.0, -0.1, 1.0 + 1e-12, math.nan, math.inf):
        with pytest.raises(ValueError, match="density"):
            random_mask(model, q, generator=0)
    with pytest.raises(TypeError, match="density"):
        random_mask(model, True, generator=0)
    assert mask_density(random_mask(model, 1.0, generator=0)) == 1.0
    with pytest.raises(TypeError, match="model"):
        apply_mask({"a": 1}, {})
    assert isinstance(model[0], NTKLinear) and MaskParametrization(torch.ones(2, dtype=torch.bool)).scale == 1.0


def test_random_mask_follows_the_one_randomness_rule():
    # Was: random_mask had its own generator check: a negative seed was silently wrapped to 2**64 - 1
    # (pgd and the rest refuse it); numpy integer seeds were refused. None stays refused (a mask's randomness is explicit).
    import numpy as np

    model = _mlp()
    a = random_mask(model, 0.3, generator=np.int64(7))
    b = random_mask(model, 0.3, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="generator"):
        random_mask(model, 0.3, generator=-1)
    with pytest.raises(TypeError, match="generator"):
        random_mask(model, 0.3, generator=None)

"""empirical.tracking: the probe set (reproducible, feasible adversarial points) and the kernel
tracker against independent references (a float64 torch.func.jacrev NTK, a hand-written masked
network's Jacobian, the metrics' formulas written out), zero at the trivial comparisons, and the
model's state left as it was."""
from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from empirical.tracking import KernelTracker, ProbeSet, probe_record
from ntk_theory.layers import NTKLinear
from ntk_theory.masks import apply_mask, random_mask


def _net(seed=0, widths=(64, 48, 32, 10), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(NTKLinear(a, b, sigma_b=0.1, generator=g, dtype=dtype))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _data(n=120, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(x_train=torch.rand(10, 1, 8, 8, generator=g, dtype=dtype),
                           y_train=torch.randint(0, 10, (10,), generator=g),
                           x_test=torch.rand(n, 1, 8, 8, generator=g, dtype=dtype),
                           y_test=torch.randint(0, 10, (n,), generator=g))


@pytest.fixture(scope="module")
def setup():
    model = _net()
    probe = ProbeSet.make(model, _data(), n_clean=10, n_adv=8, eps=0.1, steps=5, seed=3)
    return model, probe


def _jacrev_ntk(fn, params, x):
    """Independent reference: per-example Jacobians by vmap(jacrev) in float64, contracted,
    trace over outputs / O. fn(params, x_one) -> (O,)."""
    jac = torch.func.vmap(torch.func.jacrev(fn), (None, 0))(params, x)
    full = sum(torch.einsum("naf,mbf->nmab", j.flatten(2), j.flatten(2)) for j in jac.values())
    return full, torch.diagonal(full, dim1=2, dim2=3).mean(-1)


def _model_ntk(model, x):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return torch.func.functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    return _jacrev_ntk(f, params, x)


# --------------------------------------------------------------------------------------------- probe set
def test_probe_is_reproducible_and_drawn_from_the_test_split(setup):
    model, probe = setup
    data = _data()
    again = ProbeSet.make(model, data, n_clean=10, n_adv=8, eps=0.1, steps=5, seed=3)
    for f in ("x_clean", "y_clean", "x_adv", "y_adv", "x_adv_origin", "idx_clean", "idx_adv"):
        assert torch.equal(getattr(probe, f), getattr(again, f)), f
    other = ProbeSet.make(model, data, n_clean=10, n_adv=8, eps=0.1, steps=5, seed=4)
    assert not torch.equal(other.idx_clean, probe.idx_clean)
    assert probe.split == "test" and len(set(torch.cat([probe.idx_clean, probe.idx_adv]).tolist())) == 18
    assert torch.equal(probe.x_clean, data.x_test[probe.idx_clean])
    assert torch.equal(probe.x_adv_origin, data.x_test[probe.idx_adv])
    assert torch.equal(probe.y_adv, data.y_test[probe.idx_adv])
    assert torch.equal(probe.x, torch.cat([probe.x_clean, probe.x_adv])) and probe.x.shape[0] == 18


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.7)])
def test_adversarial_points_are_feasible_and_attack(norm, eps):
    model = _net(1)
    data = _data(seed=1)
    p = ProbeSet.make(model, data, n_clean=4, n_adv=16, eps=eps, steps=6, norm=norm, seed=0)
    d = (p.x_adv.double() - p.x_adv_origin.double()).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else torch.linalg.vector_norm(d, dim=1)
    assert bool((size <= eps).all())  # exact, in float64, no tolerance (ntk_theory.attacks' guarantee)
    assert float(p.x_adv.min()) >= 0.0 and float(p.x_adv.max()) <= 1.0
    assert bool((size > 0.5 * eps).any())  # it moved
    with torch.no_grad():  # and it raised the dense network's loss
        lc = nn.functional.cross_entropy(model(p.x_adv_origin), p.y_adv)
        la = nn.functional.cross_entropy(model(p.x_adv), p.y_adv)
    assert float(la) > float(lc)


def test_eps_zero_gives_adversarial_points_equal_to_clean_ones():
    p = ProbeSet.make(_net(), _data(), n_clean=3, n_adv=5, eps=0.0, seed=0)
    assert torch.equal(p.x_adv, p.x_adv_origin) and "no attack" in p.note
    p0 = ProbeSet.make(_net(), _data(), n_clean=3, n_adv=0, eps=0.1, seed=0)
    assert p0.n_adv == 0 and p0.x.shape[0] == 3


def test_probe_make_restores_the_dense_models_state():
    model = _net(2)
    model.train()
    before = copy.deepcopy(model.state_dict())
    ProbeSet.make(model, _data(), n_clean=2, n_adv=4, eps=0.1, seed=0)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------- the kernel
def test_tracked_kernel_equals_a_float64_jacrev_reference(setup):
    model, probe = setup
    full_ref, trace_ref = _model_ntk(model, probe.x)
    rec = probe_record(probe, model, mode="trace")
    assert rec["kernel"].dtype == torch.float64
    torch.testing.assert_close(rec["kernel"], trace_ref, rtol=1e-10, atol=1e-12)
    rec_full = probe_record(probe, model, mode="full")
    torch.testing.assert_close(rec_full["kernel"], full_ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(rec["outputs"], model(probe.x))
    out = KernelTracker(probe)(0, model)
    assert math.isclose(out["kernel_norm"], float(torch.linalg.vector_norm(trace_ref)), rel_tol=1e-12)


def test_distance_to_init_is_zero_at_epoch_zero_and_follows_the_definition(setup):
    model, probe = setup
    tr = KernelTracker(probe)
    out0 = tr(0, model)
    assert out0["kernel_distance_to_init"] == 0.0
    assert out0["kernel_distance_to_init/clean"] == 0.0 and out0["kernel_distance_to_init/adv"] == 0.0
    _, k0 = _model_ntk(model, probe.x)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    _, k1 = _model_ntk(moved, probe.x)
    out1 = tr(1, moved)
    r = float(torch.linalg.vector_norm(k1 - k0) / torch.linalg.vector_norm(k0))
    assert math.isclose(out1["kernel_distance_to_init"], r, rel_tol=1e-9)
    a = slice(10, 18)
    r_adv = float(torch.linalg.vector_norm(k1[a, a] - k0[a, a]) / torch.linalg.vector_norm(k0[a, a]))
    assert math.isclose(out1["kernel_distance_to_init/adv"], r_adv, rel_tol=1e-9)
    assert out1["kernel_distance_to_init"] > 0
    # a tracker first called after epoch 0 has no initial kernel: the key is left out, not faked as 0
    assert "kernel_distance_to_init" not in KernelTracker(probe)(3, moved)


def test_dense_against_itself_is_zero(setup):
    model, probe = setup
    out = KernelTracker(probe, reference=model)(0, model)
    assert out["output_gap"] == 0.0 and out["output_rms_gap"] == 0.0
    assert abs(out["kernel_distance"]) < 1e-12 and abs(out["kernel_relative_distance"]) < 1e-12
    assert abs(out["kernel_alignment"] - 1.0) < 1e-12
    for suf in ("/clean", "/adv"):
        assert out["output_gap" + suf] == 0.0 and abs(out["kernel_distance" + suf]) < 1e-12
    json.dumps(out)
    assert all(isinstance(v, float) for v in out.values())


class _MaskedRef(nn.Module):
    """The masked MLP written by hand: W_eff = s · m ⊙ θ, z = g_w W_eff h + g_b b (no parametrisation)."""

    def __init__(self, dense, mask, scales):
        super().__init__()
        self.lins = [m for m in dense if isinstance(m, NTKLinear)]
        self.mask, self.scales = mask, scales

    def fn(self, params, xi):
        h = xi.flatten()
        for i, lin in enumerate(self.lins):
            w = params[f"w{i}"]
            name = f"{1 + 2 * i}.weight"
            if name in self.mask:
                w = self.scales[name] * self.mask[name].to(w.dtype) * w
            h = lin.weight_gain * w @ h + lin.bias_gain * params[f"b{i}"]
            if i < len(self.lins) - 1:
                h = torch.relu(h)
        return h

    def params(self):
        out = {}
        for i, lin in enumerate(self.lins):
            out[f"w{i}"], out[f"b{i}"] = lin.weight.detach().clone(), lin.bias.detach().clone()
        return out


@pytest.mark.parametrize("rescale", [False, True])
def test_masked_model_against_its_dense_reference_matches_a_direct_computation(setup, rescale):
    dense, probe = setup
    mask = random_mask(dense, 0.3, generator=0)
    scales = {k: (1 / math.sqrt(float(m.double().mean())) if rescale else 1.0) for k, m in mask.items()}
    ref_fn = _MaskedRef(dense, mask, scales)
    full_m, k_m = _jacrev_ntk(ref_fn.fn, ref_fn.params(), probe.x)
    _, k_d = _model_ntk(dense, probe.x)
    with torch.no_grad():
        f_m = torch.stack([ref_fn.fn(ref_fn.params(), xi) for xi in probe.x])
        f_d = dense(probe.x)
    ticket = apply_mask(copy.deepcopy(dense), mask, rescale=rescale)
    out = KernelTracker(probe, reference=dense)(0, ticket)
    cos = float((k_m * k_d).sum() / (torch.linalg.vector_norm(k_m) * torch.linalg.vector_norm(k_d)))
    assert math.isclose(out["kernel_distance"], 1.0 - cos, rel_tol=1e-8, abs_tol=1e-12)
    rel = float(torch.linalg.vector_norm(k_m - k_d) / torch.linalg.vector_norm(k_d))
    assert math.isclose(out["kernel_relative_distance"], rel, rel_tol=1e-9)
    n = k_m.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    a, b = h @ k_m @ h, h @ k_d @ h
    cka = float((a * b).sum() / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)))
    assert math.isclose(out["kernel_alignment"], cka, rel_tol=1e-9)
    gap = float(torch.linalg.vector_norm(f_m - f_d) / torch.linalg.vector_norm(f_d))
    assert math.isclose(out["output_gap"], gap, rel_tol=1e-9)
    assert math.isclose(out["output_rms_gap"], float(torch.linalg.vector_norm(f_m - f_d)) / math.sqrt(n),
                        rel_tol=1e-9)
    c = slice(0, 10)
    gap_c = float(torch.linalg.vector_norm(f_m[c] - f_d[c]) / torch.linalg.vector_norm(f_d[c]))
    assert math.isclose(out["output_gap/clean"], gap_c, rel_tol=1e-9)
    cos_a = float((k_m[10:, 10:] * k_d[10:, 10:]).sum()
                  / (torch.linalg.vector_norm(k_m[10:, 10:]) * torch.linalg.vector_norm(k_d[10:, 10:])))
    assert math.isclose(out["kernel_distance/adv"], 1.0 - cos_a, rel_tol=1e-8, abs_tol=1e-12)
    assert out["kernel_distance"] > 1e-4 and out["output_gap"] > 1e-3  # a real difference was measured
    # the same figures from the precomputed reference, from a callable epoch -> module and in full mode
    rec = probe_record(probe, dense)
    assert KernelTracker(probe, reference=rec)(0, ticket) == out
    own = KernelTracker(probe)
    own(0, dense)
    assert torch.equal(own.last_record["kernel"], rec["kernel"])
    assert KernelTracker(probe, reference=lambda e: dense)(0, ticket) == out
    assert KernelTracker(probe, reference={0: rec})(0, ticket) == out
    full = KernelTracker(probe, reference=dense, mode="full")(0, ticket)
    full_d, _ = _model_ntk(dense, probe.x)
    fm, fd = full_m.permute(0, 2, 1, 3).reshape(n * 10, -1), full_d.permute(0, 2, 1, 3).reshape(n * 10, -1)
    cos_f = float((fm * fd).sum() / (torch.linalg.vector_norm(fm) * torch.linalg.vector_norm(fd)))
    assert math.isclose(full["kernel_distance"], 1.0 - cos_f, rel_tol=1e-8, abs_tol=1e-12)


def test_tracking_leaves_the_models_state_alone(setup):
    _, probe = setup
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16, dtype=torch.float64), nn.BatchNorm1d(16, dtype=torch.float64),
                          nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 10, dtype=torch.float64))
    model.train()
    model[1].weight.grad = torch.full_like(model[1].weight, 3.0)
    model[5].bias.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    out1 = KernelTracker(probe, reference=copy.deepcopy(model))(0, model)
    assert model.training and model[2].training and model[4].training
    assert torch.equal(model[1].weight.grad, torch.full_like(model[1].weight, 3.0)) and model[5].weight.grad is None
    assert not model[5].bias.requires_grad and model[1].weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running statistics untouched
    assert KernelTracker(probe)(0, model)["kernel_norm"] == out1["kernel_norm"]  # eval mode: deterministic


def test_the_initial_kernel_survives_a_checkpoint(setup, tmp_path):
    model, probe = setup
    tr = KernelTracker(probe)
    tr(0, model)
    from ntk_theory.io import atomic_torch_save

    atomic_torch_save(tmp_path / "t.pt", tr.state_dict())
    fresh = KernelTracker(probe)
    fresh.load_state_dict(torch.load(tmp_path / "t.pt", weights_only=False))
    moved = _net(9)
    assert fresh(2, moved) == tr(2, moved) and "kernel_distance_to_init" in fresh(2, moved)
    with pytest.raises(ValueError, match="^state"):
        KernelTracker(probe, mode="full").load_state_dict(tr.state_dict())


def test_every_skips_epochs_but_never_the_initialisation(setup):
    model, probe = setup
    tr = KernelTracker(probe, every=2)
    assert tr(0, model) and tr(1, model) == {} and tr(2, model) and tr(3, model) == {}
    assert KernelTracker(probe, every=5)(0, model)


def test_a_float32_model_on_the_default_path(setup):
    _, probe = setup
    model = _net(5, dtype=torch.float32)
    out = KernelTracker(probe, reference=_net(6, dtype=torch.float32))(0, model)
    _, k = _model_ntk(copy.deepcopy(model).double(), probe.x)
    assert math.isclose(out["kernel_norm"], float(torch.linalg.vector_norm(k)), rel_tol=1e-4)
    assert 0 < out["kernel_distance"] < 1


# --------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_naming_the_argument(setup):
    model, probe = setup
    with pytest.raises(TypeError, match="^probe"):
        KernelTracker(probe.x)
    with pytest.raises(ValueError, match="^mode"):
        KernelTracker(probe, mode="diagonal")
    with pytest.raises(ValueError, match="^every"):
        KernelTracker(probe, every=0)
    with pytest.raises(ValueError, match="^block_size"):
        KernelTracker(probe, block_size=0)
    with pytest.raises(ValueError, match="^device"):
        KernelTracker(probe, device="tpu")
    with pytest.raises(TypeError, match="^reference"):
        KernelTracker(probe, reference=3)
    with pytest.raises(ValueError, match="^reference"):
        KernelTracker(probe, reference={"kernel": torch.zeros(3, 3), "outputs": torch.zeros(3, 10)})
    with pytest.raises(ValueError, match="^epoch"):
        KernelTracker(probe)(-1, model)
    with pytest.raises(TypeError, match="^model"):
        KernelTracker(probe)(0, lambda x: x)
    data = _data(20)
    with pytest.raises(ValueError, match="^n_clean, n_adv"):
        ProbeSet.make(model, data, n_clean=15, n_adv=6, eps=0.1)
    with pytest.raises(ValueError, match="^n_clean"):
        ProbeSet.make(model, data, n_clean=0, eps=0.1)
    with pytest.raises(ValueError, match="^eps"):
        ProbeSet.make(model, data, eps=-0.1)
    with pytest.raises(ValueError, match="^norm"):
        ProbeSet.make(model, data, n_clean=2, n_adv=2, eps=0.1, norm="l1")
    with pytest.raises(TypeError, match="^data"):
        ProbeSet.make(model, {"x_test": data.x_test}, eps=0.1)
    with pytest.raises(TypeError, match="^dense_model"):
        ProbeSet.make(None, data, eps=0.1)


def test_as_the_track_callback_of_adversarial_train():
    """End to end: a masked ticket trained with PGD-AT, tracked against the dense network's records."""
    from empirical import data as data_mod
    from empirical import models
    from empirical.train import adversarial_train

    ds = data_mod.load("digits").subset(n_train=128, n_test=64, seed=0)
    dense = models.build("mlp", in_shape=(1, 8, 8), num_classes=10, widths=(32,), seed=0)
    probe = ProbeSet.make(dense, ds, n_clean=8, n_adv=8, eps=0.1, steps=3, seed=0)
    own = KernelTracker(probe)
    kw = dict(eps=0.1, steps=3, epochs=2, lr=0.1, batch_size=64, seed=0, device="cpu", progress=False)
    records = {}

    def dense_track(epoch, model):
        out = own(epoch, model)
        records[epoch] = own.last_record
        return out

    adversarial_train(copy.deepcopy(dense), ds, track=dense_track, **kw)
    ticket = copy.deepcopy(dense)
    res = adversarial_train(ticket, ds, mask=random_mask(ticket, 0.5, generator=0),
                            track=KernelTracker(probe, reference=records), **kw)
    hist = res.history
    assert [h["epoch"] for h in hist] == [0, 1, 2] and set(records) == {0, 1, 2}
    assert hist[0]["kernel_distance_to_init"] == 0.0 and hist[2]["kernel_distance_to_init"] > 0
    assert all(h["kernel_distance"] > 0 and h["output_gap"] > 0 for h in hist)
    json.dumps(res.history)

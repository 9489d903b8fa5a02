"""empirical.tickets: exact densities, the first layer dense, magnitude against a direct top-k, and bad input.

The score references of SNIP/GraSP/SynFlow are in test_tickets_scores.py, HYDRA and adv_imp in
test_tickets_adversarial.py, AWT in test_tickets_awt.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from empirical.tickets import find_ticket, methods
from ntk_theory.layers import finite_mlp


def _data(n=96, d=12, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return SimpleNamespace(x_train=x[: n * 3 // 4], y_train=y[: n * 3 // 4], x_test=x[n * 3 // 4:],
                           y_test=y[n * 3 // 4:], num_classes=k, input_shape=(d,))


def _model(seed=0):
    return finite_mlp(12, 48, 2, 4, generator=seed, dtype=torch.float32)


FAST = {"awt": dict(train_steps=3, batch_size=16, n_train=32, n_eval=16, steps=2, log_every=1), "synflow": dict(rounds=5),
        "hydra": dict(epochs=1, steps=1, batch_size=32), "adv_imp": dict(epochs=1, steps=1, batch_size=48)}
ALL = ["random", "magnitude", "snip", "grasp", "synflow", "awt", "hydra", "adv_imp"]


def test_every_method_is_discovered():
    assert set(methods()) == set(ALL)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("density", [0.1, 0.37])
def test_exact_layerwise_density_and_dense_first_layer(method, density):
    assert method in methods()
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = find_ticket(method, model, _data(), density, seed=0, device="cpu", progress=False, **FAST.get(method, {}))
    assert set(res.mask) == {"2.weight", "4.weight"}                 # first layer (0.weight) stays dense
    for name, m in res.mask.items():
        p = dict(model.named_parameters())[name]
        assert m.dtype == torch.bool and m.shape == p.shape
        assert int(m.sum()) == max(1, round(density * p.numel())), name   # exact by count
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # caller's model untouched


@pytest.mark.parametrize("method", ALL)
def test_exact_global_density(method):
    model = _model()
    res = find_ticket(method, model, _data(), 0.2, scope="global", seed=1, device="cpu", progress=False,
                      **FAST.get(method, {}))
    total = sum(dict(model.named_parameters())[n].numel() for n in res.mask)
    assert sum(int(m.sum()) for m in res.mask.values()) == round(0.2 * total)


def test_magnitude_is_the_top_k_of_the_initial_weights():
    model = _model(3)
    res = find_ticket("magnitude", model, _data(), 0.25, seed=0, device="cpu", progress=False)
    for name, m in res.mask.items():
        w = dict(model.named_parameters())[name].detach().abs().flatten()
        k = round(0.25 * w.numel())
        ref = torch.zeros_like(w, dtype=torch.bool)
        ref[torch.topk(w, k).indices] = True
        assert torch.equal(m.flatten(), ref), name


def test_random_is_seeded():
    a = find_ticket("random", _model(), _data(), 0.3, seed=4, device="cpu", progress=False)
    b = find_ticket("random", _model(), _data(), 0.3, seed=4, device="cpu", progress=False)
    c = find_ticket("random", _model(), _data(), 0.3, seed=5, device="cpu", progress=False)
    assert all(torch.equal(a.mask[k], b.mask[k]) for k in a.mask)
    assert not all(torch.equal(a.mask[k], c.mask[k]) for k in a.mask)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="nonsense"), "method"),
    (dict(density=0.0), "density"),
    (dict(density=1.5), "density"),
    (dict(scope="per-channel"), "scope"),
    (dict(method="synflow", rounds_=3), "rounds_"),          # a misspelt hyper-parameter is an error
])
def test_bad_input_is_refused_by_name(kwargs, match):
    args = dict(method="random", density=0.1) | kwargs
    method, density = args.pop("method"), args.pop("density")
    with pytest.raises((ValueError, TypeError), match=match):
        find_ticket(method, _model(), _data(), density, device="cpu", progress=False, **args)


@pytest.mark.parametrize("method", ["snip", "grasp", "adv_imp"])
def test_a_frozen_model_is_searched_and_left_frozen(method):
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    res = find_ticket(method, model, _data(), 0.3, device="cpu", progress=False, **FAST.get(method, {}))
    assert sum(int(m.sum()) for m in res.mask.values()) > 0
    assert not any(p.requires_grad for p in model.parameters())

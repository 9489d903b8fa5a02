"""empirical.tickets: the adversarial searches HYDRA and adv_imp.

HYDRA: its scaled score initialisation gives the magnitude mask; the straight-through score gradient
equals sign(s) ⊙ θ ⊙ ∂L/∂W of the plain masked network (float64 autograd); optimising the scores lowers
the PGD loss and moves the mask. adv_imp: the round count ceil(log q / log 0.8), the densities per
round, and the masks equal a by-hand replay of train -> prune 20 % of what is left -> rewind built on
empirical.train.adversarial_train; rewinding to epoch k returns the dense run's state after k epochs."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from empirical.tickets import find_ticket
from empirical.tickets import adv_imp as adv_imp_mod
from empirical.tickets import hydra as hydra_mod
from ntk_theory.attacks import pgd
from ntk_theory.layers import finite_mlp


def _data(n=96, d=12, k=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(k, d, generator=g, dtype=dtype)
    y = torch.randint(0, k, (n,), generator=g)
    x = (centres[y] + 0.15 * torch.randn(n, d, generator=g, dtype=dtype)).clamp(0, 1)
    cut = n * 3 // 4
    return SimpleNamespace(x_train=x[:cut], y_train=y[:cut], x_test=x[cut:], y_test=y[cut:], num_classes=k,
                           input_shape=(d,))


def _model(seed=0, dtype=torch.float32):
    return finite_mlp(12, 48, 2, 4, generator=seed, dtype=dtype)


NAMES = ["2.weight", "4.weight"]


# ---------------------------------------------------------------------------------------------- HYDRA
def test_hydra_scaled_init_is_the_magnitude_mask():
    """HYDRA README: the scaled initialisation "prunes the connection with the lowest magnitude at the
    start"; with a vanishing learning rate the ticket is the magnitude ticket."""
    model, data = _model(1), _data()
    mag = find_ticket("magnitude", model, data, 0.2, device="cpu", progress=False)
    hyd = find_ticket("hydra", model, data, 0.2, device="cpu", progress=False, epochs=1, lr=1e-12, steps=1,
                      weight_decay=0.0)
    assert all(torch.equal(mag.mask[n], hyd.mask[n]) for n in NAMES)
    s = hydra_mod.init_scores(dict(model.named_parameters()), NAMES, "scaled", torch.Generator())
    for n in NAMES:
        w = dict(model.named_parameters())[n].detach()
        assert math.isclose(float(s[n].detach().abs().max()), math.sqrt(6 / w.shape[1]), rel_tol=1e-6)
        assert torch.equal(torch.sign(s[n]), torch.sign(w))


def test_hydra_score_gradient_is_straight_through():
    model, data = _model(2, torch.float64), _data(dtype=torch.float64)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    scores = hydra_mod.init_scores(params, NAMES, "kaiming", g)
    k = {n: round(0.3 * params[n].numel()) for n in NAMES}
    x, y = data.x_train[:16], data.y_train[:16]
    xa = pgd(model, x, y, eps=0.1, steps=3, generator=0)
    loss = hydra_mod.adversarial_loss(model, params, scores, k, xa, y)
    got = torch.autograd.grad(loss, [scores[n] for n in NAMES])
    # reference: the plain network with W = θ ⊙ topk(|s|) as leaves, ∂L/∂W by autograd
    ref_net = copy.deepcopy(model)
    ref_params = dict(ref_net.named_parameters())
    hard = {}
    with torch.no_grad():
        for n in NAMES:
            a = scores[n].detach().abs().flatten()
            m = torch.zeros_like(a, dtype=torch.bool)
            m[torch.argsort(a, descending=True)[: k[n]]] = True
            hard[n] = m.reshape(params[n].shape)
            ref_params[n].mul_(hard[n].to(torch.float64))
    ref_loss = F.cross_entropy(ref_net(xa), y)
    gW = torch.autograd.grad(ref_loss, [ref_params[n] for n in NAMES])
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    for n, a, b in zip(NAMES, got, gW):
        want = torch.sign(scores[n].detach()) * params[n].detach() * b
        assert torch.allclose(a, want, rtol=1e-10, atol=1e-14), n
        assert bool((a[~hard[n]] != 0).any()), n            # pruned entries get a gradient too


def test_hydra_lowers_the_adversarial_loss_and_moves_the_mask():
    model, data = _model(4), _data(seed=4)
    res = find_ticket("hydra", model, data, 0.2, seed=0, device="cpu", progress=False, epochs=8, batch_size=24,
                      steps=3, lr=0.5)
    rows = res.diagnostics["history"]
    it = [r for r in rows if "adv_loss" in r]
    assert len(it) == 8 * math.ceil(72 / 24) and all(r["lr"] > 0 for r in it)
    first = sum(r["adv_loss"] for r in it[:3]) / 3
    last = sum(r["adv_loss"] for r in it[-3:]) / 3
    assert last < first
    assert any(r.get("mask_change", 0) > 0 for r in rows)
    mag = find_ticket("magnitude", model, data, 0.2, device="cpu", progress=False)
    assert not all(torch.equal(mag.mask[n], res.mask[n]) for n in NAMES)


def test_hydra_bad_hyper_parameters_are_refused_by_name():
    for kw, name in ((dict(momentum=1.0), "momentum"), (dict(score_init="xavier"), "score_init"),
                     (dict(epochs=0), "epochs"), (dict(schedule="step"), "schedule")):
        with pytest.raises(ValueError, match=name):
            find_ticket("hydra", _model(), _data(), 0.2, device="cpu", progress=False, **kw)


# -------------------------------------------------------------------------------------------- adv_imp
@pytest.mark.parametrize("q, rounds", [(0.8, 1), (0.64, 2), (0.5, 4), (0.1, 11), (0.05, 14), (1.0, 1)])
def test_adv_imp_round_count(q, rounds):
    assert adv_imp_mod.rounds_for(q) == rounds
    if q < 1:   # ceil(log q / log 0.8), with 0.8^r (r < R) then q: every round prunes <= 20 % of what is left
        assert rounds == math.ceil(math.log(q) / math.log(0.8) - 1e-9)


FASTIMP = dict(epochs=2, steps=2, batch_size=24, lr=2.0)   # NTK parameterisation: a large lr moves the weights


def _replay(model, data, q, rewind_epoch=0, **kw):
    """train -> keep the top 80 % of what is left by |θ_T| -> rewind, by hand (layerwise)."""
    from empirical.train import adversarial_train

    cfg = dict(eps=0.1, norm="linf", steps=kw["steps"], batch_size=kw["batch_size"], lr=kw["lr"], device="cpu",
               progress=False)
    states = {}
    res = adversarial_train(model, data, epochs=kw["epochs"], seed=0,
                            track=lambda e, m: states.__setitem__(e, copy.deepcopy(m.state_dict())) or {}, **cfg)
    start = copy.deepcopy(model)
    start.load_state_dict(states[rewind_epoch])
    R = math.ceil(math.log(q) / math.log(0.8) - 1e-9)
    dens = [0.8 ** r for r in range(1, R)] + [q]
    mask = None
    for r, d in enumerate(dens):
        eff = {n: res.model.get_submodule(n.split(".")[0]).weight.detach().clone() for n in NAMES}
        new = {}
        for n in NAMES:
            a = eff[n].abs().flatten().double()
            if mask is not None:
                a[~mask[n].flatten()] = -1.0
            m = torch.zeros_like(a, dtype=torch.bool)
            m[torch.argsort(a, descending=True)[: round(d * a.numel())]] = True
            new[n] = m.reshape(eff[n].shape)
        if mask is not None:
            assert all(bool((new[n] <= mask[n]).all()) for n in NAMES)   # nested masks
        mask = new
        if r < len(dens) - 1:
            res = adversarial_train(start, data, mask=mask, epochs=kw["epochs"] - rewind_epoch, seed=r + 1, **cfg)
    return mask, states[rewind_epoch]


def test_adv_imp_equals_a_by_hand_replay():
    model, data = _model(5), _data(seed=5)
    res = find_ticket("adv_imp", model, data, 0.6, seed=0, device="cpu", progress=False, **FASTIMP)
    want, _ = _replay(model, data, 0.6, **FASTIMP)
    hist = res.diagnostics["history"]
    assert res.diagnostics["rounds"] == 3 == len(hist)
    assert [h["kept"] for h in hist] == [sum(round(d * dict(model.named_parameters())[n].numel()) for n in NAMES)
                                         for d in (0.8, 0.64, 0.6)]
    assert all(torch.equal(res.mask[n], want[n]) for n in NAMES)
    assert all(torch.equal(res.init_state[k], v) for k, v in model.state_dict().items())   # rewound to init
    mag = find_ticket("magnitude", model, data, 0.6, device="cpu", progress=False)
    assert not all(torch.equal(res.mask[n], mag.mask[n]) for n in NAMES)   # training moved the ranking


def test_adv_imp_rewinds_to_epoch_k():
    model, data = _model(6), _data(seed=6)
    kw = dict(FASTIMP, epochs=3)
    res = find_ticket("adv_imp", model, data, 0.8, seed=0, device="cpu", progress=False, rewind_epoch=1, **kw)
    want, state = _replay(model, data, 0.8, rewind_epoch=1, **kw)
    assert all(torch.equal(res.mask[n], want[n]) for n in NAMES)
    assert all(torch.equal(res.init_state[k], state[k]) for k in state)
    assert not all(torch.equal(res.init_state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="rewind_epoch"):
        find_ticket("adv_imp", model, data, 0.8, device="cpu", progress=False, rewind_epoch=3, epochs=3)

"""empirical.tickets baselines against independent computations of their published scores.

SNIP (Lee et al. 2019): |∂L/∂c| at c = 1 for W = c ⊙ θ (autograd w.r.t. mask variables, float64).
GraSP (Wang et al. 2020): -θ ⊙ (H g) with H g from torch.autograd.functional.hvp and, separately, a
central finite difference of gradients; the mask keeps the *lowest* scores (removes the highest).
SynFlow (Tanaka et al. 2020): the closed form of |θ ⊙ ∂R/∂θ| for a bias-free ReLU MLP with positive
weights, R = 1ᵀ(∏ g_l |W_l|)1, iterated by hand with the exponential schedule; conservation of the
per-layer flow; avoidance of layer collapse where global magnitude pruning collapses a layer."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from empirical.tickets import LayerCollapseError, find_ticket
from empirical.tickets import grasp as grasp_mod
from empirical.tickets import snip as snip_mod
from empirical.tickets import synflow as synflow_mod
from ntk_theory.layers import finite_mlp


def _data(n=40, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return SimpleNamespace(x_train=x, y_train=y, x_test=x[:8], y_test=y[:8], num_classes=k, input_shape=(d,))


def _net(seed=0, bias=0.3, width=10, out=3):
    return finite_mlp(6, width, 2, out, sigma_b=bias, generator=seed, dtype=torch.float64)


def _weights(model):
    return {n: p for n, p in model.named_parameters() if p.dim() >= 2}


def _bottom_or_top(scores: dict, k: dict, largest: bool) -> dict:
    """Reference top-k per tensor by a full sort (not the package's topk_mask)."""
    out = {}
    for n, s in scores.items():
        order = torch.argsort(s.flatten(), descending=largest)
        m = torch.zeros(s.numel(), dtype=torch.bool)
        m[order[: k[n]]] = True
        out[n] = m.reshape(s.shape)
    return out


def _counts(model, names, q):
    return {n: round(q * dict(model.named_parameters())[n].numel()) for n in names}


# ----------------------------------------------------------------------------------------------- SNIP
def test_snip_equals_the_mask_variable_gradient():
    model, data = _net(), _data()
    x, y = data.x_train, data.y_train
    params = dict(model.named_parameters())
    names = ["2.weight", "4.weight"]
    c = {n: torch.ones_like(params[n], requires_grad=True) for n in names}
    eff = {n: (c[n] * params[n].detach() if n in c else params[n].detach()) for n in params}
    loss = F.cross_entropy(functional_call(model, eff, (x,)), y)
    ref = dict(zip(names, (g.abs() for g in torch.autograd.grad(loss, [c[n] for n in names]))))
    got = snip_mod.scores(model, names, x, y)
    for n in names:
        assert torch.allclose(got[n], ref[n], rtol=1e-12, atol=1e-15), n
    res = find_ticket("snip", model, data, 0.3, seed=0, device="cpu", progress=False, n=len(x))
    want = _bottom_or_top(ref, _counts(model, names, 0.3), largest=True)
    assert all(torch.equal(res.mask[n], want[n]) for n in names)


# ---------------------------------------------------------------------------------------------- GraSP
def _grasp_reference(model, x, y, T, names):
    params = {n: p.detach() for n, p in model.named_parameters()}
    wnames = [n for n, p in params.items() if p.dim() >= 2]

    def loss(*ws):
        full = dict(params) | dict(zip(wnames, ws))
        return F.cross_entropy(functional_call(model, full, (x,)) / T, y)

    ws = tuple(params[n] for n in wnames)
    wr = [w.clone().requires_grad_(True) for w in ws]
    g = torch.autograd.grad(loss(*wr), wr)
    _, hg = torch.autograd.functional.hvp(loss, ws, tuple(g))
    hg = dict(zip(wnames, hg))
    # an independent second route: central finite difference of the gradient along g
    h = 1e-4

    def grad_at(shift):
        w2 = [(w + shift * gi).requires_grad_(True) for w, gi in zip(ws, g)]
        return torch.autograd.grad(loss(*w2), w2)

    fd = {n: (a - b) / (2 * h) for n, a, b in zip(wnames, grad_at(h), grad_at(-h))}
    return {n: -params[n] * hg[n] for n in names}, {n: -params[n] * fd[n] for n in names}


def test_grasp_equals_minus_theta_hessian_gradient_and_removes_the_highest():
    model, data = _net(1), _data(seed=1)
    x, y = data.x_train, data.y_train
    names = ["2.weight", "4.weight"]
    T = 5.0  # a small temperature makes H g larger than the finite-difference error
    ref, fd = _grasp_reference(model, x, y, T, names)
    got = grasp_mod.scores(model, names, x, y, T)
    for n in names:
        assert torch.allclose(got[n], ref[n], rtol=1e-9, atol=1e-14), n
        scale = ref[n].abs().max()
        assert scale > 0 and (fd[n] - ref[n]).abs().max() < 1e-5 * scale, n
    res = find_ticket("grasp", model, data, 0.3, seed=0, device="cpu", progress=False, n=len(x), temperature=T)
    k = _counts(model, names, 0.3)
    lowest = _bottom_or_top(ref, k, largest=False)
    highest = _bottom_or_top(ref, k, largest=True)
    for n in names:
        assert torch.equal(res.mask[n], lowest[n]), n       # keeps the lowest -θ ⊙ Hg ...
        assert not torch.equal(res.mask[n], highest[n]), n  # ... not the highest (the sign matters)


# -------------------------------------------------------------------------------------------- SynFlow
def _synflow_reference(model, names, q, rounds):
    """Hand iteration: layer matrices A_l = g_l |M_l ⊙ W_l|, S_l = |W_l| ⊙ g_l (u_l v_lᵀ)."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    keys = [f"{i}.weight" for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    W = [m.weight.detach().abs() for m in layers]
    gain = [m.weight_gain for m in layers]
    M = {n: torch.ones_like(W[keys.index(n)], dtype=torch.bool) for n in names}
    d_in = W[0].shape[1]
    for r in range(1, rounds + 1):
        A = [g * (w * M[k] if k in M else w) for g, w, k in zip(gain, W, keys)]
        S = {}
        for n in names:
            i = keys.index(n)
            v = torch.ones(d_in, dtype=torch.float64)
            for a in A[:i]:
                v = a @ v
            u = torch.ones(A[-1].shape[0], dtype=torch.float64)
            for a in reversed(A[i + 1:]):
                u = u @ a
            S[n] = (W[i] * M[n]) * gain[i] * torch.outer(u, v)
            S[n] = torch.where(M[n], S[n], torch.full_like(S[n], -1.0))
        qr = q ** (r / rounds)
        k = {n: round(qr * S[n].numel()) for n in names}
        for n in names:  # the test is only well defined without ties among kept scores
            kept = S[n][M[n]]
            assert kept.numel() == 0 or torch.unique(kept).numel() == kept.numel()
        M = _bottom_or_top(S, k, largest=True)
    return M


@pytest.mark.parametrize("rounds", [1, 4])
def test_synflow_equals_the_closed_form_of_the_synaptic_flow(rounds):
    # bias-free NTK MLP (R = 1ᵀ(∏ g_l |W_l|) 1) wide enough that no unit is cut off (no tied zero scores)
    model = _net(2, bias=0.0, width=16, out=12)
    names = ["2.weight", "4.weight"]
    res = find_ticket("synflow", model, _data(), 0.4, seed=0, device="cpu", progress=False, rounds=rounds)
    want = _synflow_reference(model, names, 0.4, rounds)
    assert all(torch.equal(res.mask[n], want[n]) for n in names)
    # a mask is a sub-mask of the previous round's: kept counts decrease along the schedule
    kept = [row["kept"] for row in res.diagnostics["history"]]
    assert kept == sorted(kept, reverse=True) and len(kept) == rounds


def _collapse_net(seed=0):
    """Bias-free ReLU MLP 16-200-200-200-4 (standard init) whose layer "2" is 100x smaller."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 200, bias=False), nn.ReLU(), nn.Linear(200, 200, bias=False), nn.ReLU(),
                        nn.Linear(200, 200, bias=False), nn.ReLU(), nn.Linear(200, 4, bias=False))
    with torch.no_grad():
        net[2].weight.mul_(0.01)
    return net


def test_synflow_conserves_the_flow_across_layers():
    """Their Theorem 2 for a bias-free ReLU net: every layer's scores sum to R."""
    net = _collapse_net()
    names = ["0.weight", "2.weight", "4.weight", "6.weight"]
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters()}
    s = synflow_mod.scores(net, names, mask, (16,))
    sums = torch.tensor([float(s[n].sum()) for n in names], dtype=torch.float64)
    net_abs = _collapse_net().double()
    with torch.no_grad():
        for p in net_abs.parameters():
            p.abs_()
    R = net_abs(torch.ones(1, 16, dtype=torch.float64)).sum()
    assert torch.allclose(sums, R.detach().expand(4), rtol=1e-10)


def test_synflow_avoids_the_layer_collapse_of_global_magnitude_pruning():
    data = SimpleNamespace(x_train=torch.rand(8, 16), y_train=torch.zeros(8, dtype=torch.long),
                           x_test=torch.rand(4, 16), y_test=torch.zeros(4, dtype=torch.long))
    q = 1e-3                                           # 81 of 80,800 prunable weights
    with pytest.raises(LayerCollapseError, match="2.weight"):
        find_ticket("magnitude", _collapse_net(), data, q, scope="global", device="cpu", progress=False)
    res = find_ticket("synflow", _collapse_net(), data, q, scope="global", device="cpu", progress=False)
    assert sum(int(m.sum()) for m in res.mask.values()) == round(q * 80800)
    assert all(int(m.sum()) > 0 for m in res.mask.values())
    # and one-shot synflow (rounds=1) is not enough here: the iteration is what avoids collapse
    with pytest.raises(LayerCollapseError):
        find_ticket("synflow", _collapse_net(), data, q, scope="global", device="cpu", progress=False, rounds=1)

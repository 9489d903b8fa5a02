"""empirical.tickets.awt: the search objective against independent references, and the search's behaviour.

The objective's gradient w.r.t. the scores (straight-through masks) through the structured kernel
equals the vmap(jacrev) recipe's (float64, 1e-8) for every kernel loss; its kernel-distance term equals
ntk_theory.metrics.kernel_distance of empirical_ntk kernels of the masked network; the search lowers
its objective and the held-out adversarial kernel distance from its starting point (the magnitude
mask); subnetwork tickets keep the initial weights, ntt tickets are the top-k of their learned weights."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from empirical.tickets import awt, find_ticket
from ntk_theory.empirical import empirical_ntk
from ntk_theory.layers import finite_mlp
from ntk_theory.masks import apply_mask
from ntk_theory.metrics import kernel_distance

NAMES = ["2.weight", "4.weight"]


def _net(dtype=torch.float64, seed=0, width=16):
    return finite_mlp(5, width, 2, 3, sigma_b=0.2, generator=seed, dtype=dtype)


def _x(n, seed, dtype=torch.float64):
    return torch.rand(n, 5, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _data(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(3, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    x = (c[y] + 0.2 * torch.randn(n, 5, generator=g)).clamp(0, 1)
    return SimpleNamespace(x_train=x[:128], y_train=y[:128], x_test=x[128:], y_test=y[128:])


@pytest.mark.parametrize("kernel_loss", awt.KERNEL_LOSSES)
@pytest.mark.parametrize("pairs", ["halves", "all"])
def test_objective_gradient_equals_the_jacrev_recipe(kernel_loss, pairs):
    m = _net()
    pts = _x(8, 1)
    h = None if pairs == "all" else 4
    params = dict(m.named_parameters())
    k = {n: round(0.4 * params[n].numel()) for n in NAMES}
    K0, f0 = awt.teacher(m, pts, h, "trace")
    grads = []
    for method in ("structured", "jacobian"):
        g = torch.Generator().manual_seed(3)
        s = {n: torch.rand(params[n].shape, generator=g, dtype=torch.float64).requires_grad_(True) for n in NAMES}
        M, C, _ = awt.subnetwork_masks(s, k, True, torch.float64)
        out, ker = awt.objective(m, pts, h, M, C, None, K0, f0, kernel_loss=kernel_loss, method=method)
        grads.append((float((out + ker).detach()), torch.autograd.grad(0.3 * out + ker, [s[n] for n in NAMES])))
    assert abs(grads[0][0] - grads[1][0]) < 1e-10
    for a, b in zip(grads[0][1], grads[1][1]):
        assert a.abs().max() > 0
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-8)


def test_distance_term_equals_the_kernel_distance_of_the_masked_network():
    m = _net(seed=2)
    pts = _x(10, 4)
    params = dict(m.named_parameters())
    k = {n: round(0.3 * params[n].numel()) for n in NAMES}
    g = torch.Generator().manual_seed(1)
    s = {n: torch.rand(params[n].shape, generator=g, dtype=torch.float64) for n in NAMES}
    M, C, hard = awt.subnetwork_masks(s, k, False, torch.float64)
    K0, f0 = awt.teacher(m, pts, None, "trace")
    out, ker = awt.objective(m, pts, None, M, C, None, K0, f0, kernel_loss="distance")
    sub = apply_mask(copy.deepcopy(m), hard)
    ref_K = empirical_ntk(sub, pts, mode="trace", method="jacobian")
    ref_K0 = empirical_ntk(m, pts, mode="trace", method="jacobian")
    assert abs(float(ker.detach()) - float(kernel_distance(ref_K, ref_K0))) < 1e-12
    with torch.no_grad():
        ref_out = ((sub(pts) - m(pts)) ** 2).mean() / (m(pts) ** 2).mean()
    assert abs(float(out.detach()) - float(ref_out)) < 1e-12


FAST = dict(train_steps=60, batch_size=32, n_train=128, n_eval=32, steps=3, log_every=1000)


def test_subnetwork_search_improves_on_its_magnitude_start():
    model, data = _net(torch.float32, seed=3, width=64), _data()
    res = find_ticket("awt", model, data, 0.1, seed=0, device="cpu", progress=False, **FAST)
    ev = res.diagnostics["eval"]
    assert ev[0]["iter"] == 0 and ev[-1]["final"]
    assert ev[-1]["adv_kernel_distance"] < ev[0]["adv_kernel_distance"]        # held-out, not trained on
    hist = res.diagnostics["history"]
    first = sum(r["loss"] for r in hist[:10]) / 10
    last = sum(r["loss"] for r in hist[-10:]) / 10
    assert last < first
    assert all(r["seconds"] > 0 for r in hist)
    assert all(torch.equal(res.init_state[k], v) for k, v in model.state_dict().items())   # a sub-network of θ_0
    mag = find_ticket("magnitude", model, data, 0.1, device="cpu", progress=False)
    assert not all(torch.equal(res.mask[n], mag.mask[n]) for n in NAMES)


def test_ntt_ticket_is_the_top_k_of_its_learned_weights():
    model, data = _net(torch.float32, seed=4, width=32), _data(seed=1)
    res = find_ticket("awt", model, data, 0.2, seed=0, device="cpu", progress=False, mode="ntt",
                      **dict(FAST, train_steps=10))
    assert any(not torch.equal(res.init_state[k], v) for k, v in model.state_dict().items())
    for n in NAMES:
        w = res.init_state[n].abs().flatten()
        ref = torch.zeros_like(w, dtype=torch.bool)
        ref[torch.argsort(w, descending=True)[: round(0.2 * w.numel())]] = True
        assert torch.equal(res.mask[n].flatten(), ref), n


def test_bad_awt_hyper_parameters_are_refused_by_name():
    for kw, name in ((dict(kernel_loss="cos"), "kernel_loss"), (dict(pairs="some"), "pairs"),
                     (dict(score_init="snip"), "score_init"), (dict(method="jvp"), "method"),
                     (dict(rescale=None), "rescale")):
        with pytest.raises((ValueError, TypeError), match=name):
            find_ticket("awt", _net(torch.float32), _data(), 0.2, device="cpu", progress=False, **kw)

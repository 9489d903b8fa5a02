"""Adversarial NTKs and kernel-form adversarial training against independent references.

References: the closed-form gradient descent of ntk_theory.dynamics (eps = 0), the
function-space recursion f_{k+1} = f_k - (lr/c) Theta0(., X~_k) r_k rebuilt here from
empirical NTKs at the recorded adversarial points, autograd finite differences, and
the attack constraints.
"""
from __future__ import annotations

import math

import pytest
import torch

from ntk_theory.adversarial import KernelRegressor, adversarial_kernel_training, adversarial_ntk
from ntk_theory.attacks import pgd
from ntk_theory.dynamics import gradient_descent_mse, gradient_flow_mse
from ntk_theory.empirical import empirical_ntk
from ntk_theory.infinite import mlp
from ntk_theory.layers import finite_mlp
from ntk_theory.masks import random_mask

f64 = torch.float64


def _data(n=10, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=f64) * 0.8 + 0.1
    y = torch.randn(n, generator=g, dtype=f64)
    return x, y, g


def test_kernel_regressor_equals_closed_form_flow():
    x, y, g = _data()
    xt = torch.rand(4, 5, generator=g, dtype=f64)
    k = mlp(2, sigma_b=0.1)
    for t in (0.5, 30.0, math.inf):
        f = KernelRegressor(k, x, y, t=t, diag_reg=1e-8)
        ref = gradient_flow_mse(k(x).ntk, y, [t], k_test_train=k(xt, x).ntk, diag_reg=1e-8).f_test[0]
        assert torch.allclose(f(xt), ref, rtol=1e-9, atol=1e-12)
    # interpolation at t = inf: the training points are reproduced (exact self-pairs make this tight)
    f = KernelRegressor(k, x, y)
    assert torch.allclose(f(x.clone()), y, rtol=1e-7, atol=1e-9)


def test_kernel_regressor_is_differentiable_and_attackable():
    x, y, g = _data()
    f = KernelRegressor(mlp(2, sigma_b=0.1), x, y, t=20.0)
    xv = x[:3].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: f(z), (xv,))
    x_adv = pgd(f, x, y, eps=0.05, steps=10, loss="mse", generator=g)
    assert (x_adv - x).abs().max() <= 0.05
    loss = lambda z: ((f(z) - y) ** 2).sum()
    assert loss(x_adv) > loss(x)


def test_adversarial_ntk_infinite_and_finite():
    x, y, g = _data(8, 4)
    k = mlp(2, sigma_b=0.1)
    a = adversarial_ntk(k, x, y, eps=0.05, steps=5, generator=g)
    assert a.k_adv_adv.shape == (8, 8) and a.k_adv_clean.shape == (8, 8)
    assert torch.allclose(a.k_adv_adv, k(a.x_adv, get="ntk"))
    assert torch.allclose(a.k_adv_clean, k(a.x_adv, x, get="ntk"))
    assert (a.x_adv - x).abs().max() <= 0.05 + 1e-15
    zero = adversarial_ntk(k, x, y, eps=0.0)
    assert torch.equal(zero.x_adv, x) and torch.allclose(zero.k_adv_adv, k(x, get="ntk"))

    net = finite_mlp(4, 32, 2, 1, sigma_b=0.1, generator=g)
    mask = random_mask(net, 0.5, generator=torch.Generator().manual_seed(1))
    b = adversarial_ntk(net, x, y[:, None], eps=0.05, steps=5, generator=g, mask=mask)
    assert torch.allclose(b.k_adv_adv, empirical_ntk(net, b.x_adv, mask=mask, mode="trace"))
    # the attack ran on the masked network: it increases the masked network's loss
    masked = {k_: (p * mask[k_] if k_ in mask else p) for k_, p in net.named_parameters()}
    fm = lambda z: torch.func.functional_call(net, masked, (z,))
    with torch.no_grad():
        assert ((fm(b.x_adv) - y[:, None]) ** 2).sum() > ((fm(x) - y[:, None]) ** 2).sum()


def test_adversarial_ntk_on_a_model_with_an_applied_mask():
    import copy
    from ntk_theory.masks import apply_mask
    x, y, g = _data(8, 4)
    net = finite_mlp(4, 32, 2, 1, sigma_b=0.1, generator=g)
    m1 = random_mask(net, 0.5, generator=torch.Generator().manual_seed(1))
    m2 = random_mask(net, 0.5, generator=torch.Generator().manual_seed(2))
    masked = apply_mask(copy.deepcopy(net), m1)
    a = adversarial_ntk(masked, x, y[:, None], eps=0.05, steps=3, generator=torch.Generator().manual_seed(0), mask=m2)
    both = {k: m1[k] & m2[k] for k in m1}
    b = adversarial_ntk(net, x, y[:, None], eps=0.05, steps=3, generator=torch.Generator().manual_seed(0), mask=both)
    assert torch.allclose(a.x_adv, b.x_adv) and torch.allclose(a.k_adv_adv, b.k_adv_adv, rtol=1e-10)


def test_kernel_training_without_attack_is_kernel_gradient_descent():
    x, y, g = _data()
    xt = torch.rand(4, 5, generator=g, dtype=f64)
    k = mlp(2, sigma_b=0.1)
    tr = adversarial_kernel_training(k, x, y, steps=15, lr=2.0, eps=0.0, x_test=xt)
    ref = gradient_descent_mse(k(x).ntk, y, list(range(16)), k_test_train=k(xt, x).ntk, lr=2.0)
    assert torch.allclose(tr.f_train, ref.f_train, rtol=1e-10, atol=1e-12)
    assert torch.allclose(tr.f_test, ref.f_test, rtol=1e-10, atol=1e-12)

    net = finite_mlp(5, 48, 2, 1, sigma_b=0.1, generator=g)
    tr = adversarial_kernel_training(net, x, y[:, None], steps=15, lr=2.0, eps=0.0, x_test=xt)
    with torch.no_grad():
        ref = gradient_descent_mse(empirical_ntk(net, x), y[:, None], list(range(16)), f0=net(x),
                                   k_test_train=empirical_ntk(net, xt, x), f0_test=net(xt), lr=2.0)
    assert torch.allclose(tr.f_train, ref.f_train, rtol=1e-10, atol=1e-12)
    assert torch.allclose(tr.f_test, ref.f_test, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["finite", "infinite"])
def test_adversarial_kernel_training_follows_the_kernel_recursion(kind):
    # f_{k+1}(x) = f_k(x) - (lr/c) Theta(x, X~_k)(f_k(X~_k) - Y), rebuilt from the recorded X~_k
    x, y, g = _data(8, 4)
    xt = torch.rand(3, 4, generator=g, dtype=f64)
    lr, steps = 1.0, 6
    if kind == "finite":
        model = finite_mlp(4, 32, 1, 1, sigma_b=0.1, generator=g)
        yy = y[:, None]
        kern = lambda a, b: empirical_ntk(model, a, b)
        with torch.no_grad():
            f0 = lambda z: model(z)
    else:
        model = mlp(1, sigma_b=0.1)
        yy = y
        kern = lambda a, b: model(a, b, get="ntk")
        f0 = lambda z: torch.zeros(z.shape[0], dtype=f64)
    tr = adversarial_kernel_training(model, x, yy, steps=steps, lr=lr, eps=0.03, attack_steps=4,
                                     generator=torch.Generator().manual_seed(3), x_test=xt)
    c = yy.numel()
    centres, resids = [], []

    def rebuilt(z):      # f_k(z) = f_0(z) - (lr/c) sum_s Theta(z, X~_s) r_s, from the recorded X~_s only
        out = f0(z)
        for xs, rs in zip(centres, resids):
            out = out - (lr / c) * kern(z, xs) @ rs
        return out

    with torch.no_grad():
        for k_ in range(steps + 1):
            xa = tr.x_adv[k_]
            assert torch.allclose(rebuilt(xa), tr.f_adv[k_], rtol=1e-9, atol=1e-11)
            assert torch.allclose(rebuilt(x), tr.f_train[k_], rtol=1e-9, atol=1e-11)
            assert torch.allclose(rebuilt(xt), tr.f_test[k_], rtol=1e-9, atol=1e-11)
            centres.append(xa)
            resids.append(rebuilt(xa) - yy)
    assert (tr.x_adv - x).abs().max() <= 0.03 + 1e-15
    assert (tr.robust_loss >= tr.clean_loss - 1e-12).all()     # the attack never lowers the loss
    assert tr.robust_loss[-1] < tr.robust_loss[0]              # training lowers the robust loss


def test_model_is_not_modified():
    x, y, g = _data(6, 4)
    net = finite_mlp(4, 16, 1, 1, generator=g)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    adversarial_kernel_training(net, x, y[:, None], steps=3, lr=1.0, eps=0.05, attack_steps=2, generator=g)
    adversarial_ntk(net, x, y[:, None], eps=0.05, steps=2, generator=g)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("call,match", [
    (lambda x, y: KernelRegressor(mlp(1), x, y[:3]), "y_train"),
    (lambda x, y: KernelRegressor(mlp(1), x, y, t=-1.0), "t"),
    (lambda x, y: KernelRegressor(mlp(1), x, y.long()), "y_train"),
    (lambda x, y: adversarial_ntk(mlp(1), x, y, eps=-0.1), "eps"),
    (lambda x, y: adversarial_ntk(mlp(1), x, y[:2], eps=0.1), "y"),
    (lambda x, y: adversarial_kernel_training(mlp(1), x, y, steps=-1, lr=1.0, eps=0.1), "steps"),
    (lambda x, y: adversarial_kernel_training(mlp(1), x, y, steps=2, lr=0.0, eps=0.1), "lr"),
    (lambda x, y: adversarial_kernel_training(mlp(1), x, y, steps=2, lr=1.0, eps=0.1, x_test=torch.ones(2, 3)),
     "x_test"),
    (lambda x, y: adversarial_kernel_training(mlp(1), x, y[:, None], steps=2, lr=1.0, eps=0.1, x_test=x[:2],
                                              y_test=y[:2]), "y_test"),
    (lambda x, y: adversarial_kernel_training(finite_mlp(4, 8, 1, 1), x, y, steps=2, lr=1.0, eps=0.1), "y_train"),
    (lambda x, y: adversarial_kernel_training(mlp(1), x, y, steps=2, lr=1.0, eps=0.0, norm="l7"), "norm"),
    (lambda x, y: adversarial_ntk(mlp(1), x, (y > 0).long(), eps=0.1), "y"),
    (lambda x, y: adversarial_ntk(mlp(1), x, y, eps=0.1, x_train=x), "y_train"),
])
def test_bad_input(call, match):
    x, y, _ = _data(6, 4)
    with pytest.raises(ValueError, match=match):
        call(x, y)


@pytest.mark.slow
def test_wide_network_adversarial_training_tracks_its_linearisation():
    """Real AT of a finite network (PGD, MSE, small eps) vs its linearised kernel dynamics: the gap shrinks with width."""
    x, y, _ = _data(12, 6, seed=4)
    gaps = []
    widths = [64, 256, 1024]
    for w in widths:
        gaps_w = []
        for s in range(3):
            net = finite_mlp(6, w, 2, 1, activation="erf", sigma_b=0.1, generator=torch.Generator().manual_seed(s))
            lin_traj = adversarial_kernel_training(net, x, y[:, None], steps=30, lr=0.4, eps=0.05, attack_steps=5,
                                                   generator=torch.Generator().manual_seed(9))
            opt = torch.optim.SGD(net.parameters(), lr=0.4)   # lr < 2c/lambda_max ~ 0.8
            gen = torch.Generator().manual_seed(9)
            outs = []
            for k in range(31):
                xa = pgd(net, x, y[:, None], eps=0.05, steps=5, loss="mse", generator=gen)
                with torch.no_grad():
                    outs.append(net(x).clone())
                if k == 30:
                    break
                opt.zero_grad()
                (0.5 * ((net(xa) - y[:, None]) ** 2).sum() / y.numel()).backward()
                opt.step()
            real = torch.stack(outs)
            gaps_w.append(float((real - lin_traj.f_train).norm(dim=(1, 2)).max() / lin_traj.f_train.norm(dim=(1, 2)).max()))
        gaps.append(sum(gaps_w) / len(gaps_w))
    slope = (math.log(gaps[-1]) - math.log(gaps[0])) / (math.log(widths[-1]) - math.log(widths[0]))
    assert gaps[0] > gaps[1] > gaps[2], gaps
    assert -1.3 <= slope <= -0.3, (gaps, slope)


def test_adv_ntk_predictor_against_kernel_regressor_and_scipy():
    import numpy as np
    import scipy.linalg
    from ntk_theory.adversarial import AdvNTKPredictor
    x, y, g = _data(7, 3)
    xt = torch.rand(4, 3, generator=g, dtype=f64)
    k = mlp(2, sigma_b=0.1)
    # equal times: the gradient-flow mean at scaled time tau (normalization "none": tau = t)
    f = AdvNTKPredictor(k, x, y, init=0.7)
    ref = KernelRegressor(k, x, y, t=0.7, normalization="none")
    assert torch.allclose(f(xt), ref(xt), rtol=1e-10)
    # per-sample (and per-class) times against scipy's expm and solve
    Y = torch.stack([y, -2 * y], 1)
    fc = AdvNTKPredictor(k, x, Y, per_class=True)
    with torch.no_grad():
        fc.varpi.copy_(torch.rand(7, 2, generator=g, dtype=f64) * 3)
    K, Kt = k(x).ntk.numpy(), k(xt, x).ntk.numpy()
    ref_cols = []
    for j in range(2):
        D = np.diag(np.abs(fc.varpi[:, j].detach().numpy()))
        ref_cols.append(Kt @ np.linalg.solve(K, (np.eye(7) - scipy.linalg.expm(-K @ D)) @ Y[:, j].numpy()))
    assert np.allclose(fc(xt).detach().numpy(), np.stack(ref_cols, 1), rtol=1e-8)
    # differentiable in the times (what Adv-NTK trains) and in the inputs (what PGD attacks)
    f.varpi.data = torch.rand(7, generator=g, dtype=f64) + 0.1
    v0 = f.varpi.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: torch.func.functional_call(f, {"varpi": v}, (xt,)), (v0,))
    x_adv = pgd(f, xt, torch.zeros(4, dtype=f64), eps=0.05, steps=3, loss="mse", generator=g)
    assert (x_adv - xt).abs().max() <= 0.05

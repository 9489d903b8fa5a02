"""Adversarial NTKs and kernel-form adversarial training against independent references.

References: the closed-form gradient descent of ntk_theory.dynamics (eps = 0), the
function-space recursion f_{k+1} = f_k - (lr/c) Theta0(., X~_k) r_k rebuilt here from
empirical NTKs at the recorded adversarial points, autograd finite differences, and
the attack constraints; numpy/scipy (pinv, expm) for the kernel predictors, and explicit loops that
rebuild AT-2 from kernels (infinite width) or from an independent jvp linearisation (finite width) at
the recorded adversarial points. Tests marked ``# Was:`` are regressions: each names a defect a review
found (fixed since) and fails if it comes back.
"""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from ntk_theory import adversarial as adv_mod
from ntk_theory.adversarial import AdvNTKPredictor, KernelRegressor, adversarial_kernel_training, adversarial_ntk
from ntk_theory.attacks import pgd
from ntk_theory.dynamics import gradient_descent_mse, gradient_flow_mse
from ntk_theory.empirical import empirical_ntk
from ntk_theory.infinite import mlp
from ntk_theory.layers import finite_mlp
from ntk_theory.masks import random_mask

f64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _data(n=10, d=5, o=None, seed=0):
    g = _gen(seed)
    x = torch.rand(n, d, generator=g, dtype=f64) * 0.8 + 0.1
    y = torch.randn((n,) if o is None else (n, o), generator=g, dtype=f64)
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
    # lr = 1 lies below both kernels' stability limits 2c/λ_max (1.28 and 1.34); the run at lr = 2 this test
    # used before diverged (robust loss 1e8-fold by step 14), which adversarial_kernel_training now refuses
    x, y, g = _data()
    xt = torch.rand(4, 5, generator=g, dtype=f64)
    k = mlp(2, sigma_b=0.1)
    tr = adversarial_kernel_training(k, x, y, train_steps=15, lr=1.0, eps=0.0, x_test=xt)
    ref = gradient_descent_mse(k(x).ntk, y, list(range(16)), k_test_train=k(xt, x).ntk, lr=1.0)
    assert torch.allclose(tr.f_train, ref.f_train, rtol=1e-10, atol=1e-12)
    assert torch.allclose(tr.f_test, ref.f_test, rtol=1e-10, atol=1e-12)

    net = finite_mlp(5, 48, 2, 1, sigma_b=0.1, generator=g)
    tr = adversarial_kernel_training(net, x, y[:, None], train_steps=15, lr=1.0, eps=0.0, x_test=xt)
    with torch.no_grad():
        ref = gradient_descent_mse(empirical_ntk(net, x), y[:, None], list(range(16)), f0=net(x),
                                   k_test_train=empirical_ntk(net, xt, x), f0_test=net(xt), lr=1.0)
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
    tr = adversarial_kernel_training(model, x, yy, train_steps=steps, lr=lr, eps=0.03, steps=4,
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
    adversarial_kernel_training(net, x, y[:, None], train_steps=3, lr=1.0, eps=0.05, steps=2, generator=g)
    adversarial_ntk(net, x, y[:, None], eps=0.05, steps=2, generator=g)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("call,match", [
    (lambda x, y: KernelRegressor(mlp(1), x, y[:3]), "y"),
    (lambda x, y: KernelRegressor(mlp(1), x, y, t=-1.0), "t"),
    (lambda x, y: KernelRegressor(mlp(1), x, y.long()), "y"),
    (lambda x, y: adversarial_ntk(mlp(1), x, y, eps=-0.1), "eps"),
    (lambda x, y: adversarial_ntk(mlp(1), x, y[:2], eps=0.1), "y"),
    (lambda x, y: adversarial_kernel_training(mlp(1), x, y, train_steps=-1, lr=1.0, eps=0.1), "train_steps"),
    (lambda x, y: adversarial_kernel_training(mlp(1), x, y, train_steps=1, lr=1.0, eps=0.1, steps=-1), "steps"),
    (lambda x, y: adversarial_kernel_training(mlp(1), x, y, train_steps=2, lr=0.0, eps=0.1), "lr"),
    (lambda x, y: adversarial_kernel_training(mlp(1), x, y, train_steps=2, lr=1.0, eps=0.1, x_test=torch.ones(2, 3)),
     "x_test"),
    (lambda x, y: adversarial_kernel_training(mlp(1), x, y[:, None], train_steps=2, lr=1.0, eps=0.1, x_test=x[:2],
                                              y_test=y[:2]), "y_test"),
    (lambda x, y: adversarial_kernel_training(finite_mlp(4, 8, 1, 1), x, y, train_steps=2, lr=1.0, eps=0.1), "y: targets"),
    (lambda x, y: adversarial_kernel_training(mlp(1), x, y, train_steps=2, lr=1.0, eps=0.0, norm="l7"), "norm"),
    (lambda x, y: adversarial_ntk(mlp(1), x, (y > 0).long(), eps=0.1), "y"),
    (lambda x, y: adversarial_ntk(mlp(1), x, y, eps=0.1, predictor="f"), "predictor"),
    (lambda x, y: adversarial_ntk(finite_mlp(4, 8, 1, 1), x, y[:, None], eps=0.1, predictor=lambda z: z), "predictor"),
    (lambda x, y: adversarial_ntk(mlp(1), x.to(torch.complex128), y, eps=0.1), "x"),
    (lambda x, y: adversarial_ntk(mlp(1), x, y, eps=0.1, mode="diag"), "mode"),
])
def test_bad_input(call, match):
    x, y, _ = _data(6, 4)
    with pytest.raises((ValueError, TypeError), match=match):
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
            lin_traj = adversarial_kernel_training(net, x, y[:, None], train_steps=30, lr=0.4, eps=0.05, steps=5,
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


# ============================================================================ kernel predictors
def test_kernel_regressor_singular_kernel_is_the_pseudo_inverse_limit():
    g = _gen(0)
    x = torch.rand(4, 3, generator=g, dtype=f64)
    xd = torch.cat([x, x[:2]])                           # duplicated points: Theta is singular
    yd = torch.randn(6, generator=g, dtype=f64)
    xt = torch.rand(5, 3, generator=g, dtype=f64)
    k = mlp(2, sigma_b=0.1)
    K, Kt = k(xd).ntk.numpy(), k(xt, xd).ntk.numpy()
    Kp = np.linalg.pinv(K, rcond=1e-10)
    got = KernelRegressor(k, xd, yd, t=math.inf, diag_reg=0.0)(xt).detach().numpy()
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, Kt @ Kp @ yd.numpy(), rtol=1e-9, atol=1e-12)
    t, c = 3.0, 6.0
    ref = Kt @ Kp @ (np.eye(6) - scipy.linalg.expm(-K * t / c)) @ yd.numpy()
    np.testing.assert_allclose(KernelRegressor(k, xd, yd, t=t)(xt).detach().numpy(), ref, rtol=1e-9, atol=1e-12)
    # Adv-NTK with equal times t/c on the same singular kernel (it never inverts Theta)
    np.testing.assert_allclose(AdvNTKPredictor(k, xd, yd, init=t / c)(xt).detach().numpy(), ref, rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("big", [1.0, 100.0, 1e4])
def test_adv_ntk_per_class_times_against_scipy_expm(big):
    x, _, g = _data(6, 3)
    Y = torch.randn(6, 3, generator=g, dtype=f64)
    xt = torch.rand(4, 3, generator=g, dtype=f64)
    k = mlp(2, sigma_b=0.1)
    f = AdvNTKPredictor(k, x, Y, per_class=True)
    with torch.no_grad():
        f.varpi.copy_((torch.rand(6, 3, generator=g, dtype=f64) - 0.3) * big)  # some negative: |varpi| is used
    K, Kt = k(x).ntk.numpy(), k(xt, x).ntk.numpy()
    cols = []
    for j in range(3):
        D = np.diag(np.abs(f.varpi[:, j].detach().numpy()))
        cols.append(Kt @ np.linalg.solve(K, (np.eye(6) - scipy.linalg.expm(-K @ D)) @ Y[:, j].numpy()))
    np.testing.assert_allclose(f(xt).detach().numpy(), np.stack(cols, 1), rtol=1e-8, atol=1e-11)


def test_adv_ntk_trainable_from_its_default_zero_init():
    # Was: varpi.abs() has derivative 0 at 0 in torch, so from init=0 (the default and Fu & Wang's init,
    # aug = zeros) every gradient w.r.t. varpi is exactly 0 and Adv-NTK training never moves. The reference
    # (fshp971/adv-ntk, JAX) differentiates |.| with select(x >= 0, g, -g), i.e. +1 at 0; here
    # d f(x)/d varpi_i at 0 is Theta(x, x_i) y_i != 0.
    x, y, g = _data(6, 3)
    k = mlp(2, sigma_b=0.1)
    for per_class in (False, True):
        f = AdvNTKPredictor(k, x, y, per_class=per_class)
        xt = torch.rand(4, 3, generator=g, dtype=f64)
        (0.5 * (f(xt) - 1.0).pow(2).sum()).backward()
        expected = -(k(xt, x).ntk * y[None, :]).sum(0) if not per_class else None
        assert float(f.varpi.grad.abs().max()) > 0.0
        if expected is not None:  # at varpi = 0: f = 0, dL/dvarpi_i = sum_x (f - 1) Theta(x, x_i) y_i
            torch.testing.assert_close(f.varpi.grad, expected, rtol=1e-10, atol=1e-12)


# ============================================================================ adversarial_ntk
def test_adversarial_ntk_infinite_equals_pgd_on_the_kernel_regressor():
    x, y, _ = _data(7, 3)
    k = mlp(2, sigma_b=0.1)
    a = adversarial_ntk(k, x, y, eps=0.05, steps=4, t=20.0, diag_reg=1e-6, generator=_gen(4))
    ref = pgd(KernelRegressor(k, x, y, t=20.0, diag_reg=1e-6), x, y, eps=0.05, steps=4, loss="mse",
              generator=_gen(4))
    assert torch.equal(a.x_adv, ref)
    torch.testing.assert_close(a.k_adv_clean, k(ref, x, get="ntk"), rtol=0, atol=0)
    torch.testing.assert_close(a.k_clean_clean, k(x, get="ntk"), rtol=0, atol=0)


@pytest.mark.parametrize("mask_mode", ["subnetwork", "ntt"])
def test_adversarial_ntk_masks_in_both_modes(mask_mode):
    from ntk_theory.masks import random_mask
    x, y, g = _data(6, 4)
    net = finite_mlp(4, 16, 2, 1, sigma_b=0.1, generator=_gen(2), dtype=f64)
    mask = random_mask(net, 0.4, generator=_gen(3))
    a = adversarial_ntk(net, x, y[:, None], eps=0.05, steps=3, generator=_gen(5), mask=mask, mask_mode=mask_mode,
                        mode="full")
    # the attack is on the masked network, whatever the kernel mode
    masked = {k_: (torch.where(mask[k_], p, 0.0) if k_ in mask else p).detach() for k_, p in net.named_parameters()}
    ref = pgd(lambda z: functional_call(net, masked, (z,)), x, y[:, None], eps=0.05, steps=3, loss="mse",
              generator=_gen(5))
    assert torch.equal(a.x_adv, ref)
    torch.testing.assert_close(a.k_adv_adv, empirical_ntk(net, ref, mask=mask, mask_mode=mask_mode, mode="full"))
    torch.testing.assert_close(a.k_adv_clean, empirical_ntk(net, ref, x, mask=mask, mask_mode=mask_mode, mode="full"))


def test_adversarial_ntk_masked_attack_leaves_batchnorm_statistics_alone(monkeypatch):
    # Was: with a mask the attack runs on a functional_call closure, which _ModuleStateGuard does not cover:
    # a model in train mode gets its BatchNorm running statistics updated by every PGD forward
    # (the unmasked path restores them). The kernel stage is stubbed out to isolate the attack.
    monkeypatch.setattr(adv_mod, "empirical_ntk", lambda model, a, b=None, **kw: torch.zeros(a.shape[0], a.shape[0]))

    class BNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.bn, self.l2 = nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Linear(16, 1)

        def forward(self, z):
            return self.l2(torch.relu(self.bn(self.l1(z))))

    x, y, _ = _data(6, 3)
    for masked in (False, True):
        torch.manual_seed(0)
        net = BNNet().double().train()
        before = {k: b.clone() for k, b in net.named_buffers()}
        mask = {"l2.weight": torch.arange(16)[None, :] % 2 == 0} if masked else None
        adversarial_ntk(net, x, y[:, None], eps=0.1, steps=2, generator=_gen(0), mask=mask)
        for k, b in net.named_buffers():
            assert torch.equal(b, before[k]), (masked, k)


def test_adversarial_ntk_checks_the_custom_attack_output():
    # Was: the output of a custom ``attack`` is not checked: one returning the wrong number of points gives
    # kernels of the wrong shape (here 2x2 for 6 inputs) without any error.
    x, y, _ = _data(6, 3)
    with pytest.raises(ValueError, match="attack"):
        adversarial_ntk(mlp(1), x, y, eps=0.1, attack=lambda f, a, b: a[:2])


def test_adversarial_ntk_scalar_y_is_a_value_error():
    # Was: y of shape () reaches ``y.shape[0]`` unchecked: IndexError instead of a ValueError naming y.
    x, _, _ = _data(6, 3)
    with pytest.raises(ValueError, match="y"):
        adversarial_ntk(mlp(1), x, torch.tensor(1.0, dtype=f64), eps=0.1)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(alpha=-1.0), "alpha"),
    (dict(clamp=(1.0, 0.0)), "clamp"),
    (dict(loss="hinge"), "loss"),
    (dict(generator="3"), "generator"),
    (dict(generator=-1), "generator"),
])
def test_eps_zero_does_not_bypass_attack_validation(kwargs, arg):
    # Was: _attack_fn's eps == 0 shortcut returns x before pgd validates alpha/clamp/loss/generator (pgd itself
    # validates first and then returns x for eps = 0), so bad arguments pass silently when eps = 0.
    x, y, _ = _data(6, 3)
    with pytest.raises((ValueError, TypeError), match=arg):
        adversarial_ntk(mlp(1), x, y, eps=0.0, **kwargs)
    if "loss" not in kwargs:  # adversarial_kernel_training always attacks the MSE
        with pytest.raises((ValueError, TypeError), match=arg):
            adversarial_kernel_training(mlp(1), x, y, train_steps=2, lr=1.0, eps=0.0, **kwargs)


# ============================================================================ AT-2
@pytest.mark.parametrize("normalization", ["size", "none"])
def test_at2_eps_zero_is_gradient_descent_steps_and_stability_edge(normalization):
    x, Y, g = _data(7, 3, o=2)
    xt = torch.rand(3, 3, generator=g, dtype=f64)
    k = mlp(2, sigma_b=0.1)
    K, Kt = k(x).ntk, k(xt, x).ntk
    c = Y.numel() if normalization == "size" else 1.0
    edge = 2 * c / float(torch.linalg.eigvalsh(K).max())
    for lr in (0.999 * edge, 1.001 * edge, 0.25 * edge):
        for steps in (0, 1, 6):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tr = adversarial_kernel_training(k, x, Y, train_steps=steps, lr=lr, eps=0.0, x_test=xt,
                                                 normalization=normalization)
            # the stability limit is exact here (eps = 0: the kernel at the attacked points is Θ(X, X))
            assert [str(w.message) for w in caught if "stability limit" in str(w.message)] == (
                [] if (lr < edge or steps == 0) else [caught[0].message.args[0]])
            torch.testing.assert_close(torch.tensor(tr.meta["lr_limit"]), torch.tensor(edge), rtol=1e-12, atol=0)
            ref = gradient_descent_mse(K, Y, list(range(steps + 1)), k_test_train=Kt, lr=lr,
                                       normalization=normalization)
            torch.testing.assert_close(tr.f_train, ref.f_train, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(tr.f_test, ref.f_test, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(tr.tau, ref.tau, rtol=1e-15, atol=0)


def test_at2_finite_eps_zero_multi_output_at_the_stability_edge():
    x, Y, g = _data(7, 3, o=2)
    xt = torch.rand(3, 3, generator=g, dtype=f64)
    net = finite_mlp(3, 32, 2, 2, sigma_b=0.1, generator=_gen(1), dtype=f64)
    with torch.no_grad():
        K, Kt, f0, f0t = empirical_ntk(net, x), empirical_ntk(net, xt, x), net(x), net(xt)
    lmax = float(torch.linalg.eigvalsh(K.permute(0, 2, 1, 3).reshape(14, 14)).max())
    for lr, steps in ((0.999 * 2 * 14 / lmax, 5), (1.0, 1)):
        tr = adversarial_kernel_training(net, x, Y, train_steps=steps, lr=lr, eps=0.0, x_test=xt)
        ref = gradient_descent_mse(K, Y, list(range(steps + 1)), f0=f0, k_test_train=Kt, f0_test=f0t, lr=lr)
        torch.testing.assert_close(tr.f_train, ref.f_train, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(tr.f_test, ref.f_test, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_at2_infinite_matches_an_explicit_loop(norm):
    """Rebuild f_k = -(lr/c) sum_s Theta(., X~_s) r_s and attack it with the same PGD and generator stream."""
    x, Y, g = _data(6, 3, o=2)
    xt = torch.rand(3, 3, generator=g, dtype=f64)
    k = mlp(2, sigma_b=0.1)
    lr, steps, eps, c = 0.1, 4, (0.05 if norm == "linf" else 0.1), 1.0
    tr = adversarial_kernel_training(k, x, Y, train_steps=steps, lr=lr, eps=eps, norm=norm, steps=3,
                                     generator=_gen(7), x_test=xt, normalization="none")
    gen = _gen(7)
    centres, res = [], []

    def fk(z):
        out = torch.zeros(z.shape[0], 2, dtype=f64)
        for xs, r in zip(centres, res):
            out = out - (lr / c) * k(z, xs, get="ntk") @ r
        return out

    for step in range(steps + 1):
        xa = x.clone() if step == 0 else pgd(fk, x, Y, eps=eps, steps=3, norm=norm, loss="mse", generator=gen)
        torch.testing.assert_close(tr.x_adv[step], xa, rtol=0, atol=1e-12)
        with torch.no_grad():
            r = fk(xa) - Y
            torch.testing.assert_close(tr.f_adv[step], fk(xa), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(tr.f_train[step], fk(x), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(tr.f_test[step], fk(xt), rtol=1e-10, atol=1e-12)
            assert abs(float(tr.robust_loss[step]) - float((r ** 2).sum() / (2 * c))) <= 1e-6 * float((r ** 2).sum())
        centres.append(xa)
        res.append(r)
    assert tr.robust_loss[-1] < tr.robust_loss[0]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_at2_finite_matches_an_independent_linearisation(norm):
    """Own linearisation f0 + J0 u (torch.func.jvp), GD on u with vjp, attacked by the same PGD stream."""
    x, Y, g = _data(6, 3, o=2)
    xt = torch.rand(3, 3, generator=g, dtype=f64)
    model = finite_mlp(3, 24, 1, 2, sigma_b=0.1, generator=_gen(1), dtype=f64)
    p0 = {k_: v.detach().clone() for k_, v in model.named_parameters()}
    lr, steps, eps, c = 1.0, 3, 0.05, 12.0
    tr = adversarial_kernel_training(model, x, Y, train_steps=steps, lr=lr, eps=eps, norm=norm, steps=3,
                                     generator=_gen(7), x_test=xt)
    u = {k_: torch.zeros_like(v) for k_, v in p0.items()}

    def flin(z):
        out, tan = jvp(lambda p: functional_call(model, p, (z,)), (p0,), (u,))
        return out + tan

    gen = _gen(7)
    for step in range(steps + 1):
        xa = pgd(flin, x, Y, eps=eps, steps=3, norm=norm, loss="mse", generator=gen)
        torch.testing.assert_close(tr.x_adv[step], xa, rtol=0, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(tr.f_train[step], flin(x), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(tr.f_test[step], flin(xt), rtol=1e-10, atol=1e-12)
            r = flin(xa) - Y
        _, pull = vjp(lambda p: functional_call(model, p, (xa,)), p0)
        (gr,) = pull(r)
        u = {k_: u[k_] - lr / c * gr[k_] for k_ in u}
    for k_, v in model.named_parameters():  # the caller's model is untouched
        assert torch.equal(v, p0[k_]) and v.grad is None and v.requires_grad


def test_at2_does_not_mutate_inputs():
    x, Y, g = _data(6, 3, o=2)
    xt = torch.rand(3, 3, generator=g, dtype=f64)
    copies = [t.clone() for t in (x, Y, xt)]
    for model in (mlp(1), finite_mlp(3, 8, 1, 2, generator=_gen(0), dtype=f64)):
        adversarial_kernel_training(model, x, Y, train_steps=2, lr=0.5, eps=0.05, steps=2, generator=_gen(0),
                                    x_test=xt, y_test=Y[:3])
        for a, b in zip((x, Y, xt), copies):
            assert torch.equal(a, b)


def test_at2_losses_are_recorded_in_float64():
    # Was: robust_loss / clean_loss / test_loss are built with torch.tensor(list_of_python_floats), i.e. float32,
    # although computed in float64: ~1e-7 relative error, enough to hide robust-vs-clean gaps at small eps.
    x, Y, _ = _data(6, 3, o=2)
    tr = adversarial_kernel_training(mlp(1), x, Y, train_steps=2, lr=1.0, eps=0.05, x_test=x[:2], y_test=Y[:2])
    assert tr.robust_loss.dtype == f64 and tr.clean_loss.dtype == f64 and tr.test_loss.dtype == f64
    assert float(tr.robust_loss[0]) == float((Y ** 2).sum() / (2 * Y.numel()))



# ============================================================================ issue 13: divergence, dtypes, cost
@pytest.mark.parametrize("kind", ["infinite", "finite"])
def test_at2_divergence_beyond_the_stability_limit_raises_with_the_limit(kind):
    # Was: adversarial_kernel_training(lr=1e6) let the loss grow to 8.6e200 in 20 steps without a word
    x, Y, g = _data(6, 3, o=2)
    model = mlp(2, sigma_b=0.1) if kind == "infinite" else finite_mlp(3, 16, 1, 2, generator=_gen(1), dtype=f64)
    with pytest.warns(RuntimeWarning, match=r"lr: 1e\+06 exceeds the stability limit 2c/λ_max = [0-9.]+"):
        with pytest.raises(FloatingPointError, match=r"diverged at step \d+ .*stability limit 2c/λ_max = [0-9.]+"):
            adversarial_kernel_training(model, x, Y, train_steps=20, lr=1e6, eps=0.05, steps=2, generator=0)
    # well below the limit: no warning, the loss decreases and the limit is recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr = adversarial_kernel_training(model, x, Y, train_steps=5, lr=0.2, eps=0.05, steps=2, generator=0)
    assert 0.2 < tr.meta["lr_limit"] < math.inf and tr.clean_loss[-1] < tr.clean_loss[0]


def test_at2_eps_zero_just_above_the_limit_diverges_geometrically_and_is_stopped():
    x, Y, _ = _data(6, 3, o=2)
    k = mlp(1)
    edge = 2 * Y.numel() / float(torch.linalg.eigvalsh(k(x, get="ntk")).max())
    with pytest.warns(RuntimeWarning, match="stability limit"):
        with pytest.raises(FloatingPointError, match="stability limit"):
            adversarial_kernel_training(k, x, Y, train_steps=400, lr=1.1 * edge, eps=0.0)


def test_adversarial_ntk_casts_inputs_to_the_models_dtype():
    # Was: adversarial_ntk with float64 or numpy inputs on a float32 model failed inside the attack
    net = finite_mlp(4, 16, 1, 2, generator=_gen(0), dtype=torch.float32).eval()
    x, Y, _ = _data(5, 4, o=2)
    a = adversarial_ntk(net, x.numpy(), Y.numpy(), eps=0.05, steps=2, generator=1)
    b = adversarial_ntk(net, x.float(), Y.float(), eps=0.05, steps=2, generator=1)
    assert a.k_adv_adv.dtype == torch.float32 and a.k_adv_adv.shape == (5, 5, 2, 2)  # mode="full" by default
    for f in ("x_adv", "k_adv_adv", "k_adv_clean", "k_clean_clean"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=0)
    tr = adversarial_ntk(net, x, Y, eps=0.05, steps=2, generator=1, mode="trace")
    assert tr.k_adv_adv.shape == (5, 5)
    inf = adversarial_ntk(mlp(1), x.float().numpy(), Y.numpy(), eps=0.05, steps=2, generator=1)
    assert inf.k_adv_adv.dtype == f64


def test_kernel_regressor_is_callable_on_numpy():
    # Was: KernelRegressor(k, x_np, y_np) accepted numpy, but calling it on a numpy array raised AttributeError
    x, y, g = _data(6, 3)
    xt = torch.rand(4, 3, generator=g, dtype=f64)
    f = KernelRegressor(mlp(1), x.numpy(), y.numpy(), diag_reg=1e-8)
    torch.testing.assert_close(f(xt.numpy()), f(xt), rtol=0, atol=0)
    torch.testing.assert_close(f(xt.float().numpy()), f(xt.float().double()), rtol=0, atol=0)
    p = AdvNTKPredictor(mlp(1), x.numpy(), y.numpy(), init=1.0)
    torch.testing.assert_close(p(xt.numpy()), p(xt), rtol=0, atol=0)
    with pytest.raises(TypeError, match="x: expected real values"):
        f(xt.to(torch.complex128))


def test_results_are_frozen_io_results():
    from dataclasses import FrozenInstanceError

    from ntk_theory.io import Result
    x, Y, _ = _data(5, 3, o=2)
    adv = adversarial_ntk(mlp(1), x, Y, eps=0.05, steps=2, generator=0)
    tr = adversarial_kernel_training(mlp(1), x, Y, train_steps=2, lr=0.5, eps=0.05, steps=2, generator=0)
    for r in (adv, tr):
        assert isinstance(r, Result)
        with pytest.raises(FrozenInstanceError):
            r.x_adv = None
    d = tr.to_dict()
    assert d["step"] == [0.0, 1.0, 2.0] and d["meta"]["train_steps"] == 2 and d["meta"]["steps"] == 2
    assert d["f_test"] is None and d["robust_loss"] == tr.robust_loss.tolist()
    assert adv.to_dict()["k_adv_adv"] == adv.k_adv_adv.tolist()


class _CountingKernel(adv_mod.KernelFn):
    """The kernel of ``base`` that records the (rows of x1) x (rows of x2) pairs each call evaluates."""

    def __init__(self, base):
        super().__init__(base.layers)
        self.pairs = []

    def __call__(self, x1, x2=None, *args, **kwargs):
        self.pairs.append(x1.shape[0] * (x1.shape[0] if x2 is None else x2.shape[0]))
        return super().__call__(x1, x2, *args, **kwargs)


def test_at2_infinite_cost_per_step_grows_linearly_and_fixed_blocks_are_not_recomputed():
    # Was: every step recomputed f(x) and f(x_test) against all past adversarial sets (N·kN + M·kN kernel
    # entries at step k, blocks that do not change), on top of the attack's (steps + 1)·N·kN
    n, m, steps, train_steps = 5, 3, 2, 6
    x, Y, g = _data(n, 3, o=2)
    xt = torch.rand(m, 3, generator=g, dtype=f64)
    k = _CountingKernel(mlp(1))
    tr = adversarial_kernel_training(k, x, Y, train_steps=train_steps, lr=0.5, eps=0.05, steps=steps, x_test=xt,
                                     generator=0)
    ref = adversarial_kernel_training(mlp(1), x, Y, train_steps=train_steps, lr=0.5, eps=0.05, steps=steps,
                                      x_test=xt, generator=0)
    torch.testing.assert_close(tr.f_train, ref.f_train, rtol=0, atol=0)
    # step 0: Θ(X, X) (stability limit, and the block the training outputs need), Θ(x_test, X);
    # step k >= 1: the attack and the residual, (steps + 1) calls of N x kN, then N x N and M x N for the new set
    expect = [n * n, m * n]
    for kk in range(1, train_steps + 1):
        expect += [n * kk * n] * (steps + 1)
        if kk < train_steps:
            expect += [n * n, m * n]
    assert k.pairs == expect

"""empirical.models: architectures (shapes, parameter counts of the papers), initialisation laws, a
hand-written forward, the width limit of ntk_theory.infinite (Monte Carlo), the structured NTK engine
against a float64 Jacobian reference written here, determinism, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from empirical import models
from empirical.models import build
from ntk_theory import infinite
from ntk_theory.empirical import empirical_ntk
from ntk_theory.layers import NTKConv2d, NTKLinear

D = torch.float64


def small(name):
    """Narrow versions of each model (what the Jacobian reference can afford)."""
    return {"mlp": {"widths": (7, 5)}, "lenet300_100": {}, "lenet5": {"channels": (2, 3), "widths": (5, 4)},
            "conv4": {"channels": (2, 3, 2, 3), "widths": (4, 5)}}[name]


def jacobian_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Θ[n, m, o, q] = Σ_p ∂f_o(x1_n)/∂θ_p ∂f_q(x2_m)/∂θ_p from per-example float64 Jacobians (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    def flat(x):
        J = vmap(jacrev(f), in_dims=(None, 0))(params, x)
        return torch.cat([J[k].reshape(x.shape[0], J[k].shape[1], -1) for k in params], dim=2)

    return torch.einsum("nop,mqp->nmoq", flat(x1), flat(x2))


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------
# architectures
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_parameter_counts_of_the_papers(parameterization):
    def count(m):
        return sum(p.numel() for p in m.parameters())

    kw = dict(num_classes=10, parameterization=parameterization)
    # LeNet-300-100: 784*300+300 + 300*100+100 + 100*10+10
    assert count(build("lenet300_100", in_shape=(1, 28, 28), **kw)) == 266_610
    # LeNet-5 (LeCun et al. 1998): 156 + 2,416 + 48,120 + 10,164 + 850
    lenet = build("lenet5", in_shape=(1, 28, 28), **kw)
    assert count(lenet) == 61_706
    assert [m.in_features for m in lenet if isinstance(m, nn.Linear)] == [400, 120, 84]
    # Conv-4 on CIFAR-10 (Frankle & Carbin 2019, Fig. 2: "2.4M" weights)
    c4 = build("conv4", in_shape=(3, 32, 32), **kw)
    assert count(c4) == 2_425_930
    assert [m.out_channels for m in c4 if isinstance(m, nn.Conv2d)] == [64, 64, 128, 128]
    assert [m.in_features for m in c4 if isinstance(m, nn.Linear)] == [8192, 256, 256]
    m = build("mlp", in_shape=(1, 8, 8), **kw)
    assert isinstance(m[0], nn.Flatten) and [l.out_features for l in m if isinstance(l, nn.Linear)] == [512, 512, 10]


@pytest.mark.parametrize("name,shape,features", [
    ("lenet5", (1, 28, 28), 3 * 5 * 5), ("lenet5", (3, 32, 32), 3 * 6 * 6), ("lenet5", (1, 8, 8), 3 * 2 * 2),
    ("conv4", (3, 32, 32), 3 * 8 * 8), ("conv4", (1, 8, 8), 3 * 2 * 2), ("mlp", (1, 8, 8), None), ("mlp", (20,), None),
    ("lenet300_100", (1, 28, 28), None)])
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_forward_shapes(name, shape, features, parameterization):
    model = build(name, in_shape=shape, num_classes=7, parameterization=parameterization, seed=3, **small(name))
    x = torch.rand(5, *shape)
    out = model(x)
    assert out.shape == (5, 7) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    if features is not None:
        assert next(m for m in model if isinstance(m, nn.Linear)).in_features == features
    assert isinstance(model, nn.Sequential)
    kinds = (NTKLinear, NTKConv2d) if parameterization == "ntk" else ()
    for m in model:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert isinstance(m, kinds) if kinds else type(m) in (nn.Linear, nn.Conv2d)
            assert m.bias is not None


def test_ntk_forward_by_hand():
    """LeNet-5 in the NTK parameterisation, on 28x28: 'SAME' first conv, unpadded second, gains σ_w/sqrt(fan_in)."""
    m = build("lenet5", in_shape=(1, 28, 28), num_classes=3, seed=1, dtype=D, sigma_w=1.3, sigma_b=0.2,
              activation="tanh", **small("lenet5"))
    x = torch.rand(4, 1, 28, 28, dtype=D)
    c1, c2, l1, l2, l3 = [m[i] for i in (0, 3, 7, 9, 11)]
    h = torch.tanh(F.conv2d(x, 1.3 / math.sqrt(25) * c1.weight, 0.2 * c1.bias, padding=2))
    h = F.max_pool2d(h, 2)
    h = torch.tanh(F.conv2d(h, 1.3 / math.sqrt(2 * 25) * c2.weight, 0.2 * c2.bias, padding=0))
    h = F.max_pool2d(h, 2).flatten(1)
    assert h.shape[1] == 3 * 5 * 5
    for lin, act in ((l1, torch.tanh), (l2, torch.tanh), (l3, lambda t: t)):
        h = act(F.linear(h, 1.3 / math.sqrt(lin.in_features) * lin.weight, 0.2 * lin.bias))
    assert torch.allclose(m(x), h, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# initialisation laws
# ------------------------------------------------------------------------------------------------
def test_ntk_weights_standard_normal():
    m = build("lenet300_100", in_shape=(1, 28, 28), num_classes=10, seed=2)
    w, b = m[1].weight.detach().double(), m[1].bias.detach().double()
    n = w.numel()
    assert abs(float(w.mean())) < 5 / math.sqrt(n)
    assert abs(float(w.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float(b.var()) - 1) < 5 * math.sqrt(2 / b.numel())
    assert m[1].weight_gain == pytest.approx(math.sqrt(2) / math.sqrt(784)) and m[1].bias_gain == 0.1


def test_standard_init_is_pytorch_default_law():
    """Standard layers follow PyTorch's reset_parameters law: the same bound as torch's own layers, the
    variance of U(-c, c), and a two-sample Kolmogorov-Smirnov distance to torch's own draw that is small."""
    m = build("lenet5", in_shape=(1, 28, 28), num_classes=10, parameterization="standard", seed=2)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        ref = {"conv": nn.Conv2d(6, 16, 5), "lin": nn.Linear(400, 120)}  # PyTorch's own reset_parameters
        for ours, theirs, fan_in in ((m[3], ref["conv"], 6 * 25), (m[7], ref["lin"], 400)):
            bound = 1 / math.sqrt(fan_in)
            for a, b in ((ours.weight, theirs.weight), (ours.bias, theirs.bias)):
                assert float(a.abs().max()) <= bound and float(b.abs().max()) <= bound * (1 + 1e-6)
            w, t = ours.weight.double().flatten(), theirs.weight.double().flatten()
            n = w.numel()
            # U(-c, c) has variance c^2/3 and the variance of the sample variance is (4/45) c^4 / n
            assert abs(float(w.var()) - bound ** 2 / 3) < 5 * math.sqrt(4 / 45 / n) * bound ** 2
            grid = torch.linspace(-bound, bound, 201, dtype=D)
            ks = float(((w[:, None] <= grid).double().mean(0) - (t[:, None] <= grid).double().mean(0)).abs().max())
            assert ks < 1.95 * math.sqrt(2 / n)  # the 0.1 % critical value of the two-sample KS statistic


# ------------------------------------------------------------------------------------------------
# width limit: the NTK-parameterised MLP converges to ntk_theory.infinite
# ------------------------------------------------------------------------------------------------
def test_ntk_mlp_converges_to_infinite_width():
    """Mean over S seeds of the empirical NTK (trace over outputs) of ``mlp(widths=(n, n))`` on digits-shaped
    inputs vs ``infinite.mlp(2, 'relu', sqrt 2, 0.1)``: within 5 standard errors of the seed mean plus a
    10/n relative allowance for the O(1/n) finite-width bias (Hanin & Nica 2019); the cross-output blocks
    average to zero (the limit is Θ ⊗ I). And the test can fail: σ_b = 0.3 or one more layer is rejected."""
    n, S, outs = 1024, 10, 10
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 8, 8, generator=g, dtype=D)
    closed = infinite.mlp(2, "relu", 2 ** 0.5, 0.1)(x.reshape(5, -1), get="ntk")
    full = torch.stack([empirical_ntk(build("mlp", in_shape=(1, 8, 8), num_classes=outs, widths=(n, n), seed=s,
                                            dtype=D), x, mode="full") for s in range(S)])
    diag = torch.diagonal(full, dim1=3, dim2=4).mean(-1)  # (S, N, N): the trace mode's estimate
    mean, se = diag.mean(0), diag.std(0) / math.sqrt(S)
    tol = 5 * se + 10 / n * closed.abs()
    assert bool(((mean - closed).abs() <= tol).all()), float(((mean - closed).abs() / se).max())
    off = full[..., 0, 1]
    assert bool((off.mean(0).abs() <= 5 * off.std(0) / math.sqrt(S) + 1e-12).all())
    for wrong in (infinite.mlp(2, "relu", 2 ** 0.5, 0.3), infinite.mlp(3, "relu", 2 ** 0.5, 0.1)):
        assert bool(((mean - wrong(x.reshape(5, -1), get="ntk")).abs() > tol).any())


# ------------------------------------------------------------------------------------------------
# the structured NTK engine traces every model exactly
# ------------------------------------------------------------------------------------------------
CASES = [("mlp", (1, 8, 8), "relu"), ("mlp", (6,), "tanh"), ("lenet300_100", (1, 28, 28), "relu"),
         ("lenet5", (1, 28, 28), "relu"), ("lenet5", (1, 8, 8), "leaky_relu"), ("conv4", (3, 32, 32), "relu"),
         ("conv4", (1, 8, 8), "erf")]


@pytest.mark.parametrize("name,shape,act", CASES)
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_structured_ntk_equals_jacobian_reference(name, shape, act, parameterization):
    model = build(name, in_shape=shape, num_classes=3, parameterization=parameterization, seed=4, dtype=D,
                  activation=act, **small(name))
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.rand(4, *shape, generator=g, dtype=D), torch.rand(3, *shape, generator=g, dtype=D)
    ref = jacobian_ntk(model, x1, x2)
    K, info = empirical_ntk(model, x1, x2, mode="full", return_info=True)
    assert (info.method, info.tracer, info.declined) == ("structured", "sequential", None)
    assert K.shape == (4, 3, 3, 3) and K.dtype == D
    assert rel_err(K, ref) < 1e-8
    Ks = empirical_ntk(model, x1, mode="trace")
    assert rel_err(Ks, torch.diagonal(jacobian_ntk(model, x1, x1), dim1=2, dim2=3).mean(-1)) < 1e-8
    if name in ("lenet5", "conv4") and act == "relu":  # conv -> ReLU -> MaxPool2d carried in its pool form
        assert any(layer.form.startswith("pool") for layer in info.layers)


@pytest.mark.parametrize("name,shape", [("lenet5", (1, 28, 28)), ("conv4", (1, 8, 8)), ("mlp", (1, 8, 8))])
def test_masked_models_stay_on_the_structured_engine(name, shape):
    """A model masked with ntk_theory.masks.apply_mask (what ticket search and training do) is still traced by
    the sequential engine, and its sub-network kernel equals the Jacobian method's; pruned weights are zero."""
    from ntk_theory.masks import apply_mask, random_mask

    model = build(name, in_shape=shape, num_classes=3, seed=2, dtype=D, **small(name))
    mask = random_mask(model, 0.5, generator=3)
    apply_mask(model, mask, rescale=True)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(5), dtype=D)
    K, info = empirical_ntk(model, x, mode="full", return_info=True)
    assert (info.method, info.tracer) == ("structured", "sequential")
    assert rel_err(K, empirical_ntk(model, x, mode="full", method="jacobian")) < 1e-8
    for key, keep in mask.items():
        idx, _, attr = key.rpartition(".")
        assert bool((getattr(model.get_submodule(idx), attr)[~keep] == 0).all())


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("name", models.names())
def test_seeded_and_global_rng_untouched(name, parameterization):
    shape = (3, 8, 8)
    kw = dict(in_shape=shape, num_classes=4, parameterization=parameterization, **small(name))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build(name, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    torch.manual_seed(999)
    b = build(name, seed=7, **kw)
    c = build(name, seed=8, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    d = build(name, seed=7, dtype=D, **kw)
    assert all(d.state_dict()[k].dtype == D for k in sa)


def test_same_parameter_names_in_both_parameterisations():
    for name in models.names():
        kw = dict(in_shape=(1, 8, 8), num_classes=10, **small(name))
        a = dict(build(name, parameterization="ntk", **kw).named_parameters())
        b = dict(build(name, parameterization="standard", **kw).named_parameters())
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_functions_equal_build():
    for name in models.names():
        f = getattr(models, name)
        kw = dict(in_shape=(1, 8, 8), num_classes=10, seed=5, **small(name))
        sa, sb = f(**kw).state_dict(), build(name, **kw).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
BAD = [
    (dict(name="resnet18"), ValueError, "name.*'mlp'.*'conv4'"),
    (dict(parameterization="mup"), ValueError, "parameterization.*'ntk'.*'standard'"),
    (dict(activation="swish"), ValueError, "activation.*'relu'"),
    (dict(in_shape="1x8x8"), TypeError, "in_shape"),
    (dict(in_shape=(1, 0, 8)), ValueError, "in_shape"),
    (dict(num_classes=0), ValueError, "num_classes"),
    (dict(num_classes=2.5), TypeError, "num_classes"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(dtype=torch.int64), ValueError, "dtype"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(widths=(8, 0)), ValueError, "widths"),
    (dict(widths=8), TypeError, "widths"),
    (dict(sigma_w=-1.0), ValueError, "sigma_w"),
    (dict(parameterization="standard", sigma_b=0.1), ValueError, "sigma_b.*ntk"),
    (dict(channels=(4,)), TypeError, "channels.*not accepted by model 'mlp'"),
    (dict(name="lenet5", in_shape=(64,)), ValueError, r"in_shape.*\(C, H, W\)"),
    (dict(name="conv4", in_shape=(1, 3, 3)), ValueError, "at least 4x4"),
    (dict(name="lenet5", conv2_padding="valid"), ValueError, "conv2_padding.*6x6"),
    (dict(name="lenet5", conv2_padding="full"), ValueError, "conv2_padding"),
    (dict(name="conv4", channels=(1, 2)), ValueError, "channels.*4 entries"),
]


@pytest.mark.parametrize("kw,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(kw, exc, match):
    args = dict(name="mlp", in_shape=(1, 8, 8), num_classes=10)
    args.update(kw)
    name = args.pop("name")
    with pytest.raises(exc, match=match):
        build(name, **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_refused_without_cuda():
    with pytest.raises(ValueError, match="device.*CUDA is not available"):
        build("mlp", in_shape=(4,), num_classes=2, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_same_weights_as_cpu():
    kw = dict(in_shape=(1, 8, 8), num_classes=10, seed=3, **small("lenet5"))
    a, b = build("lenet5", **kw), build("lenet5", device="cuda", **kw)
    assert all(v.device.type == "cuda" for v in b.state_dict().values())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k].cpu()) for k in a.state_dict())

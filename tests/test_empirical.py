"""Tests of ntk_theory.empirical: every method against the float64 Jacobian reference (and that
against a plain autograd loop), mask semantics, blocking, validation, Monte-Carlo agreement with
ntk_theory.infinite, CUDA."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ntk_theory.empirical import Budgets, empirical_ntk
from ntk_theory.layers import ErfActivation, NTKConv2d, NTKLinear, finite_mlp
from ntk_theory.masks import apply_mask, random_mask, raw_name

from ntk_helpers import TOL, assert_rel
from ntk_helpers import gen as _gen

D = torch.float64


def engine_taken(model, x, **kw) -> bool:
    """Whether the structured path traces ``model`` on ``x`` with the sequential engine (the supported
    way to ask: ``return_info=True``)."""
    _, info = empirical_ntk(model, x, method="structured", return_info=True, **kw)
    return info.tracer == "sequential"


def lenet(bias: bool = True, pool: str = "max", c1: int = 3, c2: int = 4, out: int = 3, seed: int = 0) -> nn.Module:
    """LeNet-style CNN on (1, 12, 12): conv, act, pool, conv, act, pool, flatten, linear, act, linear."""
    torch.manual_seed(seed)
    Pool = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, bias=bias), nn.Tanh(), Pool(2),  # 10 -> 5
        NTKConv2d(c1, c2, 3, sigma_b=0.2 if bias else 0.0, bias=bias), nn.ReLU(), Pool(2),  # 5 -> 2
        nn.Flatten(), nn.Linear(c2 * 2 * 2, 6, bias=bias), nn.ReLU(),
        NTKLinear(6, out, sigma_b=0.3 if bias else 0.0, bias=bias)).to(D)


def mlp(bias: bool = True, out: int = 3, seed: int = 0) -> nn.Module:
    return finite_mlp(4, 7, 2, out, activation="erf", sigma_b=0.3 if bias else 0.0, generator=_gen(seed))


def naive_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, masks: dict | None = None,
              ntt: bool = False) -> torch.Tensor:
    """Θ[n1, n2, o1, o2] from per-(example, output) autograd gradients: no torch.func at all.

    Subnetwork: gradient of θ -> f(m ⊙ θ) w.r.t. θ. NTT: gradient w.r.t. w of f(w) at w = m ⊙ θ.
    """
    masks = masks or {}
    model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    thetas = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}

    def rows(x):
        out = []
        for n in range(x.shape[0]):
            tensors = {}
            for k, t in thetas.items():
                m = masks.get(k)
                if m is None:
                    tensors[k] = t
                elif ntt:
                    tensors[k] = (t * m).detach().requires_grad_(True)
                else:
                    tensors[k] = t * m
            leaves = [tensors[k] if ntt and k in masks else thetas[k] for k in names]
            f = torch.func.functional_call(model, tensors, (x[n:n + 1],)).reshape(-1)
            per_o = []
            for o in range(f.shape[0]):
                g = torch.autograd.grad(f[o], leaves, retain_graph=True, allow_unused=True)
                per_o.append(torch.cat([(torch.zeros_like(l) if gi is None else gi).reshape(-1)
                                        for gi, l in zip(g, leaves)]))
            out.append(torch.stack(per_o))
        return torch.stack(out)  # (N, O, P)

    J1, J2 = rows(x1), rows(x2)
    return torch.einsum("aop,bqp->aboq", J1, J2)


# ------------------------------------------------------------------------------------------
# The reference itself
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "lenet"])
@pytest.mark.parametrize("mask_mode", [None, "subnetwork", "ntt"])
def test_jacobian_reference_matches_plain_autograd(kind, mask_mode):
    model = mlp() if kind == "mlp" else lenet()
    g = _gen(3)
    x1 = torch.randn(3, *((4,) if kind == "mlp" else (1, 12, 12)), generator=g, dtype=D)
    x2 = torch.randn(2, *x1.shape[1:], generator=g, dtype=D)
    masks = None if mask_mode is None else random_mask(model, 0.4, generator=1, skip_first=False, include_bias=True)
    ref = naive_ntk(model, x1, x2, masks, ntt=mask_mode == "ntt")
    out = empirical_ntk(model, x1, x2, mask=masks, mask_mode=mask_mode or "subnetwork", method="jacobian")
    assert_rel(out, ref)


# ------------------------------------------------------------------------------------------
# Every method against the reference, on fixed architectures
# ------------------------------------------------------------------------------------------
ARCHS = {
    "mlp": lambda: (mlp(True), (4,)),
    "mlp_nobias": lambda: (mlp(False), (4,)),
    "mlp_1out": lambda: (mlp(True, out=1), (4,)),
    "lenet_max": lambda: (lenet(True, "max"), (1, 12, 12)),
    "lenet_avg_nobias": lambda: (lenet(False, "avg"), (1, 12, 12)),
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("masked", [None, "subnetwork", "ntt"])
def test_methods_match_reference(arch, masked):
    model, shape = ARCHS[arch]()
    g = _gen(11)
    x1 = torch.randn(5, *shape, generator=g, dtype=D)
    x2 = torch.randn(3, *shape, generator=g, dtype=D)
    kw = {}
    if masked:
        kw = dict(mask=random_mask(model, 0.5, generator=2, include_bias=True), mask_mode=masked)
    for mode in ("full", "trace", "diagonal"):
        for xb in ((None,) if mode == "diagonal" else (x2, None)):
            ref = empirical_ntk(model, x1, xb, mode=mode, method="jacobian", **kw)
            for method, bs in (("structured", None), ("structured", 2), ("jvp", None), ("auto", 3)):
                out = empirical_ntk(model, x1, xb, mode=mode, method=method, block_size=bs, **kw)
                assert_rel(out, ref)


def test_shapes():
    model, _ = ARCHS["mlp"]()
    x1, x2 = torch.randn(5, 4, dtype=D), torch.randn(3, 4, dtype=D)
    assert empirical_ntk(model, x1, x2).shape == (5, 3, 3, 3)
    assert empirical_ntk(model, x1, x2, mode="trace").shape == (5, 3)
    assert empirical_ntk(model, x1, mode="diagonal").shape == (5, 3, 3)
    one = mlp(out=1)
    assert empirical_ntk(one, x1, x2).shape == (5, 3)
    assert empirical_ntk(one, x1, mode="diagonal").shape == (5,)
    full = empirical_ntk(model, x1)
    # trace and diagonal are the parts of the full kernel they claim to be
    assert_rel(empirical_ntk(model, x1, mode="trace"), torch.diagonal(full, dim1=2, dim2=3).mean(-1))
    assert_rel(empirical_ntk(model, x1, mode="diagonal"), torch.stack([full[i, i] for i in range(5)]))
    # symmetry Θ(x, x')[o, o'] = Θ(x', x)[o', o] and positive semi-definiteness
    assert_rel(full, full.permute(1, 0, 3, 2))
    mat = full.permute(0, 2, 1, 3).reshape(15, 15)
    assert float(torch.linalg.eigvalsh(mat).min()) > -1e-10 * float(mat.abs().max())


def test_symmetric_tiling_and_internal_chunking():
    """Large symmetric batches are tiled (2x2, 3x3); tiny memory budgets force every chunked path."""
    for out, sizes in ((8, (70,)), (1, (600, 1100))):  # output-group tiles; N-tiles 2x2 and 3x3
        model = finite_mlp(3, 5, 1, out, sigma_b=0.2, generator=_gen(4))
        m = random_mask(model, 0.5, generator=4, include_bias=True)
        for n in sizes:
            x = torch.randn(n, 3, dtype=D, generator=_gen(n))
            for kw in ({}, {"mask": m}):
                assert_rel(empirical_ntk(model, x, method="structured", **kw),
                           empirical_ntk(model, x, method="jacobian", **kw))
    cnn = lenet()
    xc = torch.randn(5, 1, 12, 12, dtype=D, generator=_gen(9))
    xc2 = torch.randn(4, 1, 12, 12, dtype=D, generator=_gen(10))
    mc = random_mask(cnn, 0.5, generator=1, include_bias=True)
    refs = {(mode, i): empirical_ntk(cnn, xc, None if mode == "diagonal" else xc2, mode=mode, method="jacobian", **kw)
            for mode in ("full", "trace", "diagonal") for i, kw in enumerate(({}, {"mask": mc}))}
    tiny = Budgets(temp_elems=64, jac_elems=8 * 2000)
    for (mode, i), ref in refs.items():
        kw = ({}, {"mask": mc})[i]
        xb = None if mode == "diagonal" else xc2
        assert_rel(empirical_ntk(cnn, xc, xb, mode=mode, method="structured", budgets=tiny, **kw), ref)
    K, info = empirical_ntk(cnn, xc, xc2, method="jacobian", budgets=tiny, return_info=True)
    assert_rel(K, refs[("full", 0)])
    assert info.method == "jacobian"
    tiny = Budgets(jvp_elems=500)
    assert_rel(empirical_ntk(cnn, xc, xc2, method="jvp", mask=mc, budgets=tiny), refs[("full", 1)])
    assert_rel(empirical_ntk(cnn, xc, mode="diagonal", method="jvp", budgets=tiny), refs[("diagonal", 0)])


def test_conv_parameter_subsets_and_signal_chunks():
    """Convolutions with only the bias, only the weight, or a masked bias differentiated (the bias
    is folded into the patches as a row of ones), and the example chunks of the stacked signals."""
    cnn = lenet()
    named = dict(cnn.named_parameters())
    x1 = torch.randn(5, 1, 12, 12, dtype=D, generator=_gen(11))
    x2 = torch.randn(3, 1, 12, 12, dtype=D, generator=_gen(12))
    m = random_mask(cnn, 0.5, generator=2, include_bias=True)
    subsets = [{"0.bias": named["0.bias"]}, {"3.weight": named["3.weight"]},
               {"0.bias": named["0.bias"], "3.weight": named["3.weight"], "7.bias": named["7.bias"]}]
    cases = [({"params": p}, xb) for p in subsets for xb in (None, x2)] + [({"mask": m}, None), ({}, x2)]
    refs = []
    for kw, xb in cases:
        refs.append({mode: empirical_ntk(cnn, x1, xb, mode=mode, method="jacobian", **kw)
                     for mode in ("full", "trace", "diagonal") if not (mode == "diagonal" and xb is not None)})
    for budgets in (None, Budgets(sig_elems=1)):  # one example per chunk
        for (kw, xb), ref in zip(cases, refs):
            for mode, r in ref.items():
                assert_rel(empirical_ntk(cnn, x1, xb, mode=mode, method="structured", budgets=budgets, **kw), r)

def test_weight_reuse_and_sequence_inputs():
    """A Linear applied twice, and a Linear on (N, T, K) inputs: the several-position path."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4 * 5, 2)

        def forward(self, x):  # x: (N, 5, 3)
            return self.b(torch.relu(self.a(x)).flatten(1))

    torch.manual_seed(0)
    for model, shape in ((Twice().to(D), (3,)), (Seq().to(D), (5, 3))):
        x1, x2 = torch.randn(4, *shape, dtype=D), torch.randn(3, *shape, dtype=D)
        m = random_mask(model, 0.5, generator=0, skip_first=False)
        for kw in ({}, {"mask": m}):
            for mode in ("full", "trace"):
                ref = empirical_ntk(model, x1, x2, mode=mode, method="jacobian", **kw)
                assert_rel(empirical_ntk(model, x1, x2, mode=mode, method="structured", **kw), ref)
            ref = empirical_ntk(model, x1, mode="diagonal", method="jacobian", **kw)
            assert_rel(empirical_ntk(model, x1, mode="diagonal", method="structured", block_size=3, **kw), ref)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_conv_geometry_variants():
    """Stride, dilation, asymmetric 'same' padding, kernel 1 and 2."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(3, 3, 2, padding="same", dilation=1), nn.Tanh(),
        nn.Conv2d(3, 2, 3, padding="same", dilation=2), nn.Softplus(),
        nn.Conv2d(2, 2, 1), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 2)).to(D)
    x1, x2 = torch.randn(3, 2, 9, 9, dtype=D), torch.randn(2, 2, 9, 9, dtype=D)
    m = random_mask(model, 0.5, generator=5, include_bias=True)
    for kw in ({}, {"mask": m}, {"mask": m, "mask_mode": "ntt"}):
        ref = empirical_ntk(model, x1, x2, method="jacobian", **kw)
        assert_rel(empirical_ntk(model, x1, x2, method="structured", **kw), ref)


# ------------------------------------------------------------------------------------------
# Hypothesis: random small architectures, masks, modes, blocks
# ------------------------------------------------------------------------------------------
_ACTS = [nn.ReLU, nn.Tanh, ErfActivation, nn.Identity, nn.Softplus, nn.GELU, nn.LeakyReLU, nn.Sigmoid]


@st.composite
def architectures(draw):
    seed = draw(st.integers(0, 2 ** 16))
    torch.manual_seed(seed)
    bias = draw(st.booleans())
    ntk = draw(st.booleans())
    out = draw(st.integers(1, 3))
    act = draw(st.sampled_from(_ACTS))
    lin = (lambda i, o: NTKLinear(i, o, sigma_b=0.4 if bias else 0.0, bias=bias)) if ntk else \
        (lambda i, o: nn.Linear(i, o, bias=bias))
    if draw(st.booleans()):  # MLP
        d = draw(st.integers(1, 4))
        layers, w = [], d
        for _ in range(draw(st.integers(0, 2))):
            h = draw(st.integers(1, 5))
            layers += [lin(w, h), act()]
            w = h
        layers.append(lin(w, out))
        return nn.Sequential(*layers).to(D), (d,)
    cin = draw(st.integers(1, 2))
    size = draw(st.integers(5, 7))
    layers, c, s = [], cin, size
    for _ in range(draw(st.integers(1, 2))):
        k = draw(st.sampled_from([1, 2, 3]))
        stride = draw(st.sampled_from([1, 2]))
        pad = draw(st.sampled_from([0, 1])) if stride == 2 or k == 2 else draw(st.sampled_from([0, 1, "same"]))
        co = draw(st.integers(1, 3))
        if ntk and k % 2 == 1 and stride == 1 and pad in (k // 2, "same"):
            layers.append(NTKConv2d(c, co, k, sigma_b=0.4 if bias else 0.0, bias=bias))
            pad = k // 2
        else:
            layers.append(nn.Conv2d(c, co, k, stride=stride, padding=pad, bias=bias))
        s = s if pad == "same" else (s + 2 * pad - k) // stride + 1
        layers.append(act())
        c = co
        if s >= 2 and draw(st.booleans()):
            layers.append(draw(st.sampled_from([nn.MaxPool2d, nn.AvgPool2d]))(2))
            s //= 2
    layers += [nn.Flatten(), lin(c * s * s, out)]
    return nn.Sequential(*layers).to(D), (cin, size, size)


@given(arch=architectures(), n1=st.integers(1, 4), n2=st.integers(0, 3), data=st.data())
def test_hypothesis_structured_and_jvp_match_reference(arch, n1, n2, data):
    model, shape = arch
    seed = data.draw(st.integers(0, 2 ** 16))
    g = _gen(seed)
    x1 = torch.randn(n1, *shape, generator=g, dtype=D)
    mode = data.draw(st.sampled_from(["full", "trace", "diagonal"]))
    x2 = None if (n2 == 0 or mode == "diagonal") else torch.randn(n2, *shape, generator=g, dtype=D)
    kw = {}
    if data.draw(st.booleans()):
        dens = data.draw(st.sampled_from([0.3, 0.6, 1.0]))
        try:
            m = random_mask(model, dens, generator=seed, skip_first=data.draw(st.booleans()),
                            include_bias=data.draw(st.booleans()), layerwise=data.draw(st.booleans()))
        except ValueError:  # nothing maskable beyond the first layer
            m = None
        if m is not None and any(bool(v.any()) for v in m.values()):
            kw = dict(mask=m, mask_mode=data.draw(st.sampled_from(["subnetwork", "ntt"])))
    bs = data.draw(st.sampled_from([None, 1, 2]))
    ref = empirical_ntk(model, x1, x2, mode=mode, method="jacobian", **kw)
    for method in ("structured", "jvp"):
        assert_rel(empirical_ntk(model, x1, x2, mode=mode, method=method, block_size=bs, **kw), ref)
    if data.draw(st.booleans()):  # the autograd trace where the sequential engine would apply
        assert_rel(empirical_ntk(model, x1, x2, mode=mode, method="structured", block_size=bs, tracer="autograd",
                                 **kw), ref)


# ------------------------------------------------------------------------------------------
# Mask semantics
# ------------------------------------------------------------------------------------------
def test_subnetwork_and_ntt_differ_and_ntt_is_dense_kernel_at_masked_weights():
    model = mlp()
    x = torch.randn(4, 4, dtype=D, generator=_gen(0))
    m = random_mask(model, 0.3, generator=0)
    sub = empirical_ntk(model, x, mask=m)
    ntt = empirical_ntk(model, x, mask=m, mask_mode="ntt")
    assert float((sub - ntt).abs().max()) > 1e-2 * float(ntt.abs().max())
    # NTT = the dense-architecture NTK at the masked weights
    named = dict(model.named_parameters())
    masked_params = {k: (named[k] * m[k] if k in m else named[k]).detach() for k in named}
    for method in ("structured", "jacobian"):
        assert_rel(empirical_ntk(model, x, params=masked_params, method=method), ntt)
    # ntt - sub = the pruned coordinates' contribution >= 0 (PSD) on the diagonal
    diff = (ntt - sub).permute(0, 2, 1, 3).reshape(12, 12)
    assert float(torch.linalg.eigvalsh(diff).min()) > -1e-10 * float(diff.abs().max())
    # an all-True mask is the dense kernel in both modes
    ones = {k: torch.ones_like(v) for k, v in m.items()}
    dense = empirical_ntk(model, x)
    assert_rel(empirical_ntk(model, x, mask=ones), dense)
    assert_rel(empirical_ntk(model, x, mask=ones, mask_mode="ntt"), dense)


def test_pruned_hidden_units_give_the_narrower_network():
    """Masking whole rows of W1 (and the matching columns of W2) = NTK of the network without those units."""
    torch.manual_seed(0)
    big = nn.Sequential(NTKLinear(3, 6, sigma_b=0.5), nn.Tanh(), NTKLinear(6, 2, sigma_b=0.5)).to(D)
    keep = torch.tensor([True, False, True, True, False, True])
    small = nn.Sequential(NTKLinear(3, 4, sigma_b=0.5), nn.Tanh(), NTKLinear(4, 2, sigma_b=0.5)).to(D)
    small[2].weight_gain = big[2].weight_gain  # same fan-in normalisation as the big net
    with torch.no_grad():
        small[0].weight.copy_(big[0].weight[keep])
        small[0].bias.copy_(big[0].bias[keep])
        small[2].weight.copy_(big[2].weight[:, keep])
        small[2].bias.copy_(big[2].bias)
    m = {"0.weight": keep[:, None].expand(6, 3).clone(), "0.bias": keep.clone(),
         "2.weight": keep[None, :].expand(2, 6).clone()}
    x = torch.randn(5, 3, dtype=D)
    ref = empirical_ntk(small, x, method="jacobian")
    for method in ("structured", "jacobian", "jvp"):
        assert_rel(empirical_ntk(big, x, mask=m, method=method), ref)


@pytest.mark.parametrize("rescale", [False, True])
def test_apply_mask_model_gives_subnetwork_kernel(rescale):
    model = lenet()
    x1 = torch.randn(4, 1, 12, 12, dtype=D, generator=_gen(1))
    x2 = torch.randn(3, 1, 12, 12, dtype=D, generator=_gen(2))
    m = random_mask(model, 0.4, generator=7, include_bias=True)
    masked = apply_mask(copy.deepcopy(model), m, rescale=rescale)
    for mm in ("subnetwork", "ntt"):
        for mode in ("full", "trace"):
            ref = empirical_ntk(masked, x1, x2, mode=mode, mask_mode=mm, method="jacobian")
            if not rescale:  # the applied mask and an explicit mask on the unmasked model agree
                assert_rel(ref, empirical_ntk(model, x1, x2, mask=m, mask_mode=mm, mode=mode, method="jacobian"))
            for method in ("structured", "jvp"):
                assert_rel(empirical_ntk(masked, x1, x2, mode=mode, mask_mode=mm, method=method), ref)
    if rescale:  # rescaling by 1/sqrt(q) changes the kernel
        dense_mask = empirical_ntk(model, x1, x2, mask=m)
        assert float((empirical_ntk(masked, x1, x2) - dense_mask).abs().max()) > 0.1 * float(dense_mask.abs().max())


def test_apply_mask_rescale_ntk_linear_exact():
    """NTK layers only: rescaled applied mask == gains / sqrt(q) with mask=, in both mask modes."""
    model = finite_mlp(3, 8, 2, 2, sigma_b=0.2, generator=_gen(0))
    m = random_mask(model, 0.25, generator=1, include_bias=True)
    masked = apply_mask(copy.deepcopy(model), m, rescale=True)
    twin = copy.deepcopy(model)
    for name, mm in m.items():
        prefix, _, tensor = name.rpartition(".")
        mod = twin.get_submodule(prefix)
        attr = "weight_gain" if tensor == "weight" else "bias_gain"
        setattr(mod, attr, getattr(mod, attr) / math.sqrt((int(mm.sum()) / mm.numel())))
    x = torch.randn(4, 3, dtype=D, generator=_gen(3))
    for mm_ in ("subnetwork", "ntt"):
        ref = empirical_ntk(twin, x, mask=m, mask_mode=mm_, method="jacobian")
        for method in ("structured", "jacobian", "jvp"):
            assert_rel(empirical_ntk(masked, x, mask_mode=mm_, method=method), ref)


def test_explicit_mask_on_masked_model_is_combined_and_names_accepted():
    model = mlp()
    m1 = random_mask(model, 0.5, generator=1)
    m2 = random_mask(model, 0.5, generator=2)
    masked = apply_mask(copy.deepcopy(model), m1)
    x = torch.randn(3, 4, dtype=D)
    both = {k: m1[k] & m2[k] for k in m1}
    ref = empirical_ntk(model, x, mask=both, method="jacobian")
    assert_rel(empirical_ntk(masked, x, mask=m2), ref)
    raw = {raw_name(k): v for k, v in m2.items()}
    assert_rel(empirical_ntk(masked, x, mask=raw, method="jvp"), ref)
    # params by canonical or raw name
    p_canon = {k: v.detach() for k, v in model.named_parameters() if k in m1}
    p_raw = {raw_name(k): v for k, v in p_canon.items()}
    a = empirical_ntk(masked, x, params=p_canon)
    assert_rel(empirical_ntk(masked, x, params=p_raw, method="jacobian"), a)
    # the one parameter-dict validation (ntk_theory.masks.validate_params): a name given twice is
    # refused, numpy values are converted at the edge
    with pytest.raises(ValueError, match="params.*twice"):
        empirical_ntk(masked, x, params={**p_canon, **p_raw})
    assert_rel(empirical_ntk(masked, x, params={k: v.numpy() for k, v in p_canon.items()}), a)


def test_params_subset_and_frozen_parameters():
    model = mlp()
    x = torch.randn(4, 4, dtype=D)
    named = dict(model.named_parameters())
    # kernel of a subset = sum of the per-parameter kernels
    parts = [empirical_ntk(model, x, params={k: v}, method="structured") for k, v in named.items()]
    assert_rel(sum(parts), empirical_ntk(model, x))
    sub = {"2.weight": named["2.weight"], "4.bias": named["4.bias"]}
    assert_rel(empirical_ntk(model, x, params=sub), empirical_ntk(model, x, params=sub, method="jacobian"))
    frozen = copy.deepcopy(model)
    frozen[0].weight.requires_grad_(False)
    expect = empirical_ntk(model, x, params={k: v for k, v in named.items() if k != "0.weight"}, method="jacobian")
    assert_rel(empirical_ntk(frozen, x), expect)
    # params at other values: the kernel is evaluated there
    other = {k: torch.randn_like(v) for k, v in named.items()}
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for k, v in twin.named_parameters():
            v.copy_(other[k])
    assert_rel(empirical_ntk(model, x, params=other), empirical_ntk(twin, x, method="jacobian"))


def test_model_is_not_mutated():
    model = lenet()
    model.eval()
    m = random_mask(model, 0.5, generator=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: v.requires_grad for k, v in model.named_parameters()}
    x = torch.randn(3, 1, 12, 12, dtype=D)
    for method in ("structured", "jacobian", "jvp"):
        for mm in ("subnetwork", "ntt"):
            empirical_ntk(model, x, mask=m, mask_mode=mm, method=method, dtype=torch.float32)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert {k: v.requires_grad for k, v in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())


def test_dtype_and_numpy_inputs():
    model32 = mlp().to(torch.float32)
    x = np.random.default_rng(0).normal(size=(3, 4))
    k32 = empirical_ntk(model32, x)
    assert k32.dtype == torch.float32
    k64 = empirical_ntk(model32, x, dtype=torch.float64)
    assert k64.dtype == torch.float64
    assert_rel(k64, empirical_ntk(model32.to(D), torch.as_tensor(x), method="jacobian"))
    assert float((k32.double() - k64).abs().max()) < 1e-4 * float(k64.abs().max())


def test_auto_falls_back_for_unsupported_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).to(D)
    x = torch.randn(4, 3, dtype=D)
    ref = empirical_ntk(model, x, method="jacobian")
    assert_rel(empirical_ntk(model, x), ref)  # auto: LayerNorm's affine parameters are not supported
    assert_rel(empirical_ntk(model, x, method="jvp"), ref)
    with pytest.raises(ValueError, match="method"):
        empirical_ntk(model, x, method="structured")
    # frozen LayerNorm: only supported layers are differentiated -> structured applies
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    assert_rel(empirical_ntk(model, x, method="structured"), empirical_ntk(model, x, method="jacobian"))

    class Direct(nn.Module):  # calls F.linear with a Linear's weight: hooks never fire
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return nn.functional.linear(x, self.lin.weight, self.lin.bias)

    direct = Direct().to(D)
    assert_rel(empirical_ntk(direct, x), empirical_ntk(direct, x, method="jacobian"))
    with pytest.raises(ValueError, match="method"):
        empirical_ntk(direct, x, method="structured")


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors_naming_the_argument():
    model = mlp()
    x = torch.randn(3, 4, dtype=D)
    good = random_mask(model, 0.5, generator=0)
    cases = [
        (dict(mask={"nope.weight": torch.ones(2, dtype=torch.bool)}), "mask"),
        (dict(mask={"2.weight": torch.ones(3, 3, dtype=torch.bool)}), "mask"),
        (dict(mask={"2.weight": good["2.weight"].float()}), "mask"),
        (dict(mask={}), "mask"),
        (dict(mask={k: torch.zeros_like(v) for k, v in good.items()}), "mask"),
        (dict(mode="diag"), "mode"),
        (dict(method="fast"), "method"),
        (dict(mask_mode="dense"), "mask_mode"),
        (dict(x2=torch.randn(2, 5, dtype=D)), "x2"),
        (dict(x2=torch.randn(2, 4, dtype=D), mode="diagonal"), "x2"),
        (dict(params={"missing": torch.zeros(1)}), "params"),
        (dict(params={"0.weight": torch.zeros(2, 2)}), "params"),
        (dict(params={"0.weight": torch.full((7, 4), float("nan"), dtype=D)}), "params"),
        (dict(params={"0.weight": torch.zeros(7, 4, dtype=torch.int64)}), "params"),
        (dict(dtype=torch.int64), "dtype"),
        (dict(block_size=0), "block_size"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            empirical_ntk(model, x, **kw)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x1"):
        empirical_ntk(model, bad)
    with pytest.raises(ValueError, match="x2"):
        empirical_ntk(model, x, torch.full((2, 4), float("inf"), dtype=D))
    with pytest.raises(ValueError, match="x1"):
        empirical_ntk(model, torch.zeros(0, 4, dtype=D))
    with pytest.raises(TypeError, match="model"):
        empirical_ntk(lambda t: t, x)


# Was (issue 13): complex inputs were cast to the real dtype with only torch's warning, and the
# kernel of the real part came back; the closed form raises TypeError. Refused, naming the argument.
@pytest.mark.parametrize("method", ["auto", "structured", "jacobian", "jvp"])
def test_regression_complex_inputs_refused(method):
    model = mlp()
    x = torch.randn(3, 4, dtype=D, generator=_gen(0))
    xc = torch.complex(x, torch.ones_like(x))
    with pytest.raises(TypeError, match="x1.*complex"):
        empirical_ntk(model, xc, method=method)
    with pytest.raises(TypeError, match="x1.*complex"):
        empirical_ntk(model, xc.numpy(), method=method)
    with pytest.raises(TypeError, match="x2.*complex"):
        empirical_ntk(model, x, xc[:2], method=method)
    with pytest.raises(TypeError, match="x1.*complex"):  # even with the imaginary part zero
        empirical_ntk(model, torch.complex(x, torch.zeros_like(x)), mode="diagonal", method=method)


def test_dtype_rule_inputs_cast_to_the_kernel_dtype():
    """Inputs are cast to the kernel dtype (the model's unless dtype= is given) at the boundary."""
    model32 = mlp().float()
    x = torch.randn(3, 4, dtype=D, generator=_gen(1))
    x2 = torch.randn(2, 4, dtype=D, generator=_gen(2))
    k = empirical_ntk(model32, x, x2)
    assert k.dtype == torch.float32
    assert torch.equal(k, empirical_ntk(model32, x.float(), x2.float()))  # exactly the cast inputs
    assert torch.equal(empirical_ntk(model32, x.numpy(), x2.numpy()), k)  # numpy at the edge
    xi = torch.arange(12).reshape(3, 4) - 5  # integers: cast as well
    assert torch.equal(empirical_ntk(model32, xi), empirical_ntk(model32, xi.float()))
    k64 = empirical_ntk(model32, x.float(), x2.float(), dtype=D)  # dtype= : parameters and inputs in float64
    assert k64.dtype == D
    assert_rel(k64, empirical_ntk(copy.deepcopy(model32).double(), x.float().double(), x2.float().double()))
    assert x.dtype == D and x2.dtype == D  # the caller's tensors are untouched


# ------------------------------------------------------------------------------------------
# Monte-Carlo bridge to the closed-form kernels (ntk_theory.infinite)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["dense", "masked_rescaled", "masked_unscaled"])
def test_monte_carlo_agrees_with_infinite_width(case):
    """Mean over S seeds of the trace-mode empirical NTK at width n vs the closed form.

    Tolerance: 5 standard errors of the seed mean per entry plus the O(1/n) finite-width bias
    allowance 10/n relative (Hanin & Nica 2019 give Var/Mean² ≈ e^{5L/n} - 1 for the diagonal).
    """
    infinite = pytest.importorskip("ntk_theory.infinite")
    depth, width, d0, S, q = 2, 1024, 8, 12, 0.3
    x = torch.randn(5, d0, dtype=D, generator=_gen(0))
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d0)
    x[4] = -x[0]  # an anti-parallel pair
    kw = dict(sigma_w=2 ** 0.5, sigma_b=0.1)
    if case == "dense":
        closed = infinite.mlp(depth, "relu", **kw)(x, get="ntk")
    else:
        closed = infinite.mlp(depth, "relu", density=q, rescale=case == "masked_rescaled", **kw)(x, get="ntk")
    samples = []
    for s in range(S):
        g = _gen(100 + s)
        net = finite_mlp(d0, width, depth, 2, sigma_b=0.1, generator=g)
        if case != "dense":
            apply_mask(net, random_mask(net, q, generator=g, skip_first=True), rescale=case == "masked_rescaled")
        samples.append(empirical_ntk(net, x, mode="trace"))
    samples = torch.stack(samples)
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(S)
    err = (mean - closed).abs()
    tol = 5 * se + 10 / width * closed.abs()
    assert bool((err <= tol).all()), f"max err/se = {float((err / se).max()):.2f}"
    # and the test can fail: the dense kernel is far from the unscaled masked limit
    if case == "masked_unscaled":
        dense = infinite.mlp(depth, "relu", **kw)(x, get="ntk")
        assert bool(((mean - dense).abs() > tol).any())


# ------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_same_code_path():
    model = lenet().cuda()
    x1 = torch.randn(4, 1, 12, 12, dtype=D, device="cuda")
    x2 = torch.randn(3, 1, 12, 12, dtype=D, device="cuda")
    m = random_mask(model, 0.5, generator=torch.Generator(device="cuda").manual_seed(0), include_bias=True)
    assert all(v.device.type == "cuda" for v in m.values())
    masked = apply_mask(copy.deepcopy(model), m, rescale=True)
    for kw, mdl in (({}, model), ({"mask": m}, model), ({}, masked)):
        for mode in ("full", "trace"):
            ref = empirical_ntk(mdl, x1, x2, mode=mode, method="jacobian", **kw)
            assert ref.device.type == "cuda"
            for method in ("structured", "jvp"):
                out = empirical_ntk(mdl, x1, x2, mode=mode, method=method, block_size=2, **kw)
                assert out.device.type == "cuda"
                assert_rel(out, ref)
    cpu = empirical_ntk(model.cpu(), x1.cpu(), x2.cpu())
    assert_rel(empirical_ntk(model.cuda(), x1, x2).cpu(), cpu, 1e-8)


# ------------------------------------------------------------------------------------------
# Conv -> ReLU -> MaxPool2d: signals carried at the pool output (structured path)
# ------------------------------------------------------------------------------------------
def _pool_path_taken(model, x) -> list[bool]:
    """Per explicit-Jacobian layer of the autograd tracer: is it carried in its pool form?"""
    _, info = empirical_ntk(model, x, method="structured", tracer="autograd", return_info=True)
    return [lay.form.startswith("pool") for lay in info.layers if lay.form != "gram"]


def _relu_pool_cnn(variant: str) -> nn.Module:
    torch.manual_seed(3)
    act = nn.ReLU()
    if variant == "plain":  # 11 -> 9 -> 4 (floor: a row and a column of the conv output uncovered)
        body = [nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), NTKConv2d(3, 4, 3, sigma_b=0.2), nn.ReLU(inplace=True),
                nn.MaxPool2d((1, 3), stride=(1, 3))]  # 4 -> 4 (same padding) -> 4x1
        head = 4 * 4 * 1
    elif variant == "shared_relu_nobias":
        body = [nn.Conv2d(1, 3, 3, bias=False), act, nn.MaxPool2d(2), nn.Conv2d(3, 2, 2, padding=1, stride=2), act,
                nn.MaxPool2d(2)]  # 11 -> 9 -> 4 -> 3 -> 1
        head = 2
    elif variant == "overlapping":  # not the pattern: ordinary path
        body = [nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(3, stride=2)]  # 11 -> 9 -> 4
        head = 3 * 4 * 4
    else:
        raise ValueError(variant)
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(head, 5), nn.ReLU(), nn.Linear(5, 3)).to(D)


@pytest.mark.parametrize("variant,taken", [("plain", [True, True]), ("shared_relu_nobias", [True, True]),
                                           ("overlapping", [False])])
@pytest.mark.parametrize("masked", [None, "subnetwork", "ntt"])
def test_conv_relu_maxpool_path_matches_reference(variant, taken, masked):
    model = _relu_pool_cnn(variant)
    g = _gen(5)
    x1 = torch.randn(6, 1, 11, 11, generator=g, dtype=D)
    x1[0] = -1.0  # ties in every window (and ReLU derivative 0 at the argmax)
    x1[1] = x1[1].round()  # ties
    x2 = torch.randn(4, 1, 11, 11, generator=g, dtype=D)
    assert _pool_path_taken(model, x1) == taken
    kw = {}
    if masked:
        kw = dict(mask=random_mask(model, 0.5, generator=4, include_bias=True), mask_mode=masked)
    for mode in ("full", "trace", "diagonal"):
        for xb in ((None,) if mode == "diagonal" else (x2, None)):
            ref = empirical_ntk(model, x1, xb, mode=mode, method="jacobian", **kw)
            for bs in (None, 2):
                assert_rel(empirical_ntk(model, x1, xb, mode=mode, method="structured", block_size=bs, **kw), ref)


def test_conv_relu_maxpool_signal_chunks_and_fallbacks():
    model = _relu_pool_cnn("plain")
    x = torch.randn(7, 1, 11, 11, generator=_gen(6), dtype=D)
    ref = empirical_ntk(model, x, method="jacobian")
    for tracer in ("sequential", "autograd"):  # one example per chunk of signals
        assert_rel(empirical_ntk(model, x, method="structured", tracer=tracer, budgets=Budgets(sig_elems=200)), ref)
    # the conv called twice (weight reuse): the pattern is not followed at run time -> ordinary trace
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2))
            self.fc = nn.Linear(16 + 81, 2)

        def forward(self, x):
            return self.fc(torch.cat([self.seq(x).flatten(1), conv(x).flatten(1)], 1))

    tw = Twice().to(D)
    assert _pool_path_taken(tw, x) == [False]
    assert_rel(empirical_ntk(tw, x, method="structured"), empirical_ntk(tw, x, method="jacobian"))
    # a user hook on the pool: the pattern is not assumed
    model.get_submodule("2").register_forward_hook(lambda m, a, o: o * 2)
    assert _pool_path_taken(model, x) == [False, True]
    assert_rel(empirical_ntk(model, x, method="structured"), empirical_ntk(model, x, method="jacobian"))


# ------------------------------------------------------------------------------------------
# The sequential engine (plain nn.Sequential traced without autograd) against the reference
# ------------------------------------------------------------------------------------------
def _all_paths_match(model, x1, x2=None, **kw):
    """structured (engine where taken, and the autograd trace forced) equals the jacobian reference."""
    for mode in ("full", "trace", "diagonal"):
        xb = None if mode == "diagonal" else x2
        ref = empirical_ntk(model, x1, xb, mode=mode, method="jacobian", **kw)
        assert_rel(empirical_ntk(model, x1, xb, mode=mode, method="structured", **kw), ref)
        assert_rel(empirical_ntk(model, x1, xb, mode=mode, method="structured", tracer="autograd", **kw), ref)


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, ErfActivation, nn.Identity])
def test_engine_activations_and_nested_sequentials(act):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), act()),
                          nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(3, 2, 2, stride=2, bias=False), act()),
                          nn.Flatten(), nn.Linear(2 * 2 * 2, 4), act(), NTKLinear(4, 3, sigma_b=0.5)).to(D)
    g = _gen(2)
    x1, x2 = torch.randn(5, 2, 8, 8, generator=g, dtype=D), torch.randn(3, 2, 8, 8, generator=g, dtype=D)
    x1[0] = 0.0  # activations at exactly 0 (ReLU' = 0 there, as autograd), ties in every pool window
    assert engine_taken(model, x1)
    _all_paths_match(model, x1, x2)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, stride=2), nn.MaxPool2d(2, padding=1), nn.MaxPool2d(2, ceil_mode=True),
                                  nn.MaxPool2d(2, dilation=2), nn.MaxPool2d((2, 1))])
def test_engine_pooling_geometries_after_relu(pool):
    """Overlapping windows (scatter-add), padding, ceil mode, dilation, rectangular windows."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), pool, nn.Conv2d(3, 2, 2), nn.ReLU(), nn.Flatten(1, -1))
    x = torch.randn(4, 1, 11, 11, generator=_gen(3), dtype=D)
    with torch.no_grad():
        out = model.to(D)(x)
    model.append(nn.Linear(out[0].numel(), 2).to(D))
    x[1] = x[1].round()  # ties
    assert engine_taken(model, x)
    _all_paths_match(model, x, torch.randn(2, 1, 11, 11, generator=_gen(4), dtype=D))


@pytest.mark.parametrize("masked", ["apply", "apply_rescale", "subnetwork", "ntt", "apply+ntt"])
def test_engine_masks_and_parametrised_models(masked):
    model = lenet()
    x1, x2 = torch.randn(4, 1, 12, 12, generator=_gen(5), dtype=D), torch.randn(3, 1, 12, 12, generator=_gen(6), dtype=D)
    m = random_mask(model, 0.5, generator=7, include_bias=True)
    kw = {}
    if masked.startswith("apply"):
        model = copy.deepcopy(model)
        apply_mask(model, m, rescale=masked == "apply_rescale")
        if masked == "apply+ntt":
            kw = dict(mask_mode="ntt")
    else:
        kw = dict(mask=m, mask_mode=masked)
    assert engine_taken(model, x1, **kw)
    _all_paths_match(model, x1, x2, **kw)


def test_engine_output_shapes_and_params_subsets():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 2, 3)).to(D)  # output (N, 2, 4, 4): O = 32
    x = torch.randn(3, 1, 8, 8, generator=_gen(8), dtype=D)
    assert engine_taken(model, x)
    _all_paths_match(model, x, torch.randn(2, 1, 8, 8, generator=_gen(9), dtype=D))
    params = {"0.bias": model[0].bias.detach(), "2.weight": model[2].weight.detach() * 2}  # bias-only conv layer
    assert engine_taken(model, x, params=params)
    _all_paths_match(model, x, params=params)


def test_engine_declines_what_it_does_not_know():
    """Unknown modules, custom forwards, hooks, reused modules, asymmetric padding, batch-merging
    flatten: the autograd trace takes over, with the same result."""
    torch.manual_seed(4)
    x = torch.randn(3, 1, 8, 8, generator=_gen(10), dtype=D)

    def net(*mid, head=2 * 6 * 6):
        return nn.Sequential(nn.Conv2d(1, 2, 3), *mid, nn.Flatten(), nn.Linear(head, 2)).to(D)

    relu = nn.ReLU()
    hooked = net(nn.ReLU())
    hooked[1].register_forward_hook(lambda m, a, o: o * 2)

    class MySeq(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 3

    cases = [net(nn.Softplus()), net(nn.AvgPool2d(1)), hooked, net(relu, relu),
             nn.Sequential(nn.Conv2d(1, 2, 2, padding="same"), nn.Flatten(), nn.Linear(128, 2)).to(D),
             MySeq(nn.Flatten(), nn.Linear(64, 2)).to(D)]
    for model in cases:
        assert not engine_taken(model, x), model
        assert_rel(empirical_ntk(model, x, method="structured"), empirical_ntk(model, x, method="jacobian"))
    # a global module hook switches the engine off
    model = net(nn.ReLU())
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert not engine_taken(model, x)
    finally:
        handle.remove()
    assert engine_taken(model, x)
    # an input that does not fit the model: the autograd trace raises torch's own error
    with pytest.raises(RuntimeError):
        empirical_ntk(model, torch.randn(2, 1, 9, 9, dtype=D), method="structured")


def test_training_mode_batchnorm_and_dropout_are_refused_without_side_effects():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=D)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(D)
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(D)
    for model, what in ((bn, "BatchNorm1d"), (drop, "Dropout")):
        state = copy.deepcopy(model.state_dict())
        for method in ("auto", "jacobian", "structured", "jvp"):
            with pytest.raises(ValueError, match=f"model: {what}.*model.eval"):
                empirical_ntk(model, x, method=method)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k  # running statistics and counters untouched
        model.eval()
        assert_rel(empirical_ntk(model, x), empirical_ntk(model, x, method="jacobian"))
    assert int(bn[1].num_batches_tracked) == 0
    drop.train()
    drop[1].p = 0.0  # p = 0 is deterministic: accepted in training mode
    assert_rel(empirical_ntk(drop, x), empirical_ntk(drop, x, method="jacobian"))


# ------------------------------------------------------------------------------------------
# Which path was taken: return_info, tracer=, budgets=
# ------------------------------------------------------------------------------------------
def test_return_info_reports_method_tracer_and_layer_forms():
    model = lenet()
    x = torch.randn(3, 1, 12, 12, dtype=D, generator=_gen(0))
    K, info = empirical_ntk(model, x, return_info=True)
    assert torch.equal(K, empirical_ntk(model, x))
    assert (info.method, info.tracer, info.declined) == ("structured", "sequential", None)
    assert [(lay.name, lay.form) for lay in info.layers] == [("0", "jacobian"), ("3", "pool-scattered"),
                                                             ("7", "gram"), ("9", "gram")]
    assert info.budgets == Budgets() and info.to_dict()["layers"][2] == {"name": "7", "form": "gram"}
    _, info = empirical_ntk(model, x, tracer="autograd", return_info=True)
    assert info.tracer == "autograd" and [lay.form for lay in info.layers][2:] == ["gram", "gram"]
    # auto falls back where the structured path does not apply, and says why
    bil = _Bilinear().to(D)
    xb = torch.randn(3, 4, dtype=D, generator=_gen(1))
    K, info = empirical_ntk(bil, xb, return_info=True)
    assert info.method in ("jacobian", "jvp") and info.tracer is None and "LayerNorm" in info.declined
    assert_rel(K, empirical_ntk(bil, xb, method="jacobian"))


def _Bilinear() -> nn.Module:
    """A model with parameters outside Linear/Conv2d (LayerNorm's): the structured path declines."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))


def test_tracer_and_budgets_arguments_are_validated():
    model = mlp()
    x = torch.randn(3, 4, dtype=D, generator=_gen(0))
    with pytest.raises(ValueError, match="tracer"):
        empirical_ntk(model, x, tracer="hooks")
    with pytest.raises(ValueError, match="tracer"):
        empirical_ntk(model, x, method="jacobian", tracer="autograd")
    with pytest.raises(ValueError, match="tracer"):  # not a plain Sequential: the engine cannot be forced
        empirical_ntk(_Twice2().to(D), x, tracer="sequential")
    with pytest.raises(ValueError, match="tracer"):  # nor can the structured path on a model it does not handle
        empirical_ntk(_Bilinear().to(D), x, tracer="autograd")
    with pytest.raises(TypeError, match="budgets"):
        empirical_ntk(model, x, budgets={"temp_elems": 1})
    with pytest.raises(TypeError, match="return_info"):
        empirical_ntk(model, x, return_info=1)
    for bad in (dict(temp_elems=0), dict(jac_elems=1.5), dict(sym_split_rows=(512,)), dict(gather_min_q=True)):
        with pytest.raises(ValueError, match="budgets"):
            Budgets(**bad)


class _Twice2(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        return self.l(torch.tanh(self.l(x)))

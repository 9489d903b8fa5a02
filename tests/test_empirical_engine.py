"""Adversarial review of the sequential engine of ntk_theory.empirical (``_sequential_plan``,
``_trace_sequential``, ``_pool_form``, ``_Jac._gathered``): ``method="structured"`` against the
``method="jacobian"`` reference (float64, relative tolerance 1e-10 on the max-abs entry) on the
inputs where a plain-``nn.Sequential`` tracer without autograd is most likely to go wrong.

Tests named ``test_regression_*`` reproduce defects the review found (and that are fixed); each
comment says what went wrong before the fix.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ntk_theory.empirical import Budgets, empirical_ntk
from ntk_theory.layers import ErfActivation, NTKConv2d, NTKLinear
from ntk_theory.masks import apply_mask, random_mask

from ntk_helpers import TOL, assert_rel
from ntk_helpers import gen as _gen

D = torch.float64
MODES = ("full", "trace", "diagonal")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (two threads only spin against each other on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _matches(model, x1, x2=None, block_sizes=(None,), tracer="auto", budgets=None, **kw) -> None:
    """structured (with ``tracer``: "autograd" forces the hook tracer) == jacobian in every mode
    (and for each block size)."""
    for mode in MODES:
        xb = None if mode == "diagonal" else x2
        ref = empirical_ntk(model, x1, xb, mode=mode, method="jacobian", **kw)
        for bs in block_sizes:
            out = empirical_ntk(model, x1, xb, mode=mode, method="structured", block_size=bs, tracer=tracer,
                                budgets=budgets, **kw)
            assert_rel(out, ref)


def engine_taken(model, x, **kw) -> bool:
    """Whether the structured path traces ``model`` on ``x`` with the sequential engine (the supported
    way to ask: ``return_info=True``)."""
    _, info = empirical_ntk(model, x, method="structured", return_info=True, **kw)
    return info.tracer == "sequential"


def _forms(model, x, **kw) -> list[str]:
    """The feature form of each differentiated layer (``NTKInfo.layers``)."""
    _, info = empirical_ntk(model, x, method="structured", return_info=True, **kw)
    return [lay.form for lay in info.layers]


def _unhooked(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _asymmetric_same_padding(m: nn.Module) -> bool:
    """A conv with padding='same' whose span ``dilation (k - 1)`` is odd in some dimension."""
    return (isinstance(m, nn.Conv2d) and m.padding == "same"
            and any(d * (k - 1) % 2 for k, d in zip(m.kernel_size, m.dilation)))


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(D)


def _small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3), nn.Tanh(),
                         nn.Linear(3, 2)).to(D)


def _lenet(dtype=D) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.MaxPool2d(2), NTKConv2d(3, 4, 3, sigma_b=0.2), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 6), nn.ReLU(),
                         NTKLinear(6, 3, sigma_b=0.3)).to(dtype)


def _with_ties(x: torch.Tensor) -> torch.Tensor:
    """Constant, zero and integer-valued examples: ties in pooling windows, ReLU inputs at exactly 0."""
    x = x.clone()
    x[0] = -1.0
    if x.shape[0] > 1:
        x[1] = 0.0
    if x.shape[0] > 2:
        x[2] = x[2].round()
    return x


# ------------------------------------------------------------------------------------------
# Random plain-Sequential architectures (hypothesis)
# ------------------------------------------------------------------------------------------
def _try_add(mods: list, m: nn.Module, shape: tuple) -> tuple | None:
    """Append ``m`` if it accepts an input of ``shape`` and gives a non-empty, finite output on zeros
    (a max-pooling window lying entirely in the padding gives -inf: kept out here, see the regression test)."""
    try:
        with torch.no_grad():
            y = m.to(D)(torch.zeros((1,) + shape, dtype=D))
    except RuntimeError:
        return None
    if y.numel() == 0 or not bool(torch.isfinite(y).all()):
        return None
    mods.append(m)
    return tuple(y.shape[1:])


def _draw_act(draw) -> nn.Module:
    kind = draw(st.sampled_from(["relu", "relu_", "leaky", "tanh", "sigmoid", "erf", "identity"]))
    if kind == "leaky":
        return nn.LeakyReLU(draw(st.sampled_from([0.0, 0.1, 2.5, -0.3])))
    return {"relu": nn.ReLU(), "relu_": nn.ReLU(inplace=True), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(),
            "erf": ErfActivation(), "identity": nn.Identity()}[kind]


@st.composite
def _architectures(draw):
    seed = draw(st.integers(0, 2 ** 16))
    torch.manual_seed(seed)
    in_shape = shape = (draw(st.integers(1, 3)), draw(st.integers(4, 12)), draw(st.integers(4, 12)))
    small = st.integers(1, 2)
    mods: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 3))):
        cin, cout = shape[0], draw(st.integers(1, 3))
        k, s, d = (draw(st.integers(1, 4)), draw(st.integers(1, 4))), (draw(small), draw(small)), (draw(small), draw(small))
        bias = draw(st.booleans())
        pad = draw(st.sampled_from(["same", "valid", "int", "int", "ntk"]))
        if pad == "same":  # symmetric (engine) or asymmetric (declined) depending on kernel and dilation
            conv = nn.Conv2d(cin, cout, k, padding="same", dilation=d, bias=bias)
        elif pad == "valid":
            conv = nn.Conv2d(cin, cout, k, stride=s, padding="valid", dilation=d, bias=bias)
        elif pad == "ntk":
            conv = NTKConv2d(cin, cout, draw(st.sampled_from([1, 3])), sigma_b=draw(st.sampled_from([0.0, 0.3])))
        else:
            conv = nn.Conv2d(cin, cout, k, stride=s, padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))),
                             dilation=d, bias=bias)
        new = _try_add(mods, conv, shape)
        if new is None:
            break
        shape = _try_add(mods, _draw_act(draw), new)
        if draw(st.booleans()):
            pk = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            ps = pk if draw(st.booleans()) else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            pp = (draw(st.integers(0, pk[0] // 2)), draw(st.integers(0, pk[1] // 2)))
            pd = (draw(small), draw(small))
            new = _try_add(mods, nn.MaxPool2d(pk, ps, pp, pd, ceil_mode=draw(st.booleans())), shape)
            shape = shape if new is None else new
    head = draw(st.sampled_from(["linear", "mlp", "flatten12", "flatten2", "none"]))
    if head in ("linear", "mlp"):
        mods.append(nn.Flatten())
        n = math.prod(shape)
        if head == "mlp":
            mods += [nn.Linear(n, 5, bias=draw(st.booleans())), _draw_act(draw)]
            n = 5
        O = draw(st.integers(1, 3))
        mods.append(NTKLinear(n, O, sigma_b=0.4) if draw(st.booleans()) else nn.Linear(n, O))
    elif head == "flatten12":
        mods.append(nn.Flatten(1, 2))
    elif head == "flatten2":
        mods.append(nn.Flatten(2))
    if not any(isinstance(m, nn.Conv2d) for m in mods):  # the first conv did not fit: a 1x1 conv always does
        mods.insert(0, nn.Conv2d(in_shape[0], in_shape[0], 1))  # (keeping the channels: the head was sized on them)
    model = nn.Sequential(*mods).to(D)

    kw: dict = {}
    variant = draw(st.sampled_from(["dense", "mask", "ntt", "apply", "apply_ntt", "params", "frozen"]))
    if variant in ("mask", "ntt", "apply", "apply_ntt") and any(p.dim() >= 2 for p in model.parameters()):
        m = random_mask(model, 0.5, generator=seed, include_bias=draw(st.booleans()), skip_first=False)
        if variant.startswith("apply"):
            apply_mask(model, m, rescale=draw(st.booleans()))
            kw = dict(mask_mode="ntt") if variant == "apply_ntt" else {}
        else:
            kw = dict(mask=m, mask_mode="ntt" if variant == "ntt" else "subnetwork")
    elif variant in ("params", "frozen"):
        named = dict(model.named_parameters())
        keep = [n for n in named if draw(st.booleans())] or list(named)[-1:]
        if variant == "params":
            kw = dict(params={n: named[n].detach() * 1.5 for n in keep})
        else:
            for n, p in named.items():
                p.requires_grad_(n in keep)
    n1, n2 = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    x1 = _with_ties(torch.randn((n1,) + in_shape, dtype=D, generator=_gen(seed)))
    x2 = torch.randn((n2,) + in_shape, dtype=D, generator=_gen(seed + 1)) if draw(st.booleans()) else None
    return model, x1, x2, kw, draw(st.sampled_from([None, 1, 2]))


@settings(max_examples=80, derandomize=True, deadline=None)
@given(_architectures())
def test_random_sequential_architectures_match_reference(case):
    """Conv geometry (stride, dilation, int/'same'/'valid' padding, no bias, NTKConv2d), every engine
    activation (LeakyReLU slopes 0, <0, >1; in-place ReLU), max-pooling geometries (overlap, padding,
    dilation, ceil mode), 4-D and Flatten(1, 2)/Flatten(2) outputs, masks, apply_mask, params subsets,
    frozen parameters, block sizes, ties: the engine is taken unless a conv has asymmetric 'same'
    padding, and agrees with the reference."""
    model, x1, x2, kw, bs = case
    asym = any(_asymmetric_same_padding(m) for m in model.modules())
    assert engine_taken(model, x1, **kw) == (not asym), model
    _matches(model, x1, x2, block_sizes=(bs,), **kw)


# ------------------------------------------------------------------------------------------
# conv -> ReLU -> MaxPool2d pool form, gathered (Q >= _GATHER_MIN_Q) and scattered
# ------------------------------------------------------------------------------------------
def _pool_cnn(seed: int, bias: bool = True, ntk: bool = False, k: int = 3, pool=2, H: int = 18) -> nn.Sequential:
    torch.manual_seed(seed)
    conv = NTKConv2d(2, 3, k, sigma_b=0.3, bias=bias) if ntk else nn.Conv2d(2, 3, k, bias=bias)
    body = [conv, nn.ReLU(), nn.MaxPool2d(pool)]
    with torch.no_grad():
        n = nn.Sequential(*body).to(D)(torch.zeros(1, 2, H, H, dtype=D)).numel()
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(n, 3)).to(D)


@pytest.mark.parametrize("arch", [dict(), dict(bias=False), dict(ntk=True), dict(H=17, k=2), dict(H=26, pool=(2, 3))])
@pytest.mark.parametrize("variant", ["dense", "mask", "ntt", "bias_only", "tiny_chunks"])
def test_gathered_pool_form_matches_reference(arch, variant):
    """Q = 8 x 8 (or more) pooled positions per channel: the gathered pool-form Jacobian, with dead
    windows (all-negative input: ReLU' = 0 at the argmax), ties, odd conv outputs (uncovered row and
    column), rectangular pools, masks with biases, bias-only differentiation, one example per chunk."""
    model = _pool_cnn(3, **arch)
    H = arch.get("H", 18)
    x1 = _with_ties(torch.randn(5, 2, H, H, dtype=D, generator=_gen(1)))
    x2 = torch.randn(2, 2, H, H, dtype=D, generator=_gen(2))
    kw: dict = {}
    if variant in ("mask", "ntt"):
        kw = dict(mask=random_mask(model, 0.5, generator=4, include_bias=True, skip_first=False),
                  mask_mode="ntt" if variant == "ntt" else "subnetwork")
    elif variant == "bias_only":
        kw = dict(params={n: p.detach() for n, p in model.named_parameters() if n.endswith("bias")})
        if not any(n.startswith("0.") for n in kw["params"]):  # conv without bias: its weight alone
            kw["params"]["0.weight"] = model[0].weight.detach()
    budgets = Budgets(sig_elems=1) if variant == "tiny_chunks" else None  # one example per chunk
    assert engine_taken(model, x1, **kw)
    for tracer in ("sequential", "autograd"):
        assert "pool-gathered" in _forms(model, x1, tracer=tracer, **kw), tracer
    _matches(model, x1, x2, block_sizes=(None, 2), budgets=budgets, **kw)


def test_scattered_pool_form_below_gather_threshold():
    """Q < Budgets.gather_min_q: the scattered pool form, including column P for dead windows; the
    same model gathered once the threshold is lowered (Budgets(gather_min_q=16))."""
    model = _pool_cnn(5, H=10)  # 8 x 8 conv output -> 4 x 4 = 16 pooled positions
    x1 = _with_ties(torch.randn(4, 2, 10, 10, dtype=D, generator=_gen(3)))
    x2 = torch.randn(3, 2, 10, 10, dtype=D, generator=_gen(4))
    assert _forms(model, x1)[0] == "pool-scattered"
    _matches(model, x1, x2, block_sizes=(None, 3))
    low = Budgets(gather_min_q=16)
    assert _forms(model, x1, budgets=low)[0] == "pool-gathered"
    _matches(model, x1, x2, block_sizes=(None, 3), budgets=low)


# ------------------------------------------------------------------------------------------
# Targeted probes that pass
# ------------------------------------------------------------------------------------------
def test_float32_model_with_float64_kernel():
    model = _lenet(torch.float32)
    x1 = _with_ties(torch.randn(4, 1, 12, 12, dtype=D, generator=_gen(1)))
    x2 = torch.randn(2, 1, 12, 12, dtype=torch.float32, generator=_gen(2))
    assert engine_taken(model, x1, dtype=D)
    _matches(model, x1, x2, dtype=D)
    m = random_mask(model, 0.5, generator=1, include_bias=True, skip_first=False)
    apply_mask(model, m, rescale=True)
    assert engine_taken(model, x1, dtype=D)
    _matches(model, x1, x2, dtype=D)
    _matches(model, x1, x2, dtype=D, mask_mode="ntt")


@pytest.mark.parametrize("apply", [False, True])
@pytest.mark.parametrize("mask_mode", ["subnetwork", "ntt"])
def test_applied_and_explicit_masks_with_frozen_layers(apply, mask_mode):
    """apply_mask(rescale) and mask= together (logical and), include_bias on either, with the
    parameters of one conv and one dense layer frozen (forward at the masked values, not differentiated)."""
    model = _lenet()
    x1 = _with_ties(torch.randn(4, 1, 12, 12, dtype=D, generator=_gen(1)))
    x2 = torch.randn(2, 1, 12, 12, dtype=D, generator=_gen(2))
    if apply:
        apply_mask(model, random_mask(model, 0.5, generator=1, include_bias=True, skip_first=False), rescale=True)
    kw = dict(mask=random_mask(_lenet(), 0.6, generator=2, include_bias=not apply, skip_first=False),
              mask_mode=mask_mode)
    for n, p in model.named_parameters():
        if n.startswith(("3.", "7.")):
            p.requires_grad_(False)
    assert engine_taken(model, x1, **kw)
    _matches(model, x1, x2, **kw)


def test_nested_ordereddict_flatten_variants_and_layouts():
    torch.manual_seed(2)
    model = nn.Sequential(OrderedDict([
        ("feat", nn.Sequential(OrderedDict([("c1", nn.Conv2d(1, 2, 3, stride=2, dilation=2)),
                                            ("act", nn.ReLU(inplace=True)), ("pool", nn.MaxPool2d(2))]))),
        ("empty", nn.Sequential()), ("flat", nn.Flatten()),
        ("head", nn.Sequential(OrderedDict([("l1", nn.Linear(8, 4)), ("t", nn.Tanh()), ("l2", nn.Linear(4, 2))])))])).to(D)
    x1 = _with_ties(torch.randn(4, 1, 12, 12, dtype=D, generator=_gen(1)))
    x2 = torch.randn(2, 1, 12, 12, dtype=D, generator=_gen(2))
    assert engine_taken(model, x1)
    _matches(model, x1, x2)
    _matches(model, x1, x2, mask=random_mask(model, 0.5, generator=3, include_bias=True, skip_first=False))
    # channels-last, strided and permuted inputs (im2col through as_strided on arbitrary strides)
    torch.manual_seed(4)
    cnn = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(72, 2)).to(D)
    xs = [torch.randn(4, 3, 12, 12, dtype=D, generator=_gen(5)).contiguous(memory_format=torch.channels_last),
          torch.randn(3, 3, 24, 24, dtype=D, generator=_gen(6))[:, :, ::2, 1::2],
          torch.randn(2, 12, 12, 3, dtype=D, generator=_gen(7)).permute(0, 3, 1, 2)]
    for x in xs:
        assert engine_taken(cnn, x)
        _matches(cnn, x, xs[0])


def test_leaky_relu_negative_slope_in_place_is_exact():
    """LeakyReLU(-0.3, inplace=True): autograd (hence the reference) refuses its in-place backward;
    the engine differentiates it from the input and agrees with the out-of-place model."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 5), nn.LeakyReLU(-0.3, inplace=True), nn.Linear(5, 2)).to(D)
    oop = copy.deepcopy(model)
    oop[1].inplace = False
    x = torch.randn(3, 4, dtype=D, generator=_gen(7))
    x[0] = 0.0
    with pytest.raises(RuntimeError, match="negative slope"):
        empirical_ntk(model, x, method="jacobian")
    for mode in MODES:
        assert_rel(empirical_ntk(model, x, mode=mode, method="structured"),
                   empirical_ntk(oop, x, mode=mode, method="jacobian"))


def test_engine_leaves_model_and_inputs_untouched():
    """In-place ReLU as the first module, masks, frozen parameters: nothing of the caller's changes."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8, 2)).to(D)
    apply_mask(model, random_mask(model, 0.5, generator=1, include_bias=True, skip_first=False), rescale=True)
    model[1].parametrizations.bias.original.requires_grad_(False)
    x = torch.randn(3, 1, 6, 6, dtype=D, generator=_gen(1))
    x_before = x.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    assert engine_taken(model, x)
    for mode in MODES:
        empirical_ntk(model, x, mode=mode, method="structured")
    assert torch.equal(x, x_before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert all(_unhooked(m) for m in model.modules())


# ------------------------------------------------------------------------------------------
# Regressions: defects found in the review, fixed
# ------------------------------------------------------------------------------------------
# Was: a weight tied between two Linear layers and not differentiated is missing from prob.fixed
# (named_parameters() drops the duplicate name): the engine raises KeyError('2.weight').
def test_regression_tied_frozen_weight_crashes_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    model[2].weight = model[0].weight
    model[0].weight.requires_grad_(False)
    x = torch.randn(3, 4, dtype=D, generator=_gen(0))
    _matches(model, x, tracer="autograd")  # the autograd tracer handles it
    _matches(model, x)


# Was: a Linear/Conv whose weight is a buffer (a frozen layer stored as buffer) is neither in
# prob.diff nor in prob.fixed (buffers are copied there only on a dtype change): KeyError('0.weight').
def test_regression_weight_held_as_buffer_crashes_engine():
    model = _mlp()
    w = model[0].weight.detach().clone()
    del model[0].weight
    model[0].register_buffer("weight", w)
    x = torch.randn(3, 4, dtype=D, generator=_gen(0))
    _matches(model, x, tracer="autograd")
    _matches(model, x)


# Was: a dilated, padded MaxPool2d window can lie entirely in the padding (output -inf, killed by the
# ReLU after it); torch then returns an argmax index past the end of the plane and the engine's
# scatter_add_ raises "index 3 is out of bounds" where the reference and the autograd tracer work.
def test_regression_pool_window_entirely_in_padding_crashes_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.MaxPool2d((1, 2), stride=1, padding=(0, 1), dilation=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(2 * 3 * 1, 2)).to(D)
    x = torch.randn(3, 1, 3, 1, dtype=D, generator=_gen(0))
    _matches(model, x, tracer="autograd")
    _matches(model, x)


# Was: the engine takes layer widths from the module attributes (out_features / out_channels) rather
# than from the weights; after manual pruning (smaller weight, stale attribute) the Linear case
# crashes and the conv (pool form) case silently reshapes the signals into a wrong layout.
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_regression_stale_width_attributes(kind):
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(3, 2)).to(D)
        model[0].weight = nn.Parameter(torch.randn(3, 4, dtype=D))
        model[0].bias = nn.Parameter(torch.randn(3, dtype=D))
        x = torch.randn(3, 4, dtype=D, generator=_gen(7))
    else:
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3, padding=1),
                              nn.Flatten(), nn.Linear(8, 2)).to(D)
        model[0].weight = nn.Parameter(torch.randn(2, 1, 3, 3, dtype=D))
        model[0].bias = nn.Parameter(torch.randn(2, dtype=D))
        x = torch.randn(3, 1, 6, 6, dtype=D, generator=_gen(1))
    _matches(model, x, tracer="autograd")
    _matches(model, x)


# Was: the engine records the raw input x (not detached) as a layer input; with x.requires_grad the
# full-mode GEMMs with out= raise, and trace/diagonal kernels come back attached to x's graph.
def test_regression_input_requiring_grad():
    model = _mlp()
    x = torch.randn(3, 4, dtype=D, generator=_gen(0))
    refs = {mode: empirical_ntk(model, x, mode=mode, method="jacobian") for mode in MODES}
    for mode in MODES:
        out = empirical_ntk(model, x.clone().requires_grad_(True), mode=mode, method="structured",
                            tracer="autograd")
        assert not out.requires_grad
        assert_rel(out, refs[mode])
    for mode in MODES:
        out = empirical_ntk(model, x.clone().requires_grad_(True), mode=mode, method="structured")
        assert not out.requires_grad, mode
        assert_rel(out, refs[mode])


# Was: the engine checks type(m).forward only; a forward replaced on the instance (Sequential or
# activation) or a subclass overriding __call__ is run by the model but ignored by the engine (the
# autograd tracer gets these right).
@pytest.mark.parametrize("case", ["sequential_forward", "activation_forward", "call_override"])
def test_regression_instance_forward_and_call_overrides_ignored(case):
    model = _small_cnn()
    if case == "sequential_forward":
        fwd = model.forward
        model.forward = lambda h: 2 * fwd(h)
    elif case == "activation_forward":
        model[5].forward = torch.sigmoid  # the Tanh between the two Linear layers
    else:
        class TwiceTanh(nn.Tanh):
            def __call__(self, h):
                return 2 * super().__call__(h)
        model[5] = TwiceTanh()
    x = torch.randn(3, 1, 6, 6, dtype=D, generator=_gen(1))
    _matches(model, x, tracer="autograd")
    _matches(model, x)


# Was: the engine applies weight_gain/bias_gain of every layer it runs, including frozen layers whose
# forward does not use them (a plain nn.Linear carrying a weight_gain attribute: silently wrong) and
# non-scalar tensor gains of a frozen NTKLinear (float() raises).
@pytest.mark.parametrize("case", ["plain_linear_attribute", "tensor_gain"])
def test_regression_gains_of_frozen_layers(case):
    torch.manual_seed(0)
    if case == "plain_linear_attribute":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(D)
        model[0].weight_gain = 3.0  # metadata: nn.Linear.forward ignores it
    else:
        model = nn.Sequential(NTKLinear(4, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
        model[0].weight_gain = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=D)  # per-unit gains
    for p in model[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 4, dtype=D, generator=_gen(7))
    _matches(model, x, tracer="autograd")
    _matches(model, x)


# Was: _sequential_plan skips None entries of a Sequential ("if m is None: continue"), but
# Sequential.forward calls them: the reference (and the model) raise TypeError, the engine returns a kernel.
def test_regression_none_module_in_sequential_accepted():
    model = _mlp()
    model[1] = None
    x = torch.randn(3, 4, dtype=D, generator=_gen(0))
    with pytest.raises(TypeError):
        model(x)
    with pytest.raises(TypeError):
        empirical_ntk(model, x, method="jacobian")
    with pytest.raises(TypeError):
        empirical_ntk(model, x, method="structured")


# Was (outside the engine, in _prepare_x): x is used as given, so the reference paths mutate the
# caller's tensor through an in-place first module, and crash on an x that requires grad (_probe).
def test_regression_reference_paths_and_caller_input():
    torch.manual_seed(5)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(36, 2)).to(D)
    x = torch.randn(3, 1, 6, 6, dtype=D, generator=_gen(1))
    before = x.clone()
    empirical_ntk(model, x, method="jacobian")
    assert torch.equal(x, before), "method='jacobian' mutated x1"
    empirical_ntk(_mlp(), torch.randn(3, 4, dtype=D).requires_grad_(True), method="jacobian")

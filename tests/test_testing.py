"""ntk_theory.testing: each strategy draws what it promises (shapes, spectra, densities, ranges), builds
finite networks that match their kernels, refuses bad ranges when built, and the module says how to
install hypothesis when it is missing. The README's user-written property test runs as written."""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ntk_theory.testing as T
from ntk_theory.empirical import empirical_ntk
from ntk_theory.masks import mask_density


# --------------------------------------------------------------------------------------------- optional dependency
def test_import_without_hypothesis_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)        # "import hypothesis" now raises ImportError
    monkeypatch.setitem(sys.modules, "hypothesis.strategies", None)
    monkeypatch.delitem(sys.modules, "ntk_theory.testing")
    with pytest.raises(ImportError, match=r"pip install hypothesis"):
        importlib.import_module("ntk_theory.testing")
    monkeypatch.undo()
    assert importlib.import_module("ntk_theory.testing") is not None


def test_the_core_does_not_import_hypothesis():
    import subprocess
    code = "import sys, ntk_theory, ntk_theory.infinite, ntk_theory.empirical; print('hypothesis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# --------------------------------------------------------------------------------------------- architectures
@settings(max_examples=10)
@given(T.finite_networks(T.mlp_architectures(depth=(1, 2), d_in=(2, 5)), width=(3, 6), out_features=(1, 2)))
def test_mlp_architectures_build_matching_finite_networks(pair):
    arch, net = pair
    assert arch.kind == "mlp" and arch.in_shape[0] in range(2, 6)
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == arch.depth + 1 and linear[0].in_features == arch.in_shape[0]
    assert all(m.out_features in (3, 4, 5, 6) for m in linear[:-1]) and linear[-1].out_features in (1, 2)
    x = arch.inputs(3, generator=1)
    assert net(x).shape[0] == 3 and arch.kernel(x, get="ntk").shape == (3, 3)


@settings(max_examples=6)
@given(T.cnn_architectures(depth=1, image_size=(2, 3), channels=(1, 2)))
def test_cnn_architectures_build_matching_finite_networks(arch):
    assert arch.kind == "cnn" and len(arch.in_shape) == 3 and arch.readout in ("flatten", "gap")
    net = arch.finite(4, generator=0)
    assert any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    x = arch.inputs(2, generator=2)
    assert net(x).shape == (2, 1)
    k = arch.kernel(x, get="ntk")
    assert k.shape == (2, 2) and torch.allclose(k, k.T)


@settings(max_examples=3)
@given(T.mlp_architectures(depth=(1, 2), activations=("erf", "relu"), sigma_b=(0.0, 0.3), d_in=3))
def test_the_finite_network_converges_to_the_architecture_s_kernel(arch):
    """Monte Carlo over 12 initialisations at width 512: the mean empirical NTK is within 4 standard
    errors (per entry) of the closed form of the drawn architecture."""
    x = arch.inputs(4, generator=0)
    ks = torch.stack([empirical_ntk(arch.finite(512, generator=s), x) for s in range(12)])
    mean, se = ks.mean(0), ks.std(0) / math.sqrt(12)
    assert bool(((mean - arch.kernel(x, get="ntk")).abs() <= 4 * se + 1e-9).all())


# --------------------------------------------------------------------------------------------- kernels
@settings(max_examples=25)
@given(st.data())
def test_psd_matrices_have_the_requested_spectrum(data):
    n = data.draw(st.integers(1, 7))
    lam_min = data.draw(st.floats(1e-3, 1.0))
    cond = data.draw(st.floats(1.0, 1e3))
    k = data.draw(T.psd_matrices(n=n, lambda_min=lam_min, condition=cond))
    assert k.shape == (n, n) and k.dtype == torch.float64 and torch.equal(k, k.T)
    ev = torch.linalg.eigvalsh(k)
    tol = 1e-12 * cond * lam_min + 1e-14
    assert abs(float(ev[0]) - lam_min) <= tol
    if n > 1:
        assert abs(float(ev[-1]) - cond * lam_min) <= 1e-11 * cond * lam_min


@settings(max_examples=20)
@given(st.data())
def test_psd_matrices_of_a_given_rank(data):
    n = data.draw(st.integers(2, 7))
    r = data.draw(st.integers(1, n))
    k = data.draw(T.psd_matrices(n=n, rank=r, lambda_min=0.1, condition=(1.0, 100.0)))
    ev = torch.linalg.eigvalsh(k)
    assert int((ev > 1e-9).sum()) == r and float(ev[0]) > -1e-12


@settings(max_examples=20)
@given(T.psd_pairs(n=(1, 6), lambda_min=1e-2, perturbation=(0.0, 0.5)))
def test_psd_pairs_near_each_other_keep_lambda_min(pair):
    a, b = pair
    assert a.shape == b.shape and torch.equal(b, b.T)
    lam_a = float(torch.linalg.eigvalsh(a)[0])
    assert float(torch.linalg.eigvalsh(b)[0]) >= lam_a * (1 - 1e-9) - 1e-12
    assert abs(lam_a - 1e-2) < 1e-10


@settings(max_examples=15)
@given(T.train_test_kernels(n=(1, 5), m=(1, 3)))
def test_train_test_kernels_are_blocks_of_one_pd_kernel(blocks):
    k, kx, kxx = blocks
    n, m = k.shape[0], kxx.shape[0]
    assert kx.shape == (m, n)
    joint = torch.cat([torch.cat([k, kx.T], 1), torch.cat([kx, kxx], 1)], 0)
    assert float(torch.linalg.eigvalsh(joint)[0]) > 0


# --------------------------------------------------------------------------------------------- masks, inputs, attacks
@settings(max_examples=15)
@given(st.data())
def test_masks_have_the_requested_density(data):
    arch = data.draw(T.mlp_architectures(depth=2, d_in=4))
    net = arch.finite(10, generator=0)
    q = data.draw(st.floats(0.05, 1.0))
    mask = data.draw(T.masks(net, density=q))
    names = [n for n, p in net.named_parameters() if p.dim() >= 2]
    assert sorted(mask) == sorted(names[1:])                     # first layer dense by default
    for name, m in mask.items():
        p = dict(net.named_parameters())[name]
        assert m.dtype == torch.bool and m.shape == p.shape
        assert int(m.sum()) == max(1, round(q * p.numel()))
    assert abs(mask_density(mask) - q) <= 0.05 + 1.0 / 10


@settings(max_examples=15)
@given(T.box_inputs(n=(1, 5), shape=(2, 3, 3), low=-0.5, high=0.5))
def test_box_inputs(x):
    assert x.shape[1:] == (2, 3, 3) and 1 <= x.shape[0] <= 5
    assert float(x.min()) >= -0.5 and float(x.max()) <= 0.5


@settings(max_examples=15)
@given(T.sphere_inputs(n=(2, 6), d=(3, 6), min_angle=0.2))
def test_sphere_inputs(x):
    d = x.shape[1]
    torch.testing.assert_close(x.norm(dim=1), torch.full((x.shape[0],), math.sqrt(d), dtype=torch.float64))
    u = x / x.norm(dim=1, keepdim=True)
    cos = (u @ u.T).fill_diagonal_(-1.0)
    assert float(cos.max()) <= math.cos(0.2) + 1e-12


@settings(max_examples=15)
@given(T.attack_configs(norms="l2", eps=(0.01, 0.1), steps=(2, 4), alpha_fraction=0.5))
def test_attack_configs_feed_pgd(cfg):
    from ntk_theory.attacks import pgd
    assert cfg.norm == "l2" and 0.01 <= cfg.eps <= 0.1 and 2 <= cfg.steps <= 4 and cfg.alpha == 0.5 * cfg.eps
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    adv = pgd(lambda z: z @ w, x, torch.tensor([0, 1, 0]), clamp=None, generator=0, **cfg.kwargs())
    assert float((adv - x).norm(dim=1).max()) <= cfg.eps * (1 + 1e-9)


@pytest.mark.parametrize("make, match", [
    (lambda: T.psd_matrices(n=0), "n"),
    (lambda: T.psd_matrices(condition=0.5), "condition"),
    (lambda: T.psd_matrices(lambda_min=(0.0, 1.0)), "lambda_min"),
    (lambda: T.mlp_architectures(activations=("swish",)), "activations"),
    (lambda: T.mlp_architectures(depth=(3, 1)), "depth"),
    (lambda: T.cnn_architectures(kernel_sizes=(2,)), "kernel_sizes"),
    (lambda: T.masks(torch.nn.Linear(2, 2), density=(0.5, 1.5)), "density"),
    (lambda: T.box_inputs(low=1.0, high=0.0), "low, high"),
    (lambda: T.sphere_inputs(radius=-1.0), "radius"),
    (lambda: T.attack_configs(norms=("l1",)), "norms"),
    (lambda: T.attack_configs(eps=0.0), "eps"),
    (lambda: T.architectures(mpl={}), "mpl"),
])
def test_bad_ranges_are_refused_when_the_strategy_is_built(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


# --------------------------------------------------------------------------------------------- the README example
README_EXAMPLE = '''\
from hypothesis import given

from ntk_theory.dynamics import expm_gap, expm_gap_bound
from ntk_theory.testing import psd_pairs


@given(psd_pairs(n=(1, 8), lambda_min=1e-3, condition=(1.0, 1e4)))
def test_c6_bound_holds_for_any_two_pd_kernels(pair):
    """C6: ||exp(-A t) - exp(-B t)||_2 <= ||A - B||_2 / (e lambda_min) for every t >= 0."""
    a, b = pair
    taus = [0.0, 0.1, 1.0, 10.0, 1e3]
    sup_gap = float(expm_gap(a, b, taus).max())
    assert sup_gap <= float(expm_gap_bound(a, b)) * (1 + 1e-9) + 1e-12
'''


def test_readme_example_runs_as_written():
    """The README's property-test example is exactly README_EXAMPLE, and it passes."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    if readme.exists() and "psd_pairs" in readme.read_text():
        assert README_EXAMPLE in readme.read_text(), "README.md: the property-test example differs from the tested one"
    namespace: dict = {}
    exec(compile(README_EXAMPLE, "README_EXAMPLE", "exec"), namespace)
    namespace["test_c6_bound_holds_for_any_two_pd_kernels"]()       # hypothesis runs its examples

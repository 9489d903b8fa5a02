"""empirical.evaluate: hand counts, the worst-case AND over attacks, restarts, eps = 0, the closed-form
robust margin of a linear classifier, torchattacks' PGD as an independent reference (and a planted
disagreement), resume after an interruption, parameter-free models, state restoration, bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import empirical.evaluate as ev
from empirical.evaluate import EvalResult, evaluate


def _mlp(seed=0, d=64, h=32, c=10, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c)).to(dtype)


def _data(n=200, seed=0, c=10):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, c, (n,), generator=g)


@pytest.fixture(scope="module")
def digits_model():
    """A small MLP trained (full-batch Adam, a few hundred steps) on scikit-learn's 8x8 digits in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1200], perm[1200:]
    model = _mlp(0, h=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[tr]), y[tr]).backward()
        opt.step()
    model.eval()
    return model, x[te], y[te]


# --------------------------------------------------------------------------------------------- counts and logic
def test_clean_accuracy_is_a_hand_count():
    model = _mlp()
    x, y = _data(137)
    r = evaluate(model, x, y, eps=0.05, steps=3, batch_size=50, device="cpu")
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert r.clean_acc == int(correct.sum()) / 137
    assert torch.equal(r.flags["clean_correct"], correct)
    assert r.n == 137 and r.model_mode == "eval" and r.device == "cpu"
    assert bool(r.flags["evaluated"].all())


def test_robust_is_the_and_over_every_attack():
    model = _mlp(1, h=16)
    x, y = _data(120, seed=1)
    r = evaluate(model, x, y, eps=0.04, steps=4, restarts=3, batch_size=32, device="cpu", cross_check=True)
    f = r.flags
    hand = f["clean_correct"] & f["fgsm_robust"] & f["cross_check_robust"]
    for k in range(3):
        hand = hand & f[f"pgd_robust/{k}"]
    assert torch.equal(f["robust"], hand)
    assert torch.equal(f["pgd_robust"], f["pgd_robust/0"] & f["pgd_robust/1"] & f["pgd_robust/2"])
    assert r.robust_acc == float(hand.double().mean())
    assert r.pgd_acc == float(f["pgd_robust"].double().mean())
    assert r.fgsm_acc == float(f["fgsm_robust"].double().mean())
    assert r.robust_acc <= min(r.clean_acc, r.fgsm_acc, r.pgd_acc, r.cross_check_acc)
    assert r.attacks == ("fgsm", "pgd-4x3", "torchattacks-pgd")


def test_a_point_fooled_only_by_fgsm_counts_as_not_robust(monkeypatch):
    """Robust accuracy is not an average: a point beaten by any one attack is not robust."""
    model = _mlp(2)
    x, y = _data(40, seed=2)
    with torch.no_grad():
        y = model(x).argmax(1)  # every clean prediction correct
    r = evaluate(model, x, y, eps=0.01, steps=2, device="cpu")
    victim = 5
    other = int(torch.nonzero(y != y[victim])[0])

    def fake_fgsm(f, xb, yb, **kw):  # sends the victim to a point of another class, the rest unchanged
        out = xb.clone()
        hit = (xb == x[victim]).flatten(1).all(1)
        out[hit] = x[other]
        return out

    monkeypatch.setattr(ev, "_fgsm", fake_fgsm)
    r2 = evaluate(model, x, y, eps=0.01, steps=2, device="cpu")
    expected = torch.ones(40, dtype=torch.bool)
    expected[victim] = False
    assert torch.equal(r2.flags["fgsm_robust"], expected)
    assert not bool(r2.flags["robust"][victim])
    assert torch.equal(r2.flags["pgd_robust"], r.flags["pgd_robust"])
    assert torch.equal(r2.flags["robust"], r.flags["pgd_robust"] & expected)


def test_more_restarts_are_never_weaker_per_example():
    model = _mlp(3, h=16)
    x, y = _data(150, seed=3)
    r1 = evaluate(model, x, y, eps=0.05, steps=3, restarts=1, fgsm=False, device="cpu", seed=7)
    r3 = evaluate(model, x, y, eps=0.05, steps=3, restarts=3, fgsm=False, device="cpu", seed=7)
    assert bool((r3.flags["pgd_robust"] <= r1.flags["pgd_robust"]).all())  # per example, not only on average
    assert torch.equal(r3.flags["pgd_robust/0"], r1.flags["pgd_robust/0"])  # restart 0 is the same attack
    assert r3.pgd_acc <= r1.pgd_acc and r1.fgsm_acc is None and "fgsm_robust" not in r1.flags


def test_eps_zero_is_clean_and_runs_no_attack(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no attack may run at eps = 0")

    monkeypatch.setattr(ev, "pgd", boom)
    monkeypatch.setattr(ev, "_fgsm", boom)
    model = _mlp(4)
    x, y = _data(64, seed=4)
    r = evaluate(model, x, y, eps=0.0, device="cpu", restarts=2)
    assert r.attacks == () and "no attack" in r.note
    assert r.pgd_acc == r.fgsm_acc == r.robust_acc == r.clean_acc
    assert torch.equal(r.flags["robust"], r.flags["clean_correct"])


def test_deterministic_for_a_seed_and_seed_matters():
    model = _mlp(5, h=16)
    x, y = _data(100, seed=5)
    a = evaluate(model, x, y, eps=0.08, steps=2, device="cpu", seed=3, batch_size=30)
    b = evaluate(model, x, y, eps=0.08, steps=2, device="cpu", seed=3, batch_size=30)
    for k in a.flags:
        assert torch.equal(a.flags[k], b.flags[k])
    json.dumps(a.to_dict())  # JSON-ready


# --------------------------------------------------------------------------------------------- closed form
def _linear_worst_margin(w, b, x, y, eps):
    """Exact worst-case margin of a binary linear classifier over B_inf(x, eps) ∩ [0, 1]^d.

    With v = w_y - w_{1-y} the margin m(x') = v·x' + (b_y - b_{1-y}) is separable in the coordinates,
    so its minimum over the box [max(x_i - eps, 0), min(x_i + eps, 1)] takes each delta_i at the end
    of its interval opposite to sign(v_i): m(x) + Σ_i min(v_i lo_i, v_i hi_i), lo_i/hi_i the interval
    ends of delta_i. Without the box this is m(x) - eps ||v||_1.
    """
    xf = x.reshape(x.shape[0], -1).double()
    wd, bd = w.double(), b.double()
    v = wd[y] - wd[1 - y]
    m = (v * xf).sum(1) + bd[y] - bd[1 - y]
    lo = torch.clamp(xf - eps, min=0.0) - xf
    hi = torch.clamp(xf + eps, max=1.0) - xf
    return m + torch.minimum(v * lo, v * hi).sum(1), m


@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_pgd_on_a_linear_model_matches_the_closed_form(eps):
    """For a linear binary classifier the cross-entropy gradient is -p·v: every PGD step moves each
    coordinate by alpha toward -sign(v_i), and 10 steps of 2.5 eps/10 cross the ball, so PGD reaches
    the exact minimiser (a corner of the box-clipped ball) and its robust flags equal the closed form.
    Points whose worst-case margin is within 1e-4 of 0 (float32 rounding of a float64 margin of size
    ~1) are left out; the test asserts there are few of them and that both outcomes occur."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 2)
    with torch.no_grad():
        lin.weight.mul_(8.0)
    model = nn.Sequential(nn.Flatten(), lin)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(400, 1, 8, 8, generator=g)
    x[:50] = (x[:50] > 0.5).float()  # points on the box faces: the box bounds the perturbation
    with torch.no_grad():
        y = model(x).argmax(1)  # clean margin > 0 for all; the question is the robust one
    y[::7] = 1 - y[::7]  # and some misclassified ones
    worst, clean = _linear_worst_margin(lin.weight.detach(), lin.bias.detach(), x, y, eps)
    r = evaluate(model, x, y, eps=eps, steps=10, device="cpu", fgsm=True)
    keep = worst.abs() > 1e-4
    assert int((~keep).sum()) <= 4
    expected = worst > 0
    assert 0 < int(expected[keep].sum()) < int(keep.sum())
    assert torch.equal(r.flags["pgd_robust"][keep], expected[keep])
    # FGSM is exact for a linear model too: one step of eps to the same corner
    assert torch.equal(r.flags["fgsm_robust"][keep], expected[keep])
    assert torch.equal(r.flags["clean_correct"], clean > 0)


# --------------------------------------------------------------------------------------------- cross-checks
def test_torchattacks_cross_check_agrees_on_a_trained_model(digits_model):
    model, x, y = digits_model
    r = evaluate(model, x, y, eps=0.08, steps=10, device="cpu", cross_check=True, seed=0)
    assert 0.1 < r.pgd_acc < r.clean_acc  # an attack that does something on a model that learned something
    assert abs(r.pgd_acc - r.cross_check_acc) <= 0.02
    assert r.cross_check_flagged is False and r.flagged is False


def test_a_planted_disagreement_is_flagged(monkeypatch, digits_model):
    model, x, y = digits_model
    monkeypatch.setattr(ev, "_torchattacks_pgd", lambda m, xb, yb, **kw: xb.clone())  # a reference that does nothing
    r = evaluate(model, x, y, eps=0.08, steps=10, device="cpu", cross_check=True)
    assert r.cross_check_acc == r.clean_acc
    assert r.cross_check_flagged is True and r.flagged is True
    assert r.clean_acc - r.pgd_acc > 0.02


def test_a_stronger_reference_lowers_robust_accuracy(monkeypatch):
    """The reference's flags enter the AND: a reference that beats every point makes robust_acc 0."""
    model = _mlp(6)
    x, y = _data(60, seed=6)
    with torch.no_grad():
        y = model(x).argmax(1)
    monkeypatch.setattr(ev, "_torchattacks_pgd", lambda m, xb, yb, **kw: torch.zeros_like(xb) + 0.5)
    r = evaluate(model, x, y, eps=0.01, steps=2, device="cpu", cross_check=True)
    with torch.no_grad():
        mid = model(torch.full_like(x[:1], 0.5)).argmax(1)
    assert torch.equal(r.flags["cross_check_robust"], y == mid)
    assert torch.equal(r.flags["robust"], r.flags["pgd_robust"] & r.flags["fgsm_robust"] & (y == mid))
    assert 0 < int((y == mid).sum()) < 60


def test_autoattack_missing_gives_a_clear_import_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    x, y = _data(8)
    with pytest.raises(ImportError, match="pyautoattack"):
        evaluate(_mlp(), x, y, eps=0.1, device="cpu", autoattack=True)


def _autoattack_case(digits_model, eps, n):
    pytest.importorskip("pyautoattack")  # optional extra
    model, x, y = digits_model
    r = evaluate(model, x[:n], y[:n], eps=eps, steps=10, device="cpu", autoattack=True, fgsm=False)
    f = r.flags
    assert torch.equal(f["robust"], f["clean_correct"] & f["pgd_robust"] & f["autoattack_robust"])
    assert r.autoattack_acc <= r.clean_acc and r.attacks[-1] == "autoattack-standard"
    assert r.autoattack_flagged == (abs(r.pgd_acc - r.autoattack_acc) > 0.02)
    return r


def test_autoattack_runs_and_enters_the_worst_case(digits_model):
    """At a large radius APGD-CE breaks every point and AutoAttack stops early (fast)."""
    r = _autoattack_case(digits_model, 0.3, 12)
    assert r.autoattack_acc == 0.0


@pytest.mark.slow
def test_autoattack_at_a_moderate_radius(digits_model):
    """All four attacks of the standard ensemble run (Square's 5000 queries included: slow on CPU)."""
    r = _autoattack_case(digits_model, 0.08, 24)
    assert r.autoattack_acc <= r.pgd_acc + 0.02 or r.autoattack_flagged


# --------------------------------------------------------------------------------------------- resume
def test_resume_after_an_interruption_gives_identical_flags(tmp_path, monkeypatch):
    model = _mlp(7, h=16)
    x, y = _data(100, seed=7)
    kw = dict(eps=0.06, steps=3, restarts=2, batch_size=20, device="cpu", seed=11, cross_check=True)
    full = evaluate(model, x, y, **kw)
    ckpt = tmp_path / "eval.pt"
    calls = {"n": 0}
    real = ev.pgd

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] > 5:  # 2 restarts per batch: dies during the third batch
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "pgd", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, x, y, checkpoint=ckpt, **kw)
    monkeypatch.setattr(ev, "pgd", real)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["next_batch"] == 2 and int(saved["flags"]["evaluated"].sum()) == 40
    resumed = evaluate(model, x, y, checkpoint=ckpt, **kw)
    assert resumed.resumed_batches == 2
    for k in full.flags:
        assert torch.equal(full.flags[k], resumed.flags[k]), k
    assert resumed.robust_acc == full.robust_acc
    # resuming from flags (a dict or the checkpoint's path) skips the work as well
    again = evaluate(model, x, y, flags=resumed.flags, **kw)
    assert again.resumed_batches == 5 and torch.equal(again.flags["robust"], full.flags["robust"])
    again = evaluate(model, x, y, flags=str(ckpt), **kw)
    assert again.resumed_batches == 5


def test_a_checkpoint_of_another_evaluation_is_refused(tmp_path):
    model = _mlp(8, h=8)
    x, y = _data(30, seed=8)
    ckpt = tmp_path / "e.pt"
    evaluate(model, x, y, eps=0.05, steps=2, device="cpu", checkpoint=ckpt)
    with pytest.raises(ValueError, match="flags: .*differs in .*'eps'"):
        evaluate(model, x, y, eps=0.07, steps=2, device="cpu", checkpoint=ckpt)
    with pytest.raises(ValueError, match="flags"):
        evaluate(model, x, y, eps=0.05, steps=2, restarts=2, device="cpu", checkpoint=ckpt)


# --------------------------------------------------------------------------------------------- models and state
class _Fixed(nn.Module):
    """A fixed linear map held as a plain attribute: no parameters, no buffers."""

    def __init__(self):
        super().__init__()
        self.w = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return x @ self.w


def test_a_parameter_free_model_works():
    model = nn.Sequential(nn.Flatten(), _Fixed())
    assert not list(model.parameters()) and not list(model.buffers())
    x, y = _data(50, seed=9)
    r = evaluate(model, x, y, eps=0.05, steps=3, device="cpu", cross_check=True)
    with torch.no_grad():
        assert r.clean_acc == float((model(x).argmax(1) == y).double().mean())
    assert r.cross_check_acc is not None and r.pgd_acc <= r.clean_acc


class _Spy(nn.Module):
    def __init__(self):
        super().__init__()
        self.modes = []
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(64)
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        self.modes.append(self.training)
        return self.lin(self.drop(self.bn(x.flatten(1))))


def test_attacks_run_in_eval_mode_and_the_state_is_restored():
    model = _Spy()
    model.train()
    model.lin.weight.grad = torch.ones_like(model.lin.weight)
    model.lin.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data(40, seed=10)
    r = evaluate(model, x, y, eps=0.05, steps=2, device="cpu", cross_check=True)
    assert r.model_mode == "eval" and model.modes and not any(model.modes)
    assert model.training and model.drop.training and model.bn.training
    assert torch.equal(model.lin.weight.grad, torch.ones_like(model.lin.weight))
    assert not model.lin.bias.requires_grad and model.lin.weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_evaluation_matches_cpu_clean_and_returns_the_model():
    model = _mlp(11)
    x, y = _data(300, seed=11)
    rc = evaluate(model, x, y, eps=0.05, device="cpu")
    rg = evaluate(model, x, y, eps=0.05, device="cuda", cross_check=True)
    assert rg.device.startswith("cuda") and rg.clean_acc == rc.clean_acc
    assert abs(rg.pgd_acc - rc.pgd_acc) <= 0.05 and abs(rg.pgd_acc - rg.cross_check_acc) <= 0.03
    assert next(model.parameters()).device.type == "cpu"


# --------------------------------------------------------------------------------------------- bad input
_X, _Y = _data(10)

BAD = [
    (dict(eps=-0.1), ValueError, "eps"),
    (dict(eps=1.5), ValueError, "eps"),
    (dict(eps=0.1, norm="l1"), ValueError, "norm"),
    (dict(eps=0.1, steps=0), ValueError, "steps"),
    (dict(eps=0.1, restarts=0), ValueError, "restarts"),
    (dict(eps=0.1, batch_size=0), ValueError, "batch_size"),
    (dict(eps=0.1, alpha=-1.0), ValueError, "alpha"),
    (dict(eps=0.1, seed=-1), ValueError, "seed"),
    (dict(eps=0.1, y=_Y[:9]), ValueError, "y"),
    (dict(eps=0.1, y=_Y.float()), TypeError, "y"),
    (dict(eps=0.1, y=_Y + 20), ValueError, "y"),
    (dict(eps=0.1, x=_X * 2), ValueError, "x"),
    (dict(eps=0.1, x=_X - 0.5), ValueError, "x"),
    (dict(eps=0.1, x=torch.where(_X > 0.9, torch.nan, _X)), ValueError, "x"),
    (dict(eps=0.1, x=torch.where(_X > 0.9, torch.inf, _X)), ValueError, "x"),
    (dict(eps=0.1, x=(_X * 255).long()), TypeError, "x"),
    (dict(eps=0.1, model=lambda t: t), TypeError, "model"),
    (dict(eps=0.1, model=nn.Sequential(nn.Flatten(), nn.Linear(64, 1), nn.Flatten(0))), ValueError, "model"),
    (dict(eps=0.1, device="tpu"), ValueError, "device"),
    (dict(eps=0.1, checkpoint=3), TypeError, "checkpoint"),
    (dict(eps=0.1, flags={"clean_correct": torch.zeros(10, dtype=torch.bool)}), ValueError, "flags"),
]


@pytest.mark.parametrize("kw,exc,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_naming_the_argument(kw, exc, name, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("validation must come before any attack")

    monkeypatch.setattr(ev, "pgd", boom)
    monkeypatch.setattr(ev, "_fgsm", boom)
    kw = dict(kw)
    model = kw.pop("model", _mlp())
    x, y = kw.pop("x", _X), kw.pop("y", _Y)
    with pytest.raises(exc, match=f"^{name}"):
        evaluate(model, x, y, **{"device": "cpu", **kw})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_names_device():
    with pytest.raises(ValueError, match="^device: .*CUDA is not available"):
        evaluate(_mlp(), _X, _Y, eps=0.1, device="cuda")


@settings(max_examples=6)
@given(n=st.integers(1, 23), bs=st.integers(1, 9), seed=st.integers(0, 3))
def test_flags_do_not_depend_on_how_many_batches_ran_before(n, bs, seed):
    """Property: a batch's flags are a function of (seed, batch index, its points); the first batch of
    a run over x[:bs] equals the first batch of a run over all of x."""
    model = _mlp(12, h=8)
    x, y = _data(n, seed=seed)
    whole = evaluate(model, x, y, eps=0.1, steps=2, batch_size=bs, device="cpu", seed=seed)
    head = evaluate(model, x[:bs], y[:bs], eps=0.1, steps=2, batch_size=bs, device="cpu", seed=seed)
    assert torch.equal(whole.flags["robust"][:bs], head.flags["robust"])
    assert isinstance(whole, EvalResult)
    assert math.isclose(whole.robust_acc, float(whole.flags["robust"].double().mean()))

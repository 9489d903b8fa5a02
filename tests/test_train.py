"""empirical.train.adversarial_train: Madry PGD-AT against a hand-written loop, masks, determinism,
resume after a kill (bit-identical), bad input before any work."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from empirical import train as train_mod
from empirical.train import adversarial_train, epoch_generator, pruned_nonzeros
from ntk_theory.attacks import pgd
from ntk_theory.layers import NTKLinear
from ntk_theory.masks import apply_mask, random_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(n=96, n_test=32, d=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(k, d, generator=g)
    y = torch.arange(n + n_test) % k
    x = (centres[y] + 0.15 * torch.randn(n + n_test, d, generator=g)).clamp(0, 1)  # test data, built once
    return SimpleNamespace(x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])


def _mlp(d=12, width=32, k=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return nn.Sequential(NTKLinear(d, width, generator=g, dtype=dtype), nn.ReLU(),
                         NTKLinear(width, width, generator=g, dtype=dtype), nn.ReLU(),
                         NTKLinear(width, k, generator=g, dtype=dtype))


def _hand_loop(model, data, *, eps, steps, epochs, batch_size, lr, momentum, weight_decay, seed, alpha=None):
    """Madry PGD-AT written out: per epoch, the documented generator, a permutation, PGD in eval mode,
    SGD on the mean cross-entropy of the PGD points."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = data.x_train.shape[0]
    for epoch in range(1, epochs + 1):
        gen = epoch_generator(seed, epoch)
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            xb, yb = data.x_train[order[i:i + batch_size]], data.y_train[order[i:i + batch_size]]
            model.eval()
            xa = pgd(model, xb, yb, eps=eps, alpha=alpha, steps=steps, generator=gen) if eps > 0 else xb
            model.train()
            loss = F.cross_entropy(model(xa), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


KW = dict(eps=0.1, steps=3, epochs=2, batch_size=32, lr=0.5, momentum=0.9, weight_decay=1e-3, seed=3)


def test_equals_hand_written_madry_loop():
    data = _data()
    res = adversarial_train(_mlp(), data, progress=False, **KW)
    ref = _hand_loop(_mlp(), data, **KW)
    for (k, a), (_, b) in zip(res.model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    assert [h["epoch"] for h in res.history] == [0, 1, 2]
    assert res.history[0]["train_loss"] is None and res.history[-1]["train_loss"] > 0


def test_standard_training_eps0_equals_plain_sgd():
    data = _data()
    kw = {**KW, "eps": 0.0}
    res = adversarial_train(_mlp(), data, progress=False, **kw)
    ref = _hand_loop(_mlp(), data, **kw)
    assert all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), ref.state_dict().values()))
    # without an attack, the robust accuracy of the batches is the clean one
    assert all(h["train_acc"] == h["robust_train_acc"] for h in res.history[1:])


def test_model_not_mutated_and_result_on_cpu():
    m = _mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = adversarial_train(m, _data(), progress=False, **KW)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.device.type == "cpu" for p in res.model.parameters())
    assert res.device == "cpu" and res.to_dict()["history"][0]["epoch"] == 0


def test_learns_a_separable_task():
    # the robust training accuracy at eps = 0.05 rises well above chance (1/3) on well separated classes
    data = _data(n=192, seed=1)
    res = adversarial_train(_mlp(), data, eps=0.05, steps=5, epochs=15, batch_size=32, lr=1.0, seed=0,
                            progress=False)
    assert res.history[-1]["robust_train_acc"] > 0.8
    assert res.history[-1]["test_acc"] > 0.8


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("rescale", [False, True])
def test_pruned_weights_stay_exactly_zero_after_every_step(monkeypatch, optimizer, rescale):
    model = _mlp()
    mask = random_mask(model, 0.3, generator=1)
    seen, trained = [], {}
    real_apply, real_make = train_mod.apply_mask, train_mod._make_optimizer

    def spy_apply(m, mk, rescale=False):
        trained["model"] = m
        return real_apply(m, mk, rescale=rescale)

    def spy_make(*a, **k):
        opt = real_make(*a, **k)
        step = opt.step

        def checked_step(*sa, **sk):
            out = step(*sa, **sk)
            seen.append(pruned_nonzeros(trained["model"]))
            return out
        opt.step = checked_step
        return opt

    monkeypatch.setattr(train_mod, "apply_mask", spy_apply)
    monkeypatch.setattr(train_mod, "_make_optimizer", spy_make)
    res = adversarial_train(model, _data(), mask=mask, rescale=rescale, optimizer=optimizer,
                            **{**KW, "lr": 0.05 if optimizer == "adam" else 0.5})
    assert len(seen) == 2 * 3 and set(seen) == {0}
    # the kept weights moved, the pruned ones did not (raw and effective)
    w = res.model[2].parametrizations.weight.original
    assert not torch.equal(w[mask["2.weight"]], model[2].weight[mask["2.weight"]])
    assert pruned_nonzeros(res.model) == 0
    assert torch.all(res.model[2].weight[~mask["2.weight"]] == 0)


def test_masked_training_equals_hand_loop_on_masked_model():
    data = _data()
    mask = random_mask(_mlp(), 0.5, generator=2)
    res = adversarial_train(_mlp(), data, mask=mask, rescale=True, progress=False, **KW)
    ref = apply_mask(_mlp(), mask, rescale=True)
    with torch.no_grad():  # what adversarial_train documents: pruned raw weights set to zero first
        for name, m in mask.items():
            mod, t = name.rsplit(".", 1)
            getattr(ref.get_submodule(mod).parametrizations, t).original.masked_fill_(~m, 0.0)
    ref = _hand_loop(ref, data, **KW)
    for k, v in ref.state_dict().items():
        assert torch.equal(res.model.state_dict()[k], v), k


def test_deterministic_for_a_seed_and_seed_matters():
    data = _data()
    a = adversarial_train(_mlp(), data, progress=False, **KW).model.state_dict()
    b = adversarial_train(_mlp(), data, progress=False, **KW).model.state_dict()
    c = adversarial_train(_mlp(), data, progress=False, **{**KW, "seed": 4}).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_track_called_at_init_and_each_epoch_in_eval_mode():
    calls = []

    def track(epoch, model):
        calls.append((epoch, model.training))
        return {"w_norm": float(sum(p.detach().norm() ** 2 for p in model.parameters()))}

    res = adversarial_train(_mlp(), _data(), track=track, progress=False, **KW)
    assert calls == [(0, False), (1, False), (2, False)]
    assert all("w_norm" in h for h in res.history)
    assert res.history[0]["w_norm"] != res.history[2]["w_norm"]


def test_schedules():
    f = train_mod._schedule_fn
    assert [f("step", 8)(t) for t in (0, 3, 4, 5, 6, 7)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert f("cosine", 4)(0) == 1.0 and f("cosine", 4)(2) == pytest.approx(0.5)
    res = adversarial_train(_mlp(), _data(), schedule="step", progress=False, **{**KW, "epochs": 4})
    assert [h["lr"] for h in res.history[1:]] == pytest.approx([0.5, 0.5, 0.05, 0.005])
    with pytest.raises(ValueError, match="schedule"):
        adversarial_train(_mlp(), _data(), schedule=lambda t: -1.0, progress=False, **KW)


def test_mse_loss_trains():
    res = adversarial_train(_mlp(), _data(), loss="mse", progress=False, **{**KW, "epochs": 3})
    losses = [h["train_loss"] for h in res.history[1:]]
    assert losses[-1] < losses[0]


def test_divergence_is_an_error_not_nan():
    with pytest.raises(FloatingPointError, match="lr"):
        adversarial_train(_mlp(), _data(), progress=False, **{**KW, "lr": 1e30, "epochs": 3})


@pytest.mark.parametrize("kw, match", [
    ({"eps": -0.1}, "eps"), ({"norm": "l1"}, "norm"), ({"batch_size": 0}, "batch_size"),
    ({"optimizer": "rmsprop"}, "optimizer"), ({"loss": "hinge"}, "loss"), ({"lr": 0.0}, "lr"),
    ({"momentum": 1.0}, "momentum"), ({"steps": 0}, "steps"), ({"epochs": -1}, "epochs"),
    ({"device": "tpu"}, "device"), ({"schedule": "linear"}, "schedule"), ({"seed": -1}, "seed"),
    ({"mask": {"2.weight": torch.ones(3, 3, dtype=torch.bool)}}, "mask|shape"),
    ({"mask": {"nope.weight": torch.ones(3, 3, dtype=torch.bool)}}, "nope"),
])
def test_bad_input_raises_before_anything_is_written(tmp_path, kw, match):
    ck = tmp_path / "ck"
    with pytest.raises((ValueError, TypeError), match=match):
        adversarial_train(_mlp(), _data(), checkpoint_dir=ck, progress=False, **{**KW, **kw})
    assert not ck.exists()


def test_bad_data_raises(tmp_path):
    d = _data()
    with pytest.raises(ValueError, match=r"x_train.*\[0, 1\]"):
        adversarial_train(_mlp(), SimpleNamespace(**{**vars(d), "x_train": d.x_train * 3}), progress=False, **KW)
    nan = d.x_train.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x_train"):
        adversarial_train(_mlp(), SimpleNamespace(**{**vars(d), "x_train": nan}), progress=False, **KW)
    with pytest.raises(TypeError, match="data"):
        adversarial_train(_mlp(), (d.x_train, d.y_train), progress=False, **KW)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ValueError, match="CUDA"):
        adversarial_train(_mlp(), _data(), device="cuda", progress=False, **KW)


def test_checkpoint_resume_in_process_and_config_mismatch(tmp_path):
    data = _data()
    full = adversarial_train(_mlp(), data, progress=False, **{**KW, "epochs": 4})
    ck = tmp_path / "ck"
    adversarial_train(_mlp(), data, checkpoint_dir=ck, progress=False, **{**KW, "epochs": 4})
    # a finished checkpoint: the rerun trains nothing and returns the same model and history
    again = adversarial_train(_mlp(), data, checkpoint_dir=ck, progress=False, **{**KW, "epochs": 4})
    assert again.resumed_from == 4
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), again.model.state_dict().values()))
    with pytest.raises(ValueError, match="checkpoint_dir.*lr"):
        adversarial_train(_mlp(), data, checkpoint_dir=ck, progress=False, **{**KW, "epochs": 4, "lr": 0.1})


class _StatefulTracker:
    """A tracker with state (like KernelTracker's initial kernel): train saves and restores it."""

    def __init__(self):
        self.init = None

    def __call__(self, epoch, model):
        v = float(model[0].weight.detach().sum())
        if self.init is None:
            self.init = v
        return {"drift": v - self.init}

    def state_dict(self):
        return {"init": self.init}

    def load_state_dict(self, d):
        self.init = d["init"]


_CHILD = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import test_train as T
    from empirical import train as train_mod
    real = train_mod.atomic_torch_save
    def slow_save(path, obj):
        out = real(path, obj)
        time.sleep(0.3)   # leave the parent time to kill between epochs and inside them
        return out
    train_mod.atomic_torch_save = slow_save
    train_mod.adversarial_train(T._mlp(), T._data(n=192), checkpoint_dir={ck!r}, track=T._StatefulTracker(),
                                progress=False, **{{**T.KW, "epochs": 6}})
""")


def test_resume_after_kill_is_bit_identical(tmp_path):
    torch.set_num_threads(1)
    ck = tmp_path / "ck"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo=REPO, tests=os.path.join(REPO, "tests"), ck=str(ck)))
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    path = ck / train_mod.CHECKPOINT
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if path.exists() and torch.load(path, weights_only=False)["epoch"] >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"the training subprocess ended early with status {proc.returncode}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = torch.load(path, weights_only=False)["epoch"]
    assert 2 <= killed_at < 6
    resumed = adversarial_train(_mlp(), _data(n=192), checkpoint_dir=ck, track=_StatefulTracker(), progress=False,
                                **{**KW, "epochs": 6})
    assert resumed.resumed_from == killed_at
    whole = adversarial_train(_mlp(), _data(n=192), track=_StatefulTracker(), progress=False, **{**KW, "epochs": 6})
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in whole.history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history] == strip
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]  # no temporary file left behind


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    data = _data()
    kw = {**KW, "eps": 0.0}
    cpu = adversarial_train(_mlp(dtype=torch.float64), data, device="cpu", progress=False, **kw)
    gpu = adversarial_train(_mlp(dtype=torch.float64), data, device="cuda", progress=False, **kw)
    assert gpu.device.startswith("cuda")
    for a, b in zip(cpu.model.state_dict().values(), gpu.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)

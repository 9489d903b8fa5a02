"""Kernel-form adversarial training (README performance table).

``test_infinite_adversarial_kernel_step_N512``: one step of the infinite-width adversarial kernel
simulation on N=512 MNIST-sized inputs (d=784, ReLU MLP kernel with 2 hidden layers): PGD-10
against the kernel predictor with 512 centres (forward and input-backward through the closed-form
NTK, 10 times), the kernel update and the recording of train/adversarial outputs.
``train_steps=1`` runs exactly one such step (step 0 is free: the predictor starts at f_0 = 0 and
needs no attack).

``test_infinite_at2_growth_N32``: the README's AT-2 example at N=32 (d=784, 16 probe points,
PGD-10, eps=0.1) for 10/20/40/100 training steps, one round each: a step's cost grows linearly
with the number of past adversarial sets (its attack evaluates the kernel against all of
them), so the total grows quadratically in ``train_steps``.
"""
from __future__ import annotations

import pytest
import torch

from ntk_theory.adversarial import adversarial_kernel_training
from ntk_theory.infinite import mlp


def test_infinite_adversarial_kernel_step_N512(benchmark):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 784, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (512,), generator=g), 10).double()
    k = mlp(2)

    def run():
        return adversarial_kernel_training(k, x, y, train_steps=1, lr=1.0, eps=0.1, steps=10, generator=1)

    traj = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert traj.robust_loss[-1] >= traj.clean_loss[-1]


@pytest.mark.parametrize("train_steps", [10, 20, 40, 100])
def test_infinite_at2_growth_N32(benchmark, train_steps):
    benchmark.group = "at2-infinite-N32-d784-growth"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 784, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (32,), generator=g), 10).double()
    xt = torch.rand(16, 784, generator=g, dtype=torch.float64)

    def run():
        return adversarial_kernel_training(mlp(2), x, y, train_steps=train_steps, lr=1.0, eps=0.1, x_test=xt,
                                           generator=1)

    traj = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    assert traj.clean_loss[-1] < traj.clean_loss[0]

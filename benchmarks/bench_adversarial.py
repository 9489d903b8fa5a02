"""Kernel-form adversarial training (README performance table).

One step of the infinite-width adversarial kernel simulation on N=512 MNIST-sized inputs
(d=784, ReLU MLP kernel with 2 hidden layers): PGD-10 against the kernel predictor with 512
centres (forward and input-backward through the closed-form NTK, 10 times), the kernel
update and the recording of train/adversarial outputs. ``steps=1`` runs exactly one such
step (step 0 is free: the predictor starts at f_0 = 0 and needs no attack).
"""
from __future__ import annotations

import torch

from ntk_theory.adversarial import adversarial_kernel_training
from ntk_theory.infinite import mlp


def test_infinite_adversarial_kernel_step_N512(benchmark):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 784, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (512,), generator=g), 10).double()
    k = mlp(2)

    def run():
        return adversarial_kernel_training(k, x, y, steps=1, lr=1.0, eps=0.1, attack_steps=10,
                                           generator=torch.Generator().manual_seed(1))

    traj = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert traj.robust_loss[-1] >= traj.clean_loss[-1]

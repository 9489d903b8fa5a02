"""awt's experiments: everything that trains (DESIGN.md "Layout").

* :mod:`empirical.data`       digits (offline default), mnist / fashion_mnist (IDX), cifar10 (pickles), synthetic
* :mod:`empirical.models`     mlp, lenet300_100, lenet5, conv4 in the NTK or standard parameterisation
* :mod:`empirical.train`      PGD adversarial training of dense and masked networks, checkpoints, resume
* :mod:`empirical.evaluate`   clean / FGSM / PGD-k with restarts; torchattacks / AutoAttack cross-checks
* :mod:`empirical.tracking`   kernel and output trajectories on a fixed probe set
* :mod:`empirical.tickets`    ticket search: AWT and baselines, one module per method
* :mod:`empirical.experiment` sweeps of runs, local / Ray / Slurm executors, ``awt experiment``

``empirical`` calls :mod:`ntk_theory` for every attack, mask, kernel and file it writes.
"""

"""awt's importable core: NTK theory of adversarial training, dense and sparse.

Submodules (imported on demand, so ``import ntk_theory`` stays cheap):

* :mod:`ntk_theory.infinite`    closed-form NNGP/NTK kernels (stax-like layers, masked limits)
* :mod:`ntk_theory.empirical`   finite-width NTK of any ``torch.nn.Module`` (structured fast path)
* :mod:`ntk_theory.masks`       sparse masks: random masks, applying them for training
* :mod:`ntk_theory.layers`      finite layers in the NTK parameterisation
* :mod:`ntk_theory.attacks`     FGSM / PGD (l-inf, l2) on any callable
* :mod:`ntk_theory.adversarial` adversarial NTKs, kernel predictors, kernel-form adversarial training
* :mod:`ntk_theory.dynamics`    closed-form linearised MSE dynamics, ``linearize``
* :mod:`ntk_theory.metrics`     kernel distances, alignment, spectra
"""
__version__ = "0.1.0"

"""awt's importable core: NTK theory of adversarial training, dense and sparse.

Submodules (imported on demand, so ``import ntk_theory`` stays cheap):

* :mod:`ntk_theory.infinite`    closed-form NNGP/NTK kernels (stax-like layers, masked limits)
* :mod:`ntk_theory.empirical`   finite-width NTK of any ``torch.nn.Module`` (structured fast path)
* :mod:`ntk_theory.masks`       sparse masks: random masks, applying them for training
* :mod:`ntk_theory.layers`      finite layers in the NTK parameterisation
* :mod:`ntk_theory.activations` the activation registry (module, phi, phi', closed-form layer)
* :mod:`ntk_theory.attacks`     FGSM / PGD (l-inf, l2) on any callable
* :mod:`ntk_theory.adversarial` adversarial NTKs, kernel predictors, kernel-form adversarial training
* :mod:`ntk_theory.dynamics`    closed-form linearised MSE dynamics, ``linearize``
* :mod:`ntk_theory.metrics`     kernel distances, alignment, spectra
* :mod:`ntk_theory.io`          result records (:class:`~ntk_theory.io.Result`) and atomic file writers
* :mod:`ntk_theory.perf`        opt-in process-level performance switches

Conventions at every public boundary: tensors or numpy arrays in (complex refused), inputs that
feed a model cast to the model's dtype and device; randomness through ``generator=`` (an int
seed, a ``torch.Generator`` or ``None``); results are frozen :class:`~ntk_theory.io.Result`
dataclasses with ``to_dict()``. The theory the docstrings cite is ``docs/theory.md``.
"""
__version__ = "0.1.0"

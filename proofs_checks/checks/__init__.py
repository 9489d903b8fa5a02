"""One module per proposition of THEORY.md §C; importing this package registers them all."""
from . import c01_ntk_concentration, c03_masked_scaling, c06_dynamics_perturbation, c07_adversarial_ntk_lipschitz  # noqa: F401,E501

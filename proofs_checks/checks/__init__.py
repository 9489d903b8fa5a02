"""One module per proposition of THEORY.md §C; importing this package registers them all."""
from . import c01_ntk_concentration, c03_masked_scaling, c06_dynamics_perturbation  # noqa: F401

"""One module per proposition of THEORY.md §C; importing this package registers them all."""
from . import c01_ntk_concentration  # noqa: F401

"""Validation helpers used at awt's public boundaries.

Every helper raises ``ValueError`` (or ``TypeError`` for a wrong type) whose
message names the argument, the offending value and what is accepted.  Inside
the library the types are trusted; these run once per public call.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

__all__ = [
    "as_tensor",
    "check_finite",
    "check_rank",
    "check_positive",
    "check_nonnegative",
    "check_density",
    "check_choice",
    "check_int",
    "check_device",
    "as_generator",
    "module_dtype_device",
    "cast_like_model",
    "check_deterministic_forward",
]


def as_tensor(x: Any, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Convert ``x`` (tensor, numpy array or nested sequence) to a tensor.

    Numpy arrays are accepted at the edges (DESIGN.md) and converted without
    copying where possible. ``dtype`` casts floating tensors when given.
    """
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray) or isinstance(x, (list, tuple)):
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as exc:  # pragma: no cover - numpy decides
            raise TypeError(f"{name}: cannot convert {type(x).__name__} to a tensor ({exc})") from exc
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if dtype is not None:
        t = t.to(dtype)
    return t


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """Raise if ``x`` holds NaN or inf (nothing is silently propagated)."""
    if x.is_floating_point() or x.is_complex():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            n_bad = int(bad.sum())
            raise ValueError(f"{name}: contains {n_bad} non-finite value(s) (NaN or inf); all entries must be finite")
    return x


def check_rank(x: torch.Tensor, name: str, ranks: Iterable[int], what: str = "") -> torch.Tensor:
    ranks = tuple(ranks)
    if x.dim() not in ranks:
        accepted = " or ".join(str(r) for r in ranks)
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected a tensor of rank {accepted}{hint}, got shape {tuple(x.shape)}")
    return x


def _num(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name}: got NaN; expected a finite number")
    return v


def check_positive(value: Any, name: str, allow_inf: bool = False) -> float:
    """A real number in (0, inf) (or (0, inf] with ``allow_inf``)."""
    v = _num(value, name)
    if not v > 0 or (math.isinf(v) and not allow_inf):
        rng = "(0, inf]" if allow_inf else "(0, inf)"
        raise ValueError(f"{name}: got {value!r}; accepted range is {rng}")
    return v


def check_nonnegative(value: Any, name: str, allow_inf: bool = False) -> float:
    """A real number in [0, inf) (or [0, inf] with ``allow_inf``)."""
    v = _num(value, name)
    if v < 0 or (math.isinf(v) and not allow_inf):
        rng = "[0, inf]" if allow_inf else "[0, inf)"
        raise ValueError(f"{name}: got {value!r}; accepted range is {rng}")
    return v


def check_density(value: Any, name: str = "density") -> float:
    """A keep-probability q in (0, 1]."""
    v = _num(value, name)
    if not (0.0 < v <= 1.0):
        raise ValueError(f"{name}: got {value!r}; a density (keep-probability) must lie in (0, 1]")
    return v


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: got {value!r}; accepted values are {', '.join(repr(c) for c in choices)}")
    return value


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        lo = "-inf" if minimum is None else str(minimum)
        hi = "inf" if maximum is None else str(maximum)
        raise ValueError(f"{name}: got {v}; accepted range is [{lo}, {hi}]")
    return v


def check_real(x: torch.Tensor, name: str) -> torch.Tensor:
    """Raise ``TypeError`` for complex tensors (their imaginary part would be dropped silently)."""
    if x.is_complex():
        raise TypeError(f"{name}: expected real values, got dtype {x.dtype}")
    return x


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def check_finite_number(value: Any, name: str, what: str = "a finite real number") -> float:
    """A finite real number (``ValueError`` naming the argument otherwise, whatever the type)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    v = float(value) if ok else math.nan
    if not math.isfinite(v):
        raise ValueError(f"{name}: got {value!r}; expected {what}")
    return v


def check_device(device: Any, name: str = "device") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.

    Raises ``ValueError`` naming the argument for an unknown device, and for a CUDA device on a
    machine without CUDA (rather than torch's "not compiled with CUDA" assertion deep inside).
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name}: got {device!r}; accepted values are 'auto', 'cpu', 'cuda', 'cuda:N' "
                         f"or a torch.device") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: got {device!r}, but CUDA is not available on this machine; "
                             f"use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: got {device!r}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise ValueError(f"{name}: got {device!r}; accepted values are 'auto', 'cpu', 'cuda', 'cuda:N'")
    return dev


def as_generator(generator: Any, name: str = "generator", device: Any = "cpu") -> torch.Generator | None:
    """awt's one rule for randomness: an int seed or a ``torch.Generator`` (``None``: torch's global RNG).

    An int seeds a fresh generator on ``device``; a generator is returned as it is.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        if generator < 0:
            raise ValueError(f"{name}: got seed {generator}; a seed must be a non-negative integer")
        return torch.Generator(device=torch.device(device)).manual_seed(int(generator))
    raise TypeError(f"{name}: expected a torch.Generator, an int seed or None, got {type(generator).__name__}")


def module_dtype_device(f: Any) -> tuple[torch.dtype | None, torch.device | None]:
    """The floating dtype and the device of a model: those of its first floating parameter, else of
    its first floating buffer; ``(None, None)`` for a callable that is not an ``nn.Module`` or holds
    no floating tensor (a closure: its inputs are used as they come)."""
    if not isinstance(f, torch.nn.Module):
        return None, None
    for t in f.parameters():
        if t.is_floating_point():
            return t.dtype, t.device
    for t in f.buffers():
        if t.is_floating_point():
            return t.dtype, t.device
    return None, None


def cast_like_model(x: Any, name: str, f: Any) -> torch.Tensor:
    """awt's dtype/device rule at a public boundary that feeds a model.

    ``x`` (tensor, numpy array or nested sequence) is converted to a tensor; complex values are
    refused (``TypeError``: the imaginary part would be dropped), integer and boolean ones too
    (``TypeError``: inputs are real floating point); a floating ``x`` is then cast to the dtype
    and moved to the device of the model ``f`` (:func:`module_dtype_device`), so that float64 or
    numpy inputs on a float32 model work, as they do in ``empirical_ntk``. For a callable that is
    not a module (a closure) ``x`` keeps its dtype and device.
    """
    t = check_real(as_tensor(x, name), name)
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    dtype, device = module_dtype_device(f)
    if dtype is not None and (t.dtype != dtype or t.device != device):
        t = t.to(device=device, dtype=dtype)
    return t


def check_deterministic_forward(model: torch.nn.Module, name: str = "model") -> torch.nn.Module:
    """Refuse a model whose forward is random or couples the examples of a batch.

    ``ValueError`` naming ``name`` for a BatchNorm layer in training mode (batch statistics couple
    the examples and its running statistics would be updated) and for dropout with ``p > 0`` in
    training mode (two forwards differ: such a model has no NTK and no linearisation). The rule of
    ``empirical_ntk`` and ``linearize``: call ``model.eval()`` first.
    """
    for mname, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"{name}: {type(m).__name__} {mname!r} is in training mode (batch statistics couple the "
                             "examples and its running statistics would be updated); call model.eval() first")
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(f"{name}: {type(m).__name__} {mname!r} is in training mode with p = {m.p} (a random "
                             "forward has no NTK); call model.eval() first")
    return model

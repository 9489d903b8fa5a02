"""The problem of one kernel: which tensors are differentiated, with which masks, through which
function; the validation of the model, parameters, masks, dtype and inputs (the dtype rule)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.func import functional_call

from .._checks import as_tensor, check_finite, check_real
from ..masks import canonical_name, get_mask, mask_buffer_name, masked_value, split_name, validate_mask, validate_params
from .plan import DEFAULT_BUDGETS, Budgets

__all__ = ["Unsupported", "Problem", "mask_info", "prepare", "prepare_x"]


class Unsupported(Exception):
    """The structured path does not apply (the message says why)."""


@dataclass
class Problem:
    model: nn.Module
    diff: dict[str, torch.Tensor]  # raw name -> differentiated variable (detached, cast)
    fixed: dict[str, torch.Tensor]  # raw name -> other tensors passed to functional_call
    mult: dict[str, torch.Tensor]  # raw name -> forward multiplier of a variable (explicit masks)
    sq: dict[str, object]  # raw name -> squared coefficient dW_module/dvariable: float or tensor
    dtype: torch.dtype
    device: torch.device
    budgets: Budgets = DEFAULT_BUDGETS

    def forward(self, diff: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        tensors = dict(self.fixed)
        for k, v in diff.items():
            tensors[k] = v * self.mult[k] if k in self.mult else v
        out = functional_call(self.model, tensors, (x,))
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"model: must return a tensor, returned {type(out).__name__}")
        if out.dim() == 0 or out.shape[0] != x.shape[0]:
            raise ValueError(f"model: output shape {tuple(out.shape)} has no batch dimension of size {x.shape[0]}")
        return out.reshape(x.shape[0], -1)


def mask_info(model: nn.Module, raw: str):
    """``(mask, scale, buffer name)`` of an awt mask parametrising the raw parameter ``raw``, else None."""
    name = canonical_name(raw)
    if name == raw:
        return None
    prefix, tensor = split_name(name)
    module = model.get_submodule(prefix) if prefix else model
    try:
        info = get_mask(module, tensor)
    except ValueError:  # a foreign parametrisation: its raw tensor is an ordinary variable
        return None
    if info is None:
        return None
    return info[0], info[1], mask_buffer_name(name)


def prepare(model, params, mask, mask_mode, dtype, budgets: Budgets = DEFAULT_BUDGETS) -> Problem:
    """The problem of one kernel: validation of ``model``/``params``/``mask``/``dtype``, the
    differentiated variables cast to the kernel dtype, the fixed tensors (masked where the forward
    is at ``m ⊙ θ``) and the squared coefficients ``∂W/∂variable`` of every variable."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for mname, m in model.named_modules():
        # the per-example NTK needs examples that do not interact and a deterministic forward
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"model: {type(m).__name__} {mname!r} is in training mode (batch statistics couple the "
                             "examples and its running statistics would be updated); call model.eval() first")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(f"model: {type(m).__name__} {mname!r} is in training mode with p = {m.p} (a random "
                             "forward has no NTK); call model.eval() first")
    named = dict(model.named_parameters())
    canon_to_raw = {canonical_name(r): r for r in named}
    if params is None:
        values = {r: p for r, p in named.items() if p.requires_grad}
    else:
        values = validate_params(model, params, "params")
    if not values:
        raise ValueError("params: no parameter to differentiate (the model has no trainable parameter)")
    first = next(iter(values.values()))
    if dtype is None:
        dtype = first.dtype
    elif not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: got {dtype!r}; expected a floating torch.dtype or None")
    if not dtype.is_floating_point:
        raise ValueError(f"params: parameters have dtype {dtype}; pass dtype= a floating dtype")
    device = first.device

    marg: dict[str, torch.Tensor] = {}
    if mask is not None:
        for name, m in validate_mask({canonical_name(r): p for r, p in named.items()}, mask).items():
            marg[canon_to_raw[name]] = m.to(device=named[canon_to_raw[name]].device)
    pinfo = {r: info for r in named if (info := mask_info(model, r)) is not None}
    ntt = mask_mode == "ntt"

    def keep_of(r):
        ks = [t for t in (marg.get(r), pinfo[r][0] if r in pinfo else None) if t is not None]
        return ks[0] if len(ks) == 1 else (ks[0] & ks[1] if ks else None)

    def cast(t):
        return t.detach().to(dtype) if t.is_floating_point() else t.detach()

    fixed: dict[str, torch.Tensor] = {}
    for r, p in named.items():
        if r in values:
            continue
        t = cast(p)
        keep = keep_of(r) if ntt else marg.get(r)
        if keep is not None:  # forward at the masked point m ⊙ θ
            t = masked_value(t, keep)
        fixed[r] = t
    for b, buf in model.named_buffers():
        if buf.is_floating_point() and buf.dtype != dtype:
            fixed[b] = buf.detach().to(dtype)
    if ntt:  # the parametrisation's mask becomes all-True: W = s·w with w = m ⊙ θ held as the variable
        for r, (m, _, buf) in pinfo.items():
            fixed[buf] = torch.ones_like(m)

    diff, mult, sq = {}, {}, {}
    for r, v in values.items():
        t = cast(v)
        scale = pinfo[r][1] if r in pinfo else 1.0
        keep = keep_of(r)
        if ntt:
            diff[r] = t if keep is None else masked_value(t, keep)
            sq[r] = scale * scale
        else:
            diff[r] = t
            if r in marg:
                mult[r] = marg[r].to(dtype)
            sq[r] = scale * scale if keep is None else keep.to(dtype) * (scale * scale)
    return Problem(model, diff, fixed, mult, sq, dtype, device, budgets)


def prepare_x(x, name: str, prob: Problem) -> torch.Tensor:
    """The dtype rule at the boundary: real inputs (any real dtype, numpy included) are cast to the
    kernel dtype; complex ones are refused (a cast would silently drop the imaginary part)."""
    t = check_real(as_tensor(x, name), name)
    if t.dim() < 1 or t.shape[0] < 1:
        raise ValueError(f"{name}: expected a non-empty batch of shape (N, ...), got shape {tuple(t.shape)}")
    check_finite(t, name)
    # a private, detached copy: an in-place first module (ReLU(inplace=True)) must not write into the
    # caller's tensor, and a caller's autograd graph must not reach the kernel
    return t.detach().to(device=prob.device, dtype=prob.dtype, copy=True)

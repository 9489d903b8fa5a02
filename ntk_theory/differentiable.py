r"""The empirical NTK kept differentiable w.r.t. weights and masks (docs/theory.md §B.3, §B.7, §B.8).

Ticket search (AWT, NTT) minimises a distance between the kernel of a sparse network and the dense
one, so the kernel must be a differentiable function of the weights ``θ`` and of the (relaxed) mask
``M``. Differentiating ``vmap(jacrev(f))`` a second time works but materialises the per-example
Jacobians (``N O x P`` numbers) and their graph. This module instead builds the kernel from the
structured factorisation, with an explicit forward recursion and an explicit backward recursion of
the signals, all inside the ordinary autograd graph, so that ``loss.backward()`` gives
``∂loss/∂θ`` and ``∂loss/∂M`` without any Jacobian.

For a network ``z_l = g_l (M_l ⊙ θ_l) h_{l-1} + b_l^g b_l``, ``h_l = φ(z_l)`` (``g_l`` the
``weight_gain`` of :func:`ntk_theory.layers.gains`, 1 for a plain ``nn.Linear``), the forward pass
records the inputs ``h_{l-1}(x)`` and pre-activations, the backward pass the signals
``δ_l^o(x) = ∂f_o(x)/∂z_l`` (``δ_L^o = e_o``; ``δ_{l-1} = (δ_l W_l) ⊙ φ'(z_{l-1})``), and

    Θ(x, x')[o, o'] = Σ_l g_l² Σ_{i,j} C_l[i, j] δ_l^o(x)_i δ_l^{o'}(x')_i h_{l-1}(x)_j h_{l-1}(x')_j
                     + Σ_l (b_l^g)² Σ_i C^b_l[i] δ_l^o(x)_i δ_l^{o'}(x')_i ,

with the coefficient ``C = ∂W_eff/∂θ`` squared: ``C = M ∘ M`` for the sub-network kernel
``J(M⊙θ) diag(M²) J(M⊙θ)ᵀ`` (``mask_mode="subnetwork"``, the default; docs/theory.md §B.3), or ``C = 1``
(times the parametrisation's ``scale²``) for ``mask_mode="ntt"``, the dense-architecture kernel at the
masked weights that Neural Tangent Transfer's code computes (Liu & Zenke 2020). ``C = 1`` on an
unmasked layer gives the two-GEMM form ``g² (Δ Δ'ᵀ) ⊙ (H H'ᵀ)``; a masked layer costs one
``(N1 N2 x K) @ (K x C_out)`` GEMM more (``G[c, n, n'] = Σ_j C[c, j] h_j(x_n) h_j(x'_{n'})``).

``coefficients=`` replaces ``C`` by any tensor (a straight-through estimator passes ``C = M`` with
``M = hard + (s - s.detach())``: the same value as ``M ∘ M`` for a 0/1 mask, but a gradient that
reaches pruned entries, whose ``∂(M²)/∂M`` is 0).

Supported models: an ``nn.Sequential`` (nested ones are flattened) of ``nn.Linear`` /
:class:`~ntk_theory.layers.NTKLinear` (awt masks from :func:`ntk_theory.masks.apply_mask` are read:
``M = scale · mask``), ``nn.Flatten`` (the default ``start_dim=1``), ``nn.Identity``, ``nn.Dropout``
in eval mode, and every activation of :mod:`ntk_theory.activations` (ReLU, LeakyReLU, Tanh, Sigmoid,
ErfActivation). Convolutions are not supported yet (``ValueError``; use
:func:`ntk_theory.empirical.empirical_ntk` for their non-differentiable kernel).

``method="jacobian"`` computes the same kernel through ``torch.func.vmap(jacrev)`` of
``θ ↦ f(M ⊙ θ)`` contracted with the coefficients, differentiable as well (torch.func transforms
compose with autograd): the reference of the tests and the baseline of ``benchmarks/bench_tickets.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ._checks import as_tensor, check_choice, check_finite, check_real
from .activations import activation_of
from .layers import gains
from .masks import canonical_name, get_mask

__all__ = ["Step", "plan", "differentiable_ntk", "forward", "MODES", "MASK_MODES", "METHODS"]

MODES = ("full", "trace")
MASK_MODES = ("subnetwork", "ntt")
METHODS = ("structured", "jacobian")


@dataclass(frozen=True)
class Step:
    """One step of a model's plan: ``kind`` is ``"linear"``, ``"act"`` or ``"flatten"``.

    ``name`` is the module's path (the prefix of its canonical parameter names), ``module`` the module,
    ``gw``/``gb`` the gains of a linear step, ``act`` the registry entry of an activation and ``kw``
    its parameters (``{"alpha": s}`` for LeakyReLU)."""

    kind: str
    name: str
    module: nn.Module
    gw: float = 1.0
    gb: float = 1.0
    act: object = None
    kw: tuple = ()


def plan(model: nn.Module) -> list[Step]:
    """The steps of a supported ``nn.Sequential`` (see the module docstring), or ``ValueError`` naming
    ``model`` and the first unsupported module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Sequential, got {type(model).__name__}")
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model: the differentiable NTK supports nn.Sequential models, got {type(model).__name__}")
    steps: list[Step] = []

    def walk(seq: nn.Sequential, prefix: str) -> None:
        for key, m in seq.named_children():
            name = f"{prefix}{key}"
            if isinstance(m, nn.Sequential):
                walk(m, name + ".")
                continue
            if isinstance(m, nn.Linear):
                g = gains(m)
                if g is None:
                    raise ValueError(f"model: module {name!r} ({type(m).__name__}) has a forward of its own; "
                                     "only nn.Linear / NTKLinear are supported")
                steps.append(Step("linear", name, m, gw=g[0], gb=g[1]))
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise ValueError(f"model: nn.Flatten {name!r} must flatten from dim 1 to -1")
                steps.append(Step("flatten", name, m))
            elif isinstance(m, nn.Dropout) and (not m.training or m.p == 0):
                continue
            elif (act := activation_of(m)) is not None:
                steps.append(Step("act", name, m, act=act, kw=tuple(act.params(m).items())))
            else:
                raise ValueError(f"model: module {name!r} ({type(m).__name__}) is not supported by the differentiable "
                                 "NTK (nn.Sequential of Linear/NTKLinear, Flatten and registered activations); "
                                 "ntk_theory.empirical.empirical_ntk computes its kernel without gradients")

    walk(model, "")
    if not any(s.kind == "linear" for s in steps):
        raise ValueError("model: has no nn.Linear layer")
    return steps


def _layer_tensors(step: Step, weights, masks, coefficients, mask_mode: str):
    """``(θ_w, M_w, C_w, θ_b, M_b, C_b)`` of a linear step (``None`` where absent or dense)."""
    m = step.module
    out = []
    for tensor in ("weight", "bias"):
        cname = f"{step.name}.{tensor}" if step.name else tensor
        info = get_mask(m, tensor)
        if info is None:
            theta = getattr(m, tensor)
            M = None
        else:
            theta = m.parametrizations[tensor].original
            M = info[0].to(theta.dtype) * info[1]
            base_sq = info[1] ** 2
        if theta is None:
            out += [None, None, None]
            continue
        if weights is not None and cname in weights:
            theta = weights[cname]
        if masks is not None and cname in masks:
            extra = masks[cname]
            M = extra if M is None else M * extra
        if coefficients is not None and cname in coefficients:
            C = coefficients[cname]
        elif M is None:
            C = None
        elif mask_mode == "subnetwork":
            C = M * M
        else:
            C = None if info is None else base_sq  # dense architecture at the masked weights
        out += [theta, M, C]
    return out


def _validate_dict(d, name, model):
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise TypeError(f"{name}: expected a dict of canonical parameter name -> tensor, got {type(d).__name__}")
    shapes = {canonical_name(k): v.shape for k, v in model.named_parameters()}
    out = {}
    for k, v in d.items():
        key = canonical_name(k) if isinstance(k, str) else k
        if key not in shapes:
            raise ValueError(f"{name}: key {k!r} is not a parameter of the model")
        if not isinstance(v, torch.Tensor):
            if name == "coefficients" and isinstance(v, (int, float)):
                out[key] = v
                continue
            raise TypeError(f"{name}[{k!r}]: expected a tensor, got {type(v).__name__}")
        if v.shape != shapes[key]:
            raise ValueError(f"{name}[{k!r}]: shape {tuple(v.shape)} differs from the parameter's {tuple(shapes[key])}")
        if not v.is_floating_point():
            raise ValueError(f"{name}[{k!r}]: expected a floating tensor (a 0/1 or relaxed mask), got {v.dtype}")
        out[key] = v
    return out


def _run(steps, x, weights, masks, coefficients, mask_mode):
    """Forward recursion: output ``(N, O)`` and per linear step ``(input h, W_eff, C_w, bias gain·?, C_b)``;
    per activation step its pre-activation."""
    h = x
    records = []
    for s in steps:
        if s.kind == "flatten":
            h = h.reshape(h.shape[0], -1)
            records.append(None)
        elif s.kind == "act":
            records.append(h)
            h = s.act.phi(h, **dict(s.kw))
        else:
            tw, Mw, Cw, tb, Mb, Cb = _layer_tensors(s, weights, masks, coefficients, mask_mode)
            W = tw if Mw is None else Mw * tw
            z = s.gw * (h @ W.T)
            if tb is not None:
                b = tb if Mb is None else Mb * tb
                z = z + s.gb * b
            records.append((h, W, Cw, tb is not None, Cb))
            h = z
    if h.dim() != 2:
        raise ValueError(f"model: output shape {tuple(h.shape)}; expected (N, O)")
    return h, records


def _signals(steps, records, O: int, N: int, like: torch.Tensor):
    """Backward recursion of ``δ_l^o = ∂f_o/∂z_l`` ``(O, N, C_l)`` for every linear step (in order)."""
    d = torch.eye(O, dtype=like.dtype, device=like.device)[:, None, :].expand(O, N, O)
    first = next(i for i, s in enumerate(steps) if s.kind == "linear")
    out = {}
    for i in range(len(steps) - 1, first - 1, -1):
        s, r = steps[i], records[i]
        if s.kind == "linear":
            out[i] = d
            if i > first:
                d = s.gw * (d @ r[1])
        elif s.kind == "act":
            d = d * s.act.dphi(r, **dict(s.kw))
        # flatten: the signals are (O, N, features) already (only a leading Flatten is supported)
    return out


def _layer_kernel(d1, d2, h1, h2, gw, C, mode: str):
    """One weight tensor's term: ``g² Σ_{i,j} C_ij δ_i δ'_i h_j h'_j``; ``(N1, N2)`` or ``(N1, N2, O, O)``."""
    O, N1, Cout = d1.shape
    N2 = d2.shape[1]
    if C is None or not isinstance(C, torch.Tensor):
        c = 1.0 if C is None else float(C)
        HH = h1 @ h2.T
        if mode == "trace":
            DD = d1.permute(1, 0, 2).reshape(N1, O * Cout) @ d2.permute(1, 0, 2).reshape(N2, O * Cout).T
            return (gw * gw * c / O) * DD * HH
        DD = (d1.reshape(O * N1, Cout) @ d2.reshape(O * N2, Cout).T).reshape(O, N1, O, N2).permute(1, 3, 0, 2)
        return (gw * gw * c) * DD * HH[:, :, None, None]
    # G[n, n', i] = Σ_j C_ij h_j(x_n) h_j(x'_n')
    P = (h1[:, None, :] * h2[None, :, :]).reshape(N1 * N2, -1)
    G = (P @ C.T).reshape(N1, N2, Cout)
    if mode == "trace":
        A = torch.einsum("onc,omc->nmc", d1, d2)
        return (gw * gw / O) * (A * G).sum(-1)
    T = d1.permute(1, 0, 2)[:, None, :, :] * G[:, :, None, :]  # (N1, N2, O, C)
    return (gw * gw) * (T @ d2.permute(1, 2, 0)[None])  # (N1, N2, O, O)


def _bias_kernel(d1, d2, gb, C, mode: str):
    O, N1, Cout = d1.shape
    N2 = d2.shape[1]
    if C is not None:
        d1 = d1 * C
    if mode == "trace":
        DD = d1.permute(1, 0, 2).reshape(N1, O * Cout) @ d2.permute(1, 0, 2).reshape(N2, O * Cout).T
        return (gb * gb / O) * DD
    DD = (d1.reshape(O * N1, Cout) @ d2.reshape(O * N2, Cout).T).reshape(O, N1, O, N2).permute(1, 3, 0, 2)
    return (gb * gb) * DD


def _inputs(x, name, dtype, device):
    t = check_real(as_tensor(x, name), name)
    if t.dim() < 2 or t.shape[0] < 1:
        raise ValueError(f"{name}: expected a non-empty batch (N, ...), got shape {tuple(t.shape)}")
    if not t.requires_grad:
        check_finite(t, name)
    return t.to(device=device, dtype=dtype)


def _dtype_device(model, weights):
    if weights:
        t = next(iter(weights.values()))
        return t.dtype, t.device
    p = next(model.parameters())
    return p.dtype, p.device


def forward(model: nn.Module, x, *, weights=None, masks=None) -> torch.Tensor:
    """``f(M ⊙ θ; x)`` ``(N, O)`` through the same recursion as :func:`differentiable_ntk` (same arguments)."""
    steps = plan(model)
    weights = _validate_dict(weights, "weights", model)
    masks = _validate_dict(masks, "masks", model)
    dtype, device = _dtype_device(model, weights)
    out, _ = _run(steps, _inputs(x, "x", dtype, device), weights, masks, None, "subnetwork")
    return out


def differentiable_ntk(model: nn.Module, x1, x2=None, *, weights: Mapping[str, torch.Tensor] | None = None,
                       masks: Mapping[str, torch.Tensor] | None = None,
                       coefficients: Mapping[str, torch.Tensor] | None = None, mode: str = "full",
                       mask_mode: str = "subnetwork", method: str = "structured", return_outputs: bool = False):
    """Empirical NTK ``Θ(x1, x2)`` of ``f(M ⊙ θ)``, differentiable w.r.t. ``θ`` and ``M`` (module docstring).

    Args:
        model: a supported ``nn.Sequential`` (MLP of Linear/NTKLinear and activations), masked by
            :func:`ntk_theory.masks.apply_mask` or not. Never mutated.
        x1, x2: inputs ``(N1, ...)``, ``(N2, ...)``; ``x2=None`` means ``x1``. Cast to the weights' dtype.
        weights: ``{canonical name: θ}`` replacing the model's (raw) parameter values; a tensor with
            ``requires_grad`` gets its gradient through the kernel. Default: the model's parameters
            themselves (their ``requires_grad`` decides).
        masks: ``{canonical name: M}`` float masks (0/1, rescaled ``1/sqrt(q)``, or relaxed) multiplying
            ``θ``; combined with (multiplied by) an applied awt mask's ``scale · mask``.
        coefficients: ``{canonical name: C}``, the squared coefficient ``∂W/∂θ`` of the count term,
            overriding the default of ``mask_mode``.
        mode: ``"full"`` -> ``(N1, N2, O, O)``; ``"trace"`` -> ``(N1, N2)``, ``(1/O) Σ_o Θ[:, :, o, o]``
            (the conventions of :func:`ntk_theory.empirical.empirical_ntk`).
        mask_mode: ``"subnetwork"`` (``C = M²``, the sub-network's NTK) or ``"ntt"`` (``C = 1``).
        method: ``"structured"`` (the recursion) or ``"jacobian"`` (``vmap(jacrev)``, the reference).
        return_outputs: also return ``(f(x1), f(x2))`` (computed in the same forward pass).

    Returns:
        The kernel (in the weights' dtype), or ``(kernel, f(x1), f(x2))`` with ``return_outputs``.

    Cost (structured, MLP): per dense layer ``2 N1 N2 (O C_out + C_in)``; per masked layer
    ``2 N1 N2 C_in C_out`` more; memory ``N1 N2 max(C_in, O C_out)``.
    """
    check_choice(mode, "mode", MODES)
    check_choice(mask_mode, "mask_mode", MASK_MODES)
    check_choice(method, "method", METHODS)
    steps = plan(model)
    weights = _validate_dict(weights, "weights", model)
    masks = _validate_dict(masks, "masks", model)
    coefficients = _validate_dict(coefficients, "coefficients", model)
    dtype, device = _dtype_device(model, weights)
    same = x2 is None or x2 is x1
    a = _inputs(x1, "x1", dtype, device)
    b = a if same else _inputs(x2, "x2", dtype, device)
    if b.shape[1:] != a.shape[1:]:
        raise ValueError(f"x2: feature shape {tuple(b.shape[1:])} does not match x1's {tuple(a.shape[1:])}")
    if method == "jacobian":
        return _jacobian_ntk(model, steps, a, b, weights, masks, coefficients, mode, mask_mode, return_outputs)
    x = a if same else torch.cat([a, b])
    out, rec = _run(steps, x, weights, masks, coefficients, mask_mode)
    N1, O = a.shape[0], out.shape[1]
    sig = _signals(steps, rec, O, x.shape[0], out)
    K = None
    for i, d in sig.items():
        h, _, Cw, has_b, Cb = rec[i]
        s = steps[i]
        d1, d2 = (d, d) if same else (d[:, :N1], d[:, N1:])
        h1, h2 = (h, h) if same else (h[:N1], h[N1:])
        term = _layer_kernel(d1, d2, h1, h2, s.gw, Cw, mode)
        if has_b:
            term = term + _bias_kernel(d1, d2, s.gb, Cb, mode)
        K = term if K is None else K + term
    if return_outputs:
        return K, out[:N1], (out if same else out[N1:])
    return K


def _jacobian_ntk(model, steps, a, b, weights, masks, coefficients, mode, mask_mode, return_outputs):
    """Reference: per-example Jacobians by ``vmap(jacrev)``, contracted.

    The sub-network kernel with default coefficients is the plain recipe ``J_θ J_θᵀ`` of
    ``θ ↦ f(M ⊙ θ)`` (``∂/∂θ = M ∂/∂W``: the coefficient ``M²`` comes out of the chain rule). Otherwise
    the Jacobians are taken w.r.t. the effective weights ``W = M ⊙ θ`` and contracted with ``C``.
    """
    natural = coefficients is None and mask_mode == "subnetwork"
    thetas, Ms, Cs = {}, {}, {}
    for s in steps:
        if s.kind != "linear":
            continue
        tw, Mw, Cw, tb, Mb, Cb = _layer_tensors(s, weights, masks, coefficients, mask_mode)
        for t, theta, M, C in (("weight", tw, Mw, Cw), ("bias", tb, Mb, Cb)):
            if theta is None:
                continue
            key = f"{s.name}.{t}" if s.name else t
            if natural:
                thetas[key], Ms[key], Cs[key] = theta, M, None
            else:  # differentiate w.r.t. W = M ⊙ θ (the graph to M and θ is kept outside jacrev)
                thetas[key], Ms[key], Cs[key] = (theta if M is None else M * theta), None, C

    def f(th, xi):
        h = xi[None]
        for s in steps:
            if s.kind == "flatten":
                h = h.reshape(1, -1)
            elif s.kind == "act":
                h = s.act.phi(h, **dict(s.kw))
            else:
                kw, kb = (f"{s.name}.weight" if s.name else "weight"), (f"{s.name}.bias" if s.name else "bias")
                W = th[kw] if Ms[kw] is None else Ms[kw] * th[kw]
                h = s.gw * (h @ W.T)
                if kb in th:
                    bb = th[kb] if Ms[kb] is None else Ms[kb] * th[kb]
                    h = h + s.gb * bb
        return h[0]

    J1 = vmap(jacrev(f), in_dims=(None, 0))(thetas, a)
    J2 = J1 if b is a else vmap(jacrev(f), in_dims=(None, 0))(thetas, b)
    K = None
    for k in thetas:
        A = J1[k].reshape(a.shape[0], J1[k].shape[1], -1)
        B = J2[k].reshape(b.shape[0], J2[k].shape[1], -1)
        C = Cs[k]
        if isinstance(C, torch.Tensor):
            A = A * C.reshape(1, 1, -1)
        elif C is not None:
            A = A * float(C)
        term = torch.einsum("nap,mbp->nmab", A, B)
        K = term if K is None else K + term
    if mode == "trace":
        K = torch.diagonal(K, dim1=2, dim2=3).mean(-1)
    if return_outputs:
        fa = vmap(f, in_dims=(None, 0))(thetas, a)
        fb = fa if b is a else vmap(f, in_dims=(None, 0))(thetas, b)
        return K, fa, fb
    return K

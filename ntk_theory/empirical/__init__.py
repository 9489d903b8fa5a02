"""Finite-width (empirical) NTK of any ``torch.nn.Module``, dense or masked (docs/theory.md §B.3).

For a model ``f(θ; x) ∈ R^O`` the empirical NTK is

    Θ̂(x, x')[o, o'] = Σ_p ∂f_o(x)/∂θ_p · ∂f_o'(x')/∂θ_p          (Jacot et al. 2018)

over the differentiated parameters ``θ``. :func:`empirical_ntk` computes it in
three ways that agree to float64 round-off:

``"structured"``
    The exact per-layer factorisation (docs/theory.md §B.3; Novak et al. ICML 2022,
    "structured derivatives"). A layer ``z = g_w W h + g_b b`` (``nn.Linear`` /
    ``nn.Conv2d`` and subclasses such as :class:`~ntk_theory.layers.NTKLinear`,
    with ``g_w = weight_gain``, ``g_b = bias_gain``, both 1 for plain torch layers)
    has ``∂f_o/∂W_ij = g_w δ_i h_j`` with ``δ = ∂f_o/∂z`` the back-propagated
    signal and ``h`` the layer input. Hence, for a dense layer,

        Θ̂_l = g_w² (Δ Δ'ᵀ) ⊙ (H H'ᵀ) + g_b² Δ Δ'ᵀ        (two GEMMs per layer)

    and, with the effective squared mask ``M²`` (entries 0 or ``s²``),

        Θ̂_l[x, x'] = g_w² Σ_i δ_i δ'_i (M² (h ⊙ h'))_i + g_b² Σ_i m_b,i² δ_i δ'_i .

    A convolution is the same over positions: ``∂f/∂W = g_w Σ_pos δ(pos) ⊗ patch(pos)``,
    formed per example from im2col patches and contracted as a Gram matrix. Any
    other modules (activations, pooling, flatten, residual adds, ...) may sit in
    between, as long as they carry no differentiated parameter: the signals ``δ``
    are taken by autograd through whatever the model does. One forward pass
    records every layer input ``h``; a backward pass per output (batched over the
    ``O`` cotangents with vmap, or a plain loop for convolutional models) gives every
    ``δ``. A plain ``nn.Sequential`` of ``Linear``/``Conv2d`` (NTK subclasses and awt
    masks included), ``ReLU``, ``LeakyReLU``, ``Tanh``, ``Sigmoid``, ``ErfActivation``, ``Identity``,
    ``Flatten`` and ``MaxPool2d`` is traced without autograd instead: the convolutions
    are GEMMs on the im2col patches that the Jacobians need anyway, and the ``O``
    cotangents go down as one batch of ``O N`` (``δ ← δ W``, the convolution's input
    gradient, the pooling indices, ``φ'(z)``), stopping at the first layer with
    parameters. Nothing of size ``N x (number of parameters)`` is formed for dense layers:
    memory is ``O(N² O²)`` plus activations and signals (``N O`` times the layer
    widths), plus ``N O x`` (parameters of the convolutions) for convolutions. For
    ``Θ(x, x)`` only the output-group tiles on and above the diagonal are multiplied.
``"jacobian"``
    ``torch.func.vmap(jacrev)`` per-example Jacobians, contracted: the reference.
``"jvp"``
    NTK-vector products: ``Θ̂ e = J (Jᵀ e)`` through ``torch.func.vjp`` (one example)
    then ``torch.func.jvp`` (the whole batch), never materialising the Jacobian of
    the batch; for few outputs and many parameters.

Masks (DESIGN.md, docs/theory.md §B.3 "gotcha"): a mask ``m`` (``dict[str, BoolTensor]``,
True = kept) defines the sub-network ``f_m(θ) = f(m ⊙ θ)``.

- ``mask_mode="subnetwork"`` (default): ``Θ̂_m = J(m ⊙ θ) diag(m) J(m ⊙ θ)ᵀ``, the NTK
  of the sub-network; pruned coordinates are fixed zeros and contribute nothing.
- ``mask_mode="ntt"``: ``J(m ⊙ θ) J(m ⊙ θ)ᵀ``, the dense-architecture NTK evaluated
  at the masked weights, which is what Neural Tangent Transfer's code computes
  (Liu & Zenke 2020); pruned coordinates do contribute.

A model masked with :func:`ntk_theory.masks.apply_mask` gives the sub-network
kernel without any ``mask=`` argument: mask and rescaling (``W = s·m⊙θ``, ``s = 1/sqrt(q)``)
are read from the parametrisation, the derivative is w.r.t. the raw ``θ``
(squared coefficient ``s² m``). With ``mask_mode="ntt"`` the derivative is w.r.t.
``w = m⊙θ`` with ``W = s·w`` (squared coefficient ``s²`` everywhere). A ``mask=``
argument on such a model is combined (logical and) with the applied mask.

Which path was taken: ``empirical_ntk(..., return_info=True)`` returns ``(kernel, info)`` with an
:class:`NTKInfo` (``method``, ``tracer``: ``"sequential"`` for the autograd-free engine, ``"autograd"``
for the hook tracer, ``declined``: why ``"auto"`` fell back from ``"structured"``, and each layer's
feature form). ``tracer=`` requests a tracer of the structured path; ``budgets=`` (a :class:`Budgets`)
bounds its temporaries (the result does not depend on it).

Dtype rule: inputs are cast to the kernel dtype (the model's dtype unless ``dtype=`` is given) at
the boundary; complex inputs are refused (``TypeError``).

Layout of the package: :mod:`.problem` (validation, the differentiated variables, masks),
:mod:`.blocking`, :mod:`.features` (per-layer Gram / Jacobian factors and the one feature builder,
the seam for a kernel differentiable in weights and masks), :mod:`.sequential` (the engine) and
:mod:`.autograd_tracer`, :mod:`.contraction`, :mod:`.structured`, :mod:`.reference` (Jacobian / JVP),
:mod:`.plan` (:class:`Budgets`, :class:`NTKInfo`).

Assumptions (the same for all methods): dimension 0 of the input is the batch
and examples do not interact (no BatchNorm in training mode; no dropout);
``"structured"`` further assumes that a supported layer's parameters are used
only by that layer's own ``forward`` (no weights shared with other code).
"""
from __future__ import annotations

import warnings
from typing import Mapping

import torch
from torch import nn

from .._checks import check_bool, check_choice, check_int
from .features import structured_layers
from .plan import DEFAULT_BUDGETS, Budgets, LayerInfo, NTKInfo
from .problem import Unsupported, prepare, prepare_x
from .reference import cheaper, jacobian, jvp_kernel, probe
from .structured import structured

__all__ = ["empirical_ntk", "Budgets", "DEFAULT_BUDGETS", "NTKInfo", "LayerInfo", "MODES", "METHODS", "MASK_MODES",
           "TRACERS"]

MODES = ("full", "trace", "diagonal")
METHODS = ("auto", "structured", "jacobian", "jvp")
MASK_MODES = ("subnetwork", "ntt")
TRACERS = ("auto", "sequential", "autograd")


def empirical_ntk(model: nn.Module, x1, x2=None, *, params: Mapping[str, torch.Tensor] | None = None,
                  mask: Mapping[str, torch.Tensor] | None = None, mask_mode: str = "subnetwork",
                  mode: str = "full", method: str = "auto", block_size: int | None = None,
                  dtype: torch.dtype | None = None, tracer: str = "auto", budgets: Budgets | None = None,
                  return_info: bool = False):
    """Empirical NTK ``Θ̂(x1, x2) = J(x1) Jᵀ(x2)`` of ``model`` (docs/theory.md §B.3).

    Args:
        model: any ``nn.Module`` mapping ``(N, ...)`` to ``(N,)`` or ``(N, O)`` (further output
            dimensions are flattened into ``O``). Never mutated: it is called through
            ``torch.func.functional_call``; hooks used by ``"structured"`` are removed again.
        x1, x2: input batches ``(N1, ...)``, ``(N2, ...)`` with the same feature shape (tensors or
            numpy arrays); ``x2=None`` means ``x2 = x1`` (and exploits the symmetry). The dtype rule:
            inputs are cast to the kernel dtype (the model's dtype unless ``dtype=`` is given) at
            the boundary, and moved to the parameters' device; the caller's tensors are never
            modified. Must be real (complex inputs raise ``TypeError``) and finite.
        params: the parameters to differentiate, ``{name: tensor}`` (names of
            ``model.named_parameters()``, or canonical names for masked models); the other
            parameters are held at the model's values. Default: every parameter with
            ``requires_grad``.
        mask: ``{name: BoolTensor}``, True = kept (:mod:`ntk_theory.masks`); the forward pass is
            at ``m ⊙ θ``.
        mask_mode: ``"subnetwork"``: ``J(m⊙θ) diag(m) J(m⊙θ)ᵀ`` (the sub-network's NTK);
            ``"ntt"``: ``J(m⊙θ) J(m⊙θ)ᵀ`` (dense architecture at the masked weights, as NTT).
        mode: ``"full"`` -> ``(N1, N2, O, O)``, ``Θ[n1, n2, o1, o2] = ∂f_o1(x1_n1)·∂f_o2(x2_n2)``
            (``(N1, N2)`` for one output); ``"trace"`` -> ``(N1, N2)``, ``(1/O) Σ_o Θ[:, :, o, o]``,
            the estimate of the scalar infinite-width kernel; ``"diagonal"`` -> ``(N1, O, O)``
            (``(N1,)`` for one output), ``Θ(x, x)`` for each ``x`` in ``x1`` only (``x2`` must be None).
        method: ``"structured"`` (per-layer factorisation; ``nn.Linear``/``nn.Conv2d`` parameters
            only), ``"jacobian"`` (vmap(jacrev) and contraction, the reference), ``"jvp"``
            (NTK-vector products), ``"auto"`` (structured when it applies, else the cheaper of
            the other two by a FLOP model).
        block_size: compute the kernel in blocks of ``block_size`` rows and columns (bounded
            memory for large N); the result equals the unblocked one.
        tracer: for ``"structured"``: ``"auto"`` (the sequential engine where it applies, else the
            autograd tracer), ``"sequential"`` (ValueError where the engine does not apply) or
            ``"autograd"``; other methods take ``"auto"`` only.
        budgets: memory budgets (:class:`Budgets`; default :data:`DEFAULT_BUDGETS`); they bound
            temporaries and never change the result.
        return_info: also return an :class:`NTKInfo` saying which method and tracer computed it.
        dtype: kernel dtype (a floating ``torch.dtype``); default the model's dtype, i.e. that of
            the (first) differentiated parameter. Parameters, buffers and inputs are cast to it.

    Returns:
        The kernel as described under ``mode``, in ``dtype`` on the parameters' device; with
        ``return_info``, the pair ``(kernel, NTKInfo)``.

    Raises:
        ValueError naming the argument for unknown ``mode``/``method``/``mask_mode``, invalid
        masks, mismatching or non-finite inputs, or ``method="structured"`` on a model it
        cannot handle. TypeError for arguments of the wrong type and for complex inputs.

    Cost of ``"structured"`` for an MLP with widths ``n_l``: ``Σ_l 2 (N O)² n_l + 2 N² n_{l-1}``
    FLOPs in full mode (``O`` times less in trace mode); with a mask a layer costs
    ``2 N² n_l n_{l-1}`` more. Convolutions cost ``2 (N O)² C_out C_in k²``.
    """
    check_choice(mode, "mode", MODES)
    check_choice(method, "method", METHODS)
    check_choice(mask_mode, "mask_mode", MASK_MODES)
    check_choice(tracer, "tracer", TRACERS)
    check_bool(return_info, "return_info")
    if tracer != "auto" and method in ("jacobian", "jvp"):
        raise ValueError(f"tracer: {tracer!r} applies to method='structured' or 'auto' only, got method={method!r}")
    if budgets is None:
        budgets = DEFAULT_BUDGETS
    elif not isinstance(budgets, Budgets):
        raise TypeError(f"budgets: expected an ntk_theory.empirical.Budgets or None, got {type(budgets).__name__}")
    if block_size is not None:
        check_int(block_size, "block_size", minimum=1)
    prob = prepare(model, params, mask, mask_mode, dtype, budgets)
    if x2 is x1:
        x2 = None
    x1 = prepare_x(x1, "x1", prob)
    if x2 is not None:
        if mode == "diagonal":
            raise ValueError("x2: mode='diagonal' computes Θ(x, x) for each x in x1; pass x2=None")
        x2 = prepare_x(x2, "x2", prob)
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"x2: feature shape {tuple(x2.shape[1:])} does not match x1's {tuple(x1.shape[1:])}")

    def done(K, used, tr=None, layers=(), declined=None, bs=block_size):
        if not return_info:
            return K
        return K, NTKInfo(used, tr, declined, tuple(layers), bs, budgets)

    declined = None
    if method in ("auto", "structured"):
        try:
            K, F1, bs = structured(prob, structured_layers(prob), x1, x2, mode, block_size, tracer)
            return done(K, "structured", F1.tracer, F1.forms, bs=bs)
        except Unsupported as exc:
            if method == "structured" or tracer != "auto":
                raise ValueError(f"{'tracer' if tracer != 'auto' else 'method'}: 'structured' "
                                 f"{'with tracer=' + repr(tracer) + ' ' if tracer != 'auto' else ''}does not apply "
                                 f"to this model ({exc}); use 'jacobian', 'jvp' or 'auto'") from None
            declined = str(exc)
    O, flops, act = probe(prob, x1)
    if method == "auto":
        method = cheaper(prob, x1.shape[0], x1.shape[0] if x2 is None else x2.shape[0], O, flops, mode)
    if method == "jacobian":
        K, bs = jacobian(prob, x1, x2, mode, block_size, O)
        return done(K, "jacobian", declined=declined, bs=bs)
    with warnings.catch_warnings():  # torch's first forward-mode AD call scripts its decompositions
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
        K = jvp_kernel(prob, x1, x2, mode, block_size, O, act)
    return done(K, "jvp", declined=declined)

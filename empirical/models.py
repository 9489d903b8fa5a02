r"""The field's models for awt's experiments, in the NTK or the standard parameterisation.

==================  ==========================================================================================
name                architecture (``act`` = the activation, ReLU by default)
==================  ==========================================================================================
``"mlp"``           Flatten, ``[Linear(n_l), act]`` for each width in ``widths`` (default ``(512, 512)``),
                    Linear(num_classes)
``"lenet300_100"``  the MLP with ``widths=(300, 100)`` (LeCun et al. 1998; the "LeNet-300-100" of Han et
                    al. 2015 and Frankle & Carbin 2019)
``"lenet5"``        LeNet-5 (LeCun et al. 1998): Conv5x5(6), act, MaxPool2, Conv5x5(16), act, MaxPool2,
                    Flatten, Linear(120), act, Linear(84), act, Linear(num_classes)
``"conv4"``         Conv-4 of Frankle & Carbin 2019 (their Fig. 2): Conv3x3(64), act, Conv3x3(64), act,
                    MaxPool2, Conv3x3(128), act, Conv3x3(128), act, MaxPool2, Flatten, Linear(256), act,
                    Linear(256), act, Linear(num_classes)
==================  ==========================================================================================

Every model is a flat ``nn.Sequential`` (parameter names ``"<index>.weight"``, ``"<index>.bias"``, the
same in both parameterisations), so that masks (:mod:`ntk_theory.masks`), the structured NTK engine
(:func:`ntk_theory.empirical.empirical_ntk`) and checkpoints see one layout.

**Parameterisations.**

* ``"ntk"`` (Jacot et al. 2018; Lee et al. 2019; neural-tangents' ``parameterization='ntk'``): the
  layers of :mod:`ntk_theory.layers`, :math:`z = \frac{\sigma_w}{\sqrt{\mathrm{fan\_in}}} W h + \sigma_b b`
  with :math:`W_{ij}, b_i \sim N(0, 1)` and ``fan_in`` = ``in_features`` or :math:`C_{in} k^2`. The MLPs are
  then exactly the finite networks of :func:`ntk_theory.infinite.mlp` (``depth = len(widths)``, same
  ``sigma_w``, ``sigma_b``, ``activation``), whose empirical NTK converges, as the widths grow, to its
  closed form times the identity over the ``num_classes`` outputs. Defaults ``sigma_w = sqrt(2)``
  (He's variance-preserving gain for ReLU) and ``sigma_b = 0.1`` (a trainable bias in every layer, so
  both parameterisations have the same parameters).
* ``"standard"``: plain ``nn.Linear`` / ``nn.Conv2d`` with PyTorch's default initialisation
  (``kaiming_uniform_(a=sqrt(5))``, i.e. :math:`W_{ij}, b_i \sim U(-1/\sqrt{\mathrm{fan\_in}},
  1/\sqrt{\mathrm{fan\_in}})`), drawn from the model's own generator.

**Determinism.** ``seed`` (an int >= 0) seeds one ``torch.Generator`` that draws every layer in order;
the model is built on the CPU and then moved to ``device`` (so a seed gives the same initial weights on
every device) and torch's global RNG state is left exactly as it was (the layer constructors' own
default initialisation, overwritten anyway, runs under :func:`torch.random.fork_rng`).

**Pooling and the NTK engine.** Max-pooling (``nn.MaxPool2d(2)``, non-overlapping) is what LeNet-5 as
trained today and Conv-4 use, and the autograd-free sequential engine of
:func:`ntk_theory.empirical.empirical_ntk` traces it (``method="structured"``, ``tracer="sequential"``;
conv -> ReLU -> MaxPool2d is carried in its pool form). LeCun et al.'s original trainable average
subsampling is not offered. All four models are traced by that engine in both parameterisations.

**LeNet-5 on other image sizes.** The paper feeds 32x32 inputs (MNIST's 28x28 digits centred in a
32x32 field) to an unpadded first convolution; here the first convolution pads by 2 ('SAME'), which is
that same computation on a 28x28 input. The second convolution is unpadded ('valid', as in the paper:
14x14 -> 10x10 -> pool 5x5, 400 features on MNIST) when the map entering it is at least 6x6, and
'SAME' otherwise (8x8 digits: 8 -> pool 4 -> conv 4 -> pool 2, 64 features); ``conv2_padding=`` (
``"auto"`` | ``"valid"`` | ``"same"``) overrides the rule. Inputs smaller than 4x4 (two 2x2 pools) are
refused.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ntk_theory import activations as _acts
from ntk_theory._checks import as_generator, check_choice, check_device, check_finite_number, check_int
from ntk_theory._checks import check_nonnegative
from ntk_theory.layers import NTKConv2d, NTKLinear

__all__ = ["build", "names", "mlp", "lenet300_100", "lenet5", "conv4", "NAMES", "PARAMETERIZATIONS"]

NAMES = ("mlp", "lenet300_100", "lenet5", "conv4")
PARAMETERIZATIONS = ("ntk", "standard")


def names() -> tuple[str, ...]:
    """The model names :func:`build` accepts."""
    return NAMES


# --------------------------------------------------------------------------------------------------
# validation and layer factory
# --------------------------------------------------------------------------------------------------
class _Spec:
    """The validated common arguments of a model: parameterisation, activation, gains, generator, dtype."""

    def __init__(self, parameterization, activation, alpha, sigma_w, sigma_b, seed, dtype, device):
        self.param = check_choice(parameterization, "parameterization", PARAMETERIZATIONS)
        self.act = _acts.get(activation)
        self.alpha = check_finite_number(alpha, "alpha", "a finite leaky-ReLU slope")
        if self.param == "standard":
            for arg, v in (("sigma_w", sigma_w), ("sigma_b", sigma_b)):
                if v is not None:
                    raise ValueError(f"{arg}: got {v!r}, but parameterization='standard' uses PyTorch's default "
                                     f"initialisation; {arg} applies to parameterization='ntk' only")
        self.sigma_w = check_nonnegative(2 ** 0.5 if sigma_w is None else sigma_w, "sigma_w")
        self.sigma_b = check_nonnegative(0.1 if sigma_b is None else sigma_b, "sigma_b")
        self.seed = check_int(seed, "seed", minimum=0)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
            raise ValueError(f"dtype: got {dtype!r}; expected a real floating torch.dtype "
                             "(torch.float32, torch.float64)")
        self.dtype = dtype
        self.device = check_device(device, "device")
        self.gen = as_generator(self.seed, "seed", "cpu")

    def activation(self) -> nn.Module:
        return self.act.module(self.alpha)

    def linear(self, n_in: int, n_out: int) -> nn.Linear:
        if self.param == "ntk":
            return NTKLinear(n_in, n_out, sigma_w=self.sigma_w, sigma_b=self.sigma_b, bias=True,
                             generator=self.gen, dtype=self.dtype, device="cpu")
        layer = nn.Linear(n_in, n_out, dtype=self.dtype)
        self._torch_default(layer, n_in)
        return layer

    def conv(self, c_in: int, c_out: int, k: int, padding: str = "same") -> nn.Conv2d:
        if self.param == "ntk":
            layer = NTKConv2d(c_in, c_out, k, sigma_w=self.sigma_w, sigma_b=self.sigma_b, bias=True,
                              generator=self.gen, dtype=self.dtype, device="cpu")
            if padding == "valid":
                # Same gains (fan_in = C_in k^2 does not depend on padding); only the zero border goes.
                # NTKConv2d's forward reads self.padding, and so does the NTK engine.
                layer.padding = (0, 0)
            return layer
        layer = nn.Conv2d(c_in, c_out, k, padding=k // 2 if padding == "same" else 0, dtype=self.dtype)
        self._torch_default(layer, c_in * k * k)
        return layer

    def _torch_default(self, layer: nn.Module, fan_in: int) -> None:
        # PyTorch's reset_parameters law (kaiming_uniform_(a=sqrt(5)) -> U(+-1/sqrt(fan_in)), same bound for
        # the bias), drawn from this model's generator instead of the global RNG.
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=self.gen)
            layer.bias.uniform_(-bound, bound, generator=self.gen)

    def finish(self, layers: list[nn.Module]) -> nn.Sequential:
        return nn.Sequential(*layers).to(self.device)


def _check_widths(widths: Any, name: str, allow_empty: bool = True, length: int | None = None) -> tuple[int, ...]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (tuple, list)):
        raise TypeError(f"{name}: expected a tuple of positive ints, got {widths!r}")
    out = tuple(check_int(w, name, minimum=1) for w in widths)
    if length is not None and len(out) != length:
        raise ValueError(f"{name}: expected {length} entries, got {len(out)} ({widths!r})")
    if not out and not allow_empty:
        raise ValueError(f"{name}: expected at least one entry")
    return out


def _check_shape(in_shape: Any, image: bool) -> tuple[int, ...]:
    if isinstance(in_shape, int) and not isinstance(in_shape, bool) and not image:
        in_shape = (in_shape,)
    if isinstance(in_shape, (str, bytes)) or not isinstance(in_shape, (tuple, list, torch.Size)):
        raise TypeError(f"in_shape: expected the per-example input shape as a tuple, e.g. (1, 28, 28), "
                        f"got {in_shape!r}")
    shape = tuple(check_int(v, "in_shape", minimum=1) for v in in_shape)
    if not shape:
        raise ValueError("in_shape: got (); expected at least one dimension")
    if image and len(shape) != 3:
        raise ValueError(f"in_shape: got {shape}; this convolutional model takes images (C, H, W)")
    return shape


def _build(spec: _Spec, make) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):  # the constructors' default init draws from the global RNG
        return spec.finish(make())


# --------------------------------------------------------------------------------------------------
# the models
# --------------------------------------------------------------------------------------------------
def mlp(*, in_shape, num_classes: int, widths: Sequence[int] = (512, 512), activation: str = "relu",
        parameterization: str = "ntk", seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu",
        sigma_w: float | None = None, sigma_b: float | None = None, alpha: float = 0.01) -> nn.Sequential:
    r"""A multilayer perceptron: ``Flatten()``, then ``(Linear, act)`` per entry of ``widths``, then a
    ``Linear`` readout with ``num_classes`` outputs.

    With ``parameterization="ntk"`` this is :func:`ntk_theory.infinite.mlp` ``(len(widths), activation,
    sigma_w, sigma_b)`` made finite: for widths :math:`n_1, \dots, n_L \to \infty` its empirical NTK
    tends to that closed form :math:`\Theta^{(L+1)}(x, x') \otimes I_{\mathrm{num\_classes}}` (Jacot et
    al. 2018, Thm. 1), with :math:`x` flattened to ``prod(in_shape)`` features. ``activation``: a name of
    :mod:`ntk_theory.activations` (``alpha``: the leaky-ReLU slope). ``widths=()`` is a linear model.
    ``in_shape`` is any per-example shape (an int ``d`` means ``(d,)``).
    """
    shape = _check_shape(in_shape, image=False)
    k = check_int(num_classes, "num_classes", minimum=1)
    ws = _check_widths(widths, "widths")
    spec = _Spec(parameterization, activation, alpha, sigma_w, sigma_b, seed, dtype, device)

    def make():
        layers: list[nn.Module] = [nn.Flatten()]
        n_in = math.prod(shape)
        for w in ws:
            layers += [spec.linear(n_in, w), spec.activation()]
            n_in = w
        layers.append(spec.linear(n_in, k))
        return layers

    return _build(spec, make)


def lenet300_100(*, in_shape, num_classes: int, activation: str = "relu", parameterization: str = "ntk",
                 seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu", sigma_w: float | None = None,
                 sigma_b: float | None = None, alpha: float = 0.01) -> nn.Sequential:
    """LeNet-300-100 (LeCun et al. 1998): the :func:`mlp` with hidden widths 300 and 100, the fully
    connected network of the lottery-ticket experiments on MNIST (Frankle & Carbin 2019)."""
    return mlp(in_shape=in_shape, num_classes=num_classes, widths=(300, 100), activation=activation,
               parameterization=parameterization, seed=seed, dtype=dtype, device=device, sigma_w=sigma_w,
               sigma_b=sigma_b, alpha=alpha)


def _conv_hw(in_shape: tuple[int, int, int], model: str, pools: int) -> tuple[int, int]:
    _, H, W = in_shape
    need = 2 ** pools
    if H < need or W < need:
        raise ValueError(f"in_shape: got {in_shape}; {model} has {pools} 2x2 max-pools and needs images of at "
                         f"least {need}x{need}")
    return H, W


def lenet5(*, in_shape, num_classes: int, channels: Sequence[int] = (6, 16), widths: Sequence[int] = (120, 84),
           conv2_padding: str = "auto", activation: str = "relu", parameterization: str = "ntk", seed: int = 0,
           dtype: torch.dtype = torch.float32, device="cpu", sigma_w: float | None = None,
           sigma_b: float | None = None, alpha: float = 0.01) -> nn.Sequential:
    r"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-based learning applied to document
    recognition", Fig. 2), with max-pooling:

    ``Conv5x5(C -> 6, pad 2), act, MaxPool2d(2), Conv5x5(6 -> 16, pad 0 or 2), act, MaxPool2d(2), Flatten,
    Linear(16 h w -> 120), act, Linear(120 -> 84), act, Linear(84 -> num_classes)``.

    On 28x28 MNIST: 28 -> 28 -> 14 -> 10 -> 5, so ``16 * 5 * 5 = 400`` features, as the paper's C5. The
    rule for the second convolution's padding is in the module docstring (``conv2_padding``);
    ``channels`` (6, 16) and ``widths`` (120, 84) can be narrowed (tests) or widened (width limits).
    """
    shape = _check_shape(in_shape, image=True)
    k = check_int(num_classes, "num_classes", minimum=1)
    ch = _check_widths(channels, "channels", length=2)
    ws = _check_widths(widths, "widths", length=2)
    check_choice(conv2_padding, "conv2_padding", ("auto", "valid", "same"))
    H, W = _conv_hw(shape, "lenet5", 2)
    h1, w1 = H // 2, W // 2
    pad2 = conv2_padding
    if pad2 == "auto":
        pad2 = "valid" if min(h1, w1) >= 6 else "same"
    if pad2 == "valid":
        if min(h1, w1) < 6:
            raise ValueError(f"conv2_padding: 'valid' needs a map of at least 6x6 before the second convolution, "
                             f"got {h1}x{w1} from in_shape {shape}; use 'same' or 'auto'")
        h2, w2 = (h1 - 4) // 2, (w1 - 4) // 2
    else:
        h2, w2 = h1 // 2, w1 // 2
    spec = _Spec(parameterization, activation, alpha, sigma_w, sigma_b, seed, dtype, device)

    def make():
        return [spec.conv(shape[0], ch[0], 5), spec.activation(), nn.MaxPool2d(2),
                spec.conv(ch[0], ch[1], 5, pad2), spec.activation(), nn.MaxPool2d(2), nn.Flatten(),
                spec.linear(ch[1] * h2 * w2, ws[0]), spec.activation(),
                spec.linear(ws[0], ws[1]), spec.activation(),
                spec.linear(ws[1], k)]

    return _build(spec, make)


def conv4(*, in_shape, num_classes: int, channels: Sequence[int] = (64, 64, 128, 128),
          widths: Sequence[int] = (256, 256), activation: str = "relu", parameterization: str = "ntk",
          seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu", sigma_w: float | None = None,
          sigma_b: float | None = None, alpha: float = 0.01) -> nn.Sequential:
    """Conv-4 of Frankle & Carbin 2019 ("The Lottery Ticket Hypothesis", ICLR, Fig. 2; a scaled VGG):

    ``Conv3x3(64), act, Conv3x3(64), act, MaxPool2d(2), Conv3x3(128), act, Conv3x3(128), act, MaxPool2d(2),
    Flatten, Linear(256), act, Linear(256), act, Linear(num_classes)``, 3x3 convolutions with 'SAME'
    padding (stride 1). On CIFAR-10 (32x32): 128 * 8 * 8 = 8192 features into the first dense layer.
    ``channels`` and ``widths`` can be narrowed (tests) or widened.
    """
    shape = _check_shape(in_shape, image=True)
    k = check_int(num_classes, "num_classes", minimum=1)
    ch = _check_widths(channels, "channels", length=4)
    ws = _check_widths(widths, "widths", length=2)
    H, W = _conv_hw(shape, "conv4", 2)
    spec = _Spec(parameterization, activation, alpha, sigma_w, sigma_b, seed, dtype, device)

    def make():
        return [spec.conv(shape[0], ch[0], 3), spec.activation(), spec.conv(ch[0], ch[1], 3), spec.activation(),
                nn.MaxPool2d(2),
                spec.conv(ch[1], ch[2], 3), spec.activation(), spec.conv(ch[2], ch[3], 3), spec.activation(),
                nn.MaxPool2d(2), nn.Flatten(),
                spec.linear(ch[3] * (H // 4) * (W // 4), ws[0]), spec.activation(),
                spec.linear(ws[0], ws[1]), spec.activation(),
                spec.linear(ws[1], k)]

    return _build(spec, make)


_BUILDERS = {"mlp": mlp, "lenet300_100": lenet300_100, "lenet5": lenet5, "conv4": conv4}
_OPTIONS = {
    "mlp": ("widths", "activation", "sigma_w", "sigma_b", "alpha"),
    "lenet300_100": ("activation", "sigma_w", "sigma_b", "alpha"),
    "lenet5": ("channels", "widths", "conv2_padding", "activation", "sigma_w", "sigma_b", "alpha"),
    "conv4": ("channels", "widths", "activation", "sigma_w", "sigma_b", "alpha"),
}


def build(name: str, *, in_shape, num_classes: int, parameterization: str = "ntk", seed: int = 0,
          dtype: torch.dtype = torch.float32, device="cpu", **options) -> nn.Sequential:
    """Build model ``name`` (one of :data:`NAMES`) for inputs of per-example shape ``in_shape``.

    ``parameterization``: ``"ntk"`` or ``"standard"`` (module docstring); ``seed``: an int >= 0 (the
    global RNG is not touched); ``dtype`` a real floating dtype; ``device`` ``"cpu"``, ``"cuda"``,
    ``"auto"`` (:func:`ntk_theory._checks.check_device`). ``options`` are the keyword arguments of the
    model's function (:func:`mlp`, :func:`lenet300_100`, :func:`lenet5`, :func:`conv4`): ``widths``,
    ``channels``, ``activation``, ``sigma_w``/``sigma_b`` (NTK only), ``alpha``, ``conv2_padding``.

    Raises ``ValueError`` naming the argument and the accepted values for an unknown name,
    parameterisation, activation or option value; ``TypeError`` for an option the model does not take
    or an argument of the wrong type. Everything is validated before any layer is built.
    """
    check_choice(name, "name", NAMES)
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        raise TypeError(f"options: {', '.join(unknown)} not accepted by model {name!r}; accepted options: "
                        f"{', '.join(_OPTIONS[name])}")
    return _BUILDERS[name](in_shape=in_shape, num_classes=num_classes, parameterization=parameterization, seed=seed,
                           dtype=dtype, device=device, **options)

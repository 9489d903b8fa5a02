r"""Datasets for awt's experiments: every input in :math:`[0, 1]`, every label ``int64``.

:func:`load` returns a :class:`Dataset` (a frozen :class:`ntk_theory.io.Result`) with a train and a
test part. Inputs are float32 in :math:`[0, 1]` so that an attack box (``eps`` in :math:`\ell_\infty`
around ``x``, clamped to :math:`[0, 1]`) means the same thing on every dataset; images are
``(N, C, H, W)``, vectors ``(N, d)``.

* ``"digits"`` ``(1, 8, 8)``: scikit-learn's bundled 8x8 digits (UCI optdigits; 1,797 images, values
  0..16 divided by 16); offline, the default.
* ``"mnist"`` ``(1, 28, 28)``: the standard IDX files (LeCun et al. 1998), gzipped or not, values / 255.
* ``"fashion_mnist"`` ``(1, 28, 28)``: Zalando's Fashion-MNIST in the same IDX format (Xiao et al. 2017).
* ``"cifar10"`` ``(3, 32, 32)``: the python pickle batches of CIFAR-10 (Krizhevsky 2009), values / 255.
* ``"synthetic"`` ``(dim,)``: a Gaussian mixture mapped through the logistic sigmoid.

**Splits.** Where a source ships a train and a test part they are used as they are (the official
split). Where it ships one part only (scikit-learn's digits; a folder holding only MNIST's
``t10k`` files, as ``../shared/data/mnist``) that part is split by :func:`stratified_split`: each
class ``c`` with :math:`n_c` examples gives :math:`t_c` test examples, the largest-remainder
apportionment of :math:`\mathrm{round}(f N)` over the classes by :math:`f n_c` (so the test part has
exactly :math:`\mathrm{round}(f N)` examples and every class its share, up to one), drawn by a
``torch.Generator`` seeded with ``seed``; ``f = test_fraction`` (0.2). The dataset's
``description`` says which split was used. The same rule draws :meth:`Dataset.subset`.

**Synthetic data.** ``num_classes`` means :math:`\mu_k = \tfrac{s}{\sqrt 2}\, u_k` with :math:`u_k`
uniform on the unit sphere of :math:`R^d` (so two means are about ``separation`` :math:`= s` apart
in high dimension), labels balanced (largest remainder), :math:`z = \mu_y + \varepsilon`,
:math:`\varepsilon \sim N(0, I_d)`, and the input is :math:`x = \sigma(z) = 1/(1+e^{-z})`
elementwise: a fixed, strictly monotone map onto :math:`(0, 1)`, so nothing is clipped and the
class structure (the Bayes classifier, up to the monotone change of variables) is kept.

**Files.** Without ``download=True`` nothing is fetched: a missing folder or file raises
``FileNotFoundError`` naming the files looked for. A truncated or corrupt file raises
``ValueError`` (bad IDX magic, a length that disagrees with the header, image/label counts that
disagree, labels out of range), never a silently short dataset. CIFAR-10 pickles are read with an
unpickler that only reconstructs numpy arrays (a pickle can run code; this one cannot).
``download=True`` fetches the canonical files with :mod:`urllib`, checks their MD5 and writes them
atomically (:func:`ntk_theory.io.atomic_write`).

``root=None`` for a file-based dataset means ``$AWT_DATA/<name>`` (``<name>`` = ``mnist``,
``fashion_mnist``, ``cifar10``) when the environment variable ``AWT_DATA`` is set.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ntk_theory._checks import as_generator, check_choice, check_finite_number, check_int
from ntk_theory.io import Result, atomic_write

__all__ = ["Dataset", "load", "names", "batches", "stratified_split", "read_idx", "NAMES"]

NAMES = ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic")

# MNIST-format file names (each also accepted with ".gz").
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Canonical sources (MD5 of the gzipped files as published; torchvision checks the same sums).
_IDX_SOURCES = {
    "mnist": (("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"), {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion_mnist": (("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",), {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)

# The options each dataset accepts (with their defaults).
_OPTIONS = {
    "digits": {"test_fraction": 0.2},
    "mnist": {"test_fraction": 0.2},
    "fashion_mnist": {"test_fraction": 0.2},
    "cifar10": {},
    "synthetic": {"dim": 16, "num_classes": 2, "n_train": 512, "n_test": 256, "separation": 3.0},
}


def names() -> tuple[str, ...]:
    """The dataset names :func:`load` accepts."""
    return NAMES


# --------------------------------------------------------------------------------------------------
# the record
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class Dataset(Result):
    """A dataset: a train and a test part, inputs float32 in [0, 1], labels int64 in ``[0, num_classes)``.

    Fields: ``name``; ``x_train`` ``(N_train, *input_shape)``, ``y_train`` ``(N_train,)``; ``x_test``,
    ``y_test`` likewise; ``num_classes``; ``input_shape`` (the per-example shape, a tuple);
    ``description`` (the source and the split, in words). Checked on construction (``ValueError`` /
    ``TypeError`` naming the field), so a hand-made ``Dataset`` obeys the same rules as a loaded one.
    ``to_dict()`` is a small JSON summary (shapes, class counts, description), never the tensors.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"name: expected a str, got {type(self.name).__name__}")
        k = check_int(self.num_classes, "num_classes", minimum=1)
        if not isinstance(self.input_shape, tuple) or not all(isinstance(v, int) and v >= 1 for v in self.input_shape):
            raise TypeError(f"input_shape: expected a tuple of positive ints, got {self.input_shape!r}")
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise TypeError(f"x_{part}, y_{part}: expected torch.Tensors, got {type(x).__name__}, {type(y).__name__}")
            if x.dtype != torch.float32:
                raise TypeError(f"x_{part}: expected dtype torch.float32, got {x.dtype}")
            if y.dtype != torch.int64 or y.dim() != 1:
                raise TypeError(f"y_{part}: expected a 1-d torch.int64 tensor, got dtype {y.dtype}, shape {tuple(y.shape)}")
            if tuple(x.shape[1:]) != self.input_shape or x.shape[0] != y.shape[0]:
                raise ValueError(f"x_{part}: shape {tuple(x.shape)} does not fit y_{part} {tuple(y.shape)} and "
                                 f"input_shape {self.input_shape}; expected (N, *input_shape) and (N,)")
            if x.numel():
                lo, hi = torch.aminmax(x)  # one pass, no N-sized temporary; NaN propagates and fails the test
                if not (float(lo) >= 0.0 and float(hi) <= 1.0):
                    raise ValueError(f"x_{part}: values must lie in [0, 1], found min {float(lo):g}, max {float(hi):g}"
                                     " (NaN counts as outside); nothing is clipped silently")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
                raise ValueError(f"y_{part}: labels must lie in [0, {k - 1}], found [{int(y.min())}, {int(y.max())}]")

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def class_counts(self, part: str = "train") -> list[int]:
        """Examples per class in ``part`` (``"train"`` or ``"test"``)."""
        check_choice(part, "part", ("train", "test"))
        y = self.y_train if part == "train" else self.y_test
        return torch.bincount(y, minlength=self.num_classes).tolist()

    def to_dict(self) -> dict[str, Any]:
        """JSON summary: name, shapes, sizes, class counts, dtype, value range, description (no tensors)."""
        return {"name": self.name, "num_classes": int(self.num_classes), "input_shape": list(self.input_shape),
                "n_train": self.n_train, "n_test": self.n_test,
                "train_class_counts": self.class_counts("train"), "test_class_counts": self.class_counts("test"),
                "x_dtype": str(self.x_train.dtype), "y_dtype": str(self.y_train.dtype), "x_range": [0.0, 1.0],
                "description": self.description}

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, n_train={self.n_train}, n_test={self.n_test}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> "Dataset":
        """A stratified, seeded smaller dataset: ``n_train`` of the train part, ``n_test`` of the test part.

        ``None`` keeps a part whole. Each part is drawn by :func:`stratified_split` (largest-remainder
        class shares, a ``torch.Generator`` seeded with ``seed``; train and test use independent
        streams), and the kept examples stay in their original order. ``ValueError`` naming
        ``n_train``/``n_test`` for a size below 1 or above what the part holds.
        """
        sizes = {}
        for arg, n, avail in (("n_train", n_train, self.n_train), ("n_test", n_test, self.n_test)):
            if n is not None:
                n = check_int(n, arg)
                if not 1 <= n <= avail:
                    raise ValueError(f"{arg}: got {n}; this dataset's {arg[2:]} part has {avail} examples, "
                                     f"so the accepted range is [1, {avail}]")
            sizes[arg] = n
        seed = check_int(seed, "seed", minimum=0)
        parts = {}
        for part, stream, n in (("train", 0, sizes["n_train"]), ("test", 1, sizes["n_test"])):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if n is None or n == y.shape[0]:
                parts[part] = (x, y)
                continue
            _, keep = stratified_split(y, n_test=n, seed=seed, stream=stream)
            parts[part] = (x[keep], y[keep])
        desc = self.description
        if sizes["n_train"] is not None or sizes["n_test"] is not None:
            desc += (f"; stratified subset (seed={seed}): {parts['train'][1].shape[0]} train / "
                     f"{parts['test'][1].shape[0]} test")
        return Dataset(self.name, parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1],
                       self.num_classes, self.input_shape, desc)


# --------------------------------------------------------------------------------------------------
# splitting and batching
# --------------------------------------------------------------------------------------------------
def _apportion(counts: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder apportionment of ``total`` over classes in proportion to ``counts``
    (ties broken by class index); every share is at most its class count."""
    quota = counts * (total / counts.sum())
    share = np.floor(quota).astype(np.int64)
    rest = total - int(share.sum())
    order = sorted(range(len(counts)), key=lambda c: (-(quota[c] - share[c]), c))
    for c in order:
        if rest == 0:
            break
        if share[c] < counts[c]:
            share[c] += 1
            rest -= 1
    return share


def stratified_split(y: torch.Tensor, *, n_test: int | None = None, test_fraction: float | None = None,
                     seed: int = 0, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Seeded stratified split of the labels ``y``: ``(rest_idx, test_idx)``, each sorted ascending.

    The test part has ``n_test`` (or :math:`\mathrm{round}(f N)` for ``test_fraction = f``)
    examples; class ``c`` contributes its largest-remainder share of that total in proportion to
    its count :math:`n_c`, chosen by a ``torch.randperm`` of its indices with a generator seeded by
    ``seed`` (classes in ascending order; ``stream`` offsets the seed for independent draws).
    """
    y = torch.as_tensor(y)
    N = int(y.shape[0])
    if (n_test is None) == (test_fraction is None):
        raise ValueError("n_test, test_fraction: give exactly one of them")
    if test_fraction is not None:
        f = check_finite_number(test_fraction, "test_fraction", "a fraction in (0, 1)")
        if not 0.0 < f < 1.0:
            raise ValueError(f"test_fraction: got {test_fraction!r}; accepted range is (0, 1)")
        n_test = int(round(f * N))
    n_test = check_int(n_test, "n_test", minimum=0, maximum=N)
    classes, inverse, counts = np.unique(y.cpu().numpy(), return_inverse=True, return_counts=True)
    share = _apportion(counts.astype(np.float64), n_test) if n_test else np.zeros(len(classes), np.int64)
    gen = torch.Generator().manual_seed(int(seed) * 2 + int(stream))
    inv = torch.as_tensor(inverse.reshape(-1))
    test = []
    for c in range(len(classes)):
        idx = torch.nonzero(inv == c).flatten()
        test.append(idx[torch.randperm(idx.numel(), generator=gen)[: int(share[c])]])
    is_test = torch.zeros(N, dtype=torch.bool)
    if test:
        is_test[torch.cat(test)] = True
    return torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True,
            generator: int | torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches ``(xb, yb)`` of one epoch: every example exactly once, the last batch possibly smaller.

    ``shuffle``: visit the examples in the order of ``torch.randperm(N, generator=generator)``
    (``generator``: an int seed, a ``torch.Generator`` or ``None`` for torch's global RNG;
    :func:`ntk_theory._checks.as_generator`), else in their stored order. Validated before the
    first batch: ``x`` and ``y`` tensors with the same first dimension, ``batch_size`` an int >= 1.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x, y: expected torch.Tensors, got {type(x).__name__}, {type(y).__name__}")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x, y: need the same number of examples along dimension 0, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle: expected True or False, got {shuffle!r}")
    gen = as_generator(generator, "generator", "cpu") if shuffle else None
    N = x.shape[0]
    return _batch_iter(x, y, batch_size, torch.randperm(N, generator=gen) if shuffle else None)


def _batch_iter(x, y, batch_size, order):
    N = x.shape[0]
    if order is not None:
        order = order.to(x.device)
    for i in range(0, N, batch_size):
        if order is None:
            yield x[i:i + batch_size], y[i:i + batch_size]
        else:
            idx = order[i:i + batch_size]
            yield x[idx], y[idx.to(y.device)]


# --------------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------------
def load(name: str = "digits", *, root: str | os.PathLike | None = None, seed: int = 0, download: bool = False,
         **options) -> Dataset:
    """Load dataset ``name`` (see the module docstring for the sources, splits and value maps).

    Args:
        name: one of :data:`NAMES` (``"digits"`` by default, offline).
        root: the folder holding the files of ``mnist`` / ``fashion_mnist`` / ``cifar10`` (for CIFAR-10
            also ``root/cifar-10-batches-py``; for the MNIST formats also torchvision's
            ``root/MNIST/raw`` / ``root/FashionMNIST/raw``). ``None``: ``$AWT_DATA/<name>``.
            Ignored (must be None) for ``digits`` and ``synthetic``.
        seed: seeds the split where a source has one part only, and the draw of ``synthetic``.
        download: fetch missing files from the canonical URLs (MD5-checked, written atomically).
        options: ``test_fraction`` (0.2) for ``digits`` and a one-part MNIST folder; ``dim`` (16),
            ``num_classes`` (2), ``n_train`` (512), ``n_test`` (256), ``separation`` (3.0) for
            ``synthetic``. Unknown options raise ``TypeError`` naming them.

    Raises:
        ValueError for an unknown name (listing the names) or a bad option value; FileNotFoundError
        naming the files looked for; ValueError for a corrupt or truncated file.
    """
    check_choice(name, "name", NAMES)
    seed = check_int(seed, "seed", minimum=0)
    if not isinstance(download, bool):
        raise TypeError(f"download: expected True or False, got {download!r}")
    accepted = _OPTIONS[name]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        acc = ", ".join(accepted) if accepted else "none"
        raise TypeError(f"options: {', '.join(unknown)} not accepted by dataset {name!r}; accepted options: {acc}")
    opts = {**accepted, **options}
    if "test_fraction" in opts:
        f = check_finite_number(opts["test_fraction"], "test_fraction", "a fraction in (0, 1)")
        if not 0.0 < f < 1.0:
            raise ValueError(f"test_fraction: got {opts['test_fraction']!r}; accepted range is (0, 1)")
        opts["test_fraction"] = f
    if name in ("digits", "synthetic"):
        if root is not None:
            raise ValueError(f"root: dataset {name!r} reads no files; pass root=None")
        if download:
            raise ValueError(f"download: dataset {name!r} needs no download; pass download=False")
        return _digits(seed, **opts) if name == "digits" else _synthetic(seed, **opts)
    folder = _root(name, root)
    if name == "cifar10":
        return _cifar10(folder, download)
    return _mnist_like(name, folder, seed, download, opts["test_fraction"])


def _root(name: str, root) -> Path:
    if root is None:
        env = os.environ.get("AWT_DATA")
        if not env:
            raise FileNotFoundError(
                f"root: dataset {name!r} reads files and neither root= nor the environment variable AWT_DATA is set; "
                f"pass root= the folder holding them (the tests use ../shared/data/mnist beside the repository)")
        return Path(env) / name
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root: expected a path (str or os.PathLike) or None, got {type(root).__name__}")
    return Path(root)


def _split_description(n_train, n_test, seed, f, what):
    return (f"{what} split into train/test by a stratified seeded split (seed={seed}, test_fraction={f:g}): "
            f"{n_train} train / {n_test} test")


def _from_split(name, x, y, num_classes, seed, f, description) -> Dataset:
    tr, te = stratified_split(y, test_fraction=f, seed=seed)
    desc = description + "; " + _split_description(tr.numel(), te.numel(), seed, f, "the one part")
    return Dataset(name, x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous(),
                   num_classes, tuple(x.shape[1:]), desc)


def _digits(seed: int, test_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    pix = np.asarray(d.images, dtype=np.float64)
    if pix.min() < 0 or pix.max() > 16:
        raise ValueError(f"digits: scikit-learn returned pixel values in [{pix.min()}, {pix.max()}], expected [0, 16]")
    x = torch.from_numpy((pix / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    desc = (f"scikit-learn digits (UCI optdigits, {y.numel()} 8x8 images, pixel values 0..16 divided by 16); "
            "it ships one part")
    return _from_split("digits", x, y, 10, seed, test_fraction, desc)


def _synthetic(seed: int, dim, num_classes, n_train, n_test, separation) -> Dataset:
    d = check_int(dim, "dim", minimum=1)
    k = check_int(num_classes, "num_classes", minimum=2)
    n_tr = check_int(n_train, "n_train", minimum=1)
    n_te = check_int(n_test, "n_test", minimum=1)
    s = check_finite_number(separation, "separation", "a finite number >= 0")
    if s < 0:
        raise ValueError(f"separation: got {separation!r}; accepted range is [0, inf)")
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(k, d, generator=gen, dtype=torch.float64)
    means = (s / 2 ** 0.5) * u / u.norm(dim=1, keepdim=True)

    def draw(n):
        y = torch.arange(n) % k                       # balanced: class counts differ by at most one
        y = y[torch.randperm(n, generator=gen)]
        z = means[y] + torch.randn(n, d, generator=gen, dtype=torch.float64)
        return torch.sigmoid(z).to(torch.float32), y.to(torch.int64)

    xtr, ytr = draw(n_tr)
    xte, yte = draw(n_te)
    desc = (f"synthetic Gaussian mixture (seed={seed}): {k} classes, means (separation/sqrt 2) u_k with u_k "
            f"uniform on the unit sphere of R^{d}, separation={s:g}, unit-variance isotropic noise, inputs "
            f"x = sigmoid(z) elementwise; {n_tr} train / {n_te} test drawn independently")
    return Dataset("synthetic", xtr, ytr, xte, yte, k, (d,), desc)


# ---- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({exc})") from None
    return raw


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or not) with ``ndim`` dimensions.

    Format (LeCun et al., the MNIST page): magic ``0x00 0x00 0x08 ndim``, then ``ndim`` big-endian
    uint32 sizes, then ``prod(sizes)`` bytes. ``ValueError`` naming the file for a bad magic, a
    different number of dimensions, or a payload whose length disagrees with the header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: bad magic {raw[:4].hex() or '(empty file)'}; an IDX file starts with 0x0000")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX data type 0x{raw[2]:02x}; only unsigned bytes (0x08) are read")
    if raw[3] != ndim:
        raise ValueError(f"{path}: IDX file with {raw[3]} dimension(s), expected {ndim}")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"{path}: truncated header ({len(raw)} bytes, the header alone needs {head})")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    want = int(np.prod(shape, dtype=np.int64))
    if len(raw) - head != want:
        raise ValueError(f"{path}: {len(raw) - head} data bytes, but the header {shape} says {want} "
                         f"({'truncated' if len(raw) - head < want else 'trailing bytes'})")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def _find(folder_list: list[Path], stem: str) -> Path | None:
    for folder in folder_list:
        for cand in (folder / stem, folder / (stem + ".gz")):
            if cand.is_file():
                return cand
    return None


def _read_idx_pair(images: Path, labels: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    xi = read_idx(images, 3)
    yl = read_idx(labels, 1)
    if xi.shape[0] != yl.shape[0]:
        raise ValueError(f"{images}, {labels}: {xi.shape[0]} images but {yl.shape[0]} labels")
    if xi.shape[1:] != (28, 28):
        raise ValueError(f"{images}: images of size {xi.shape[1:]}, expected (28, 28)")
    if yl.size and int(yl.max()) >= num_classes:
        raise ValueError(f"{labels}: label {int(yl.max())} out of range [0, {num_classes - 1}]")
    x = torch.from_numpy(xi.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(yl.astype(np.int64))


def _mnist_like(name: str, root: Path, seed: int, download: bool, test_fraction: float) -> Dataset:
    sub = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]
    folders = [root, root / sub / "raw"]
    found = {part: [_find(folders, s) for s in stems] for part, stems in _IDX_FILES.items()}
    if download and not all(p is not None for ps in found.values() for p in ps):
        _download_idx(name, root)
        found = {part: [_find(folders, s) for s in stems] for part, stems in _IDX_FILES.items()}
    have = {part: all(p is not None for p in ps) for part, ps in found.items()}
    label = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}[name]
    if not any(have.values()):
        looked = ", ".join(f"{s}[.gz]" for stems in _IDX_FILES.values() for s in stems)
        where = " or ".join(str(f) for f in folders)
        hint = "" if download else "; pass download=True where a network exists"
        raise FileNotFoundError(f"root: no {label} files in {where}: looked for {looked} (a train pair, "
                                f"a test pair, or both){hint}")
    parts = {part: _read_idx_pair(*found[part], 10) for part in _IDX_FILES if have[part]}
    files = ", ".join(p.name for part in parts for p in found[part])
    if have["train"] and have["test"]:
        (xtr, ytr), (xte, yte) = parts["train"], parts["test"]
        desc = f"{label} from {root} ({files}), values/255; the official train/test split"
        return Dataset(name, xtr, ytr, xte, yte, 10, (1, 28, 28), desc)
    part = "train" if have["train"] else "test"
    x, y = parts[part]
    which = "official training set only" if part == "train" else "official test set (t10k) only"
    desc = f"{label} from {root} ({files}), values/255; the folder holds the {which}, {x.shape[0]} images"
    return _from_split(name, x, y, 10, seed, test_fraction, desc)


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - fixed https/http URLs
        return resp.read()


def _download_idx(name: str, root: Path) -> None:
    mirrors, files = _IDX_SOURCES[name]
    for fname, md5 in files.items():
        if _find([root], fname[:-3]) is not None:
            continue
        errors = []
        for base in mirrors:
            try:
                blob = _fetch(base + fname)
            except OSError as exc:
                errors.append(f"{base + fname}: {exc}")
                continue
            got = hashlib.md5(blob).hexdigest()
            if got != md5:
                errors.append(f"{base + fname}: MD5 {got}, expected {md5}")
                continue
            atomic_write(root / fname, lambda fh: fh.write(blob), mode="wb")
            break
        else:
            raise OSError(f"download: could not fetch {fname} ({'; '.join(errors)})")


# ---- CIFAR-10 -------------------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Reconstructs numpy arrays, dicts, lists, bytes and numbers; refuses every other global."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays are accepted)")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = path.read_bytes()
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # truncated pickles raise EOFError, UnpicklingError, ValueError, ...
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: a CIFAR-10 batch is a dict, got {type(obj).__name__}")
    get = lambda k: obj.get(k.encode(), obj.get(k))  # noqa: E731 - python-2 pickles have bytes keys
    data, labels = get("data"), get("labels")
    if data is None or labels is None:
        raise ValueError(f"{path}: a CIFAR-10 batch needs the keys b'data' and b'labels', got {sorted(map(str, obj))}")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must be integers in [0, 9]")
    return data, labels.astype(np.int64)


def _download_cifar(root: Path) -> None:
    blob = _fetch(_CIFAR_URL)
    got = hashlib.md5(blob).hexdigest()
    if got != _CIFAR_MD5:
        raise OSError(f"download: {_CIFAR_URL} has MD5 {got}, expected {_CIFAR_MD5}")
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for fname in _CIFAR_FILES:
            member = tar.extractfile(f"{_CIFAR_DIR}/{fname}")  # only the expected members, by name
            content = member.read()
            atomic_write(root / _CIFAR_DIR / fname, lambda fh: fh.write(content), mode="wb")


def _cifar10(root: Path, download: bool) -> Dataset:
    def locate():
        for folder in (root, root / _CIFAR_DIR):
            if all((folder / f).is_file() for f in _CIFAR_FILES):
                return folder
        return None

    folder = locate()
    if folder is None and download:
        _download_cifar(root)
        folder = locate()
    if folder is None:
        hint = "" if download else "; pass download=True where a network exists"
        raise FileNotFoundError(f"root: CIFAR-10 needs {', '.join(_CIFAR_FILES)} in {root} or {root / _CIFAR_DIR}; "
                                f"missing there{hint}")
    parts = []
    for names_ in (_CIFAR_FILES[:5], _CIFAR_FILES[5:]):
        xs, ys = zip(*(_read_cifar_batch(folder / f) for f in names_))
        x = np.concatenate(xs).reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0)
        parts += [torch.from_numpy(x), torch.from_numpy(np.concatenate(ys))]
    desc = (f"CIFAR-10 from {folder} (python pickle batches data_batch_1..5, test_batch), values/255; "
            "the official train/test split")
    return Dataset("cifar10", parts[0], parts[1], parts[2], parts[3], 10, (3, 32, 32), desc)

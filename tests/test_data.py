"""empirical.data: every dataset against an independent reading of its source (scikit-learn's arrays, the
raw bytes of the IDX files, the pickled arrays), the split and subset rules, batching, bad input."""
from __future__ import annotations

import gzip
import json
import math
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from empirical import data
from empirical.data import Dataset, batches, load, stratified_split

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
# Class counts of the official MNIST test set (t10k), from the MNIST page / ../shared/data/mnist/README.
MNIST_T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def need_mnist():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the shared MNIST test set is not at {MNIST_DIR}")
    return MNIST_DIR


def check_record(ds: Dataset, shape, n_classes):
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == tuple(shape) and x.shape[0] == y.shape[0] > 0
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert int(y.min()) >= 0 and int(y.max()) < n_classes
    assert ds.input_shape == tuple(shape) and ds.num_classes == n_classes
    summary = ds.to_dict()
    text = json.dumps(summary)  # JSON-ready and small: no tensors in it
    assert len(text) < 3000
    assert summary["n_train"] == ds.x_train.shape[0] and summary["n_test"] == ds.x_test.shape[0]
    assert sum(summary["train_class_counts"]) == summary["n_train"]


def within_one_of_share(counts_part, counts_all, total):
    """Each class's count in a stratified part is its proportional share up to one (largest remainder)."""
    quota = np.asarray(counts_all, float) * total / sum(counts_all)
    return bool(np.all(np.abs(np.asarray(counts_part) - quota) < 1.0 + 1e-9)) and sum(counts_part) == total


def row_keys(x: torch.Tensor) -> list[bytes]:
    return sorted(r.numpy().tobytes() for r in x.reshape(x.shape[0], -1))


# ------------------------------------------------------------------------------------------------
# digits (scikit-learn, offline default)
# ------------------------------------------------------------------------------------------------
def test_digits_against_scikit_learn():
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = load()  # the default
    assert ds.name == "digits"
    check_record(ds, (1, 8, 8), 10)
    n = len(ref.target)
    assert ds.n_train + ds.n_test == n == 1797 and ds.n_test == round(0.2 * n)
    # the two parts together are exactly scikit-learn's images / 16 with their labels (a multiset of rows)
    ours = torch.cat([torch.cat([ds.x_train, ds.x_test]).reshape(n, -1) * 16,
                      torch.cat([ds.y_train, ds.y_test]).reshape(n, 1).float()], 1)
    theirs = torch.cat([torch.as_tensor(ref.images.reshape(n, -1), dtype=torch.float32),
                        torch.as_tensor(ref.target, dtype=torch.float32).reshape(n, 1)], 1)
    assert row_keys(ours) == row_keys(theirs)
    all_counts = np.bincount(ref.target, minlength=10)
    assert within_one_of_share(ds.class_counts("test"), all_counts, ds.n_test)
    assert "split" in ds.description and "seed=0" in ds.description


def test_digits_deterministic_and_seed_dependent():
    a, b, c = load("digits", seed=0), load("digits", seed=0), load("digits", seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_test, c.x_test)
    assert a.class_counts("test") == c.class_counts("test")  # same shares, other examples
    assert "seed=1" in c.description
    d = load("digits", test_fraction=0.5)
    assert d.n_test == round(0.5 * 1797)


# ------------------------------------------------------------------------------------------------
# MNIST: the shared official test set (t10k only), split 80/20
# ------------------------------------------------------------------------------------------------
def test_shared_mnist_split_and_pixels():
    root = need_mnist()
    ds = load("mnist", root=root)
    check_record(ds, (1, 28, 28), 10)
    assert (ds.n_train, ds.n_test) == (8000, 2000)
    total = [a + b for a, b in zip(ds.class_counts("train"), ds.class_counts("test"))]
    assert total == MNIST_T10K_COUNTS
    assert within_one_of_share(ds.class_counts("test"), MNIST_T10K_COUNTS, 2000)
    assert "t10k" in ds.description and "split" in ds.description and "seed=0" in ds.description
    # independent reading of the raw bytes: header by struct, the sum of all pixels and the label histogram
    raw = gzip.open(root / "t10k-images-idx3-ubyte.gz").read()
    magic, n, h, w = struct.unpack(">IIII", raw[:16])
    assert (magic, n, h, w) == (2051, 10000, 28, 28)
    pix = np.frombuffer(raw[16:], np.uint8).astype(np.int64)
    ours = torch.cat([ds.x_train, ds.x_test]).double() * 255
    assert float((ours - ours.round()).abs().max()) < 1e-3  # values are k/255
    assert int(ours.round().sum()) == int(pix.sum())
    other = load("mnist", root=root, seed=3)
    assert not torch.equal(other.y_test, ds.y_test) or not torch.equal(other.x_test, ds.x_test)


def test_shared_mnist_gzipped_and_plain_agree(tmp_path):
    root = need_mnist()
    for f in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / f).write_bytes(gzip.open(root / (f + ".gz")).read())
    a, b = load("mnist", root=root), load("mnist", root=tmp_path)
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, k), getattr(b, k))


# ------------------------------------------------------------------------------------------------
# IDX files written by the test (Fashion-MNIST, MNIST formats)
# ------------------------------------------------------------------------------------------------
def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, parts=("train", "test"), n=(30, 10), gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for part, count in zip(("train", "test"), n):
        if part not in parts:
            continue
        imgs = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labs = (np.arange(count) % 10).astype(np.uint8)
        rng.shuffle(labs)
        stem = "train" if part == "train" else "t10k"
        for name, arr in ((f"{stem}-images-idx3-ubyte", imgs), (f"{stem}-labels-idx1-ubyte", labs)):
            blob = idx_bytes(arr)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(blob))
            else:
                (folder / name).write_bytes(blob)
        out[part] = (imgs, labs)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_official_split_exact_values(tmp_path, gz):
    ref = write_idx_set(tmp_path, gz=gz)
    ds = load("fashion_mnist", root=tmp_path)
    check_record(ds, (1, 28, 28), 10)
    for part in ("train", "test"):
        imgs, labs = ref[part]
        x, y = getattr(ds, f"x_{part}"), getattr(ds, f"y_{part}")
        assert torch.equal(x, torch.from_numpy(imgs.astype(np.float32) / 255).reshape(-1, 1, 28, 28))
        assert torch.equal(y, torch.from_numpy(labs.astype(np.int64)))
    assert "official" in ds.description


def test_idx_torchvision_layout_and_one_part(tmp_path):
    write_idx_set(tmp_path / "FashionMNIST" / "raw", parts=("train",), n=(50, 0))
    ds = load("fashion_mnist", root=tmp_path, seed=2)
    assert (ds.n_train, ds.n_test) == (40, 10)
    assert "training set only" in ds.description and "seed=2" in ds.description


def test_awt_data_environment_root(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "mnist", parts=("test",), n=(0, 20))
    monkeypatch.setenv("AWT_DATA", str(tmp_path))
    ds = load("mnist")
    assert ds.n_train + ds.n_test == 20
    monkeypatch.delenv("AWT_DATA")
    with pytest.raises(FileNotFoundError, match="root="):
        load("mnist")


def corrupt_cases():
    good_img = idx_bytes(np.zeros((5, 28, 28), np.uint8))
    good_lab = idx_bytes(np.zeros(5, np.uint8))
    return {
        "bad magic": (b"\x01\x02" + good_img[2:], good_lab, "magic"),
        "truncated images": (good_img[:-100], good_lab, "truncated"),
        "trailing bytes": (good_img + b"\x00" * 7, good_lab, "trailing"),
        "count mismatch": (good_img, idx_bytes(np.zeros(4, np.uint8)), "5 images but 4 labels"),
        "wrong rank": (good_lab, good_lab, "dimension"),
        "label out of range": (good_img, idx_bytes(np.full(5, 10, np.uint8)), "out of range"),
        "truncated gzip": (gzip.compress(good_img)[:-20], good_lab, "gzip"),
        "empty file": (b"", good_lab, "magic"),
    }


@pytest.mark.parametrize("case", list(corrupt_cases()))
def test_corrupt_idx_raises(tmp_path, case):
    img, lab, match = corrupt_cases()[case]
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(img)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(lab)
    with pytest.raises(ValueError, match=match):
        load("mnist", root=tmp_path)


def test_missing_files_name_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte") as exc:
        load("mnist", root=tmp_path)
    assert "train-labels-idx1-ubyte" in str(exc.value) and "download=True" in str(exc.value)
    with pytest.raises(FileNotFoundError, match="t10k"):
        load("fashion_mnist", root=tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="data_batch_1.*test_batch"):
        load("cifar10", root=tmp_path)


# ------------------------------------------------------------------------------------------------
# CIFAR-10 pickle batches written by the test
# ------------------------------------------------------------------------------------------------
def write_cifar(folder: Path, n=4, seed=0, protocol=2):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ref = {}
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(folder / f, "wb") as fh:
            pickle.dump({b"batch_label": f.encode(), b"data": d, b"labels": labels,
                         b"filenames": [b"x.png"] * n}, fh, protocol=protocol)
        ref[f] = (d, labels)
    return ref


@pytest.mark.parametrize("sub,protocol", [(None, 2), ("cifar-10-batches-py", 5)])
def test_cifar10_reader_exact_values(tmp_path, sub, protocol):
    folder = tmp_path if sub is None else tmp_path / sub
    ref = write_cifar(folder, protocol=protocol)
    ds = load("cifar10", root=tmp_path)
    check_record(ds, (3, 32, 32), 10)
    assert (ds.n_train, ds.n_test) == (20, 4)
    # pixel (c, i, j) of image n is byte c*1024 + i*32 + j of its row (the CIFAR-10 page's layout)
    d, labels = ref["data_batch_2"]
    x = ds.x_train[4 + 1]
    for c, i, j in ((0, 0, 0), (1, 5, 7), (2, 31, 30)):
        assert float(x[c, i, j]) == np.float32(d[1, c * 1024 + i * 32 + j]) / np.float32(255)
    assert ds.y_train[4:8].tolist() == labels
    assert ds.y_test.tolist() == ref["test_batch"][1]


def test_cifar10_corrupt_and_hostile_pickles(tmp_path):
    write_cifar(tmp_path)
    raw = (tmp_path / "data_batch_3").read_bytes()
    (tmp_path / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="data_batch_3"):
        load("cifar10", root=tmp_path)

    class Hostile:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Hostile(), b"labels": []}))
    with pytest.raises(ValueError, match="refusing"):
        load("cifar10", root=tmp_path)
    assert (tmp_path / "victim").is_dir()  # nothing was executed
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="3072"):
        load("cifar10", root=tmp_path)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(ValueError, match="2 images"):
        load("cifar10", root=tmp_path)


# ------------------------------------------------------------------------------------------------
# synthetic Gaussian mixtures
# ------------------------------------------------------------------------------------------------
def test_synthetic_distribution():
    d, k, s = 64, 4, 6.0
    ds = load("synthetic", dim=d, num_classes=k, n_train=2000, n_test=400, separation=s, seed=5)
    check_record(ds, (d,), k)
    assert float(ds.x_train.min()) > 0 and float(ds.x_train.max()) < 1  # sigmoid: open interval, no clipping
    assert ds.class_counts("train") == [500] * 4 and ds.class_counts("test") == [100] * 4
    z = torch.logit(ds.x_train.double())  # the inverse map gives back the Gaussian mixture
    means = torch.stack([z[ds.y_train == c].mean(0) for c in range(k)])
    resid = z - means[ds.y_train]
    # unit isotropic noise: the residual variance is 1 up to its standard error (sqrt(2/n) per coordinate)
    var = resid.var(0)
    assert float((var - 1).abs().max()) < 6 * math.sqrt(2 / 500)
    # mean norms s/sqrt(2): each estimated from 500 points (SE of a mean coordinate 1/sqrt(500))
    norms = means.norm(dim=1)
    assert float((norms - s / math.sqrt(2)).abs().max()) < 0.15 * s
    # and the classes are separable by nearest mean in logit space on the test part
    zt = torch.logit(ds.x_test.double())
    acc = float(((zt[:, None, :] - means[None]).norm(dim=2).argmin(1) == ds.y_test).double().mean())
    assert acc > 0.95
    same = load("synthetic", dim=d, num_classes=k, n_train=2000, n_test=400, separation=s, seed=5)
    assert torch.equal(same.x_train, ds.x_train)
    chance = load("synthetic", dim=d, num_classes=k, n_train=2000, n_test=400, separation=0.0, seed=5)
    zc = torch.logit(chance.x_test.double())
    mc = torch.stack([torch.logit(chance.x_train.double())[chance.y_train == c].mean(0) for c in range(k)])
    acc0 = float(((zc[:, None, :] - mc[None]).norm(dim=2).argmin(1) == chance.y_test).double().mean())
    assert acc0 < 0.45  # chance is 0.25 (SE ~0.02)


def test_synthetic_defaults_and_bad_options():
    ds = load("synthetic")
    assert ds.input_shape == (16,) and ds.num_classes == 2 and (ds.n_train, ds.n_test) == (512, 256)
    with pytest.raises(ValueError, match="num_classes"):
        load("synthetic", num_classes=1)
    with pytest.raises(ValueError, match="separation"):
        load("synthetic", separation=-1.0)
    with pytest.raises(TypeError, match="dim"):
        load("synthetic", dim=2.5)
    with pytest.raises(TypeError, match="widths.*accepted options: dim"):
        load("synthetic", widths=3)


# ------------------------------------------------------------------------------------------------
# subset, split, batches
# ------------------------------------------------------------------------------------------------
def test_subset_stratified_seeded():
    ds = load("digits")
    sub = ds.subset(n_train=200, n_test=50, seed=1)
    assert (sub.n_train, sub.n_test) == (200, 50)
    assert within_one_of_share(sub.class_counts("train"), ds.class_counts("train"), 200)
    assert within_one_of_share(sub.class_counts("test"), ds.class_counts("test"), 50)
    # every kept example is one of the part's examples (rows with their labels)
    full = {r.numpy().tobytes() + bytes([int(l)]) for r, l in zip(ds.x_train.reshape(ds.n_train, -1), ds.y_train)}
    assert all(r.numpy().tobytes() + bytes([int(l)]) in full
               for r, l in zip(sub.x_train.reshape(200, -1), sub.y_train))
    assert torch.equal(ds.subset(200, 50, seed=1).x_train, sub.x_train)
    assert not torch.equal(ds.subset(200, 50, seed=2).x_train, sub.x_train)
    keep_test = ds.subset(n_train=100)
    assert keep_test.x_test is ds.x_test and keep_test.n_train == 100
    assert "subset" in sub.description
    check_record(sub, (1, 8, 8), 10)


@pytest.mark.parametrize("kw,match", [({"n_train": 0}, "n_train"), ({"n_test": 10 ** 6}, "n_test"),
                                      ({"n_train": 2.0}, "n_train"), ({"seed": -1}, "seed")])
def test_subset_bad_sizes(kw, match):
    ds = load("digits")
    with pytest.raises((ValueError, TypeError), match=match):
        ds.subset(**kw)


@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=6), frac=st.floats(0.05, 0.95), seed=st.integers(0, 9))
def test_stratified_split_properties(counts, frac, seed):
    y = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    y = y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(seed))]
    rest, test = stratified_split(y, test_fraction=frac, seed=seed)
    n = y.numel()
    assert test.numel() == round(frac * n) and rest.numel() + test.numel() == n
    assert torch.equal(torch.sort(torch.cat([rest, test])).values, torch.arange(n))
    tc = torch.bincount(y[test], minlength=len(counts)).tolist()
    assert within_one_of_share(tc, counts, test.numel())


def test_batches_cover_each_example_once():
    x = torch.arange(103, dtype=torch.float32).reshape(103, 1)
    y = torch.arange(103)
    out = list(batches(x, y, 10, generator=4))
    assert [b[0].shape[0] for b in out] == [10] * 10 + [3]
    seen = torch.cat([b[1] for b in out])
    assert torch.equal(torch.sort(seen).values, y) and not torch.equal(seen, y)
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in out)  # pairs stay together
    again = torch.cat([b[1] for b in batches(x, y, 10, generator=4)])
    assert torch.equal(seen, again)
    g = torch.Generator().manual_seed(4)
    assert torch.equal(torch.cat([b[1] for b in batches(x, y, 10, generator=g)]), seen)
    assert torch.equal(torch.cat([b[1] for b in batches(x, y, 7, shuffle=False)]), y)


def test_batches_bad_input():
    x, y = torch.zeros(5, 2), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="batch_size"):
        batches(x, y, 0)
    with pytest.raises(ValueError, match="same number"):
        batches(x, y[:4], 2)
    with pytest.raises(TypeError, match="generator"):
        batches(x, y, 2, generator="seed")


# ------------------------------------------------------------------------------------------------
# bad input to load and to Dataset
# ------------------------------------------------------------------------------------------------
def test_load_bad_input(tmp_path):
    with pytest.raises(ValueError, match="name.*'digits'.*'cifar10'.*'synthetic'"):
        load("imagenet")
    with pytest.raises(TypeError, match="test_fraction"):
        load("digits", n_train=3)
    with pytest.raises(ValueError, match="test_fraction"):
        load("digits", test_fraction=1.0)
    with pytest.raises(ValueError, match="root"):
        load("digits", root=tmp_path)
    with pytest.raises(ValueError, match="seed"):
        load("digits", seed=-3)
    with pytest.raises(TypeError, match="download"):
        load("mnist", root=tmp_path, download="yes")
    assert data.names() == ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic")


def test_dataset_validates_its_fields():
    x, y = torch.rand(4, 3), torch.tensor([0, 1, 0, 1])
    ok = Dataset("t", x, y, x, y, 2, (3,), "hand-made")
    assert ok.n_train == 4
    with pytest.raises(ValueError, match=r"x_train.*\[0, 1\]"):
        Dataset("t", x + 1, y, x, y, 2, (3,))
    nan = x.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x_test.*NaN"):
        Dataset("t", x, y, nan, y, 2, (3,))
    with pytest.raises(ValueError, match="y_test"):
        Dataset("t", x, y, x, y + 1, 2, (3,))
    with pytest.raises(TypeError, match="x_train"):
        Dataset("t", x.double(), y, x, y, 2, (3,))
    with pytest.raises(ValueError, match="input_shape"):
        Dataset("t", x, y, x, y, 2, (4,))
    assert "n_train=4" in repr(ok)


# ------------------------------------------------------------------------------------------------
# download=True, with the network replaced by a dictionary of URLs (the tests never go online)
# ------------------------------------------------------------------------------------------------
def test_download_idx_checks_md5_and_writes_atomically(tmp_path, monkeypatch):
    import hashlib

    src = tmp_path / "src"
    write_idx_set(src, parts=("train", "test"), n=(20, 10))
    blobs = {f"http://mirror/{p.name}": p.read_bytes() for p in src.iterdir()}
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in src.iterdir()}
    fetched = []

    def fake_fetch(url):
        fetched.append(url)
        if url not in blobs:
            raise OSError(f"no route to {url}")
        return blobs[url]

    monkeypatch.setattr(data, "_fetch", fake_fetch)
    monkeypatch.setitem(data._IDX_SOURCES, "mnist", (("http://down/", "http://mirror/"), sums))
    root = tmp_path / "root"
    ds = load("mnist", root=root, download=True)
    assert (ds.n_train, ds.n_test) == (20, 10) and "official" in ds.description
    assert sorted(p.name for p in root.iterdir()) == sorted(sums)  # no temporary files left behind
    assert any(u.startswith("http://down/") for u in fetched)  # the first mirror failed, the second served
    n = len(fetched)
    load("mnist", root=root, download=True)
    assert len(fetched) == n  # present files are not fetched again
    bad = dict(sums, **{"t10k-labels-idx1-ubyte.gz": "0" * 32})
    monkeypatch.setitem(data._IDX_SOURCES, "mnist", (("http://mirror/",), bad))
    with pytest.raises(OSError, match="MD5"):
        load("mnist", root=tmp_path / "other", download=True)
    assert not (tmp_path / "other" / "t10k-labels-idx1-ubyte.gz").exists()


def test_download_cifar10_from_archive(tmp_path, monkeypatch):
    import hashlib
    import io
    import tarfile

    ref = write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    blob = buf.getvalue()
    monkeypatch.setattr(data, "_fetch", lambda url: blob)
    monkeypatch.setattr(data, "_CIFAR_MD5", hashlib.md5(blob).hexdigest())
    ds = load("cifar10", root=tmp_path / "root", download=True)
    assert ds.y_test.tolist() == ref["test_batch"][1] and ds.n_train == 20
    monkeypatch.setattr(data, "_CIFAR_MD5", "0" * 32)
    with pytest.raises(OSError, match="MD5"):
        load("cifar10", root=tmp_path / "elsewhere", download=True)

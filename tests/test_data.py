"""Tests for amstream.data on the real data files (no synthetic tensors)."""

from __future__ import annotations

import collections
import gzip
import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from amstream import data
from amstream.data import (DATASETS, DataFileCorrupt, DataFileMissing, Dataset, data_dir,
                           iter_samples, load_dataset, load_digits, load_elec2,
                           load_fashion_mnist, load_mnist)

# From /work/shared/data/README.md.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                   "Shirt", "Sneaker", "Bag", "Ankle boot")
ELEC2_HEADER = """@relation electricity

@attribute date numeric
@attribute day {1,2,3,4,5,6,7}
@attribute period numeric
@attribute nswprice numeric
@attribute nswdemand numeric
@attribute vicprice numeric
@attribute vicdemand numeric
@attribute transfer numeric
@attribute class {UP,DOWN}

@data
"""


def _row_counter(ds: Dataset) -> collections.Counter:
    x = ds.x.reshape(len(ds), -1).numpy()
    return collections.Counter(x[i].tobytes() + bytes([int(ds.y[i])]) for i in range(len(ds)))


# --------------------------------------------------------------------------- data_dir


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("AMSTREAM_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home" / ".cache" / "amstream"
    monkeypatch.setenv("AMSTREAM_DATA", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert data_dir("~/x") == tmp_path / "home" / "x"
    monkeypatch.setenv("AMSTREAM_DATA", "~/envdata")
    assert data_dir() == tmp_path / "home" / "envdata"


# --------------------------------------------------------------------------- errors


def test_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(DataFileMissing) as exc:
        load_mnist("train", root=tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in msg
    assert "<root>/mnist/train-images-idx3-ubyte.gz" in msg
    assert "AMSTREAM_DATA=" in msg and "root=" in msg
    assert isinstance(exc.value, FileNotFoundError)
    with pytest.raises(DataFileMissing, match="elecNormNew.arff"):
        load_elec2(root=tmp_path)
    with pytest.raises(DataFileMissing, match="fashion-mnist"):
        load_dataset("fashion-mnist", "test", root=tmp_path)


def test_missing_file_uses_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("AMSTREAM_DATA", str(tmp_path))
    with pytest.raises(DataFileMissing, match=str(tmp_path)):
        load_mnist("test")


def test_corrupt_file_md5_mismatch(tmp_path):
    bad = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    bad.parent.mkdir()
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"not mnist" * 100))
    with pytest.raises(DataFileCorrupt) as exc:
        load_mnist("test", root=tmp_path)
    msg = str(exc.value)
    assert str(bad) in msg
    assert "9fb629c4189551a2d022fa330f9573f3" in msg  # expected (official) md5
    assert data._md5(bad) in msg  # actual md5
    assert isinstance(exc.value, ValueError)


def test_elec2_malformed_row_reports_line(tmp_path):
    path = tmp_path / "elec2" / "elecNormNew.arff"
    path.parent.mkdir()
    rows = ["0,2,0,0.056443,0.439155,0.003467,0.422915,0.414912,UP",
            "0,2,0.021277,0.051699,0.415055,0.003467,0.422915,0.414912,SIDEWAYS"]
    path.write_text(ELEC2_HEADER + "\n".join(rows))
    with pytest.raises(DataFileCorrupt, match=r"line 15\b"):
        load_elec2(root=tmp_path)
    path.write_text(ELEC2_HEADER.replace("@data", "@nodata") + rows[0])
    with pytest.raises(DataFileCorrupt, match="@data"):
        load_elec2(root=tmp_path)


def test_bad_names_and_splits():
    with pytest.raises(ValueError, match="train.*test"):
        load_mnist("val")
    with pytest.raises(ValueError, match="train.*test"):
        load_fashion_mnist("all")
    with pytest.raises(ValueError) as exc:
        load_dataset("cifar10")
    assert all(name in str(exc.value) for name in DATASETS)
    with pytest.raises(ValueError, match="all"):
        load_dataset("elec2", "validation")
    with pytest.raises(ValueError, match="stream"):
        iter_samples(load_digits(), order="random")
    with pytest.raises(ValueError, match="start"):
        iter_samples(load_digits(), start=10_000)


# --------------------------------------------------------------------------- MNIST family


@pytest.mark.data
def test_mnist(data_root):
    train, test = load_mnist("train", root=data_root), load_mnist("test", root=data_root)
    assert train.x.shape == (60_000, 1, 28, 28) and test.x.shape == (10_000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert (len(train), len(test), train.n_classes, train.name) == (60_000, 10_000, 10, "mnist")
    assert train.classes == tuple("0123456789")
    assert torch.bincount(train.y).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test.y, minlength=10).sum() == 10_000
    assert abs(train.x.mean().item()) < 0.01 and abs(train.x.std().item() - 1) < 0.01
    raw = load_mnist("test", root=data_root, normalize=False)
    assert raw.x.min().item() == 0.0 and raw.x.max().item() == 1.0
    torch.testing.assert_close(raw.x, test.x * 0.3081 + 0.1307)
    assert torch.equal(raw.y, test.y)


@pytest.mark.data
def test_mnist_md5_and_arrays_are_cached(data_root, monkeypatch):
    first = load_mnist("test", root=data_root)

    def no_hashing(*args, **kwargs):
        raise AssertionError("md5 recomputed")

    monkeypatch.setattr(data.hashlib, "md5", no_hashing)
    again = load_mnist("test", root=data_root)
    assert torch.equal(first.x, again.x)
    again.x.zero_()  # loads return fresh tensors: mutating one leaves the cache intact
    assert torch.equal(load_mnist("test", root=data_root).x, first.x)


@pytest.mark.data
def test_fashion_mnist(data_root):
    train = load_fashion_mnist("train", root=data_root)
    test = load_dataset("fashion-mnist", "test", root=data_root)
    assert train.x.shape == (60_000, 1, 28, 28) and test.x.shape == (10_000, 1, 28, 28)
    assert torch.bincount(train.y).tolist() == [6000] * 10
    assert torch.bincount(test.y).tolist() == [1000] * 10
    assert train.classes == FASHION_CLASSES and train.name == "fashion-mnist"
    assert abs(train.x.mean().item()) < 0.01 and abs(train.x.std().item() - 1) < 0.01


# --------------------------------------------------------------------------- Elec2


@pytest.mark.data
def test_elec2(data_root):
    ds = load_elec2(root=data_root)
    assert ds.x.shape == (45_312, 8) and ds.x.dtype == torch.float32
    assert ds.classes == ("DOWN", "UP") and ds.n_classes == 2
    assert ds.x.min().item() >= 0.0 and ds.x.max().item() <= 1.0
    assert abs(ds.y.float().mean().item() - 0.4245) < 0.0005
    # First row of the file: 0,2,0,0.056443,0.439155,0.003467,0.422915,0.414912,UP
    torch.testing.assert_close(ds.x[0], torch.tensor(
        [0, 1 / 6, 0, 0.056443, 0.439155, 0.003467, 0.422915, 0.414912]))
    assert ds.y[0] == 1 and ds.y[-1] == 0  # the file ends with DOWN


@pytest.mark.data
def test_elec2_time_order(data_root):
    x = load_elec2(root=data_root).x.double().numpy()
    date, day, period = x[:, 0], x[:, 1], x[:, 2]
    i = np.arange(len(x))
    # 944 days x 48 half-hours, consecutive: period cycles 0..47/47 and day (Mon..Sun)
    # advances once every 48 rows.
    np.testing.assert_allclose(period, (i % 48) / 47, atol=1e-5)
    np.testing.assert_allclose(day, ((1 + i // 48) % 7) / 6, atol=1e-6)
    # The normalised date is constant within a day and non-decreasing, except for
    # 5 known drops in the MOA file, all at the first half-hour of a day.
    assert np.all(date.reshape(-1, 48) == date[::48, None])
    drops = np.flatnonzero(np.diff(date) < 0) + 1
    assert len(drops) == 5 and np.all(period[drops] == 0)


@pytest.mark.data
def test_elec2_splits(data_root):
    full = load_dataset("elec2", "all", root=data_root)
    train = load_dataset("elec2", "train", root=data_root)
    test = load_dataset("elec2", "test", root=data_root)
    assert (len(train), len(test)) == (36_249, 9_063)
    assert torch.equal(torch.cat([train.x, test.x]), full.x)
    assert torch.equal(torch.cat([train.y, test.y]), full.y)


# --------------------------------------------------------------------------- digits


def test_digits():
    ds = load_digits()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.int64 and ds.n_classes == 10 and ds.name == "digits"
    assert ds.x.min().item() == 0.0 and ds.x.max().item() == 1.0
    assert torch.unique(ds.y).tolist() == list(range(10))
    assert set(torch.unique(ds.x * 16).tolist()) <= set(range(17))
    assert load_dataset("digits", "all").x.shape == ds.x.shape


def test_digits_split_disjoint_covering_deterministic():
    full = load_digits("all")
    train, test = load_digits("train", seed=0), load_digits("test", seed=0)
    assert (len(train), len(test)) == (1438, 359)
    assert _row_counter(train) + _row_counter(test) == _row_counter(full)
    again = load_dataset("digits", "train")
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)
    other = load_digits("train", seed=1)
    assert not torch.equal(other.y, train.y)
    assert len(load_digits("test", test_fraction=0.5)) == 898


def test_digits_does_not_import_sklearn():
    code = ("import sys, amstream.data as d; d.load_digits(); "
            "assert 'sklearn' not in sys.modules, 'sklearn imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_digits_without_sklearn(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    data._read_digits.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install scikit-learn"):
            load_digits()
    finally:
        data._read_digits.cache_clear()


def test_digits_file_exists():
    spec = importlib.util.find_spec("sklearn")
    root = pathlib.Path(next(iter(spec.submodule_search_locations)))
    assert (root / data.DIGITS_FILE).is_file()


# --------------------------------------------------------------------------- Dataset / stream


def test_dataset_subset_and_len():
    ds = load_digits()
    sub = ds.subset([5, 0, 7])
    assert len(sub) == 3 and sub.classes == ds.classes and sub.name == ds.name
    assert torch.equal(sub.x[1], ds.x[0]) and torch.equal(sub.y, ds.y[[5, 0, 7]])
    assert len(ds.subset(ds.y == 3)) == int((ds.y == 3).sum())
    with pytest.raises(ValueError):
        Dataset(x=ds.x, y=ds.y[:10], n_classes=10, name="digits", classes=ds.classes)


def test_iter_samples_stream_order():
    ds = load_digits("test")
    samples = list(iter_samples(ds))
    assert len(samples) == len(ds)
    x0, y0 = samples[0]
    assert x0.shape == (1, 8, 8) and isinstance(y0, int)
    assert torch.equal(torch.stack([s[0] for s in samples]), ds.x)
    assert [s[1] for s in samples] == ds.y.tolist()


def test_iter_samples_shuffle_and_resume():
    ds = load_digits("test")
    ys = [y for _, y in iter_samples(ds, "shuffle", seed=3)]
    assert ys == [y for _, y in iter_samples(ds, "shuffle", seed=3)]
    assert ys != [y for _, y in iter_samples(ds, "shuffle", seed=4)]
    assert ys != ds.y.tolist() and sorted(ys) == sorted(ds.y.tolist())
    full = list(iter_samples(ds, "shuffle", seed=3))
    for start in (0, 1, 100, len(ds)):
        resumed = list(iter_samples(ds, "shuffle", seed=3, start=start))
        assert len(resumed) == len(ds) - start
        assert all(torch.equal(a[0], b[0]) and a[1] == b[1]
                   for a, b in zip(resumed, full[start:]))
    stream = list(iter_samples(ds, start=50))
    assert torch.equal(stream[0][0], ds.x[50]) and stream[0][1] == int(ds.y[50])

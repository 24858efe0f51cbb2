"""Real data sets for streaming experiments: digits, MNIST, Fashion-MNIST, Elec2.

Nothing is downloaded. The data root (see :func:`data_dir`) must hold
``<root>/{mnist,fashion-mnist}/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` and
``<root>/elec2/elecNormNew.arff``; the 8x8 digits set is read from the copy shipped
inside scikit-learn (without importing it). Loaders return a :class:`Dataset`;
:func:`iter_samples` turns one into a one-sample-at-a-time stream.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import os
import pathlib
import struct
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["DATASETS", "DataFileCorrupt", "DataFileMissing", "Dataset", "data_dir",
           "iter_samples", "load_dataset", "load_digits", "load_elec2",
           "load_fashion_mnist", "load_mnist"]

DATASETS = ("digits", "mnist", "fashion-mnist", "elec2")
ENV_VAR = "AMSTREAM_DATA"

_SPLITS = ("train", "test")
_IDX_FILES = {s: (f"{p}-images-idx3-ubyte.gz", f"{p}-labels-idx1-ubyte.gz")  # (images, labels)
              for s, p in (("train", "train"), ("test", "t10k"))}
_OFFICIAL_MD5 = {
    "mnist/train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "mnist/train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "mnist/t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "mnist/t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "fashion-mnist/train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "fashion-mnist/train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "fashion-mnist/t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
_MNIST_STATS = (0.1307, 0.3081)
_FASHION_STATS = (0.2860, 0.3530)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_DIGIT_CLASSES = tuple(str(i) for i in range(10))
ELEC2_FILE = "elec2/elecNormNew.arff"
ELEC2_ROWS = 45_312
ELEC2_FEATURES = ("date", "day", "period", "nswprice", "nswdemand",
                  "vicprice", "vicdemand", "transfer")
ELEC2_TRAIN_FRACTION = 0.8
DIGITS_FILE = "datasets/data/digits.csv.gz"  # relative to the sklearn package

# (path, size, mtime_ns) -> md5 hex digest, so repeated loads do not re-hash.
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


class DataFileMissing(FileNotFoundError):
    """A data file needed by a loader does not exist."""

    def __init__(self, path: os.PathLike | str, layout: str, root: os.PathLike | str):
        self.path = pathlib.Path(path)
        super().__init__(f"Missing data file: {self.path}\nExpected layout: {layout} (data root "
                         f"in use: {root}).\nPoint the toolkit at the data with {ENV_VAR}="
                         "/path/to/data or root=/path/to/data (default: ~/.cache/amstream).")


class DataFileCorrupt(ValueError):
    """A data file exists but fails its md5 check or cannot be parsed."""


def data_dir(root: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the data directory: ``root`` if given, else ``$AMSTREAM_DATA`` if set and
    non-empty, else ``~/.cache/amstream`` (``~`` expanded; it need not exist).
    """
    if root is None:
        root = os.environ.get(ENV_VAR) or "~/.cache/amstream"
    return pathlib.Path(root).expanduser()


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory labelled data set.

    Attributes:
        x: Inputs, float32, first dimension = samples.
        y: Labels, int64, shape (N,).
        n_classes: Number of classes.
        name: Data set name (one of :data:`DATASETS`).
        classes: Class names, index = label.
    """

    x: torch.Tensor
    y: torch.Tensor
    n_classes: int
    name: str
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> Dataset:
        """Return a new Dataset with the given samples, in the given order.

        Args:
            indices: Integer indices (list, array or tensor) or a boolean mask.
        """
        idx = indices if torch.is_tensor(indices) else torch.as_tensor(np.asarray(indices))
        idx = idx if idx.dtype == torch.bool else idx.long()
        return dataclasses.replace(self, x=self.x[idx], y=self.y[idx])


def _require(path: pathlib.Path, layout: str, root: pathlib.Path) -> None:
    if not path.is_file():
        raise DataFileMissing(path, layout, root)


def _md5(path: pathlib.Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MD5_CACHE:
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _MD5_CACHE[key] = h.hexdigest()
    return _MD5_CACHE[key]


def _check_md5(path: pathlib.Path, expected: str) -> None:
    if (actual := _md5(path)) != expected:
        raise DataFileCorrupt(f"md5 mismatch for {path}: expected {expected}, got {actual}. "
                              "Replace it with the original file.")


@functools.lru_cache(maxsize=8)
def _read_idx(path: str, size: int, mtime_ns: int) -> np.ndarray:
    """Decode one idx ``.gz`` file into a read-only uint8 array (cached per file)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataFileCorrupt(f"{path}: not a readable gzip file ({e})") from e
    magic = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    ndim = {2051: 3, 2049: 1}.get(magic)
    if ndim is None or len(raw) < 4 + 4 * ndim:
        raise DataFileCorrupt(f"{path}: bad idx header (magic {magic}, expected 2051 or 2049)")
    shape, offset = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim]), 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise DataFileCorrupt(f"{path}: header says shape {shape} but the payload has "
                              f"{len(raw) - offset} bytes")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)
    arr.flags.writeable = False
    return arr


def _load_idx_pair(name: str, subdir: str, split: str, root, normalize: bool,
                   stats: tuple[float, float], classes: tuple[str, ...]) -> Dataset:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS} for {name}, got {split!r}")
    base = data_dir(root)
    layout = f"<root>/{subdir}/{_IDX_FILES['train'][0]} (and the other 3 idx .gz files)"
    arrays = []
    for fname in _IDX_FILES[split]:
        path = base / subdir / fname
        _require(path, layout, base)
        _check_md5(path, _OFFICIAL_MD5[f"{subdir}/{fname}"])
        st = path.stat()
        arrays.append(_read_idx(str(path.resolve()), st.st_size, st.st_mtime_ns))
    images, labels = arrays
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise DataFileCorrupt(f"{base / subdir}: images {images.shape} and labels "
                              f"{labels.shape} do not fit together (expected (N, 28, 28), (N,))")
    x = torch.from_numpy(images.copy()).to(torch.float32).div_(255.0).unsqueeze_(1)
    if normalize:
        x.sub_(stats[0]).div_(stats[1])
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(x=x, y=y, n_classes=10, name=name, classes=classes)


def load_mnist(split: str = "train", root: str | os.PathLike | None = None,
               normalize: bool = True) -> Dataset:
    """Load MNIST from ``<root>/mnist/`` (the original idx ``.gz`` files, md5-checked).

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: Data root; see :func:`data_dir`.
        normalize: Standardize with mean 0.1307, std 0.3081 after scaling to [0, 1].

    Returns:
        Dataset with x of shape (N, 1, 28, 28) and ``classes`` "0".."9".

    Raises:
        ValueError: Unknown split. DataFileMissing: A file is absent.
        DataFileCorrupt: md5 mismatch or malformed file.
    """
    return _load_idx_pair("mnist", "mnist", split, root, normalize, _MNIST_STATS,
                          _DIGIT_CLASSES)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None,
                       normalize: bool = True) -> Dataset:
    """Load Fashion-MNIST from ``<root>/fashion-mnist/`` (idx ``.gz`` files, md5-checked).

    Same as :func:`load_mnist`, but standardized with mean 0.2860, std 0.3530 and with
    the clothing class names in ``classes``.
    """
    return _load_idx_pair("fashion-mnist", "fashion-mnist", split, root, normalize,
                          _FASHION_STATS, FASHION_CLASSES)


@functools.lru_cache(maxsize=1)
def _parse_elec2(path: str, size: int, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    lines = pathlib.Path(path).read_text(encoding="ascii", errors="replace").splitlines()
    start = next((i + 1 for i, ln in enumerate(lines)
                  if ln.strip().lower() == "@data"), None)
    if start is None:
        raise DataFileCorrupt(f"{path}: no '@data' line in the ARFF header")
    attrs = [ln.split()[1] for ln in lines[:start] if ln.lower().startswith("@attribute")]
    if tuple(attrs) != ELEC2_FEATURES + ("class",):
        raise DataFileCorrupt(f"{path}: unexpected attributes {attrs}")
    feats, labels, label_map = [], [], {"DOWN": 0, "UP": 1}
    for lineno, ln in enumerate(lines[start:], start=start + 1):
        if not ln.strip():
            continue
        parts = ln.strip().split(",")
        try:
            if len(parts) != 9:
                raise ValueError(f"expected 9 fields, got {len(parts)}")
            row = [float(v) for v in parts[:8]]
            if row[1] not in (1, 2, 3, 4, 5, 6, 7):
                raise ValueError(f"day {parts[1]!r} not in 1..7")
            labels.append(label_map[parts[8]])
        except (ValueError, KeyError) as e:
            raise DataFileCorrupt(f"{path}, line {lineno}: malformed row {ln!r} ({e})") from e
        feats.append(row)
    if len(labels) != ELEC2_ROWS:
        raise DataFileCorrupt(f"{path}: expected {ELEC2_ROWS} rows, found {len(labels)}")
    x = np.asarray(feats, dtype=np.float64)
    x[:, 1] = (x[:, 1] - 1.0) / 6.0
    return x.astype(np.float32), np.asarray(labels, dtype=np.int64)


def load_elec2(root: str | os.PathLike | None = None) -> Dataset:
    """Load the Elec2 stream (``<root>/elec2/elecNormNew.arff``) in time order.

    Features are the 8 float32 columns ``date, day, period, nswprice, nswdemand,
    vicprice, vicdemand, transfer``; ``day`` (1..7) is mapped to ``(day - 1) / 6`` so all
    features lie in [0, 1]. Labels: DOWN = 0, UP = 1.

    Raises:
        DataFileMissing: The file is absent.
        DataFileCorrupt: Bad header, a malformed row (the message gives the line
            number), or a row count other than 45,312.
    """
    base = data_dir(root)
    path = base / ELEC2_FILE
    _require(path, f"<root>/{ELEC2_FILE}", base)
    st = path.stat()
    x, y = _parse_elec2(str(path.resolve()), st.st_size, st.st_mtime_ns)
    return Dataset(x=torch.from_numpy(x.copy()), y=torch.from_numpy(y.copy()), n_classes=2,
                   name="elec2", classes=("DOWN", "UP"))


@functools.lru_cache(maxsize=1)
def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("sklearn")
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    path = pathlib.Path(locs[0]) / DIGITS_FILE if locs else None
    if path is None or not path.is_file():
        raise ImportError("load_digits reads the digits data shipped with scikit-learn "
                          f"({DIGITS_FILE}), which is not installed: pip install scikit-learn")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != 65:
        raise DataFileCorrupt(f"{path}: expected 65 columns, got {table.shape[1]}")
    return table[:, :64], table[:, 64].astype(np.int64)


def load_digits(split: str = "all", test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Load the 8x8 digits set (1,797 samples) shipped inside scikit-learn.

    scikit-learn is located with ``importlib.util.find_spec`` and never imported.

    Args:
        split: ``"all"``, ``"train"`` or ``"test"``.
        test_fraction: Share of samples in the test split, in (0, 1).
        seed: Seed of the permutation that assigns samples to train/test. Train and
            test are disjoint and together cover all samples; each keeps file order.

    Returns:
        Dataset with x of shape (N, 1, 8, 8), scaled to [0, 1] by /16.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    if split not in ("all",) + _SPLITS:
        raise ValueError(f"split must be one of ('all', 'train', 'test'), got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    pixels, labels = _read_digits()
    ds = Dataset(x=torch.from_numpy((pixels / 16.0).astype(np.float32)).view(-1, 1, 8, 8),
                 y=torch.from_numpy(labels.copy()), n_classes=10, name="digits",
                 classes=_DIGIT_CLASSES)
    if split == "all":
        return ds
    n_test = int(round(len(ds) * test_fraction))
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return ds.subset(torch.sort(idx).values)


def load_dataset(name: str, split: str = "train",
                 root: str | os.PathLike | None = None) -> Dataset:
    """Load a data set by name.

    Args:
        name: One of :data:`DATASETS`: ``"digits"``, ``"mnist"``, ``"fashion-mnist"``,
            ``"elec2"``.
        split: ``"train"`` or ``"test"``; ``"all"`` for digits and elec2. For elec2,
            ``"all"`` is the whole stream and ``"train"`` / ``"test"`` are the first
            80% / last 20% of it in time order (36,249 / 9,063 rows).
        root: Data root; see :func:`data_dir` (ignored for digits).

    Raises:
        ValueError: Unknown name or split.
    """
    if name == "digits":
        return load_digits(split)
    if name == "mnist":
        return load_mnist(split, root)
    if name == "fashion-mnist":
        return load_fashion_mnist(split, root)
    if name == "elec2":
        if split not in ("all",) + _SPLITS:
            raise ValueError(f"split must be one of ('all', 'train', 'test'), got {split!r}")
        ds, cut = load_elec2(root), int(ELEC2_ROWS * ELEC2_TRAIN_FRACTION)
        return ds if split == "all" else ds.subset(
            range(cut) if split == "train" else range(cut, len(ds)))
    raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")


def iter_samples(dataset: Dataset, order: str = "stream", seed: int = 0,
                 start: int = 0) -> Iterator[tuple[torch.Tensor, int]]:
    """Yield ``(x_i, y_i)`` one sample at a time.

    Args:
        dataset: The data set.
        order: ``"stream"`` (stored order) or ``"shuffle"`` (a permutation fixed by
            ``seed``).
        seed: Seed for ``"shuffle"``.
        start: Position in the (possibly shuffled) order to resume from.

    Yields:
        ``x_i`` without a batch dimension and ``y_i`` as a Python int.
    """
    n = len(dataset)
    if order not in ("stream", "shuffle"):
        raise ValueError(f"order must be 'stream' or 'shuffle', got {order!r}")
    if not 0 <= start <= n:
        raise ValueError(f"start must be in [0, {n}], got {start}")
    idx: Sequence[int] = range(start, n) if order == "stream" else torch.randperm(
        n, generator=torch.Generator().manual_seed(seed))[start:].tolist()
    return _iter(dataset, idx)  # arguments are validated eagerly, not on first next()


def _iter(dataset: Dataset, idx: Sequence[int]) -> Iterator[tuple[torch.Tensor, int]]:
    for i in idx:
        yield dataset.x[i], int(dataset.y[i])

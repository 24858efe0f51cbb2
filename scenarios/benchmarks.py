"""Avalanche 0.6.0 benchmarks built from amstream's own data readers.

Every builder reads its data through :mod:`amstream.data` (nothing is downloaded and
Avalanche's ``~/.avalanche/data`` is never touched), then builds the benchmark from
in-memory tensors with Avalanche's classic generators (``nc_benchmark`` /
``tensors_benchmark``). The results are ``NCScenario`` / ``ClassificationScenario``
objects: items are ``(x, y, t)`` and experiences carry ``task_labels`` and
``classes_in_this_experience``. Seeds fix class orders, permutations and angles.

Avalanche is imported lazily, after the data are loaded: ``import scenarios.benchmarks``
is fast, an unknown name fails at once, and a missing data file raises
:class:`amstream.data.DataFileMissing` before Avalanche is imported or anything trains.

Example::

    bm = make_benchmark("split-mnist", n_experiences=5, seed=0)
    for exp in bm.train_stream:
        strategy.train(online(exp, experience_size=10), eval_streams=[])
    strategy.eval(bm.test_stream)
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from amstream.data import Dataset, load_digits, load_elec2, load_fashion_mnist, load_mnist

__all__ = ["BENCHMARKS", "elec2_stream", "make_benchmark", "online", "permuted_mnist",
           "rotated_mnist", "split_digits", "split_fashion_mnist", "split_mnist"]

PathLike = str | os.PathLike | None


def _avalanche_benchmarks():
    """Import ``avalanche.benchmarks`` (slow: ~8 s the first time), hiding its import noise
    (jaxopt's DeprecationWarning, qpsolvers' "no QP solver found" UserWarning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="jaxopt")
        warnings.filterwarnings("ignore", message="no QP solver found", module="qpsolvers")
        import avalanche.benchmarks as avl_benchmarks
    return avl_benchmarks


def _load_pair(loader: Callable[..., Dataset], root: PathLike,
               subset: int | None) -> tuple[Dataset, Dataset]:
    """Load the train and test splits; ``subset`` keeps the first N train, N // 6 test rows."""
    train, test = loader("train", root), loader("test", root)
    if subset is not None:
        if subset < 6:
            raise ValueError(f"subset must be an int >= 6, got {subset!r}")
        train = train.subset(range(min(subset, len(train))))
        test = test.subset(range(min(subset // 6, len(test))))
    return train, test


def _as_torch_dataset(ds: Dataset) -> torch.utils.data.TensorDataset:
    tds = torch.utils.data.TensorDataset(ds.x, ds.y)
    tds.targets = ds.y.tolist()  # Avalanche reads the class labels from `targets`
    return tds


def _split(train: Dataset, test: Dataset, n_experiences: int, task_incremental: bool,
           seed: int, class_order: Sequence[int] | None):
    """Class-incremental (or task-incremental) split of ``train`` / ``test`` by class."""
    n = train.n_classes
    for part, ds in (("train", train), ("test", test)):
        missing = sorted(set(range(n)) - set(ds.y.unique().tolist()))
        if missing:
            raise ValueError(f"{ds.name} {part} split has no samples of classes {missing}; "
                             "use a larger subset")
    if n_experiences < 1 or n % n_experiences:
        raise ValueError(f"n_experiences must divide the {n} classes of {train.name}, "
                         f"got {n_experiences}")
    if class_order is not None:
        class_order = [int(c) for c in class_order]
        if sorted(class_order) != list(range(n)):
            raise ValueError(f"class_order must be a permutation of 0..{n - 1}, "
                             f"got {class_order}")
    nc_benchmark = _avalanche_benchmarks().nc_benchmark
    # nc_benchmark calls torch.random.manual_seed(seed) to shuffle the classes (the same order
    # as Avalanche's SplitMNIST(seed=seed)); fork_rng keeps the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        return nc_benchmark(
            _as_torch_dataset(train), _as_torch_dataset(test), n_experiences,
            task_labels=task_incremental, shuffle=class_order is None,
            seed=seed if class_order is None else None, fixed_class_order=class_order,
            class_ids_from_zero_in_each_exp=task_incremental)


def _from_tensors(train: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  test: Sequence[tuple[torch.Tensor, torch.Tensor]], task_incremental: bool):
    """One experience per (x, y) pair; each has its own test set (no complete test set)."""
    labels = list(range(len(train))) if task_incremental else [0] * len(train)
    return _avalanche_benchmarks().tensors_benchmark(
        train_tensors=[list(p) for p in train], test_tensors=[list(p) for p in test],
        task_labels=labels, complete_test_set_only=False)


def _rows(ds: Dataset) -> Dataset:
    """Images ``(N, 1, H, W)`` as sequences ``(N, H time steps, W features)`` for recurrent models."""
    return dataclasses.replace(ds, x=ds.x[:, 0].contiguous())


def split_digits(n_experiences: int = 5, *, task_incremental: bool = False, seed: int = 0,
                 class_order: Sequence[int] | None = None, rows: bool = False):
    """Split digits: the embedded 8x8 digits set, classes divided among experiences.

    Train / test are ``load_digits("train")`` / ``load_digits("test")`` (1,438 / 359 images,
    x of shape (1, 8, 8) in [0, 1]); no data files are needed.

    Args:
        n_experiences: Number of experiences; must divide 10.
        task_incremental: Give experience i task label i and class ids 0..k-1 within each
            experience (``class_ids_from_zero_in_each_exp``). Default: class-incremental,
            task label 0 everywhere, original class ids.
        seed: Seeds the class order (the same order as Avalanche's ``SplitMNIST(seed=seed)``).
        class_order: Explicit class order; overrides ``seed``.
        rows: Each image as a sequence of 8 rows of 8 pixels, x of shape (8, 8), for recurrent
            models (:mod:`amstream.models`).

    Returns:
        An Avalanche ``NCScenario``. Avalanche stores each experience grouped by class
        (ascending ids; file order within a class), so shuffle when streaming it.
    """
    train, test = load_digits("train"), load_digits("test")
    if rows:
        train, test = _rows(train), _rows(test)
    return _split(train, test, n_experiences, task_incremental, seed, class_order)


def split_mnist(n_experiences: int = 5, *, task_incremental: bool = False, seed: int = 0,
                class_order: Sequence[int] | None = None, root: PathLike = None,
                subset: int | None = None, rows: bool = False):
    """Split MNIST (Zenke et al., 2017): MNIST's 10 classes divided among experiences.

    Args:
        n_experiences: Number of experiences; must divide 10.
        task_incremental: As in :func:`split_digits`.
        seed: Seeds the class order (as Avalanche's ``SplitMNIST(seed=seed)``).
        class_order: Explicit class order; overrides ``seed``.
        root: Data root (see :func:`amstream.data.data_dir`).
        subset: Keep only the first N training and N // 6 test images (for CI-sized runs).
        rows: Each image as a sequence of 28 rows of 28 pixels (row-sequential MNIST), for
            recurrent models.

    Returns:
        An Avalanche ``NCScenario`` with x of shape (1, 28, 28) (``rows``: (28, 28)), standardized.

    Raises:
        amstream.data.DataFileMissing: The MNIST files are not under the data root.
    """
    train, test = _load_pair(load_mnist, root, subset)
    if rows:
        train, test = _rows(train), _rows(test)
    return _split(train, test, n_experiences, task_incremental, seed, class_order)


def split_fashion_mnist(n_experiences: int = 5, *, task_incremental: bool = False,
                        seed: int = 0, class_order: Sequence[int] | None = None,
                        root: PathLike = None, subset: int | None = None):
    """Split Fashion-MNIST (Xiao et al., 2017); arguments as in :func:`split_mnist`."""
    train, test = _load_pair(load_fashion_mnist, root, subset)
    return _split(train, test, n_experiences, task_incremental, seed, class_order)


def permuted_mnist(n_experiences: int = 10, *, seed: int = 0, root: PathLike = None,
                   subset: int | None = None, task_incremental: bool = False):
    """Permuted MNIST (Goodfellow et al., 2013; Kirkpatrick et al., 2017): domain shift.

    Follows Avalanche's ``PermutedMNIST`` convention: every experience, the first one
    included, permutes the 784 pixels with ``np.random.RandomState(seed).permutation(784)``
    (drawn in experience order), so the permutations equal Avalanche's for the same seed.
    The permutation is applied to the tensors once, identically to the train and the test
    images of that experience. Each experience holds all training images (all 10 classes),
    so the full benchmark materializes ``n_experiences`` copies of MNIST (~190 MB each).

    Args:
        n_experiences: Number of experiences (permutations).
        seed: Seed of the permutations.
        root: Data root. subset: As in :func:`split_mnist`.
        task_incremental: Experience i gets task label i (default: 0 everywhere).

    Returns:
        An Avalanche ``ClassificationScenario``; ``test_stream[i]`` is the test set under
        permutation i.
    """
    train, test = _load_pair(load_mnist, root, subset)
    rng = np.random.RandomState(seed)
    tr, te = [], []
    for _ in range(n_experiences):
        perm = torch.from_numpy(rng.permutation(784)).long()
        tr.append((train.x.flatten(1)[:, perm].reshape(train.x.shape), train.y))
        te.append((test.x.flatten(1)[:, perm].reshape(test.x.shape), test.y))
    return _from_tensors(tr, te, task_incremental)


def rotated_mnist(n_experiences: int = 10, *, seed: int = 0, root: PathLike = None,
                  subset: int | None = None, angles: Sequence[float] | str | None = None,
                  task_incremental: bool = False):
    """Rotated MNIST (Lopez-Paz & Ranzato, 2017): each experience rotates every image.

    Images are rotated once, on the tensors, with ``torchvision``'s bilinear ``rotate``
    (counter-clockwise degrees; the corners are filled with the standardized background
    value). An angle that is a multiple of 360 leaves the images exactly unchanged.

    Args:
        n_experiences: Number of experiences (angles).
        seed: Seed of the angles when ``angles="random"``; otherwise unused.
        root: Data root. subset: As in :func:`split_mnist`.
        angles: One angle per experience. Default (None): evenly spaced in [0, 180),
            ``180 * i / n_experiences``, so experience 0 holds the original images.
            ``"random"``: ``np.random.RandomState(seed).uniform(0, 180, n_experiences)``.
        task_incremental: Experience i gets task label i (default: 0 everywhere).

    Returns:
        An Avalanche ``ClassificationScenario``; the angles are stored on it as
        ``benchmark.angles``.
    """
    from torchvision.transforms.functional import InterpolationMode, rotate

    if angles is None:
        angles = [180.0 * i / n_experiences for i in range(n_experiences)]
    elif isinstance(angles, str):
        if angles != "random":
            raise ValueError(f"angles must be a sequence, None or 'random', got {angles!r}")
        angles = np.random.RandomState(seed).uniform(0.0, 180.0, n_experiences).tolist()
    angles = [float(a) for a in angles]
    if len(angles) != n_experiences:
        raise ValueError(f"got {len(angles)} angles for {n_experiences} experiences")
    train, test = _load_pair(load_mnist, root, subset)
    fill = [float(train.x.min())]  # background (pixel 0) after standardization

    def turn(x: torch.Tensor, angle: float) -> torch.Tensor:
        if angle % 360.0 == 0.0:
            return x.clone()
        return rotate(x, angle, interpolation=InterpolationMode.BILINEAR, fill=fill)

    bm = _from_tensors([(turn(train.x, a), train.y) for a in angles],
                       [(turn(test.x, a), test.y) for a in angles], task_incremental)
    bm.angles = angles
    return bm


def elec2_stream(n_experiences: int = 10, *, seed: int = 0, root: PathLike = None,
                 test_fraction: float = 0.2, task_incremental: bool = False):
    """Elec2 (Harries, 1999) in time order, cut into consecutive experiences.

    The 45,312 half-hourly rows are cut into ``n_experiences`` consecutive, near-equal
    chunks (a domain-incremental stream with real drift; both classes, UP and DOWN, in every
    experience). Within each chunk the first ``1 - test_fraction`` rows train and the last
    ``test_fraction`` rows are that experience's test set, so ``test_stream[i]`` measures
    the distribution of period i, and train_0, test_0, train_1, test_1, ... is exactly the
    original stream in order. Nothing is shuffled.

    Args:
        n_experiences: Number of chunks.
        seed: Unused (the order is fixed by time); accepted so every builder takes it.
        root: Data root (see :func:`amstream.data.data_dir`).
        test_fraction: Share of each chunk used as its test set, in (0, 1).
        task_incremental: Experience i gets task label i (default: 0 everywhere).

    Returns:
        An Avalanche ``ClassificationScenario`` with x of shape (8,), labels DOWN=0, UP=1.

    Raises:
        amstream.data.DataFileMissing: The ARFF file is not under the data root.
    """
    del seed
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ds = load_elec2(root)
    if not 1 <= n_experiences <= len(ds) // 10:
        raise ValueError(f"n_experiences must be in [1, {len(ds) // 10}], got {n_experiences}")
    bounds = np.linspace(0, len(ds), n_experiences + 1).round().astype(int)
    tr, te = [], []
    for i, (start, end) in enumerate(itertools.pairwise(bounds.tolist())):
        cut = start + round((end - start) * (1.0 - test_fraction))
        for part, (a, b) in (("train", (start, cut)), ("test", (cut, end))):
            if b - a < 1 or ds.y[a:b].unique().numel() < 2:
                raise ValueError(f"elec2 experience {i} ({part} rows {a}..{b - 1}) lacks a "
                                 "class; use fewer experiences or another test_fraction")
        tr.append((ds.x[start:cut], ds.y[start:cut]))
        te.append((ds.x[cut:end], ds.y[cut:end]))
    return _from_tensors(tr, te, task_incremental)


def online(stream: Any, experience_size: int, *, seed: int = 0, shuffle: bool = True):
    """Split experiences into an online stream of small sub-experiences.

    A thin wrapper over Avalanche's ``split_online_stream(..., access_task_boundaries=True)``:
    each ``OnlineCLExperience`` exposes ``origin_experience``, ``is_first_subexp``,
    ``is_last_subexp``, ``sub_stream_length`` and ``subexp_size`` in train mode too, so
    plugins can act at experience boundaries. Two fixes over the 0.6.0 splitter:
    ``is_last_subexp`` is also set when ``experience_size`` divides the experience (0.6.0
    never sets it then), and each sub-experience gets ``task_labels`` (plus ``task_label``
    when unique) and ``classes_in_this_experience`` from its own data (0.6.0 strips them;
    without ``task_labels`` the strategy calls ``model(x)`` without task labels, so a
    ``MultiTaskModule`` fails on the online stream).

    Train one original experience at a time and evaluate at the original boundaries::

        for exp in bm.train_stream:
            strategy.train(online(exp, 10), eval_streams=[])
        strategy.eval(bm.test_stream)

    Pass ``eval_streams=[]`` (otherwise ``train()`` uses the whole online stream as its eval
    stream) and keep the strategy's ``eval_every=-1`` (otherwise it evaluates after every
    sub-experience). ``current_experience`` of a sub-experience is its index in the online
    stream; use ``origin_experience.current_experience`` for the original id.

    Args:
        stream: An experience, or an iterable of experiences (e.g. ``bm.train_stream``).
        experience_size: Samples per sub-experience; the last one of each experience may
            be smaller. Every sample appears exactly once.
        seed: Seed of the within-experience shuffle (the same for every experience).
        shuffle: Shuffle each experience before cutting it (False keeps stored order).

    Returns:
        A lazy Avalanche ``CLStream`` (named ``"<stream>_online"``, e.g. ``train_online``).
    """
    if experience_size < 1:
        raise ValueError(f"experience_size must be >= 1, got {experience_size}")
    _avalanche_benchmarks()
    from avalanche.benchmarks.scenarios.generic_scenario import CLExperience
    from avalanche.benchmarks.scenarios.online import (FixedSizeExperienceSplitter,
                                                       split_online_stream)

    def split(exp, size: int) -> Iterable[Any]:
        splitter = FixedSizeExperienceSplitter(exp, size, shuffle=shuffle, drop_last=False,
                                               access_task_boundaries=True, seed=seed)
        for i, sub in enumerate(splitter):
            if i == sub.sub_stream_length - 1:
                sub.is_last_subexp = True
            tasks = sorted(sub.dataset.targets_task_labels.uniques)
            sub.task_labels = tasks
            if len(tasks) == 1:
                sub.task_label = tasks[0]
            sub.classes_in_this_experience = sorted(sub.dataset.targets.uniques)
            yield sub

    source = [stream] if isinstance(stream, CLExperience) else stream
    return split_online_stream(source, experience_size, shuffle=shuffle,
                               experience_split_strategy=split, access_task_boundaries=True,
                               seed=seed)


BENCHMARKS: dict[str, Callable[..., Any]] = {
    "split-digits": split_digits,
    "split-mnist": split_mnist,
    "permuted-mnist": permuted_mnist,
    "rotated-mnist": rotated_mnist,
    "split-fashion-mnist": split_fashion_mnist,
    "elec2": elec2_stream,
}


def make_benchmark(name: str, **kwargs: Any):
    """Build a benchmark by name, e.g. ``make_benchmark("split-mnist", seed=1)``.

    Args:
        name: A key of :data:`BENCHMARKS`.
        **kwargs: Passed to the builder.

    Raises:
        ValueError: Unknown name (checked before any import or data loading).
        amstream.data.DataFileMissing: The benchmark's data files are missing.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known benchmarks: "
                         f"{', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](**kwargs)

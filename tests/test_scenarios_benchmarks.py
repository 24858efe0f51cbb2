"""Tests for scenarios.benchmarks: Avalanche benchmarks built from amstream's real data."""
from __future__ import annotations

import collections
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from amstream.data import DataFileMissing, load_digits, load_elec2, load_mnist
from scenarios import benchmarks as B

SUBSET = 1200  # MNIST training images kept (and SUBSET // 6 test images)


def tensors(exp):
    """All (x, y, t) of an experience as three batched tensors, in stored order."""
    return next(iter(DataLoader(exp.dataset, batch_size=len(exp.dataset), shuffle=False)))


def check_items(bm, x_shape):
    """Items are (x, y, t) with x float32 of x_shape and int labels; batches are tensors."""
    for stream in (bm.train_stream, bm.test_stream):
        for exp in stream:
            item = exp.dataset[0]
            assert len(item) == 3
            assert torch.is_tensor(item[0]) and item[0].dtype == torch.float32
            assert tuple(item[0].shape) == x_shape
            assert isinstance(item[1], int) and isinstance(item[2], int)
    x, y, t = tensors(bm.train_stream[0])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and t.dtype == torch.int64


@pytest.fixture(scope="module")
def digits_ci():
    return B.split_digits(5, seed=0)


@pytest.fixture(scope="module")
def mnist_ci(data_root):
    return B.split_mnist(5, seed=0, root=data_root, subset=SUBSET)


# ---------------------------------------------------------------- registry and failures


def test_registry_and_unknown_name(tmp_path):
    assert list(B.BENCHMARKS) == ["split-digits", "split-mnist", "permuted-mnist",
                                  "rotated-mnist", "split-fashion-mnist", "elec2"]
    # Fails on the name before touching the (empty) data root.
    with pytest.raises(ValueError, match="'nope'") as info:
        B.make_benchmark("nope", root=tmp_path)
    for name in B.BENCHMARKS:
        assert name in str(info.value)


def test_import_and_unknown_name_do_not_import_avalanche():
    code = ("import sys, scenarios.benchmarks as B\n"
            "try:\n    B.make_benchmark('nope')\nexcept ValueError:\n    pass\n"
            "assert 'avalanche' not in sys.modules, 'avalanche imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   cwd=pathlib.Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("name", ["split-mnist", "permuted-mnist", "split-fashion-mnist",
                                  "elec2"])
def test_empty_data_root_raises_data_file_missing(tmp_path, name):
    with pytest.raises(DataFileMissing, match="Missing data file"):
        B.make_benchmark(name, root=tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="divide"):
        B.split_digits(3)
    with pytest.raises(ValueError, match="permutation"):
        B.split_digits(5, class_order=[0, 1, 2])
    with pytest.raises(ValueError, match="angles"):
        B.rotated_mnist(3, angles=[0.0, 90.0])
    with pytest.raises(ValueError, match="experience_size"):
        B.online([], 0)


def test_subset_too_small_names_missing_classes(data_root):
    with pytest.raises(ValueError, match="no samples of classes"):
        B.split_mnist(5, root=data_root, subset=12)


# ---------------------------------------------------------------- split benchmarks


def test_split_digits_class_incremental(digits_ci):
    bm = digits_ci
    assert len(bm.train_stream) == len(bm.test_stream) == 5
    order = list(bm.classes_order)
    assert sorted(order) == list(range(10))
    for i, (tr, te) in enumerate(zip(bm.train_stream, bm.test_stream)):
        assert sorted(tr.classes_in_this_experience) == sorted(order[2 * i:2 * i + 2])
        assert tr.task_labels == te.task_labels == [0]
        _, y, t = tensors(tr)
        assert set(y.tolist()) == set(order[2 * i:2 * i + 2])
        assert t.eq(0).all()
    assert sum(len(e.dataset) for e in bm.train_stream) == len(load_digits("train"))
    assert sum(len(e.dataset) for e in bm.test_stream) == len(load_digits("test"))
    check_items(bm, (1, 8, 8))


def test_split_class_order_is_fixed_by_seed(digits_ci):
    rng_state = torch.random.get_rng_state()
    same = B.split_digits(5, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # global RNG untouched
    assert list(same.classes_order) == list(digits_ci.classes_order)
    assert list(B.split_digits(5, seed=1).classes_order) != list(digits_ci.classes_order)
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    for seed in (0, 1):
        bm = B.split_digits(2, seed=seed, class_order=order)
        assert list(bm.classes_order) == order
        assert [sorted(e.classes_in_this_experience) for e in bm.train_stream] == [
            [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]


def test_split_digits_task_incremental():
    order = [3, 7, 0, 9, 1, 8, 2, 6, 4, 5]
    bm = B.split_digits(5, task_incremental=True, class_order=order)
    counts = collections.Counter(load_digits("train").y.tolist())
    for i, (tr, te) in enumerate(zip(bm.train_stream, bm.test_stream)):
        assert tr.task_labels == te.task_labels == [i]
        assert sorted(tr.classes_in_this_experience) == [0, 1]
        assert bm.original_classes_in_exp[i] == set(order[2 * i:2 * i + 2])
        _, y, t = tensors(tr)
        assert t.eq(i).all() and set(y.tolist()) == {0, 1}
        # local label k of experience i is original class order[2i + k]
        assert [int((y == k).sum()) for k in (0, 1)] == [counts[order[2 * i + k]]
                                                         for k in (0, 1)]


def test_split_mnist(mnist_ci, data_root):
    bm = mnist_ci
    assert len(bm.train_stream) == 5
    assert list(bm.classes_order) == list(B.split_digits(5, seed=0).classes_order)
    assert sum(len(e.dataset) for e in bm.train_stream) == SUBSET
    assert sum(len(e.dataset) for e in bm.test_stream) == SUBSET // 6
    assert all(e.task_labels == [0] for e in bm.train_stream)
    check_items(bm, (1, 28, 28))
    # The samples are the first SUBSET training images, unchanged; Avalanche stores an
    # experience grouped by class (ascending ids), file order within a class.
    first = load_mnist("train", data_root).subset(range(SUBSET))
    x, y, _ = tensors(bm.train_stream[0])
    lo, hi = sorted(bm.classes_order[:2])
    assert torch.equal(y, torch.cat([first.y[first.y == lo], first.y[first.y == hi]]))
    assert torch.equal(x, torch.cat([first.x[first.y == lo], first.x[first.y == hi]]))


def test_split_mnist_task_incremental(data_root):
    bm = B.make_benchmark("split-mnist", n_experiences=5, task_incremental=True, seed=3,
                          root=data_root, subset=SUBSET)
    assert [e.task_labels for e in bm.train_stream] == [[i] for i in range(5)]
    assert all(sorted(e.classes_in_this_experience) == [0, 1] for e in bm.test_stream)
    assert tensors(bm.test_stream[4])[2].eq(4).all()


def test_split_fashion_mnist(data_root):
    bm = B.split_fashion_mnist(2, seed=0, root=data_root, subset=SUBSET)
    assert len(bm.train_stream) == 2
    assert [len(e.classes_in_this_experience) for e in bm.train_stream] == [5, 5]
    assert sum(len(e.dataset) for e in bm.train_stream) == SUBSET
    check_items(bm, (1, 28, 28))


# ---------------------------------------------------------------- permuted / rotated


def test_permuted_mnist(data_root):
    bm = B.permuted_mnist(3, seed=5, root=data_root, subset=SUBSET)
    assert len(bm.train_stream) == len(bm.test_stream) == 3
    check_items(bm, (1, 28, 28))
    train = load_mnist("train", data_root).subset(range(SUBSET))
    test = load_mnist("test", data_root).subset(range(SUBSET // 6))
    rng = np.random.RandomState(5)  # Avalanche's PermutedMNIST convention
    xs = []
    for i, (tr, te) in enumerate(zip(bm.train_stream, bm.test_stream)):
        perm = torch.from_numpy(rng.permutation(784))
        assert not torch.equal(perm, torch.arange(784))  # the first one too
        assert tr.task_labels == [0] and sorted(tr.classes_in_this_experience) == list(range(10))
        x, y, t = tensors(tr)
        assert torch.equal(y, train.y) and t.eq(0).all()
        assert torch.equal(x.flatten(1), train.x.flatten(1)[:, perm])
        xt, yt, _ = tensors(te)  # same permutation for the test set of the experience
        assert torch.equal(xt.flatten(1), test.x.flatten(1)[:, perm])
        assert torch.equal(yt, test.y)
        # a real permutation of the same image: sorted pixel values are equal
        assert torch.equal(x.flatten(1).sort(1).values, train.x.flatten(1).sort(1).values)
        xs.append(x)
    assert not torch.equal(xs[0], xs[1]) and not torch.equal(xs[1], xs[2])
    again = B.permuted_mnist(3, seed=5, root=data_root, subset=SUBSET, task_incremental=True)
    assert torch.equal(tensors(again.train_stream[2])[0], xs[2])
    assert [e.task_labels for e in again.train_stream] == [[0], [1], [2]]
    other = B.permuted_mnist(1, seed=6, root=data_root, subset=SUBSET)
    assert not torch.equal(tensors(other.train_stream[0])[0], xs[0])


def test_rotated_mnist(data_root):
    train = load_mnist("train", data_root).subset(range(SUBSET))
    test = load_mnist("test", data_root).subset(range(SUBSET // 6))
    bm = B.rotated_mnist(3, root=data_root, subset=SUBSET)
    assert bm.angles == [0.0, 60.0, 120.0]
    assert all(e.task_labels == [0] for e in bm.train_stream)
    check_items(bm, (1, 28, 28))
    x0, y0, _ = tensors(bm.train_stream[0])
    assert torch.equal(x0, train.x) and torch.equal(y0, train.y)  # angle 0: the originals
    # Rotating experience 1 back by 60 degrees approximately recovers the originals.
    from torchvision.transforms.functional import InterpolationMode, rotate
    fill = [float(train.x.min())]
    for exp, orig in ((bm.train_stream[1], train.x), (bm.test_stream[1], test.x)):
        x1 = tensors(exp)[0]
        back = rotate(x1, -60.0, interpolation=InterpolationMode.BILINEAR, fill=fill)
        assert (back - orig).abs().mean() < 0.3 * (x1 - orig).abs().mean()
    # 90 degrees is counter-clockwise rot90, for train and test alike.
    bm90 = B.rotated_mnist(2, root=data_root, subset=SUBSET, angles=[90.0, 360.0])
    for exp, orig in ((bm90.train_stream[0], train.x), (bm90.test_stream[0], test.x)):
        torch.testing.assert_close(tensors(exp)[0], torch.rot90(orig, 1, dims=(-2, -1)),
                                   atol=1e-4, rtol=0)
    assert torch.equal(tensors(bm90.test_stream[1])[0], test.x)
    rnd = B.rotated_mnist(4, seed=2, root=data_root, subset=SUBSET, angles="random")
    assert rnd.angles == B.rotated_mnist(4, seed=2, root=data_root, subset=60,
                                         angles="random").angles
    assert all(0.0 <= a < 180.0 for a in rnd.angles) and len(set(rnd.angles)) == 4


# ---------------------------------------------------------------- elec2


def test_elec2_stream_keeps_time_order(data_root):
    bm = B.make_benchmark("elec2", root=data_root)
    assert len(bm.train_stream) == len(bm.test_stream) == 10
    check_items(bm, (8,))
    full = load_elec2(data_root)
    parts_x, parts_y = [], []
    for i, (tr, te) in enumerate(zip(bm.train_stream, bm.test_stream)):
        assert tr.task_labels == te.task_labels == [0]
        assert sorted(tr.classes_in_this_experience) == sorted(te.classes_in_this_experience) \
            == [0, 1]
        n_tr, n_te = len(tr.dataset), len(te.dataset)
        assert abs(n_te / (n_tr + n_te) - 0.2) < 1e-3
        for exp in (tr, te):
            x, y, _ = tensors(exp)
            parts_x.append(x)
            parts_y.append(y)
    # train_0, test_0, train_1, ... is exactly the original stream, in time order
    # (The file's normalized `date` column itself is not monotone: it drops 5 times.)
    assert torch.equal(torch.cat(parts_x), full.x) and torch.equal(torch.cat(parts_y), full.y)
    ti = B.elec2_stream(4, root=data_root, task_incremental=True, test_fraction=0.5)
    assert [e.task_labels for e in ti.test_stream] == [[0], [1], [2], [3]]
    assert len(ti.train_stream[0].dataset) == len(ti.test_stream[0].dataset)


# ---------------------------------------------------------------- online


def _key(x, y):
    return x.numpy().tobytes(), int(y)


def test_online_covers_each_experience_once(digits_ci):
    bm = digits_ci
    size = 50
    subs = list(B.online(bm.train_stream, size, seed=1))
    by_origin = collections.defaultdict(list)
    for sub in subs:
        train_view = sub.train()  # boundaries readable in train mode (access_task_boundaries)
        by_origin[train_view.origin_experience.current_experience].append(train_view)
    assert sorted(by_origin) == list(range(5))
    assert len(subs) == sum(math.ceil(len(e.dataset) / size) for e in bm.train_stream)
    for i, exp in enumerate(bm.train_stream):
        group = by_origin[i]
        n = len(exp.dataset)
        assert [len(s.dataset) for s in group] == [size] * (n // size) + (
            [n % size] if n % size else [])
        assert [s.is_first_subexp for s in group] == [True] + [False] * (len(group) - 1)
        assert [s.is_last_subexp for s in group] == [False] * (len(group) - 1) + [True]
        assert all(s.sub_stream_length == len(group) for s in group)
        assert all(s.task_labels == [0] and s.task_label == 0 for s in group)
        seen = collections.Counter()
        for s in group:
            x, y, _ = tensors(s)
            assert set(s.classes_in_this_experience) == set(y.tolist())
            seen.update(_key(a, b) for a, b in zip(x, y))
        x, y, _ = tensors(exp)
        assert seen == collections.Counter(_key(a, b) for a, b in zip(x, y))


def test_online_single_experience_order_and_last_flag(digits_ci):
    exp = digits_ci.train_stream[0]
    n = len(exp.dataset)
    size = next(d for d in range(10, n) if n % d == 0)  # divides n: 0.6.0 misses is_last
    subs = list(B.online(exp, size, seed=0))
    assert len(subs) == n // size and [s.is_last_subexp for s in subs][-1]
    assert [s.current_experience for s in subs] == list(range(len(subs)))
    again = list(B.online(exp, size, seed=0))
    assert torch.equal(tensors(subs[0])[0], tensors(again[0])[0])  # deterministic shuffle
    plain = list(B.online(exp, size, shuffle=False))
    assert torch.equal(torch.cat([tensors(s)[0] for s in plain]), tensors(exp)[0])
    assert not torch.equal(tensors(subs[0])[0], tensors(plain[0])[0])


@pytest.mark.filterwarnings("ignore:No loggers specified")
def test_online_stream_trains_a_multitask_model():
    """The sub-experiences carry task labels, so Avalanche passes them to the model."""
    from avalanche.models import MultiHeadClassifier, MultiTaskModule
    from avalanche.training import Naive

    class Heads(MultiTaskModule):
        def __init__(self):
            super().__init__()
            self.head = MultiHeadClassifier(64, 2)

        def forward_single_task(self, x, task_label):
            return self.head(x.flatten(1), task_label)

    bm = B.split_digits(5, task_incremental=True)
    model = Heads()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     train_mb_size=10, eval_every=-1, evaluator=None)
    for exp in bm.train_stream[:2]:
        strategy.train(B.online(exp, 100), eval_streams=[])
    strategy.eval(bm.test_stream[:2])
    assert set(model.head.classifiers) == {"0", "1"}

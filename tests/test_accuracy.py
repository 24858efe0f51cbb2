"""Real-data accuracy floors, CI-sized, taken from measured runs (see BENCHMARKS.md).

Protocol of the MNIST rows: 784-100-100-10 ReLU MLP, batch 200, one pass over the 60,000 training
images in a seeded random order, accuracy on the 10,000 test images. The floors sit about half a
point to two points below the measured values so that they catch a broken learner, not noise.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from amstream import AMAdam, AMMem, Backprop, prequential
from amstream.data import iter_samples, load_elec2, load_mnist


def mnist_mlp(batchnorm: bool) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten()]
    width = 784
    for _ in range(2):
        layers.append(nn.Linear(width, 100))
        if batchnorm:
            layers.append(nn.BatchNorm1d(100))
        layers.append(nn.ReLU())
        width = 100
    layers.append(nn.Linear(100, 10))
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def mnist(data_root):
    return load_mnist("train", root=data_root), load_mnist("test", root=data_root)


def one_epoch_accuracy(learner, mnist, batch_size: int = 200) -> float:
    train, test = mnist
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    for start in range(0, len(train), batch_size):
        idx = order[start:start + batch_size]
        info = learner.learn(train.x[idx], train.y[idx])
        assert not info.rolled_back
    correct = sum(int((learner.predict(test.x[i:i + 2000]).argmax(1) == test.y[i:i + 2000]).sum())
                  for i in range(0, len(test), 2000))
    return correct / len(test)


# (learner factory, BatchNorm, floor); measured one-epoch test accuracy (CPU, seed 0) in comments.
MNIST_FLOORS = {
    "am-adam-bn": (lambda m: AMAdam(m, device="cpu"), True, 0.960),  # 0.9675
    "am-adam": (lambda m: AMAdam(m, device="cpu"), False, 0.925),  # 0.9451 (0.9366-0.9522: rounding moves it)
    "am-mem": (lambda m: AMMem(m, device="cpu"), False, 0.92),  # 0.9340
    "backprop-adam-bn": (lambda m: Backprop(m, lr=0.003, device="cpu"), True, 0.960),  # 0.9681
}


@pytest.mark.parametrize("name", MNIST_FLOORS)
def test_mnist_one_epoch_accuracy_floor(name, mnist):
    factory, batchnorm, floor = MNIST_FLOORS[name]
    accuracy = one_epoch_accuracy(factory(mnist_mlp(batchnorm)), mnist)
    print(f"{name}: {accuracy:.4f}")
    assert accuracy >= floor, f"{name}: test accuracy {accuracy:.4f} after one epoch, floor {floor}"


ELEC2_FLOORS = {"am-adam": (AMAdam, 0.62), "am-mem": (AMMem, 0.76)}


@pytest.mark.parametrize("name", ELEC2_FLOORS)
def test_elec2_prequential_floor(name, data_root):
    """The first 10,000 half-hours of Elec2, test-then-train in time order, batches of 10.

    Measured: AM-Adam 0.647, AM-mem 0.794, backprop-Adam 0.599 (lr 1e-3) / 0.640 (lr 1e-2);
    always predicting the majority class gives 0.567.
    """
    cls, floor = ELEC2_FLOORS[name]
    data = load_elec2(root=data_root)
    torch.manual_seed(0)
    learner = cls(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)), device="cpu")
    samples = (s for i, s in zip(range(10_000), iter_samples(data, order="stream")))
    result = prequential(samples, learner, batch_size=10)
    print(f"elec2 prequential, {name}: {result.accuracy:.4f}")
    assert result.n_seen == 10_000
    assert result.accuracy >= floor

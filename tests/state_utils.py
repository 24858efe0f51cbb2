"""Comparing learner states exactly (shared by the test modules)."""
from __future__ import annotations

import copy
import math

import torch


def snapshot(learner) -> dict:
    """A deep copy of everything the learner would checkpoint."""
    return copy.deepcopy(learner.state_dict())


def assert_same_state(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> None:
    """Tensors equal bit for bit (same dtype), containers and plain values equal, recursively.

    ``ignore``: top-level keys left out (``"stream"``: the micro-batch buffer and the feature order
    of ``learn_one``, when two learners reached the same weights by different input forms).
    """
    a = {k: v for k, v in a.items() if k not in ignore}
    b = {k: v for k, v in b.items() if k not in ignore}

    def walk(x, y, path="state"):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), f"{path} differs"
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), f"{path} keys differ"
            for k in x:
                walk(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), f"{path} lengths differ"
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        else:
            assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), f"{path}: {x} != {y}"

    walk(a, b)

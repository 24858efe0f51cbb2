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


def addresses(learner) -> dict[str, tuple[int, torch.Size]]:
    """Where each tensor a captured step holds by address lives (weights, optimizer states, the
    learner's static tensors such as AM-mem's memories): name -> (data pointer, shape)."""
    held = {f"model.{k}": v for k, v in learner.model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor)}
    for i, opt in enumerate(learner.optimizers()):
        for j, p in enumerate(p for g in opt.param_groups for p in g["params"]):
            held.update({f"opt{i}.param{j}.{k}": v for k, v in opt.state.get(p, {}).items()
                         if isinstance(v, torch.Tensor)})
    held.update({f"static{i}": t for i, t in enumerate(learner._static_tensors())})
    return {name: (t.data_ptr(), t.shape) for name, t in held.items()}

"""Learner states: copying them, listing optimizer tensors, and checking a model state before loading.

``nn.Module.load_state_dict`` copies values into the module's own tensors, but a torch optimizer's
``load_state_dict`` keeps the tensors it is given when they already have the right device and
dtype: a learner loaded from another live learner's ``state_dict()`` would share its optimizer
moments. Learners therefore load a deep copy (:func:`clone_tensors`).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["clone_tensors", "optimizer_tensors", "check_model_state"]


def clone_tensors(obj):
    """A copy of a nested structure of dicts, lists and tuples in which every tensor is cloned."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = clone_tensors(v)
        if hasattr(obj, "_metadata"):  # nn.Module state dicts carry per-module versions
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, list):
        return [clone_tensors(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_tensors(v) for v in obj)
    return obj


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], set[int]]:
    """Every state tensor of ``optimizer``, and the ids of the parameters that have state."""
    tensors = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
    return tensors, {id(p) for p in optimizer.state}


def check_model_state(model: nn.Module, state: Mapping) -> None:
    """Raise a ``ValueError`` that names every tensor of ``state`` that does not fit ``model``:
    missing, unexpected, or of another shape (a checkpoint of another network)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"the model state must be a dict of tensors, got {type(state).__name__}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: saved {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    problems = []
    if shapes:
        problems.append("shapes differ for " + "; ".join(_first(shapes)))
    if missing:
        problems.append("missing " + ", ".join(_first(missing)))
    if unexpected:
        problems.append("unexpected " + ", ".join(_first(unexpected)))
    if problems:
        raise ValueError(f"the saved weights do not fit this {type(model).__name__} (another network?): "
                         + " | ".join(problems))


def _first(items: list[str], n: int = 6) -> list[str]:
    return items[:n] + ([f"... ({len(items) - n} more)"] if len(items) > n else [])

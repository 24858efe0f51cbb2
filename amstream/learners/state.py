"""Learner states: copying them, checking one before loading, and the guard of a step (a snapshot of
the tensors it mutates, restored when it produced non-finite values).

``nn.Module.load_state_dict`` copies values into the module's own tensors, but a torch optimizer's
``load_state_dict`` keeps the tensors it is given when they already have the right device and
dtype: a learner loaded from another live learner's ``state_dict()`` would share its optimizer
moments. Learners therefore load a deep copy (:func:`clone_tensors`).
"""
from __future__ import annotations

import copy
import math
import operator
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

_SHAPE = operator.attrgetter("shape")

__all__ = ["FrozenParameters", "Snapshot", "gradients_or_zeros", "all_finite", "clone_tensors", "optimizer_tensors", "check_model_state",
           "load_optimizer_state_"]


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


def load_optimizer_state_(optimizer: torch.optim.Optimizer, state: Mapping) -> None:
    """``optimizer.load_state_dict(state)``, keeping the optimizer's own state tensors: where a parameter
    already has a state tensor of the loaded one's shape, dtype and device, the values are copied
    into it rather than the tensor replaced.

    A learner loaded or rolled back then holds its optimizer state in the same memory as before, like
    its weights (``nn.Module.load_state_dict`` copies too). A captured step needs this: a CUDA graph
    holds the addresses of the tensors it updates, and a state tensor at a new address would make
    torch record the graph again (new here)."""
    before = {p: dict(s) for p, s in optimizer.state.items()}
    optimizer.load_state_dict(state)
    for p, loaded in optimizer.state.items():
        own = before.get(p, {})
        for key, value in loaded.items():
            old = own.get(key)
            if (isinstance(old, torch.Tensor) and isinstance(value, torch.Tensor) and old is not value
                    and old.shape == value.shape and old.dtype == value.dtype and old.device == value.device):
                loaded[key] = old.copy_(value)


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


def gradients_or_zeros(loss: torch.Tensor, tensors: list[torch.Tensor], retain_graph: bool = False,
                       allow_unused: bool = False) -> list[torch.Tensor | None]:
    """``torch.autograd.grad(loss, tensors)``, with zeros for the tensors outside the graph: a layer's
    output when it and everything before it are frozen (``requires_grad_(False)``) has no gradient
    to give, and its layer is held as it is anyway (:class:`FrozenParameters`)."""
    live = [i for i, t in enumerate(tensors) if t.requires_grad]
    found = torch.autograd.grad(loss, [tensors[i] for i in live], retain_graph=retain_graph,
                                allow_unused=allow_unused) if live else ()
    grads: list[torch.Tensor | None] = [torch.zeros_like(t) for t in tensors]
    for i, g in zip(live, found):
        grads[i] = g
    return grads


class FrozenParameters:
    """Parameters frozen with ``requires_grad_(False)``, held as they are across a step: their values
    and their optimizer state are copied before it and put back after it, and state the step gave
    them is dropped. Torch's optimizers skip a parameter without a gradient; alternating
    minimization, LocoProp, the low-rank writes and the ADMM solves fit each layer by rules of their
    own, so the learner enforces the freeze for all of them in one place (new here)."""

    @torch.no_grad()
    def __init__(self, params: list[torch.Tensor], optimizers: list[torch.optim.Optimizer]) -> None:
        self._params = params
        self._optimizers = optimizers
        self._had_state = [[p in opt.state for p in params] for opt in optimizers]
        self._tensors = list(params) + [v for opt in optimizers for p in params
                                        for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
        self._values = [t.clone() for t in self._tensors]

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_(self._tensors, self._values)
        for opt, had in zip(self._optimizers, self._had_state):
            for p, h in zip(self._params, had):
                if not h and p in opt.state:
                    del opt.state[p]
                if p.grad is not None:  # a rule that wrote one: a frozen parameter has no gradient
                    p.grad = None


class Snapshot:
    """Pre-allocated shadow copies of the tensors a step mutates, to undo a non-finite step."""

    def __init__(self) -> None:
        self._shadows: list[torch.Tensor] = []
        self._sources: list[torch.Tensor] = []
        self._last: list[torch.Tensor] = []  # the tensors of the last take, and their shapes
        self._shapes: list[torch.Size] = []

    @torch.no_grad()  # a copy recorded by autograd would chain every step's graph to the next
    def take(self, tensors: list[torch.Tensor]) -> None:
        # The same tensor objects with the same shapes as last time (the common case, checked by C
        # loops: a Python loop over dtypes and devices cost 16 us a step) keep their shadows.
        shapes = list(map(_SHAPE, tensors))
        same = len(tensors) == len(self._last) and all(map(operator.is_, tensors, self._last))
        if not (same and shapes == self._shapes) and (len(tensors) != len(self._shadows) or any(
            s.shape != t.shape or s.dtype != t.dtype or s.device != t.device
            for s, t in zip(self._shadows, tensors)
        )):
            self._shadows = [torch.empty_like(t, requires_grad=False) for t in tensors]
        self._last, self._shapes = list(tensors), shapes
        self._sources = tensors
        if tensors:
            torch._foreach_copy_(self._shadows, tensors)

    @torch.no_grad()
    def restore(self) -> None:
        if self._sources:
            for t, s in zip(self._sources, self._shadows):
                if t.shape != s.shape:  # a buffer resized by the step (a sequence model's carried state)
                    t.resize_(s.shape)
            torch._foreach_copy_(self._sources, self._shadows)

    def release(self) -> None:
        self._sources = []


@torch.no_grad()
def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one host sync in the common case.

    A tensor's 2-norm is finite exactly when its elements are, unless the sum of squares overflows
    (a norm above ~1.8e19 in float32); a non-finite norm is therefore confirmed element by element.
    The 2-norm, a fused multi-tensor kernel, is about 30 times faster than the infinity norm or
    ``isfinite`` on the CPU (measured: 45 us against 1.4 ms for a 784-512-10 MLP).
    """
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors, 2)
    device = norms[0].device
    total = torch.stack([n if n.device == device else n.to(device) for n in norms]).sum()  # dtypes promote
    if math.isfinite(float(total)):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)

"""Turn an ``nn.Sequential`` into an explicit list of blocks with a *code* after each hidden block.

Online alternating minimization (Choromanska et al., ICML 2019, "Beyond Backprop") treats the
output of every linear-like layer as a free variable, a *code*. A network

    x -> [pre_1] lin_1 -> c_1 -> [pre_2] lin_2 -> c_2 -> ... -> [pre_out] lin_out [post] -> output

is split into hidden blocks ``f_l(c) = lin_l(pre_l(c))`` that map code ``c_{l-1}`` to code ``c_l``
(with ``c_0 = x``) and one output block ``f_out`` that maps the last code to the network output.

- A *code layer* is a maximal run of Linear / Conv1d / Conv2d / BatchNorm1d / BatchNorm2d modules, so a
  Linear followed by its BatchNorm yields one code (post-BN pre-activation), as in the reference code.
- Everything between code layers (activations, pooling, Flatten, Dropout, ...) is the ``pre`` part of
  the next block. Modules after the last code layer form the output block's ``post`` part.
- Non-differentiable activations are allowed; code updates cross them with a straight-through
  estimator. Use :class:`Sign` / :class:`Step`, or wrap any activation in :class:`StraightThrough`.

- The last module with parameters may be an output head: any module whose parameters all belong
  to Linear/Conv layers inside it (Avalanche's ``IncrementalClassifier``, which adds units when new
  classes appear, or a multi-head classifier). It forms the output block, which every learner
  trains on the task loss by autograd. Any other module with parameters that is not a code layer
  (LSTM, Embedding, LayerNorm, attention, ...) is refused with an error naming it, because it has
  no place in the block structure.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "Block",
    "Blocks",
    "Sign",
    "Step",
    "StraightThrough",
    "UnsupportedModelError",
    "blocks_from_sequential",
    "frozen_batchnorm_stats",
]

CODE_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
WEIGHT_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
#: activations with trainable parameters; they are trained with their block by AM-Adam
PARAMETERIZED_ACTIVATIONS = (nn.PReLU,)


class UnsupportedModelError(ValueError):
    """The model cannot be decomposed into alternating-minimization blocks."""


class _StraightThroughFn(torch.autograd.Function):
    """Forward: ``fn(x)``; backward: identity (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ARG004
        return grad, None


class StraightThrough(nn.Module):
    """Wrap a shape-preserving activation so gradients pass through it unchanged.

    Weight updates in alternating minimization never differentiate through activations (each
    layer's input is a fixed code); code updates do, and for a step or sign function the true
    gradient is zero almost everywhere. The straight-through estimator replaces it by the identity.
    """

    def __init__(self, activation: nn.Module):
        super().__init__()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(x)
        if not torch.is_grad_enabled() or not x.requires_grad:
            return y
        return _StraightThroughFn.apply(x, y.detach())


class Sign(nn.Module):
    """``sign(x)`` mapped to {-1, +1} (zero goes to +1), with a straight-through gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        if not torch.is_grad_enabled() or not x.requires_grad:
            return y
        return _StraightThroughFn.apply(x, y)


class Step(nn.Module):
    """Heaviside step to {0, 1}, with a straight-through gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x >= 0).to(x.dtype)
        if not torch.is_grad_enabled() or not x.requires_grad:
            return y
        return _StraightThroughFn.apply(x, y)


@dataclass(eq=False)
class Block:
    """One block ``lin(pre(c))`` of the decomposed network.

    Attributes:
        pre: parameter-light modules applied to the incoming code (activation, pooling, Flatten).
        lin: the code layer (Linear/Conv, optionally with its BatchNorm) whose output is the code.
        post: modules after the code layer; only the output block has any.
        index: position of the block, 0-based.
    """

    pre: nn.Sequential
    lin: nn.Sequential
    post: nn.Sequential
    index: int

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        return self.post(self.lin(self.pre(c)))

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.pre, self.lin, self.post) for p in m.parameters() if p.requires_grad]

    @property
    def weight_layer(self) -> nn.Module | None:
        """The Linear/Conv layer of this block (None for a BatchNorm-only code layer)."""
        for m in self.lin:
            if isinstance(m, WEIGHT_LAYER_TYPES):
                return m
        return None

    @property
    def batchnorms(self) -> list[nn.Module]:
        return [m for m in (*self.pre, *self.lin, *self.post) if isinstance(m, BATCHNORM_TYPES)]

    def describe(self) -> str:
        parts = [type(m).__name__ for m in (*self.pre, *self.lin, *self.post)]
        return " -> ".join(parts)


class Blocks(list):
    """A validated list of blocks; the last one is the output block."""

    @property
    def hidden(self) -> list[Block]:
        return list(self[:-1])

    @property
    def output(self) -> Block:
        return self[-1]

    @property
    def has_batchnorm(self) -> bool:
        return any(b.batchnorms for b in self)

    def forward_with_codes(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the network, returning the hidden codes ``[c_1, ..., c_L]`` and the output."""
        codes = []
        c = x
        for block in self.hidden:
            c = block(c)
            codes.append(c)
        return codes, self.output(c)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_codes(x)[1]


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """In training mode, BatchNorm layers use batch statistics but do not update running ones."""
    bns = [m for m in model.modules() if isinstance(m, BATCHNORM_TYPES) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def _flatten(model: nn.Module) -> list[nn.Module]:
    """Leaf modules of nested ``nn.Sequential`` containers, in order."""
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in _flatten(child)]
    return [model]


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=True))


def _output_head(leaves: list[nn.Module]) -> nn.Module | None:
    """The last module with parameters when it is a custom output head: a module that is not a
    code layer itself but whose parameters all belong to Linear/Conv layers inside it (a classifier
    that masks or adds units, a multi-head classifier). None otherwise."""
    with_params = [m for m in leaves if _has_parameters(m)]
    if not with_params:
        return None
    last = with_params[-1]
    if isinstance(last, (*CODE_LAYER_TYPES, *PARAMETERIZED_ACTIVATIONS, StraightThrough)):
        return None
    owners = [m for m in last.modules() if any(True for _ in m.parameters(recurse=False))]
    if owners and all(isinstance(m, WEIGHT_LAYER_TYPES) for m in owners):
        return last
    return None


def _check_layer(position: int, module: nn.Module) -> None:
    if isinstance(module, (*CODE_LAYER_TYPES, *PARAMETERIZED_ACTIVATIONS, StraightThrough)):
        return
    if any(True for _ in module.parameters(recurse=True)):
        supported = ", ".join(t.__name__ for t in CODE_LAYER_TYPES)
        raise UnsupportedModelError(
            f"unsupported layer at position {position}: {type(module).__name__} has trainable "
            f"parameters but is not a code layer ({supported}) nor the output head (the last "
            "module with parameters). Parameter-free modules (activations, pooling, Flatten, "
            "Dropout) are allowed anywhere."
        )
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        raise UnsupportedModelError(
            f"unsupported layer at position {position}: {type(module).__name__} is a container "
            "without a forward order; use nn.Sequential."
        )


def blocks_from_sequential(model: nn.Module) -> Blocks:
    """Decompose ``model`` (an ``nn.Sequential``, possibly nested) into blocks.

    The blocks share the model's modules (no copies): training the blocks trains the model, and
    running the blocks equals running the model.

    Raises:
        UnsupportedModelError: the model is not a Sequential, contains no Linear/Conv layer, or
            contains a parameterized layer that is not a code layer (the message names it).
    """
    if not isinstance(model, nn.Sequential):
        raise UnsupportedModelError(
            f"expected an nn.Sequential model, got {type(model).__name__}; write the network as "
            "nn.Sequential(...) of Linear/Conv/BatchNorm layers and parameter-free modules."
        )
    leaves = _flatten(model)
    head = _output_head(leaves)
    for i, m in enumerate(leaves):
        if m is not head:
            _check_layer(i, m)
    if head is None and not any(isinstance(m, WEIGHT_LAYER_TYPES) for m in leaves):
        raise UnsupportedModelError("the model has no Linear or Conv layer, so nothing can be trained.")

    # Group into (pre, lin) pairs: a run of non-code modules followed by a run of code modules.
    groups: list[tuple[list[nn.Module], list[nn.Module]]] = []
    pre: list[nn.Module] = []
    lin: list[nn.Module] = []
    for m in leaves:
        if isinstance(m, CODE_LAYER_TYPES) or m is head:
            lin.append(m)
        else:
            if lin:
                groups.append((pre, lin))
                pre, lin = [], []
            pre.append(m)
    if lin:
        groups.append((pre, lin))
        pre = []
    post = pre  # modules after the last code layer

    blocks = Blocks()
    for i, (p, code_layer) in enumerate(groups):
        last = i == len(groups) - 1
        blocks.append(
            Block(
                pre=nn.Sequential(*p),
                lin=nn.Sequential(*code_layer),
                post=nn.Sequential(*(post if last else [])),
                index=i,
            )
        )
    return blocks

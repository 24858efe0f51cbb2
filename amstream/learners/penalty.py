"""Penalties of the parameters (EWC, SI, L2 to a reference) in layer-local updates."""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["add_penalty_grads_", "penalty_value", "frozen_penalty"]


def penalty_value(penalty: Callable[[], torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """The penalty as a scalar tensor (a callable is called), or a ``ValueError``."""
    value = penalty() if callable(penalty) else penalty
    if not (isinstance(value, torch.Tensor) and value.dim() == 0):
        raise ValueError(f"penalty must be a scalar tensor, got {type(value).__name__} "
                         f"of shape {getattr(value, 'shape', None)}")
    return value


def add_penalty_grads_(penalty, params: list[torch.nn.Parameter]) -> None:
    """Add ``d penalty / d p`` to ``p.grad`` for each parameter (no-op for None).

    A penalty that depends on parameters only is separable across layers, so each layer can take
    its own part in its local update; no gradient travels through the network.
    """
    if penalty is None:
        return
    if isinstance(penalty, _ConstantGradient):
        penalty.add_to_()
        return
    with torch.enable_grad():
        value = penalty_value(penalty)
        if not value.requires_grad:
            return  # a constant: no gradient
        grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=not callable(penalty))
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)


def frozen_penalty(penalty, params: list[torch.nn.Parameter]):
    """For a learner that steps its weights several times per batch: a tensor penalty (its graph
    recorded at the batch's start, possibly through the forward pass) cannot be differentiated again
    once the weights changed in place, so its gradient is taken now and added unchanged at every
    step. A callable penalty is returned as it is: it is recomputed at the current weights."""
    if penalty is None or callable(penalty):
        return penalty
    with torch.enable_grad():
        value = penalty_value(penalty)
        if not value.requires_grad:
            return None
        grads = torch.autograd.grad(value, params, allow_unused=True)
    return _ConstantGradient(params, [None if g is None else g.detach() for g in grads])


class _ConstantGradient:
    """A penalty already differentiated: ``add_to_`` adds its stored gradient to the parameters'."""

    def __init__(self, params, grads) -> None:
        self.params, self.grads = params, grads

    @torch.no_grad()
    def add_to_(self) -> None:
        for p, g in zip(self.params, self.grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

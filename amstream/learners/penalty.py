"""Penalties of the parameters (EWC, SI, L2 to a reference) in layer-local updates."""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["add_penalty_grads_", "penalty_value"]


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

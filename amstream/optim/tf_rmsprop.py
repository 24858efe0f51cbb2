"""RMSProp with TensorFlow 1's semantics, to reproduce code written for ``tf.train.RMSPropOptimizer``.

TensorFlow 1 (``tf.compat.v1.train.RMSPropOptimizer``) and PyTorch (``torch.optim.RMSprop``) differ
in three places (reference/algorithms.md, section 3.2):

- the mean square starts at 1.0 in TensorFlow, at 0 in PyTorch;
- epsilon sits inside the square root in TensorFlow, outside in PyTorch;
- with momentum, TensorFlow puts the learning rate inside the momentum accumulator,
  ``mom = momentum * mom + lr * g / sqrt(ms + eps)``, ``w -= mom``, where PyTorch applies it after.

The last one matters whenever the learning rate changes from step to step, as in LocoProp's local
learning-rate decay within each batch (Amid, Anil, Warmuth, AISTATS 2022), whose official code uses
this optimizer.
"""
from __future__ import annotations

import torch

__all__ = ["TFRMSprop"]


class TFRMSprop(torch.optim.Optimizer):
    """RMSProp as TensorFlow 1 computes it.

    ``ms <- decay ms + (1 - decay) g^2`` (``ms`` starts at ``initial_ms``), then
    ``mom <- momentum mom + lr g / sqrt(ms + eps)`` and ``w <- w - mom`` (without momentum:
    ``w <- w - lr g / sqrt(ms + eps)``).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (TensorFlow's default 1e-3).
        decay: discount of the mean square (TensorFlow's ``decay``, 0.9).
        momentum: momentum (0.0).
        eps: added to the mean square inside the square root (1e-10).
        initial_ms: initial value of the mean square (TensorFlow: 1.0).
    """

    def __init__(self, params, lr: float = 1e-3, decay: float = 0.9, momentum: float = 0.0, eps: float = 1e-10,
                 initial_ms: float = 1.0) -> None:
        for name, value, low, high in (("lr", lr, 0.0, float("inf")), ("decay", decay, 0.0, 1.0),
                                       ("momentum", momentum, 0.0, 1.0), ("eps", eps, 0.0, float("inf"))):
            if not low <= value <= high:
                raise ValueError(f"invalid {name}: {value!r}")
        super().__init__(params, {"lr": lr, "decay": decay, "momentum": momentum, "eps": eps,
                                  "initial_ms": initial_ms})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                state = self.state[p]
                if not state:
                    state["ms"] = torch.full_like(p, group["initial_ms"], memory_format=torch.preserve_format)
                    if group["momentum"]:
                        state["mom"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            ms = [self.state[p]["ms"] for p in params]
            torch._foreach_mul_(ms, group["decay"])
            torch._foreach_addcmul_(ms, grads, grads, value=1.0 - group["decay"])
            denom = torch._foreach_sqrt(torch._foreach_add(ms, group["eps"]))
            if group["momentum"]:
                mom = [self.state[p]["mom"] for p in params]
                torch._foreach_mul_(mom, group["momentum"])
                torch._foreach_addcdiv_(mom, grads, denom, value=group["lr"])
                torch._foreach_sub_(params, mom)
            else:
                torch._foreach_addcdiv_(params, grads, denom, value=-group["lr"])
        return loss

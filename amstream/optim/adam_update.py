"""Adam's update as a plain tensor function over ``torch.optim.Adam``'s own state.

``torch.optim.Adam.step`` breaks a ``torch.compile`` graph on purpose (before and after the update)
and, on the CPU, cannot take its learning rate as a tensor. A learner that captures its whole step
in one graph (one CUDA graph on a GPU) applies the same rule with :func:`adam_update_` to the very
state tensors of its ``torch.optim.Adam`` (Kingma and Ba, ICLR 2015, Algorithm 1, with torch's
placement of epsilon), so that the optimizer's ``state_dict``, checkpoints, schedulers and plugins
see one optimizer whichever path took the step.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["AdamState", "adam_state", "adam_update_"]

#: (exp_avgs, exp_avg_sqs, steps) of a list of parameters, in their order
AdamState = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def adam_state(optimizer: torch.optim.Adam, group: dict, params: Sequence[torch.Tensor]) -> AdamState | None:
    """The state tensors of ``params`` (members of ``group`` of ``optimizer``) for
    :func:`adam_update_`, or None where that rule would not be the optimizer's: a parameter without
    state yet (torch makes it at its first step), a group with weight decay, amsgrad, maximize or
    a differentiable optimizer, or a step counter on another device than its parameter."""
    if (group.get("weight_decay", 0.0) != 0.0 or group.get("amsgrad") or group.get("maximize")
            or group.get("differentiable")):
        return None
    exp_avgs, exp_avg_sqs, steps = [], [], []
    for p in params:
        state = optimizer.state.get(p)
        if not state or "exp_avg" not in state or state["step"].device != p.device:
            return None
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        steps.append(state["step"])
    return exp_avgs, exp_avg_sqs, steps


def adam_update_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: AdamState, *,
                 lr: float | torch.Tensor, beta1: float, beta2: float, eps: float) -> None:
    """One Adam step of ``params`` along ``grads``, in place, updating ``state``.

    ``m <- beta1 m + (1 - beta1) g``, ``v <- beta2 v + (1 - beta2) g^2``, ``t <- t + 1`` and
    ``p <- p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)``: torch's Adam without
    weight decay, written as its capturable (CUDA-graph) form. ``lr`` may be a 0-dim tensor on the
    parameters' device, so a changed learning rate needs no new graph; nothing syncs with the host.
    """
    for p, g, m, v, step in zip(params, grads, *state):
        step.add_(1)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        t = step.double()  # torch keeps t in float32; its fused kernels take the corrections in double
        step_size = lr / (1 - beta1 ** t)
        denom = (v.sqrt() / (1 - beta2 ** t).sqrt()).add_(eps)
        p.sub_(m / denom * step_size)

"""Adam's update as a plain tensor function over ``torch.optim.Adam``'s own state.

``torch.optim.Adam.step`` breaks a ``torch.compile`` graph on purpose (before and after the update)
and, on the CPU, cannot take its learning rate as a tensor. A learner that captures its whole step
in one graph (one CUDA graph on a GPU) applies the same rule with :func:`adam_update_` to the very
state tensors of its ``torch.optim.Adam`` (Kingma and Ba, ICLR 2015, Algorithm 1, with torch's
placement of epsilon), so that the optimizer's ``state_dict``, checkpoints, schedulers and plugins
see one optimizer whichever path took the step.

:func:`fused_adam_step_` is ``optimizer.step()`` of a fused ``torch.optim.Adam`` (or ``AdamW``)
without the Python around its kernels: the same two kernel calls per parameter group on the same
tensors, so the same bits.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim import optimizer as _optimizer_module

__all__ = ["AdamState", "adam_state", "adam_update_", "fused_adam_step_"]

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


_ADAM_STATE_KEYS = {"step", "exp_avg", "exp_avg_sq"}


def fused_adam_step_(optimizer: torch.optim.Optimizer) -> bool:
    """``optimizer.step()`` by torch's fused Adam kernels alone, where that is exactly what the step
    would run; returns False, having changed nothing, where it is not (then call ``optimizer.step()``).

    ``torch.optim.Adam.step`` with ``fused=True`` makes lists of each group's tensors, sorts them by
    device and dtype, and calls ``torch._foreach_add_`` on the step counters and
    ``torch._fused_adam_`` (``_fused_adamw_`` for AdamW's decoupled decay) once per group: about
    50 us of its 140 us are the kernels for a three-group MLP on one CPU thread, the rest Python: a
    tenth of a one-sample step. This makes the same calls with the same arguments. It declines (False) for
    anything the kernels alone would not do the same: another optimizer class, a group that is not
    fused or uses amsgrad, maximize, differentiable or a tensor learning rate or betas, a parameter
    whose state torch has not made yet (its first step), parameters of several devices or dtypes in
    one group, a grad scaler's ``grad_scale``/``found_inf``, step hooks (the optimizer's or global
    ones), or a ``step`` replaced on the instance (an LR scheduler counts the calls that way).
    """
    if (type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or "step" in vars(optimizer)
            or optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or _optimizer_module._global_optimizer_pre_hooks or _optimizer_module._global_optimizer_post_hooks
            or getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None):
        return False
    calls = []
    for group in optimizer.param_groups:
        lr, (beta1, beta2) = group["lr"], group["betas"]
        if (not group.get("fused") or group.get("amsgrad") or group.get("maximize") or group.get("differentiable")
                or type(lr) not in (float, int) or type(beta1) is not float or type(beta2) is not float):
            return False
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            state = optimizer.state.get(p)
            if not state or not _ADAM_STATE_KEYS <= state.keys() or grad.is_sparse:
                return False
            params.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            device, dtype = params[0].device, params[0].dtype
            if any(p.device != device or p.dtype != dtype for p in params):
                return False
            calls.append((group, params, grads, exp_avgs, exp_avg_sqs, steps))
    for group, params, grads, exp_avgs, exp_avg_sqs, steps in calls:
        torch._foreach_add_(steps, 1)
        kernel = torch._fused_adamw_ if group.get("decoupled_weight_decay") else torch._fused_adam_
        kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
               beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
               eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)
    return True

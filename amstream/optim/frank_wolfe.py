"""Frank-Wolfe directions for an Adam step (Yue, Li, Saligrama, Zhang, ICPR 2020, arXiv 2010.05397).

"RNN Training along Locally Optimal Trajectories via Frank-Wolfe Algorithm": around the current
weights ``w0``, an inner Frank-Wolfe loop over the ball ``||w - w0|| <= lr`` (per tensor) follows
the local loss landscape; the displacement it reaches becomes the direction of one outer Adam step.
Inner step ``k = 1..T`` with the normalized gradient ``g^_k = g_k / ||g_k||`` at the current
iterate:

- the linear minimization oracle over the ball: ``s_k = w0 - lr g^_k``;
- the Frank-Wolfe update with step ``1/k``: ``w_k = (1 - 1/k) w_{k-1} + (1/k) s_k``, i.e. the
  displacement ``D_k = w_k - w0 = (1 - 1/k) D_{k-1} - (lr/k) g^_k``, which stays in the ball;
- after step ``T``: back to ``w0``, and Adam (learning rate ``lr``) steps on ``-D_T / lr`` as its
  gradient. With ``T = 1`` this is Adam on per-tensor normalized gradients.

The reference (``YunYunY/FW_RNN_optimizer``, ``fgsm.py``) writes ``p += D_k`` at every inner step,
so its iterates are ``w0 + sum_j D_j``, which is not Frank-Wolfe for ``T >= 2`` and can leave the
ball: ``faithful=True`` reproduces that. New here: the true iterate (default), a zero gradient
read as a zero direction (the reference divides by it), the state kept in the optimizer's state
(checkpointed and rolled back like Adam's), and inner steps on the same batch through a closure
(the reference draws a new batch for every inner step, as ``step()`` without a closure does here).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["FrankWolfe", "FrankWolfeState", "frank_wolfe_state", "frank_wolfe_update_", "inner_position"]


class FrankWolfe(torch.optim.Optimizer):
    """Frank-Wolfe inner loop, Adam outer step.

    Args:
        params: parameters or parameter groups.
        lr: the radius of the Frank-Wolfe ball and the learning rate of the Adam step.
        inner_steps: ``T``, Frank-Wolfe steps per Adam step.
        betas, eps: Adam's.
        faithful: the reference's cumulative ``p += D_k`` instead of the Frank-Wolfe iterate.

    ``step()`` without a closure is one inner step on the gradients already in ``p.grad`` (the
    reference: every inner step on a new batch; Adam steps every ``T`` calls). ``step(closure)``
    runs all ``T`` inner steps, calling ``closure()`` (which zeroes the gradients, evaluates the loss
    and calls ``backward``) at each iterate: the same batch for every inner step.
    """

    def __init__(self, params, lr: float = 1e-3, inner_steps: int = 1, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, faithful: bool = False) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        defaults = dict(lr=lr, inner_steps=inner_steps, betas=tuple(betas), eps=eps, faithful=bool(faithful))
        super().__init__(params, defaults)

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        if closure is None:
            for group in self.param_groups:
                self._inner_step(group)
            return None
        loss = None
        rounds = max(group["inner_steps"] for group in self.param_groups)
        for _ in range(rounds):
            with torch.enable_grad():
                loss = closure()
            for group in self.param_groups:
                self._inner_step(group)
        return loss

    @torch.no_grad()
    def _inner_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                # inner steps taken: the round's position and Adam's step count follow from it;
                # named "step", torch keeps it on the CPU (read without a device sync)
                state["step"] = torch.tensor(0.0)
                state["origin"] = p.detach().clone()
                state["displacement"] = torch.zeros_like(p)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        T = group["inner_steps"]
        k, adam_step = inner_position(self.state[params[0]]["step"], T)
        frank_wolfe_update_(params, [p.grad for p in params], frank_wolfe_state(self, params), k=k,
                            lr=group["lr"], adam_step=adam_step, inner_steps=T, faithful=group["faithful"],
                            betas=group["betas"], eps=group["eps"])
        for p in params:
            self.state[p]["step"] += 1


#: ``(origins, displacements, exp_avgs, exp_avg_sqs)`` of a list of parameters, in their order
FrankWolfeState = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def frank_wolfe_state(optimizer: FrankWolfe, params: list[torch.Tensor]) -> FrankWolfeState | None:
    """The state tensors of ``params`` for :func:`frank_wolfe_update_`, or None before each has its state
    (made at its first inner step)."""
    states = [optimizer.state.get(p) for p in params]
    if not all(states):
        return None
    return tuple([s[key] for s in states] for key in ("origin", "displacement", "exp_avg", "exp_avg_sq"))


def inner_position(taken: torch.Tensor, inner_steps: int) -> tuple[int, int]:
    """``(k, Adam's step number)`` of the next inner step after ``taken`` (a CPU tensor) inner steps:
    ``k`` in ``1..T``, and the number the Adam step at ``k = T`` takes."""
    taken = int(taken)
    return taken % inner_steps + 1, (taken + 1) // inner_steps


def frank_wolfe_update_(params: list[torch.Tensor], grads: list[torch.Tensor], state: FrankWolfeState, *, k: int,
                        lr: float | torch.Tensor, adam_step: int | torch.Tensor, inner_steps: int, faithful: bool,
                        betas: tuple[float, float], eps: float) -> None:
    """Inner step ``k`` (``1..T``) of :class:`FrankWolfe` on ``params`` along ``grads``, in place,
    and at ``k = T`` Adam's step number ``adam_step``: a plain tensor function, so that the learner's
    whole step applies the optimizer's very rule in one compiled graph (one CUDA graph on a GPU).
    ``lr`` and ``adam_step`` may be 0-dim tensors on the parameters' device (a new value needs no
    new graph); the step counters are the caller's to advance."""
    origins, moves, exp_avgs, exp_avg_sqs = state
    if k == 1:  # a new round starts at the current weights
        torch._foreach_copy_(origins, [p.detach() for p in params])
    norms = torch.stack(torch._foreach_norm(grads))
    inverse = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms)).unbind()  # g = 0: no move
    unit = torch._foreach_mul(grads, inverse)
    torch._foreach_mul_(moves, 1.0 - 1.0 / k)
    if isinstance(lr, torch.Tensor):
        torch._foreach_add_(moves, torch._foreach_mul(unit, -lr / k))
    else:
        torch._foreach_add_(moves, unit, alpha=-lr / k)
    if k == inner_steps:
        torch._foreach_copy_(params, origins)
        _adam(params, exp_avgs, exp_avg_sqs, torch._foreach_div(moves, -lr), adam_step, lr, betas, eps)
    elif faithful:
        torch._foreach_add_(params, moves)  # the reference: w_k = w_{k-1} + D_k
    else:
        torch._foreach_copy_(params, origins)
        torch._foreach_add_(params, moves)  # Frank-Wolfe: w_k = w0 + D_k


def _adam(params: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
          directions: list[torch.Tensor], step: int | torch.Tensor, lr: float | torch.Tensor,
          betas: tuple[float, float], eps: float) -> None:
    """torch.optim.Adam's update number ``step`` (no weight decay, no amsgrad) with ``directions``
    as gradients."""
    beta1, beta2 = betas
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    traced = isinstance(lr, torch.Tensor) or isinstance(step, torch.Tensor)  # addcdiv_ takes a number only
    for p, m, v, d in zip(params, exp_avgs, exp_avg_sqs, directions):
        m.lerp_(d, 1 - beta1)
        v.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        denom = (v.sqrt() / bias2 ** 0.5).add_(eps)
        if traced:
            p.sub_(m / denom * (lr / bias1))
        else:
            p.addcdiv_(m, denom, value=-lr / bias1)

"""The end-to-end backpropagation baseline behind the same learner API.

Every amstream learner is compared with this one on the same network, batch and device: one
forward pass, one backward pass of the task loss through the whole network, one optimizer step.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..schedules import apply_lr_halving_
from .base import Learner, LossFn, Penalty, StepInfo

__all__ = ["Backprop"]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}


class Backprop(Learner):
    """Backpropagation with any torch optimizer, one parameter group per block.

    Args:
        model: an ``nn.Sequential`` (decomposed only to name the parameter groups).
        optimizer: ``"adam"`` (default), ``"adamw"``, ``"sgd"``, ``"rmsprop"``, a
            ``torch.optim.Optimizer`` subclass, or a callable ``params -> Optimizer``.
        lr: learning rate (default 1e-3).
        optimizer_kwargs: extra keyword arguments for the optimizer (momentum, betas, ...).
        lr_halve_every: halve the learning rate every this many steps (None: constant).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from amstream import Backprop
        >>> learner = Backprop(nn.Sequential(nn.Linear(4, 3)), optimizer="sgd", lr=0.1, device="cpu")
        >>> info = learner.learn(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: str | type[torch.optim.Optimizer] | Callable = "adam",
        lr: float = 1e-3,
        optimizer_kwargs: dict | None = None,
        lr_halve_every: int | None = None,
        **kwargs,
    ) -> None:
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"invalid lr: {lr!r} (must be > 0)")
        super().__init__(model, **kwargs)
        self.lr, self.lr_halve_every = float(lr), lr_halve_every
        groups = [{"params": b.parameters(), "name": f"block{b.index}"} for b in self.blocks if b.parameters()]
        kw = dict(optimizer_kwargs or {})
        if isinstance(optimizer, str):
            if optimizer not in OPTIMIZERS:
                raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
            self.optimizer = OPTIMIZERS[optimizer](groups, lr=self.lr, **kw)
        elif isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer(groups, lr=self.lr, **kw)
        elif callable(optimizer):
            self.optimizer = optimizer(groups)
        else:
            raise ValueError(f"optimizer must be a name, an Optimizer class or a factory, got {optimizer!r}")
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def _step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        apply_lr_halving_(self.optimizer, self.step_count, self.lr_halve_every)
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(x))
        total = loss
        if penalty is not None:
            value = penalty() if callable(penalty) else penalty
            total = loss + value
        total.backward()
        self.optimizer.step()
        return StepInfo(loss=loss.detach(), lrs=tuple(g["lr"] for g in self.optimizer.param_groups),
                        batch_size=x.shape[0])

    def hparams(self) -> dict:
        return {"optimizer": type(self.optimizer).__name__, "lr": self.lr, "lr_halve_every": self.lr_halve_every}

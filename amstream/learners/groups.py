"""Parameter groups: how a learner names its parameters for optimizers, schedulers and plugins.

Every learner exposes one ``torch.optim.Optimizer`` as ``learner.optimizer``, with one named
parameter group per layer (or block), so that Avalanche plugins and ``torch.optim.lr_scheduler``
can call ``zero_grad`` and read or set ``param_groups`` whatever the method. A learner that trains
with a torch optimizer exposes that one; a learner that solves its weights exactly exposes a
:class:`ParameterGroups` holder, whose ``step`` does nothing.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..blocks import UnsupportedModelError, blocks_from_sequential

__all__ = ["ParameterGroups", "named_parameter_groups", "sync_groups_"]

NamedGroups = list[tuple[str, list[nn.Parameter]]]


def named_parameter_groups(model: nn.Module) -> NamedGroups:
    """The model's trainable parameters in named groups, in the model's parameter order.

    An ``nn.Sequential`` that splits into alternating-minimization blocks gets one group per block
    (``block0``, ``block1``, ...); any other module one group per top-level child that has
    parameters (named as the child), plus ``model`` for parameters the module holds itself (a bare
    ``nn.Linear`` is one group, ``model``).
    """
    if isinstance(model, nn.Sequential):
        try:
            blocks = blocks_from_sequential(model)
        except UnsupportedModelError:
            pass
        else:
            return [(f"block{b.index}", b.parameters()) for b in blocks if b.parameters()]
    groups: NamedGroups = []
    own = [p for p in model.parameters(recurse=False) if p.requires_grad]
    if own:
        groups.append(("model", own))
    for name, child in model.named_children():
        params = [p for p in child.parameters() if p.requires_grad]
        if params:
            groups.append((name, params))
    return groups


class ParameterGroups(torch.optim.Optimizer):
    """The parameter groups of a learner that has no torch optimizer (its weights are solved).

    It is a real ``torch.optim.Optimizer``, so Avalanche plugins (``zero_grad``), learning-rate
    schedulers and ``LRSchedulerPlugin`` accept it; ``step`` does nothing, because the learner's
    own step writes the weights, and it keeps no state. A learner calls ``step()`` once at the end
    of each of its updates, so that schedulers see steps in the order they expect.
    """

    def __init__(self, groups: Iterable[dict]) -> None:
        super().__init__(list(groups), defaults={"lr": 0.0})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - the learner updates the weights, not this holder
        return None if closure is None else closure()


def sync_groups_(optimizer: torch.optim.Optimizer, groups: NamedGroups) -> None:
    """Give each named group of ``optimizer`` the parameters of the same name in ``groups``.

    New parameters start with no optimizer state and replaced ones lose theirs (what Avalanche does
    for its own optimizers when a model grows).

    Raises:
        ValueError: an optimizer group whose name is not among ``groups`` (a custom optimizer that
            renamed its groups).
    """
    by_name = dict(groups)
    for group in optimizer.param_groups:
        name = group.get("name")
        if name not in by_name:
            raise ValueError(
                f"the model's parameters changed, but optimizer group {name!r} matches none of the model's "
                f"groups ({', '.join(by_name)}); keep the named groups that the learner creates"
            )
        group["params"] = list(by_name[name])
    live = {p for group in optimizer.param_groups for p in group["params"]}
    for p in [p for p in optimizer.state if p not in live]:
        del optimizer.state[p]

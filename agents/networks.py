"""The Q-network, and the learner settings a DQN agent uses for a learner given by name.

The settings come from the learner class alone: its ``presets["td"]`` (what its method needs for
regression on bootstrapped targets) and the agent's learning rate for every hyperparameter the
class declares as a learning rate. A learner registered in :data:`amstream.LEARNERS` therefore
works in the agent with no table to edit here.
"""
from __future__ import annotations

import torch
from torch import nn

from amstream import LEARNERS
from amstream.learners import Learner
from amstream.utils import resolve_device

__all__ = ["q_network", "td_learner_settings", "make_td_learner", "check_value_network", "DEFAULT_LEARNING_RATE"]

#: CleanRL's learning rate for DQN on the classic-control tasks
DEFAULT_LEARNING_RATE = 2.5e-4


def q_network(obs_dim: int, n_actions: int, hidden: tuple[int, ...] = (120, 84)) -> nn.Sequential:
    """CleanRL's Q-network: ``obs -> 120 -> ReLU -> 84 -> ReLU -> n_actions``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = obs_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_actions))
    return nn.Sequential(*layers)


def td_learner_settings(name: str, learning_rate: float = DEFAULT_LEARNING_RATE) -> dict:
    """The keywords a DQN agent gives learner ``name`` before the user's own: the class's ``"td"``
    preset and ``learning_rate`` for each of its learning-rate hyperparameters.

    Raises:
        ValueError: ``name`` is not registered in :data:`amstream.LEARNERS`.
    """
    if name not in LEARNERS:
        raise ValueError(f"unknown learner {name!r}; choose from {', '.join(LEARNERS)} or pass a Learner")
    cls = LEARNERS[name]
    rates = {key: float(learning_rate) for key, h in cls.defaults.items() if h.learning_rate}
    return {**rates, **cls.presets.get("td", {})}


def make_td_learner(learner: str | Learner, obs_shape: tuple[int, ...], n_actions: int, *,
                    hidden: tuple[int, ...] = (120, 84), seed: int = 0, learning_rate: float = DEFAULT_LEARNING_RATE,
                    learner_kwargs: dict | None = None, device="auto") -> Learner:
    """A learner given by name built on :func:`q_network` (seeded) with :func:`td_learner_settings`
    and the user's ``learner_kwargs`` over them; a built learner is returned as it is.

    Raises:
        ValueError: an unknown name, ``learner_kwargs`` for a built learner, or a ``device`` other
            than the built learner's.
    """
    if isinstance(learner, Learner):
        if learner_kwargs:
            raise ValueError("learner_kwargs apply to a learner given by name, not to a built learner")
        if device != "auto" and resolve_device(device) != learner.device:
            raise ValueError(f"device={device!r} differs from the learner's device {learner.device}; "
                             "the agent lives on its learner's device")
        return learner
    if not isinstance(learner, str) or learner not in LEARNERS:
        raise ValueError(f"unknown learner {learner!r}; choose from {', '.join(LEARNERS)} or pass a Learner")
    torch.manual_seed(seed)
    model = q_network(int(torch.Size(obs_shape).numel()), n_actions, tuple(hidden))
    kwargs = {**td_learner_settings(learner, learning_rate), **(learner_kwargs or {})}
    return LEARNERS[learner](model, device=resolve_device(device), **kwargs)


def check_value_network(learner: Learner, obs_shape: tuple[int, ...], n_actions: int) -> None:
    """Refuse a network that does not map an observation batch to one value per action.

    Raises:
        ValueError: observations of this shape do not fit it, or its output has another width.
    """
    probe = torch.zeros((1, *obs_shape), dtype=torch.float32)
    try:
        out = learner.predict(probe)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"observations of shape {obs_shape} do not fit the value network: "
                         f"{' '.join(str(err).split())}") from None
    if out.dim() != 2 or out.shape[1] != n_actions:
        raise ValueError(f"the value network must output one value per action ({n_actions}), "
                         f"got output shape {tuple(out.shape[1:])}")

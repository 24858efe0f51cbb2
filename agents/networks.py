"""The Q-network, and the learner settings a DQN agent uses for a learner given by name.

The settings come from the learner class alone: its ``presets["td"]`` (what its method needs for
regression on bootstrapped targets) and the agent's learning rate for every hyperparameter the
class declares as a learning rate. A learner registered in :data:`amstream.LEARNERS` therefore
works in the agent with no table to edit here.
"""
from __future__ import annotations

from torch import nn

from amstream import LEARNERS

__all__ = ["q_network", "td_learner_settings", "DEFAULT_LEARNING_RATE"]

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

"""Gymnasium agents whose value network is trained by any amstream learner.

- :class:`DQNAgent`: DQN / Double DQN with an SB3-shaped interface (``learn``, ``predict``,
  ``evaluate``, ``save``, ``load``) and CleanRL's TensorBoard tags.
- :class:`ReplayBuffer`: uniform replay on the learner's device.
- :mod:`agents.tasks`: sequences of environments that share their spaces (CartPole and Acrobot with
  changed physics) for continual reinforcement learning, with a task-by-task return matrix.
"""
from .buffer import Batch, ReplayBuffer
from .dqn import DQN_LEARNER_DEFAULTS, DQNAgent, q_network, td_targets
from .envs import check_discrete_env, make_env_factory, make_vector_env

__all__ = [
    "Batch", "DQNAgent", "DQN_LEARNER_DEFAULTS", "ReplayBuffer", "check_discrete_env", "make_env_factory",
    "make_vector_env", "q_network", "td_targets",
]

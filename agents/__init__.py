"""Gymnasium agents whose value network is trained by any amstream learner.

- :class:`DQNAgent`: DQN / Double DQN with an SB3-shaped interface (``learn``, ``predict``,
  ``evaluate``, ``save``, ``load``) and CleanRL's TensorBoard tags.
- :class:`ReplayBuffer`: uniform replay on the learner's device.
- :mod:`agents.tasks`: sequences of environments that share their spaces (CartPole and Acrobot with
  changed physics) for continual reinforcement learning, with a task-by-task return matrix.
"""
from .buffer import Batch, ReplayBuffer
from .dqn import DQNAgent
from .envs import check_discrete_env, make_env_factory, make_vector_env
from .networks import q_network, td_learner_settings
from .td import TDUpdate, td_targets

__all__ = [
    "Batch", "DQNAgent", "ReplayBuffer", "TDUpdate", "check_discrete_env", "make_env_factory",
    "make_vector_env", "q_network", "td_learner_settings", "td_targets",
]

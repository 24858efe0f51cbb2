"""Gymnasium 1.x environments for the agents: building, checking, and saving their state.

- :func:`make_vector_env` turns an id, a factory or an env into a ``SyncVectorEnv`` with the 1.x
  default next-step autoreset: the step after an episode ends returns the reset observation with
  reward 0, and its transition must not be learned from (the agent masks it).
- :func:`check_discrete_env` refuses what a DQN cannot act in, with the reason.
- :func:`env_state` / :func:`restore_env_state` capture and restore the sub-environments (their
  internal state and random generators) so that a resumed run continues the very same episodes.
"""
from __future__ import annotations

import difflib
import pickle
from collections.abc import Callable
from typing import Any, Union

import gymnasium as gym
import numpy as np

__all__ = ["EnvSpec", "make_env_factory", "make_vector_env", "check_discrete_env", "env_state", "restore_env_state",
           "RescaledEnv"]

#: what the agents accept as an environment: an id, a zero-argument factory, or an env instance
EnvSpec = Union[str, Callable[[], gym.Env], gym.Env]


def make_env_factory(env: EnvSpec) -> Callable[[], gym.Env]:
    """A zero-argument callable that builds a fresh copy of ``env``.

    Raises:
        ValueError: an unknown environment id (with the closest registered ids).
    """
    if isinstance(env, str):
        if env not in gym.registry:
            close = difflib.get_close_matches(env, list(gym.registry), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown Gymnasium environment id {env!r}{hint}")
        return _MakeById(env)
    if isinstance(env, gym.Env):
        return _Fixed(env)
    if callable(env):
        return env
    raise ValueError(f"expected an environment id, a factory or a gymnasium.Env, got {type(env).__name__}")


class _MakeById:
    """Picklable ``lambda: gym.make(env_id)``."""

    def __init__(self, env_id: str) -> None:
        self.env_id = env_id

    def __call__(self) -> gym.Env:
        return gym.make(self.env_id)

    def __repr__(self) -> str:
        return self.env_id


class RescaledEnv:
    """Picklable factory of ``gym.make(env_id)`` with its observations rescaled linearly from the
    observation space's bounds to [-1, 1] (as Gymnasium's ``RescaleObservation``, whose lambda
    cannot be pickled, so an agent's checkpoint could not hold the environments).

    Why: a network whose layers are not trained by per-parameter adaptive steps sees raw inputs at
    their own scale, and MountainCar's velocity (|v| <= 0.07) is about 1/20 of its position's range.

    Raises:
        ValueError: an unknown id, or an observation space that is not a Box with finite bounds.
    """

    def __init__(self, env_id: str) -> None:
        make_env_factory(env_id)  # an unknown id fails here, with the closest ids
        probe = gym.make(env_id)
        space = probe.observation_space
        probe.close()
        if not isinstance(space, gym.spaces.Box):
            raise ValueError(f"{env_id}: only Box observations can be rescaled, got {type(space).__name__}")
        unbounded = np.flatnonzero(~(np.isfinite(space.low) & np.isfinite(space.high)).ravel())
        if unbounded.size:
            raise ValueError(f"{env_id}: observation dimensions {unbounded.tolist()} have infinite bounds, "
                             f"so they cannot be rescaled to [-1, 1]")
        self.env_id = env_id

    def __call__(self) -> gym.Env:
        return _RescaleToUnit(gym.make(self.env_id))

    def __repr__(self) -> str:
        return f"{self.env_id} (observations rescaled to [-1, 1])"


class _RescaleToUnit(gym.ObservationWrapper):
    """``2 (obs - low) / (high - low) - 1`` for a Box with finite bounds: picklable."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.observation_space
        self.low, self.span = space.low.astype(np.float64), (space.high - space.low).astype(np.float64)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, space.shape, np.float32)

    def observation(self, observation):
        return (2.0 * (observation - self.low) / self.span - 1.0).astype(np.float32)


class _Fixed:
    """Hands out one given env instance (a vector env of one)."""

    def __init__(self, env: gym.Env) -> None:
        self.env, self.used = env, False

    def __call__(self) -> gym.Env:
        if self.used:
            raise ValueError("an environment instance can serve only one copy; pass an id or a factory "
                             "for n_envs > 1 or for a separate evaluation environment")
        self.used = True
        return self.env


def make_vector_env(env: EnvSpec, n_envs: int = 1) -> gym.vector.SyncVectorEnv:
    """``n_envs`` copies of ``env`` stepped in lock-step, with next-step autoreset."""
    if int(n_envs) < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs!r}")
    factory = make_env_factory(env)
    vec = gym.vector.SyncVectorEnv([factory for _ in range(int(n_envs))],
                                   autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    check_discrete_env(vec.single_observation_space, vec.single_action_space)
    return vec


def check_discrete_env(observation_space: gym.Space, action_space: gym.Space) -> None:
    """Raise a ValueError unless actions are ``Discrete`` and observations a ``Box`` of numbers."""
    if not isinstance(action_space, gym.spaces.Discrete):
        raise ValueError(f"DQN needs a discrete action space (gymnasium.spaces.Discrete), got {action_space}; "
                         "continuous control needs an actor-critic method")
    if not isinstance(observation_space, gym.spaces.Box) or not np.issubdtype(observation_space.dtype, np.number):
        raise ValueError(f"the value network takes numeric Box observations, got {observation_space}; "
                         "flatten dict or tuple observations with gymnasium.wrappers.FlattenObservation")


# ------------------------------------------------------------------------------- saving state
def env_state(vec: gym.vector.SyncVectorEnv) -> bytes | None:
    """The sub-environments pickled (internal state, wrappers' counters, random generators), or
    None when one of them cannot be pickled (then a resumed run starts new episodes)."""
    try:
        return pickle.dumps(list(vec.envs))
    except (pickle.PicklingError, TypeError, AttributeError):
        return None


def restore_env_state(vec: gym.vector.SyncVectorEnv, state: bytes, autoreset: np.ndarray) -> None:
    """Put pickled sub-environments back into ``vec``; ``autoreset`` marks the sub-envs whose episode
    ended at the last step, which the next ``step`` must reset (next-step autoreset)."""
    envs: list[Any] = pickle.loads(state)
    if len(envs) != vec.num_envs:
        raise ValueError(f"saved state holds {len(envs)} environments, this agent has {vec.num_envs}")
    vec.envs = envs
    if not hasattr(vec, "_autoreset_envs"):  # gymnasium 1.x keeps the mask here
        raise RuntimeError("this gymnasium version's SyncVectorEnv has no autoreset mask to restore")
    vec._autoreset_envs = np.asarray(autoreset, dtype=np.bool_).copy()

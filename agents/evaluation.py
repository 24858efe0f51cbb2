"""Evaluating a policy: mean and spread of the episodic return on a separate environment."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["evaluate_policy"]


def evaluate_policy(act: Callable[[np.ndarray], int], env_factory: Callable, n_episodes: int = 10,
                    seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of the return of ``act`` (one float32 observation -> an action)
    over ``n_episodes`` episodes of a fresh environment from ``env_factory``, reset with ``seed`` so
    that the same policy always gets the same score.

    Raises:
        ValueError: ``n_episodes`` below 1.
    """
    if int(n_episodes) < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes!r}")
    env = env_factory()
    returns = []
    try:
        obs, _ = env.reset(seed=seed)
        for _ in range(int(n_episodes)):
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(act(np.asarray(obs, dtype=np.float32)))
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
            obs, _ = env.reset()
    finally:
        env.close()
    return float(np.mean(returns)), float(np.std(returns))

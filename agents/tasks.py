"""Continual reinforcement learning: one agent, a sequence of environments that share their spaces.

Each task is an environment factory (a picklable callable). :func:`run_task_sequence` trains the
agent on task 0 for ``steps_per_task`` environment steps, then switches to task 1, and so on; after
every task it evaluates the greedy policy on *every* task. That gives a return matrix
``R[i][j]`` (return on task ``j`` after training on task ``i``), the reinforcement-learning
counterpart of the accuracy matrix of continual supervised learning, summarized with the same
functions (:mod:`amstream.metrics`): the average final return, forgetting and backward transfer.

Ready-made sequences:

- :func:`cartpole_physics`: CartPole-v1 with the default physics, a longer pole, a heavier pole and
  stronger gravity.
- :func:`acrobot_physics`: Acrobot-v1 with the default links, a longer first link, a heavier second
  link and a lighter first link.
- :func:`cartpole_reversed`: CartPole-v1, then CartPole-v1 with its two actions swapped. The physics
  variants are close (a policy good on one is good on all), so they measure progress more than
  forgetting; here the second task asks for the opposite action in every state, so whatever the
  agent learns on it is forgotten on the first.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import gymnasium as gym

from amstream.metrics import backward_transfer, forgetting

__all__ = ["Task", "TASK_SEQUENCES", "TaskSequenceResult", "acrobot_physics", "cartpole_physics", "cartpole_reversed",
           "run_task_sequence"]


class _Physics:
    """Picklable factory: ``gym.make(env_id)`` with attributes of the unwrapped env replaced, and
    ``derived`` recomputed (CartPole caches products of its constants in ``__init__``)."""

    def __init__(self, env_id: str, derived: Callable[[gym.Env], None] | None = None, **attributes: float) -> None:
        self.env_id, self.attributes, self.derived = env_id, attributes, derived

    def __call__(self) -> gym.Env:
        env = gym.make(self.env_id)
        base = env.unwrapped
        for name, value in self.attributes.items():
            if not hasattr(base, name):
                raise ValueError(f"{self.env_id} has no physical parameter {name!r}")
            setattr(base, name, value)
        if self.derived is not None:
            self.derived(base)
        return env

    def __repr__(self) -> str:
        changes = ", ".join(f"{k}={v}" for k, v in self.attributes.items())
        return f"{self.env_id}({changes})"


class _ReversedActions:
    """Picklable factory: ``gym.make(env_id)`` whose discrete action ``a`` acts as ``n - 1 - a``."""

    def __init__(self, env_id: str) -> None:
        self.env_id = env_id

    def __call__(self) -> gym.Env:
        env = gym.make(self.env_id)
        if not isinstance(env.action_space, gym.spaces.Discrete):
            raise ValueError(f"{self.env_id}: reversing actions needs a Discrete action space, "
                             f"got {env.action_space}")
        return _ReverseDiscreteActions(env)

    def __repr__(self) -> str:
        return f"{self.env_id}(actions reversed)"


class _ReverseDiscreteActions(gym.ActionWrapper):
    def action(self, action):
        space = self.env.action_space
        return space.start + (space.n - 1) - (int(action) - space.start)


def _cartpole_derived(env) -> None:
    env.total_mass = env.masspole + env.masscart
    env.polemass_length = env.masspole * env.length


@dataclass(frozen=True)
class Task:
    """One task of a sequence: a name and a zero-argument environment factory."""

    name: str
    make_env: Callable[[], gym.Env]


def cartpole_physics() -> list[Task]:
    """CartPole-v1 variants (defaults: pole half-length 0.5, pole mass 0.1, gravity 9.8)."""
    return [
        Task("default", _Physics("CartPole-v1", _cartpole_derived)),
        Task("long pole (length 1.0)", _Physics("CartPole-v1", _cartpole_derived, length=1.0)),
        Task("heavy pole (mass 0.5)", _Physics("CartPole-v1", _cartpole_derived, masspole=0.5)),
        Task("strong gravity (15.0)", _Physics("CartPole-v1", _cartpole_derived, gravity=15.0)),
    ]


def acrobot_physics() -> list[Task]:
    """Acrobot-v1 variants (defaults: link lengths 1.0, link masses 1.0)."""
    return [
        Task("default", _Physics("Acrobot-v1")),
        Task("long first link (1.5)", _Physics("Acrobot-v1", LINK_LENGTH_1=1.5)),
        Task("heavy second link (2.0)", _Physics("Acrobot-v1", LINK_MASS_2=2.0)),
        Task("light first link (0.5)", _Physics("Acrobot-v1", LINK_MASS_1=0.5)),
    ]


def cartpole_reversed() -> list[Task]:
    """CartPole-v1, then CartPole-v1 with push-left and push-right swapped (conflicting tasks)."""
    return [
        Task("default", _Physics("CartPole-v1", _cartpole_derived)),
        Task("actions reversed", _ReversedActions("CartPole-v1")),
    ]


TASK_SEQUENCES: dict[str, Callable[[], list[Task]]] = {
    "cartpole-physics": cartpole_physics,
    "acrobot-physics": acrobot_physics,
    "cartpole-reversed": cartpole_reversed,
}


@dataclass
class TaskSequenceResult:
    """``returns[i][j]``: mean greedy return on task ``j`` after training on task ``i``."""

    tasks: list[str]
    returns: list[list[float]] = field(default_factory=list)
    stds: list[list[float]] = field(default_factory=list)

    @property
    def average_return(self) -> float:
        """Mean final return over all tasks (the last row)."""
        return sum(self.returns[-1]) / len(self.returns[-1])

    @property
    def forgetting(self) -> float:
        """Mean drop from the best return ever reached on an earlier task to its final return."""
        return forgetting(self.returns)

    @property
    def backward_transfer(self) -> float:
        """Mean (final - just-after-training) return on the earlier tasks."""
        return backward_transfer(self.returns)


def run_task_sequence(agent, tasks: Sequence[Task], steps_per_task: int, *, n_eval_episodes: int = 10,
                      progress_bar: bool = False, on_task_end: Callable[[int, list[float]], None] | None = None,
                      ) -> TaskSequenceResult:
    """Train ``agent`` on each task in turn for ``steps_per_task`` steps and evaluate on all tasks
    after each one.

    The agent keeps its networks, learner state, replay buffer and exploration schedule across the
    switches (``agent.set_env``); the environment must share the agent's spaces.

    Args:
        agent: a :class:`agents.DQNAgent` (anything with ``set_env``, ``learn`` and ``evaluate``).
        tasks: the sequence; the agent is switched to ``tasks[0]`` first.
        steps_per_task: environment steps on each task.
        n_eval_episodes: greedy evaluation episodes per task and row of the matrix.
        on_task_end: called with the task index and its row of returns.
    """
    if not tasks:
        raise ValueError("the task sequence is empty")
    result = TaskSequenceResult(tasks=[t.name for t in tasks])
    for i, task in enumerate(tasks):
        agent.set_env(task.make_env, seed=agent.seed + i)
        agent.learn(steps_per_task, progress_bar=progress_bar)
        scores = [agent.evaluate(n_eval_episodes, env=other.make_env) for other in tasks]
        result.returns.append([m for m, _ in scores])
        result.stds.append([s for _, s in scores])
        if on_task_end is not None:
            on_task_end(i, result.returns[-1])
    return result

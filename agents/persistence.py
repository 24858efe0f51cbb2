"""Saving and loading a DQN agent: everything a resumed run needs to continue exactly.

The checkpoint holds the learner (through :func:`amstream.save_checkpoint`, atomic), the target
network, the replay buffer, the counters and exploration schedule, every random generator and the
environments themselves (pickled sub-environments; None if they cannot be pickled, and a resumed
run then starts new episodes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from amstream.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from .envs import env_state, restore_env_state

if TYPE_CHECKING:
    from .dqn import DQNAgent

__all__ = ["save_agent", "load_agent"]


def _spaces(agent: DQNAgent) -> list:
    return [list(agent.obs_shape), agent.n_actions, agent.n_envs]


def save_agent(agent: DQNAgent, path: str | Path) -> Path:
    """Write ``agent`` to ``path`` atomically; returns the path."""
    envs = env_state(agent.envs)
    return save_checkpoint(
        path, agent.learner,
        agent={
            "spaces": _spaces(agent),
            "target": agent.td.target.state_dict(),
            "buffer": agent.buffer.state_dict(),
            "counters": [agent.global_step, agent.n_updates, agent.dropped_transitions, agent._since_train,
                         agent._since_target, agent.exploration_timesteps or 0],
            "rng": json.dumps(agent._rng.bit_generator.state),
            "sampler": agent._sampler.get_state(),
            "obs": torch.as_tensor(np.asarray(agent._obs)),
            "autoreset": torch.as_tensor(agent._autoreset),
            "episode": [torch.as_tensor(agent._episode_return), torch.as_tensor(agent._episode_length)],
            "episode_returns": [list(r) for r in agent.episode_returns],
            "eval_history": [list(r) for r in agent.eval_history],
            "run_dir": None if agent.run_dir is None else str(agent.run_dir),
            "envs": None if envs is None else torch.frombuffer(bytearray(envs), dtype=torch.uint8),
        },
    )


def load_agent(agent: DQNAgent, path: str | Path) -> None:
    """Restore a checkpoint of :func:`save_agent` into ``agent`` (built with the same environment
    and settings).

    Raises:
        CheckpointError: a missing or unreadable file, a learner checkpoint, or one saved for other
            spaces.
    """
    extra = load_checkpoint(path, agent.learner)
    state = extra.get("agent")
    if state is None:
        raise CheckpointError(f"{path} is a learner checkpoint, not a DQN agent's")
    if state["spaces"] != _spaces(agent):
        raise CheckpointError(f"{path} was saved for observation shape, actions and environments "
                              f"{state['spaces']}, this agent has {_spaces(agent)}")
    # The checkpoint is mapped onto the learner's device; the host-side state goes back to the CPU.
    host = {k: state[k].cpu() for k in ("sampler", "obs", "autoreset")}
    episode = [t.cpu() for t in state["episode"]]
    envs = None if state["envs"] is None else state["envs"].cpu()
    agent.td.target.load_state_dict(state["target"])
    agent.buffer.load_state_dict(state["buffer"])
    (agent.global_step, agent.n_updates, agent.dropped_transitions, agent._since_train, agent._since_target,
     exploration) = (int(v) for v in state["counters"])
    agent.exploration_timesteps = exploration or None
    agent._rng.bit_generator.state = json.loads(state["rng"])
    agent._sampler.set_state(host["sampler"])
    agent._obs = host["obs"].numpy().copy()
    agent._autoreset = host["autoreset"].numpy().astype(np.bool_)
    agent._episode_return = episode[0].numpy().copy()
    agent._episode_length = episode[1].numpy().copy()
    agent.episode_returns = [(int(s), float(r), int(n)) for s, r, n in state["episode_returns"]]
    agent.eval_history = [(int(s), float(m), float(d)) for s, m, d in state["eval_history"]]
    if state.get("run_dir"):
        agent._resume_run_dir = Path(state["run_dir"])
    if envs is not None:
        restore_env_state(agent.envs, envs.numpy().tobytes(), agent._autoreset)
    else:  # environments that cannot be pickled: start new episodes
        agent._obs, _ = agent.envs.reset(seed=agent.seed + agent.global_step)
        agent._autoreset[:] = False

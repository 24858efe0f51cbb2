"""A uniform replay buffer held on the learner's device (Mnih et al., 2015, "Human-level control
through deep reinforcement learning").

Transitions ``(obs, action, reward, next_obs, terminated)`` live in preallocated tensors of a fixed
capacity, overwritten oldest first. Only ``terminated`` is stored: a truncated episode (time limit)
still bootstraps from ``next_obs``, so the TD target never needs ``truncated``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = ["ReplayBuffer", "Batch"]


class Batch(NamedTuple):
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor


class ReplayBuffer:
    """Fixed-capacity circular buffer of transitions on ``device``.

    Args:
        capacity: number of transitions kept.
        obs_shape: shape of one observation.
        device: where the tensors live (sampling and the TD targets then need no transfer).
        obs_dtype: dtype of the stored observations.
    """

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], device: str | torch.device = "cpu",
                 obs_dtype: torch.dtype = torch.float32) -> None:
        if int(capacity) < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        self.capacity, self.obs_shape, self.device = int(capacity), tuple(obs_shape), torch.device(device)
        self.obs = torch.zeros((self.capacity, *self.obs_shape), dtype=obs_dtype, device=self.device)
        self.next_obs = torch.zeros_like(self.obs)
        self.actions = torch.zeros(self.capacity, dtype=torch.int64, device=self.device)
        self.rewards = torch.zeros(self.capacity, dtype=torch.float32, device=self.device)
        self.terminated = torch.zeros(self.capacity, dtype=torch.float32, device=self.device)
        self.pos = 0  # next slot to write
        self.size = 0
        # On the CPU the columns are also written through NumPy views of the same memory: one
        # environment step's transition costs a few microseconds instead of five tensor conversions.
        self._arrays = (tuple(t.numpy() for t in (self.obs, self.next_obs, self.actions, self.rewards,
                                                  self.terminated))
                        if self.device.type == "cpu" and obs_dtype in (torch.float32, torch.float64) else None)

    def __len__(self) -> int:
        return self.size

    def add(self, obs, actions, rewards, next_obs, terminated) -> int:
        """Append a batch of transitions (arrays or tensors with a leading batch dimension).

        Returns the number stored. Shapes are checked, so a wrong observation shape cannot
        silently corrupt the buffer.
        """
        if self._arrays is not None and self._add_arrays(obs, actions, rewards, next_obs, terminated):
            return len(obs)
        obs = torch.as_tensor(np.asarray(obs), dtype=self.obs.dtype)
        next_obs = torch.as_tensor(np.asarray(next_obs), dtype=self.obs.dtype)
        n = obs.shape[0]
        if tuple(obs.shape[1:]) != self.obs_shape or tuple(next_obs.shape) != tuple(obs.shape):
            raise ValueError(f"observations of shape {tuple(obs.shape[1:])} (next: {tuple(next_obs.shape[1:])}) "
                             f"do not fit a buffer of observation shape {self.obs_shape}")
        columns = [torch.as_tensor(np.asarray(v)).reshape(-1) for v in (actions, rewards, terminated)]
        if any(c.shape[0] != n for c in columns):
            raise ValueError(f"a batch of {n} observations needs {n} actions, rewards and terminated flags")
        if n == 0:
            return 0
        if n > self.capacity:  # only the newest fit
            obs, next_obs, columns = obs[-self.capacity:], next_obs[-self.capacity:], [c[-self.capacity:] for c in columns]
            n = self.capacity
        end = self.pos + n
        if end <= self.capacity:  # one contiguous slice (the common case)
            where = slice(self.pos, end)
        else:
            where = ((torch.arange(n) + self.pos) % self.capacity).to(self.device)
        self.obs[where] = obs.to(self.device)
        self.next_obs[where] = next_obs.to(self.device)
        self.actions[where] = columns[0].to(self.device, torch.int64)
        self.rewards[where] = columns[1].to(self.device, torch.float32)
        self.terminated[where] = columns[2].to(self.device, torch.float32)
        self.pos = int(end % self.capacity)
        self.size = min(self.size + n, self.capacity)
        return n

    def _add_arrays(self, obs, actions, rewards, next_obs, terminated) -> bool:
        """The common case of :meth:`add` on the CPU: NumPy arrays of a few transitions that fit
        before the end of the ring; False (nothing written) for anything else."""
        if not all(isinstance(v, np.ndarray) for v in (obs, actions, rewards, next_obs, terminated)):
            return False
        n = obs.shape[0]
        if (not 0 < n <= self.capacity - self.pos or obs.shape[1:] != self.obs_shape or next_obs.shape != obs.shape
                or not actions.shape == rewards.shape == terminated.shape == (n,)):
            return False
        end = self.pos + n
        o, no, a, r, t = self._arrays
        o[self.pos:end] = obs
        no[self.pos:end] = next_obs
        a[self.pos:end] = actions
        r[self.pos:end] = rewards
        t[self.pos:end] = terminated
        self.pos = end % self.capacity
        self.size = min(self.size + n, self.capacity)
        return True

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` transitions drawn uniformly with replacement (indices from ``generator``,
        a CPU generator, so the draw is the same on every device)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = torch.randint(self.size, (int(batch_size),), generator=generator).to(self.device)
        return Batch(self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.terminated[idx])

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The stored transitions (only the filled part) and the write position."""
        n = self.size
        return {"capacity": self.capacity, "obs_shape": self.obs_shape, "pos": self.pos, "size": n,
                "obs": self.obs[:n].cpu(), "next_obs": self.next_obs[:n].cpu(), "actions": self.actions[:n].cpu(),
                "rewards": self.rewards[:n].cpu(), "terminated": self.terminated[:n].cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity or tuple(state["obs_shape"]) != self.obs_shape:
            raise ValueError(f"buffer state of capacity {state['capacity']} and observation shape "
                             f"{tuple(state['obs_shape'])} does not fit this buffer ({self.capacity}, {self.obs_shape})")
        n = int(state["size"])
        for name in ("obs", "next_obs", "actions", "rewards", "terminated"):
            getattr(self, name)[:n] = state[name].to(self.device)
        self.pos, self.size = int(state["pos"]), n

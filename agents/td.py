"""The value network's update of DQN: TD targets from a target network, the TD loss, target updates.

Deep Q-learning (Mnih et al., 2015, "Human-level control through deep reinforcement learning")
minimizes ``(Q(s, a) - [r + gamma (1 - terminated) max_a' Q_target(s', a')])^2`` over replayed
transitions; Double DQN (van Hasselt, Guez, Silver, AAAI 2016) picks ``a'`` with the online
network and values it with the target network. The update is the learner's:
``learner.step(obs, td_loss)``, where ``td_loss`` compares the Q-value of the action taken with the
TD target, so only that output is fitted, whatever the method.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from amstream.learners import Learner, StepInfo

from .buffer import Batch

__all__ = ["TD_LOSSES", "TDLoss", "TDUpdate", "td_targets"]

TD_LOSSES = {"mse": F.mse_loss, "huber": F.smooth_l1_loss}


def td_targets(rewards: torch.Tensor, terminated: torch.Tensor, next_q_target: torch.Tensor, gamma: float,
               next_q_online: torch.Tensor | None = None) -> torch.Tensor:
    """``r + gamma * (1 - terminated) * V(s')``: ``V(s') = max_a Q_target(s', a)``, or with
    ``next_q_online`` (Double DQN) ``Q_target(s', argmax_a Q_online(s', a))``. Only a terminal
    state stops the bootstrap; a truncated episode's last transition bootstraps like any other."""
    if next_q_online is None:
        next_value = next_q_target.max(dim=1).values
    else:
        next_value = next_q_target.gather(1, next_q_online.argmax(dim=1, keepdim=True)).squeeze(1)
    return rewards + gamma * (1.0 - terminated.to(rewards.dtype)) * next_value


class TDLoss:
    """The TD loss of a batch as a function of the network output ``(B, n_actions)``: the loss of
    the Q-values of the actions taken against the TD targets, with its gradient in closed form.

    The gradient is nonzero only in the taken action's column: ``2 (q - target) / B`` for the
    squared error, ``clamp(q - target, -1, 1) / B`` for the Huber loss (beta 1). Learners that
    need the loss's gradient with respect to the output (the code steps of alternating
    minimization: six per update) use it instead of autograd (``amstream.functional.task_loss_gradient``).
    """

    __slots__ = ("kind", "index", "target")

    def __init__(self, kind: str, actions: torch.Tensor, target: torch.Tensor) -> None:
        self.kind, self.index, self.target = kind, actions[:, None], target

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        return TD_LOSSES[self.kind](out.gather(1, self.index).squeeze(1), self.target)

    def gradient(self, out: torch.Tensor) -> torch.Tensor:
        error = out.detach().gather(1, self.index).squeeze(1) - self.target
        scale = error.clamp_(-1.0, 1.0) if self.kind == "huber" else error.mul_(2.0)
        return torch.zeros_like(out).scatter_(1, self.index, scale.div_(error.numel()).unsqueeze(1))


class TDUpdate:
    """One TD update of ``learner``'s network from a batch, and the target network it bootstraps on.

    Args:
        learner: trains the online network (``learner.model``) through ``learner.step``.
        gamma: discount.
        tau: 1.0 for a hard copy at each target update, below 1 for a Polyak average
            ``target <- tau q + (1 - tau) target``.
        double_dqn: Double DQN targets.
        td_loss: ``"mse"`` (CleanRL) or ``"huber"`` (SB3's smooth L1).
    """

    def __init__(self, learner: Learner, *, gamma: float = 0.99, tau: float = 1.0, double_dqn: bool = False,
                 td_loss: str = "mse") -> None:
        if td_loss not in TD_LOSSES:
            raise ValueError(f"td_loss must be one of {tuple(TD_LOSSES)}, got {td_loss!r}")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau!r}")
        self.learner = learner
        self.gamma, self.tau, self.double_dqn, self.td_loss = float(gamma), float(tau), bool(double_dqn), td_loss
        self.target = copy.deepcopy(learner.model).eval()
        for p in self.target.parameters():
            p.requires_grad_(False)

    def step(self, batch: Batch) -> StepInfo:
        """One ``learner.step`` on the TD loss of ``batch``."""
        with torch.no_grad():
            online = self.learner.predict(batch.next_obs) if self.double_dqn else None
            target = td_targets(batch.rewards, batch.terminated, self.target(batch.next_obs), self.gamma, online)
        return self.learner.step(batch.obs, TDLoss(self.td_loss, batch.actions, target))

    @torch.no_grad()
    def update_target(self) -> None:
        online = self.learner.model
        if self.tau >= 1.0:
            self.target.load_state_dict(online.state_dict())
            return
        for t, p in zip(self.target.parameters(), online.parameters()):
            t.lerp_(p.detach(), self.tau)
        for t, b in zip(self.target.buffers(), online.buffers()):
            t.copy_(b)

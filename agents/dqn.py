"""DQN whose value network is trained by any amstream learner.

Deep Q-learning (Mnih et al., 2015, "Human-level control through deep reinforcement learning"),
with Double DQN as an option (van Hasselt et al., 2016). The loop follows CleanRL's ``dqn.py``
(its defaults are the CartPole settings) but uses Gymnasium 1.x semantics correctly:

- the TD target bootstraps on ``terminated`` only, never on ``truncated`` (a time limit is not a
  terminal state of the MDP);
- with vector environments and the default next-step autoreset, the step after an episode ends
  only resets that sub-environment: its "transition" (last observation -> reset observation) is
  never stored;
- a transition with a non-finite observation or reward is dropped and counted, so neither the
  buffer nor the network is corrupted.

The value network's update is the learner's (:mod:`agents.td`): ``learner.step(obs, td_loss)``,
where ``td_loss`` compares the Q-value of the action taken with the TD target, so only that output
is fitted. With an alternating-minimization learner, the codes move to lower the TD loss and each
layer fits its own codes (Choromanska et al., 2019). The agent uses the learner API only, so any
registered learner, an exact solver included, trains the value network. Saving and loading is in
:mod:`agents.persistence`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from amstream import set_seed
from amstream.learners import Learner
from amstream.logging import NullLogger, TensorBoardLogger, make_run_dir

from .buffer import ReplayBuffer
from .envs import EnvSpec, make_env_factory, make_vector_env
from .evaluation import evaluate_policy
from .networks import DEFAULT_LEARNING_RATE, check_value_network, make_td_learner
from .persistence import load_agent, save_agent
from .td import TD_LOSSES, TDUpdate

__all__ = ["DQNAgent"]


class DQNAgent:
    """A DQN agent with an SB3-shaped interface; the value network is trained by ``learner``.

    Args:
        env: a Gymnasium id, a zero-argument env factory, or an env instance (``n_envs=1``).
        learner: a name from :data:`amstream.LEARNERS` (the Q-network is then :func:`q_network`
            with ``hidden``) or a learner built on your own network, which must map an observation
            batch to one value per action; the agent then lives on the learner's device.
        n_envs: sub-environments stepped together (a ``SyncVectorEnv``).
        hidden: hidden widths of the Q-network built for a named learner.
        learning_rate: the rate of every learning-rate hyperparameter of a named learner (CleanRL's
            2.5e-4); :func:`agents.networks.td_learner_settings` shows what a learner gets.
        learner_kwargs: options of a named learner, over its TD preset and ``learning_rate``.
        buffer_size, batch_size, gamma, learning_starts, train_frequency, gradient_steps: as
            CleanRL (``train_frequency`` and ``learning_starts`` count environment steps, all
            sub-environments together).
        target_update_interval: environment steps between target-network updates.
        tau: 1.0 for a hard copy, below 1 for a Polyak average ``target <- tau q + (1 - tau) target``.
        exploration_fraction, start_e, end_e: epsilon falls linearly from ``start_e`` to ``end_e``
            over ``exploration_fraction`` of the first ``learn`` call's ``total_timesteps`` (or over
            ``exploration_timesteps`` steps when given), then stays at ``end_e``.
        double_dqn: pick the next action with the online network, value it with the target network.
        td_loss: ``"mse"`` (CleanRL) or ``"huber"`` (SB3, smooth L1).
        seed: seeds python, numpy, torch, the environments' resets and the agent's own generators.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...; the buffer and the networks live there (for a
            built learner: its device; another device given here is an error).
        tensorboard_log: root folder for TensorBoard runs (None: no logging).

    Raises:
        ValueError: an unknown environment id or learner name, a non-discrete action space,
            observations that are not numeric boxes, or a network that does not fit the spaces.
    """

    def __init__(
        self,
        env: EnvSpec,
        learner: str | Learner = "am-adam",
        *,
        n_envs: int = 1,
        hidden: tuple[int, ...] = (120, 84),
        learning_rate: float = DEFAULT_LEARNING_RATE,
        learner_kwargs: dict | None = None,
        buffer_size: int = 10_000,
        batch_size: int = 128,
        gamma: float = 0.99,
        learning_starts: int = 10_000,
        train_frequency: int = 10,
        gradient_steps: int = 1,
        target_update_interval: int = 500,
        tau: float = 1.0,
        exploration_fraction: float = 0.5,
        exploration_timesteps: int | None = None,
        start_e: float = 1.0,
        end_e: float = 0.05,
        double_dqn: bool = False,
        td_loss: str = "mse",
        seed: int = 0,
        device: str | torch.device = "auto",
        tensorboard_log: str | Path | None = None,
    ) -> None:
        if td_loss not in TD_LOSSES:
            raise ValueError(f"td_loss must be one of {tuple(TD_LOSSES)}, got {td_loss!r}")
        if not (0.0 <= end_e <= 1.0 and 0.0 <= start_e <= 1.0):
            raise ValueError(f"start_e and end_e must be probabilities, got {start_e!r}, {end_e!r}")
        for name, value in (("batch_size", batch_size), ("train_frequency", train_frequency),
                            ("gradient_steps", gradient_steps), ("target_update_interval", target_update_interval)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        self.seed = int(seed)
        set_seed(self.seed)
        self.env_factory = make_env_factory(env)
        self.envs = make_vector_env(self.env_factory, n_envs)
        self.n_envs = self.envs.num_envs
        obs_space, act_space = self.envs.single_observation_space, self.envs.single_action_space
        self.obs_shape, self.n_actions = tuple(obs_space.shape), int(act_space.n)

        self.learner_name = learner if isinstance(learner, str) else type(learner).__name__
        self.learner = make_td_learner(learner, self.obs_shape, self.n_actions, hidden=hidden, seed=self.seed,
                                       learning_rate=learning_rate, learner_kwargs=learner_kwargs, device=device)
        self.device = self.learner.device
        check_value_network(self.learner, self.obs_shape, self.n_actions)
        # Acting runs the network directly when eval mode changes nothing (no BatchNorm, no
        # Dropout): one forward pass per environment step without predict's checks and mode switches.
        self._plain_forward = not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))
                                      for m in self.learner.model.modules())
        self.td = TDUpdate(self.learner, gamma=gamma, tau=tau, double_dqn=double_dqn, td_loss=td_loss)

        self.buffer = ReplayBuffer(buffer_size, self.obs_shape, self.device)
        self.batch_size = int(batch_size)
        self.learning_starts, self.train_frequency = int(learning_starts), int(train_frequency)
        self.gradient_steps, self.target_update_interval = int(gradient_steps), int(target_update_interval)
        self.exploration_fraction, self.exploration_timesteps = float(exploration_fraction), exploration_timesteps
        self.start_e, self.end_e = float(start_e), float(end_e)

        # the agent's own randomness: exploration (numpy) and minibatch indices (torch, CPU)
        self._rng = np.random.default_rng(self.seed)
        self._sampler = torch.Generator().manual_seed(self.seed)
        self.envs.action_space.seed(self.seed)
        self._obs, _ = self.envs.reset(seed=self.seed)
        self._autoreset = np.zeros(self.n_envs, dtype=np.bool_)  # sub-envs that reset at the next step
        self._episode_return = np.zeros(self.n_envs)
        self._episode_length = np.zeros(self.n_envs, dtype=np.int64)

        self.global_step = 0
        self.n_updates = 0
        self.dropped_transitions = 0
        self._since_train = 0
        self._since_target = 0
        self.episode_returns: list[tuple[int, float, int]] = []  # (global step, return, length)
        self.eval_history: list[tuple[int, float, float]] = []  # (global step, mean, std)
        self.last_td_loss = float("nan")
        self._logger = NullLogger()
        self.tensorboard_log = tensorboard_log
        self.run_dir: Path | None = None
        self._resume_run_dir: Path | None = None

    # ------------------------------------------------------------------------------ construction
    @property
    def target(self) -> nn.Module:
        """The target network the TD targets bootstrap on."""
        return self.td.target

    @property
    def gamma(self) -> float:
        return self.td.gamma

    # ---------------------------------------------------------------------------------- acting
    def epsilon(self, step: int | None = None) -> float:
        """The exploration rate at environment step ``step`` (default: now)."""
        step = self.global_step if step is None else step
        duration = max(1, int(self.exploration_timesteps or 1))
        fraction = min(1.0, step / duration)
        return self.start_e + fraction * (self.end_e - self.start_e)

    @torch.no_grad()
    def q_values(self, obs) -> torch.Tensor:
        """Q-values of a batch of observations (online network, eval mode)."""
        obs = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
        if self._plain_forward:
            with torch.inference_mode():
                return self.learner.model(obs.to(self.device))
        return self.learner.predict(obs)

    def predict(self, obs, deterministic: bool = True) -> np.ndarray:
        """Actions for a batch of observations (or one observation): greedy, or epsilon-greedy
        with the current epsilon when ``deterministic=False``."""
        obs = np.asarray(obs, dtype=np.float32)
        single = obs.shape == self.obs_shape
        batch = obs[None] if single else obs
        if batch.shape[1:] != self.obs_shape:
            raise ValueError(f"observations must have shape {self.obs_shape} (one) or (batch, "
                             f"{', '.join(map(str, self.obs_shape))}), got {obs.shape}")
        actions = self._act(batch, 0.0 if deterministic else self.epsilon())
        return actions[0] if single else actions

    def _act(self, obs: np.ndarray, epsilon: float) -> np.ndarray:
        finite = np.isfinite(obs).reshape(len(obs), -1).all(axis=1)
        explore = (self._rng.random(len(obs)) < epsilon) | ~finite  # no greedy action from a broken observation
        actions = self._rng.integers(self.n_actions, size=len(obs))
        # the network runs only for the observations that act greedily (none while epsilon is 1);
        # the random draws are the same either way, so a seeded run is unchanged
        if not explore.all():
            greedy = ~explore
            actions[greedy] = self.q_values(obs[greedy]).argmax(dim=1).cpu().numpy()
        return actions

    # -------------------------------------------------------------------------------- learning
    def learn(self, total_timesteps: int, callback: Callable[["DQNAgent"], bool | None] | None = None,
              progress_bar: bool = True, log_interval: int = 100, eval_freq: int = 0,
              n_eval_episodes: int = 10) -> "DQNAgent":
        """Interact for ``total_timesteps`` more environment steps (all sub-environments together),
        training the value network as it goes.

        Args:
            callback: called after every vector step with the agent; returning False stops.
            progress_bar: a tqdm bar with the latest episodic return and epsilon.
            log_interval: environment steps between TensorBoard records of the losses and SPS.
            eval_freq: environment steps between greedy evaluations on a separate environment
                (0: none); each appends to ``eval_history`` and logs ``eval/episodic_return``.
            n_eval_episodes: episodes per periodic evaluation.

        Returns:
            self.
        """
        if int(total_timesteps) < 0:
            raise ValueError(f"total_timesteps must be >= 0, got {total_timesteps!r}")
        if self.exploration_timesteps is None:
            self.exploration_timesteps = max(1, int(self.exploration_fraction * int(total_timesteps)))
        self._open_logger()
        end = self.global_step + int(total_timesteps)
        bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=int(total_timesteps), desc=f"DQN {self.learner_name}", unit="step", leave=False)
        start_time, start_step = time.perf_counter(), self.global_step
        next_log = self.global_step + log_interval
        next_eval = self.global_step + eval_freq if eval_freq else None
        try:
            while self.global_step < end:
                self._env_step()
                if bar is not None:
                    bar.update(self.n_envs)
                    if self.episode_returns:
                        bar.set_postfix(ret=f"{self.episode_returns[-1][1]:.1f}", eps=f"{self.epsilon():.3f}",
                                        refresh=False)
                self._maybe_train()
                if self.global_step >= next_log:
                    next_log += log_interval
                    sps = (self.global_step - start_step) / max(time.perf_counter() - start_time, 1e-9)
                    self._logger.record("charts/SPS", sps, self.global_step)
                    self._logger.record("charts/epsilon", self.epsilon(), self.global_step)
                if next_eval is not None and self.global_step >= next_eval:
                    next_eval += eval_freq
                    mean, std = self.evaluate(n_eval_episodes)
                    self.eval_history.append((self.global_step, mean, std))
                    self._logger.record("eval/episodic_return", mean, self.global_step)
                if callback is not None and callback(self) is False:
                    break
        finally:
            if bar is not None:
                bar.close()
            if isinstance(self._logger, TensorBoardLogger):
                self._logger.writer.flush()
        return self

    def _env_step(self) -> None:
        obs = self._obs
        actions = self._act(obs, self.epsilon())
        next_obs, rewards, terminated, truncated, _ = self.envs.step(actions)
        # Next-step autoreset: a sub-env whose episode ended at the last step was only reset now.
        real = ~self._autoreset
        finite = (np.isfinite(next_obs).reshape(self.n_envs, -1).all(axis=1)
                  & np.isfinite(obs).reshape(self.n_envs, -1).all(axis=1) & np.isfinite(rewards))
        keep = real & finite
        self.dropped_transitions += int((real & ~finite).sum())
        if keep.any():
            self.buffer.add(obs[keep], actions[keep], rewards[keep], next_obs[keep], terminated[keep])
        done = terminated | truncated
        self._episode_return[real] += np.where(np.isfinite(rewards[real]), rewards[real], 0.0)
        self._episode_length[real] += 1
        for i in np.flatnonzero(real & done):
            record = (self.global_step + self.n_envs, float(self._episode_return[i]), int(self._episode_length[i]))
            self.episode_returns.append(record)
            self._logger.record("charts/episodic_return", record[1], record[0])
            self._logger.record("charts/episodic_length", record[2], record[0])
        self._episode_return[done | ~real] = 0.0
        self._episode_length[done | ~real] = 0
        self._autoreset = done.copy()
        self._obs = next_obs
        self.global_step += self.n_envs
        self._since_train += self.n_envs
        self._since_target += self.n_envs

    def _maybe_train(self) -> None:
        if self.global_step <= self.learning_starts or len(self.buffer) == 0:
            self._since_train = self._since_target = 0
            return
        while self._since_train >= self.train_frequency:
            self._since_train -= self.train_frequency
            for _ in range(self.gradient_steps):
                self._train_step()
        while self._since_target >= self.target_update_interval:
            self._since_target -= self.target_update_interval
            self.td.update_target()

    def _train_step(self) -> None:
        batch = self.buffer.sample(self.batch_size, self._sampler)
        info = self.td.step(batch)
        self.n_updates += 1
        logging = isinstance(self._logger, TensorBoardLogger)
        if self.n_updates % 10 == 0 or logging:
            self.last_td_loss = float(info.loss)
        if logging and self.n_updates % 10 == 0:
            with torch.no_grad():
                q_taken = self.learner.predict(batch.obs).gather(1, batch.actions[:, None]).mean()
            self._logger.record("losses/td_loss", info.loss, self.global_step)
            self._logger.record("losses/q_values", q_taken, self.global_step)
            self._logger.log_step(info, self.global_step)

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, n_episodes: int = 10, env: EnvSpec | None = None, deterministic: bool = True,
                 seed: int | None = None) -> tuple[float, float]:
        """Mean and standard deviation of the return over ``n_episodes`` on a separate environment
        (a fresh copy of the training one unless ``env`` is given), greedy unless
        ``deterministic=False``. The evaluation seed is fixed (``seed``, default the agent's seed
        + 10,000), so the same network always gets the same score; training is not affected."""
        factory = self.env_factory if env is None else make_env_factory(env)
        rng_state = self._rng.bit_generator.state
        try:
            return evaluate_policy(lambda obs: int(self._act(obs[None], 0.0 if deterministic else self.end_e)[0]),
                                   factory, n_episodes, self.seed + 10_000 if seed is None else seed)
        finally:
            self._rng.bit_generator.state = rng_state  # evaluation never shifts training's randomness

    # -------------------------------------------------------------------------------- switching
    def set_env(self, env: EnvSpec, seed: int | None = None) -> None:
        """Continue in another environment with the same spaces (a new task of a sequence). The
        replay buffer, the networks and the exploration schedule carry over; episodes restart."""
        factory = make_env_factory(env)
        envs = make_vector_env(factory, self.n_envs)
        if (tuple(envs.single_observation_space.shape) != self.obs_shape
                or int(envs.single_action_space.n) != self.n_actions):
            envs.close()
            raise ValueError(f"the new environment's spaces ({envs.single_observation_space}, "
                             f"{envs.single_action_space}) differ from the agent's")
        self.envs.close()
        self.env_factory, self.envs = factory, envs
        self.envs.action_space.seed(self.seed if seed is None else seed)
        self._obs, _ = self.envs.reset(seed=self.seed if seed is None else seed)
        self._autoreset[:] = False
        self._episode_return[:] = 0.0
        self._episode_length[:] = 0

    # -------------------------------------------------------------------------------- logging
    def _open_logger(self) -> None:
        if self.tensorboard_log is None or isinstance(self._logger, TensorBoardLogger):
            return
        resumed = self._resume_run_dir
        if resumed is not None and resumed.is_dir():  # a loaded run continues its own folder
            self.run_dir = resumed
            self._logger = TensorBoardLogger(self.run_dir, purge_step=self.global_step + 1)
            return
        env_name = getattr(self.env_factory, "env_id", None) or "env"
        self.run_dir = make_run_dir(self.tensorboard_log, f"{env_name}__dqn-{self.learner_name}__{self.seed}")
        self._logger = TensorBoardLogger(self.run_dir)
        rows = "\n".join(f"|{k}|{v}|" for k, v in self.hparams().items())
        self._logger.log_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")

    def hparams(self) -> dict:
        return {
            "env": repr(self.env_factory), "learner": self.learner_name,
            **{f"learner.{k}": v for k, v in self.learner.hparams().items()},
            "n_envs": self.n_envs, "buffer_size": self.buffer.capacity, "batch_size": self.batch_size,
            "gamma": self.gamma, "learning_starts": self.learning_starts, "train_frequency": self.train_frequency,
            "gradient_steps": self.gradient_steps, "target_update_interval": self.target_update_interval,
            "tau": self.td.tau, "exploration_timesteps": self.exploration_timesteps, "start_e": self.start_e,
            "end_e": self.end_e, "double_dqn": self.td.double_dqn, "td_loss": self.td.td_loss, "seed": self.seed,
        }

    def close(self) -> None:
        self.envs.close()
        self._logger.close()

    # ------------------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> Path:
        """Write everything a resumed run needs to continue exactly (:func:`agents.persistence.save_agent`):
        the learner, the target network, the replay buffer, the counters and exploration schedule,
        every random generator and the environments' state. Atomic, like
        :func:`amstream.save_checkpoint`."""
        return save_agent(self, path)

    def load(self, path: str | Path) -> DQNAgent:
        """Restore a checkpoint written by :meth:`save` into this agent (built with the same
        environment and settings), so that ``learn`` continues the same run, its TensorBoard
        folder included.

        Raises:
            amstream.CheckpointError: a missing or unreadable file, or one saved for other spaces.
        """
        load_agent(self, path)
        return self

"""The DQN agent: Gymnasium 1.x semantics on tiny deterministic environments, checkpoints, bad
input, the continual task sequence, and a short CartPole run against a random policy."""
from __future__ import annotations

import math
import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch import nn

from agents import DQNAgent, ReplayBuffer, td_targets
from agents.envs import RescaledEnv
from agents.tasks import TASK_SEQUENCES, Task, cartpole_physics, run_task_sequence
import amstream
from agents import td_learner_settings
from amstream import AMAdam, Backprop
from amstream.checkpoint import CheckpointError
from doubles import RidgeHead
from learner_cases import conformance_cases


class Counter(gym.Env):
    """Observation ``[t, episode]``; every step gives reward 1 and ``t += 1``. The episode
    terminates at ``t == length`` (``terminal=True``) or is truncated there (a time limit)."""

    metadata: dict = {}

    def __init__(self, length: int = 3, terminal: bool = True, nan_reward_at: int | None = None):
        self.length, self.terminal, self.nan_reward_at = length, terminal, nan_reward_at
        self.observation_space = spaces.Box(-1e6, 1e6, (2,), np.float32)
        self.action_space = spaces.Discrete(2)
        self.t, self.episode, self.steps = 0, -1, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.episode = 0, self.episode + 1
        return np.array([self.t, self.episode], np.float32), {}

    def step(self, action):
        self.t += 1
        self.steps += 1
        reward = float("nan") if self.steps == self.nan_reward_at else 1.0
        end = self.t >= self.length
        return np.array([self.t, self.episode], np.float32), reward, end and self.terminal, end and not self.terminal, {}


def small_agent(env, learner="backprop", **kw):
    settings = dict(buffer_size=1000, batch_size=8, learning_starts=10, train_frequency=2, target_update_interval=20,
                    hidden=(16,), device="cpu", seed=0)
    return DQNAgent(env, learner, **{**settings, **kw})


def stored(agent) -> dict[str, np.ndarray]:
    n = len(agent.buffer)
    return {k: getattr(agent.buffer, k)[:n].cpu().numpy() for k in ("obs", "next_obs", "actions", "rewards", "terminated")}


# ----------------------------------------------------------------------------- TD semantics
def test_td_targets_bootstrap_unless_terminated():
    rewards = torch.tensor([1.0, 1.0, 0.5])
    terminated = torch.tensor([0.0, 1.0, 0.0])
    next_q = torch.tensor([[2.0, 3.0], [10.0, 20.0], [4.0, -1.0]])
    torch.testing.assert_close(td_targets(rewards, terminated, next_q, 0.9), torch.tensor([1 + 0.9 * 3, 1.0, 0.5 + 0.9 * 4]))
    # Double DQN: the online network picks the action, the target network values it
    online = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    torch.testing.assert_close(td_targets(rewards, terminated, next_q, 0.9, online),
                               torch.tensor([1 + 0.9 * 2, 1.0, 0.5 + 0.9 * -1]))


@pytest.mark.parametrize("terminal", [True, False])
def test_terminal_versus_truncated_transitions(terminal):
    """An episode that ends by termination stores terminated=1 on its last transition; one cut by a
    time limit stores terminated=0, so its target bootstraps from the last observation."""
    agent = small_agent(lambda: Counter(3, terminal=terminal), learning_starts=10_000)
    agent.learn(12, progress_bar=False)
    data = stored(agent)
    last = data["next_obs"][:, 0] == 3
    assert last.sum() == 3  # three complete episodes of three steps
    assert (data["terminated"][last] == (1.0 if terminal else 0.0)).all()
    assert (data["terminated"][~last] == 0.0).all()
    assert [r for _, r, _ in agent.episode_returns] == [3.0, 3.0, 3.0]


def test_autoreset_transitions_never_enter_the_buffer():
    """Two sub-environments with episodes of 2 and 3 steps under next-step autoreset: every stored
    transition is a real step (t -> t + 1 in the same episode); the reset steps are skipped."""
    lengths = iter([2, 3])
    agent = small_agent(lambda: Counter(next(lengths)), n_envs=2, learning_starts=10_000)
    agent.learn(60, progress_bar=False)  # 30 vector steps
    data = stored(agent)
    assert (data["next_obs"][:, 0] == data["obs"][:, 0] + 1).all()
    assert (data["next_obs"][:, 1] == data["obs"][:, 1]).all()
    # per sub-env: cycles of (length + 1) vector steps, one of which is the reset step (10 x 2; 7 x 3 + 2)
    assert len(agent.buffer) == 20 + 23 and agent.global_step == 60


def test_non_finite_transitions_are_dropped_and_counted():
    agent = small_agent(lambda: Counter(3, nan_reward_at=5), learning_starts=10_000)
    agent.learn(12, progress_bar=False)
    assert agent.dropped_transitions == 1
    assert len(agent.buffer) == 9 - 1 and np.isfinite(stored(agent)["rewards"]).all()  # 9 real steps in 12


def test_seeding_makes_runs_repeat():
    a = small_agent("CartPole-v1").learn(300, progress_bar=False)
    b = small_agent("CartPole-v1").learn(300, progress_bar=False)
    assert a.episode_returns == b.episode_returns
    for p, q in zip(a.learner.model.parameters(), b.learner.model.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------- checkpoints
FEEDFORWARD_LEARNERS = sorted({c.registry_name for c in conformance_cases().values() if c.model == "mlp"})


def test_a_learner_of_sequence_models_only_is_refused_by_name():
    """ADMMiRNN and AM-RNN train Elman networks, not the agent's MLP Q-network: a clear error at
    construction."""
    sequence_only = sorted(set(amstream.LEARNERS) - set(FEEDFORWARD_LEARNERS))
    assert "admm-rnn" in sequence_only and "am-rnn" in sequence_only
    for name in sequence_only:
        with pytest.raises(amstream.UnsupportedModelError, match="ElmanRNN"):
            small_agent("CartPole-v1", name)


@pytest.mark.parametrize("learner", FEEDFORWARD_LEARNERS)
def test_save_load_resume_equals_an_uninterrupted_run(learner, tmp_path):
    """Every registered learner of feed-forward models, by name: the agent saved half-way and loaded
    into a new one continues exactly as the run that never stopped."""
    kw = dict(n_envs=2, exploration_timesteps=400, double_dqn=learner == "am-adam", tau=0.5 if learner == "am-mem" else 1.0)
    straight = small_agent("CartPole-v1", learner, **kw).learn(600, progress_bar=False)
    first = small_agent("CartPole-v1", learner, **kw).learn(300, progress_bar=False)
    first.save(tmp_path / "agent.pt")
    torch.manual_seed(123)  # a new process would start elsewhere
    np.random.seed(123)
    resumed = small_agent("CartPole-v1", learner, **kw).load(tmp_path / "agent.pt")
    resumed.learn(300, progress_bar=False)
    assert resumed.global_step == straight.global_step == 600
    assert resumed.episode_returns == straight.episode_returns
    for p, q in zip(straight.learner.model.parameters(), resumed.learner.model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(straight.target.parameters(), resumed.target.parameters()):
        assert torch.equal(p, q)
    for k, v in stored(straight).items():
        assert np.array_equal(v, stored(resumed)[k]), k
    assert straight.epsilon() == resumed.epsilon()


def test_rescaled_env_maps_the_bounds_to_unit_range_and_resumes(tmp_path):
    """RescaledEnv: MountainCar's position [-1.2, 0.6] and velocity [-0.07, 0.07] both land in
    [-1, 1]; the factory pickles (for --jobs) and an agent on it resumes exactly."""
    factory = pickle.loads(pickle.dumps(RescaledEnv("MountainCar-v0")))
    env = factory()
    obs, _ = env.reset(seed=0)
    raw = env.unwrapped.state
    np.testing.assert_allclose(obs, [(raw[0] + 1.2) / 0.9 - 1.0, raw[1] / 0.07], rtol=1e-5, atol=1e-6)
    env.close()
    with pytest.raises(ValueError, match="infinite bounds"):
        RescaledEnv("CartPole-v1")

    def agent():
        return small_agent(RescaledEnv("MountainCar-v0"), "am-mem", exploration_timesteps=150)

    straight = agent().learn(200, progress_bar=False)
    first = agent().learn(100, progress_bar=False)
    first.save(tmp_path / "agent.pt")
    resumed = agent().load(tmp_path / "agent.pt").learn(100, progress_bar=False)
    assert bool(stored(straight)["obs"].max() <= 1.0) and bool(stored(straight)["obs"].min() >= -1.0)
    for k, v in stored(straight).items():
        assert np.array_equal(v, stored(resumed)[k]), k
    for p, q in zip(straight.learner.model.parameters(), resumed.learner.model.parameters()):
        assert torch.equal(p, q)


def test_loading_into_a_different_agent_is_refused(tmp_path):
    agent = small_agent("CartPole-v1").learn(50, progress_bar=False)
    agent.save(tmp_path / "agent.pt")
    other = small_agent("Acrobot-v1")
    with pytest.raises(CheckpointError):
        other.load(tmp_path / "agent.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        agent.load(tmp_path / "missing.pt")


@pytest.mark.gpu
@pytest.mark.parametrize("learner", ["am-adam", "am-mem", "backprop"])
def test_gpu_agent_resumes_on_the_gpu_and_on_the_cpu(learner, tmp_path):
    # The buffer and both networks live on the GPU; a checkpoint written there resumes on the GPU
    # as an uninterrupted run, and on the CPU as well (the host-side state is mapped back).
    straight = small_agent("CartPole-v1", learner, device="cuda").learn(600, progress_bar=False)
    assert straight.buffer.obs.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in straight.target.parameters())
    first = small_agent("CartPole-v1", learner, device="cuda").learn(300, progress_bar=False)
    first.save(tmp_path / "agent.pt")
    resumed = small_agent("CartPole-v1", learner, device="cuda").load(tmp_path / "agent.pt").learn(300, progress_bar=False)
    assert resumed.episode_returns == straight.episode_returns
    for p, q in zip(straight.learner.model.parameters(), resumed.learner.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    on_cpu = small_agent("CartPole-v1", learner, device="cpu").load(tmp_path / "agent.pt")
    assert on_cpu.global_step == 300 and len(on_cpu.buffer) == len(first.buffer)
    for p, q in zip(first.learner.model.parameters(), on_cpu.learner.model.parameters()):
        assert torch.equal(p.cpu(), q)
    on_cpu.learn(100, progress_bar=False)
    assert on_cpu.global_step == 400


# ---------------------------------------------------------------------------------- bad input
def test_bad_environments_and_networks_are_clear_errors():
    with pytest.raises(ValueError, match="unknown Gymnasium environment id 'CartPol-v1'.*CartPole-v1"):
        DQNAgent("CartPol-v1", device="cpu")
    with pytest.raises(ValueError, match="discrete action space"):
        DQNAgent("Pendulum-v1", device="cpu")
    with pytest.raises(ValueError, match="unknown learner"):
        DQNAgent("CartPole-v1", "sgd", device="cpu")
    wrong_input = AMAdam(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)), device="cpu")
    with pytest.raises(ValueError, match=r"observations of shape \(4,\) do not fit"):
        DQNAgent("CartPole-v1", wrong_input, device="cpu")
    wrong_output = AMAdam(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), device="cpu")
    with pytest.raises(ValueError, match="one value per action"):
        DQNAgent("CartPole-v1", wrong_output, device="cpu")


def test_predict_says_which_observation_shape_it_takes():
    agent = DQNAgent("CartPole-v1", device="cpu")
    assert agent.predict([0.0, 0.1, 0.0, 0.1]) in (0, 1)
    assert agent.predict([[0.0, 0.1, 0.0, 0.1]] * 3).shape == (3,)
    for wrong in ([0.0, 0.1], [[0.0, 0.1, 0.0]] * 2, 0.5):
        with pytest.raises(ValueError, match=r"observations must have shape \(4,\) \(one\) or \(batch, 4\)"):
            agent.predict(wrong)


def test_dict_observations_are_refused():
    class DictObs(Counter):
        def __init__(self):
            super().__init__()
            self.observation_space = spaces.Dict({"a": spaces.Box(0, 1, (2,))})

    with pytest.raises(ValueError, match="FlattenObservation"):
        DQNAgent(DictObs, device="cpu")


def test_replay_buffer_rejects_wrong_shapes_and_wraps_around():
    buffer = ReplayBuffer(4, (2,))
    with pytest.raises(ValueError, match="do not fit"):
        buffer.add(np.zeros((1, 3)), [0], [0.0], np.zeros((1, 3)), [False])
    for i in range(6):
        buffer.add(np.full((1, 2), i), [i % 2], [float(i)], np.full((1, 2), i + 1), [False])
    assert len(buffer) == 4 and sorted(buffer.rewards.tolist()) == [2.0, 3.0, 4.0, 5.0]


# ------------------------------------------------------------------------------------ learning
def test_am_adam_clearly_beats_a_random_policy_on_cartpole():
    random_return = np.mean([_random_episode(seed) for seed in range(20)])  # about 22
    agent = DQNAgent("CartPole-v1", "am-adam", learning_starts=1000, train_frequency=4, batch_size=64,
                     target_update_interval=500, exploration_fraction=0.3, learner_kwargs={"lr": 1e-3, "lr_out": 1e-3},
                     device="cpu", seed=1)
    assert agent.learner.output_fit == "forward"  # AM-Adam's TD preset
    assert agent.learner.lr == 1e-3 and agent.learner.mu == 1.0  # the user's value over the preset's
    agent.learn(8000, progress_bar=False)
    mean, _ = agent.evaluate(10)
    assert mean > 4 * random_return, (mean, random_return)


def _random_episode(seed: int) -> float:
    env = gym.make("CartPole-v1")
    env.reset(seed=seed)
    env.action_space.seed(seed)
    total, done = 0.0, False
    while not done:
        _, r, term, trunc, _ = env.step(env.action_space.sample())
        total, done = total + r, term or trunc
    return total


def test_tensorboard_uses_cleanrl_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    agent = small_agent("CartPole-v1", "am-adam", tensorboard_log=tmp_path)
    agent.learn(400, progress_bar=False, log_interval=50, eval_freq=200, n_eval_episodes=2)
    agent.close()
    acc = EventAccumulator(str(agent.run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"charts/episodic_return", "charts/episodic_length", "charts/epsilon", "charts/SPS",
            "losses/td_loss", "losses/q_values", "eval/episodic_return", "am/local_loss/0"} <= tags


# -------------------------------------------------------------------------------- task sequence
def test_physics_variants_change_the_environment():
    tasks = cartpole_physics()
    envs = [t.make_env().unwrapped for t in tasks]
    assert envs[1].length == 1.0 and math.isclose(envs[1].polemass_length, 0.1)
    assert envs[2].masspole == 0.5 and math.isclose(envs[2].total_mass, 1.5)
    assert envs[3].gravity == 15.0 and envs[0].gravity == 9.8
    acrobot = TASK_SEQUENCES["acrobot-physics"]()
    assert acrobot[1].make_env().unwrapped.LINK_LENGTH_1 == 1.5


def test_reversed_actions_task_swaps_the_pushes_and_pickles():
    default, reversed_ = (t.make_env for t in TASK_SEQUENCES["cartpole-reversed"]())
    a, b = default(), reversed_()
    obs_a, _ = a.reset(seed=3)
    obs_b, _ = b.reset(seed=3)
    np.testing.assert_array_equal(obs_a, obs_b)
    for action in (0, 0, 1, 0, 1, 1):
        np.testing.assert_array_equal(a.step(action)[0], b.step(1 - action)[0])
    assert "reversed" in repr(pickle.loads(pickle.dumps(reversed_)))


def test_task_sequence_gives_a_return_matrix():
    tasks = [Task("short", lambda: Counter(3)), Task("long", lambda: Counter(5))]
    agent = small_agent(tasks[0].make_env)
    rows = []
    result = run_task_sequence(agent, tasks, steps_per_task=40, n_eval_episodes=2,
                               on_task_end=lambda i, row: rows.append((i, row)))
    assert result.returns == [[3.0, 5.0], [3.0, 5.0]]  # every policy collects 1 per step to the end
    assert [i for i, _ in rows] == [0, 1]
    assert result.forgetting == 0.0 and result.average_return == 4.0
    assert agent.global_step == 80


def test_set_env_refuses_other_spaces():
    agent = small_agent("CartPole-v1")
    with pytest.raises(ValueError, match="differ"):
        agent.set_env("Acrobot-v1")


# --------------------------------------------------------------------------- any learner
class Countdown(gym.Env):
    """Observation ``[t / length]``; reward 1 per step; terminal after ``length`` steps, so the true
    value of every action at step t is ``sum_{k < length - t} gamma^k``."""

    metadata: dict = {}

    def __init__(self, length: int = 3):
        self.length = length
        self.observation_space = spaces.Box(0.0, 1.0, (1,), np.float32)
        self.action_space = spaces.Discrete(2)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t / self.length], np.float32), 1.0, self.t >= self.length, False, {}


def test_a_learner_without_a_torch_optimizer_trains_the_value_network(monkeypatch):
    """RidgeHead solves its output layer exactly and has no torch optimizer; registered in
    amstream.LEARNERS alone, the agent builds it by name and it learns the true Q-values."""
    monkeypatch.setitem(amstream.LEARNERS, "ridge-head", RidgeHead)
    assert td_learner_settings("ridge-head") == {}  # no learning rate, no TD preset: its defaults
    agent = small_agent(Countdown(3), "ridge-head", gamma=0.9, hidden=(64,), learner_kwargs={"eta": 0.5},
                        target_update_interval=10, learning_starts=20, train_frequency=1)
    assert isinstance(agent.learner, RidgeHead) and agent.learner.optimizer.param_groups[0]["name"] == "head"
    agent.learn(1500, progress_bar=False)
    q = agent.q_values(np.array([[0.0], [1 / 3], [2 / 3]], np.float32))
    truth = torch.tensor([2.71, 1.9, 1.0])[:, None].expand(3, 2)
    torch.testing.assert_close(q, truth, atol=0.1, rtol=0)


def test_a_built_learner_gives_the_agent_its_device():
    learner = Backprop(nn.Sequential(nn.Flatten(), nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)), device="cpu")
    agent = DQNAgent(Counter(), learner, buffer_size=100, learning_starts=10)  # device left at "auto"
    assert agent.device == learner.device and agent.buffer.device == learner.device
    with pytest.raises(ValueError, match="differs from the learner's device"):
        DQNAgent(Counter(), learner, device="meta")


@pytest.mark.parametrize("kind", ["mse", "huber"])
def test_td_loss_closed_form_gradient_equals_autograd(kind):
    from agents.td import TDLoss
    from amstream.functional import task_loss_gradient

    g = torch.Generator().manual_seed(0)
    out = (3 * torch.randn(16, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    actions = torch.randint(0, 3, (16,), generator=g)
    target = torch.randn(16, generator=g, dtype=torch.float64)
    loss_fn = TDLoss(kind, actions, target)
    expected = torch.autograd.grad(loss_fn(out), out)[0]
    closed = loss_fn.gradient(out)
    assert (closed != 0).sum() <= 16  # only the taken actions' Q-values are fitted
    assert torch.allclose(closed, expected, rtol=1e-12, atol=1e-15)
    assert torch.equal(task_loss_gradient(out, loss_fn), closed)

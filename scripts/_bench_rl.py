"""The RL section of ``scripts/bench.py``: ``agents.DQNAgent`` against Stable-Baselines3's DQN.

The settings of BENCHMARKS.md section 7 (CartPole-v1, a 4-120-84-2 ReLU Q-network, Adam 1e-3, buffer
50,000, batch 64, an update every 4 steps from step 1,000, a hard target copy every 500 steps,
epsilon 1 -> 0.05 over the first quarter of the run), no evaluation, one torch thread, each run a
fresh process. SB3 keeps its own defaults where the two libraries differ (Huber TD loss, gradient
clipping at norm 10): the measure is environment steps per second of the whole loop (acting,
environment, buffer, updates, target copies).

Stable-Baselines3 2.9 fits amstream's environment (its dependencies, torch and Gymnasium, are
already there), so it is not given a second torch: ``--make-envs`` installs the package alone into
``.bench-envs/sb3-overlay`` (``pip install --target ... --no-deps``), which only the bench's worker
puts on its path.

With ``compiled``, each amstream agent also runs with ``compile=True`` (its learner's whole update one
compiled graph): first one untimed run of 2,000 steps (its updates compile the step, or load it from
torch's on-disk compiler cache, as any later process on the machine does), whose seconds are reported,
then the timed runs, whose steps per second include loading the compiled step from that cache.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / ".bench-envs" / "sb3-overlay"
SB3 = "stable-baselines3==2.9.2"

WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
kind, steps, compiled = sys.argv[1], int(sys.argv[2]), sys.argv[4] == "compiled"
settings = dict(buffer_size=50000, learning_starts=1000, batch_size=64, gamma=0.99)
if kind == "sb3":
    from stable_baselines3 import DQN
    agent = DQN("MlpPolicy", "CartPole-v1", learning_rate=1e-3, train_freq=4, gradient_steps=1,
                target_update_interval=500, exploration_fraction=0.25, exploration_final_eps=0.05,
                policy_kwargs=dict(net_arch=[120, 84]), device="cpu", seed=1, **settings)
    run = lambda: agent.learn(steps, progress_bar=False)
else:
    sys.path.insert(0, sys.argv[3])
    from agents import DQNAgent
    agent = DQNAgent("CartPole-v1", learner=kind, learning_rate=1e-3, train_frequency=4,
                     target_update_interval=500, exploration_fraction=0.25, end_e=0.05, device="cpu", seed=1,
                     learner_kwargs={"compile": True} if compiled else None, **settings)
    run = lambda: agent.learn(steps, progress_bar=False)
start = time.perf_counter()
run()
print(json.dumps(steps / (time.perf_counter() - start)))
"""


def sb3_path(make: bool) -> Path | None:
    """The overlay holding Stable-Baselines3 (installed with a message when ``make``), or None."""
    check = [sys.executable, "-c", "import stable_baselines3"]
    env = {**os.environ, "PYTHONPATH": str(OVERLAY)}
    if OVERLAY.exists() and subprocess.run(check, env=env, capture_output=True).returncode == 0:
        return OVERLAY
    if not make:
        return None
    print(f"installing {SB3} into {OVERLAY} (the package alone: its dependencies are amstream's)", file=sys.stderr,
          flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(OVERLAY), "--no-deps", SB3],
                   check=True)
    return OVERLAY


def dqn_throughput(learners: list[str], *, steps: int, rounds: int, make_envs: bool,
                   compiled: bool = False) -> list[dict]:
    """Environment steps per second of SB3's DQN and of ``DQNAgent`` with each learner (and, with
    ``compiled``, each learner with ``compile=True`` too), ``rounds`` rounds of one fresh run each in
    turn; the ratio to SB3 is the median of the per-round ratios."""
    overlay = sb3_path(make_envs)
    runners = [("sb3", "eager")] if overlay is not None else []
    runners += [(name, mode) for mode in ("eager", "compiled")[:1 + compiled] for name in learners]
    if overlay is None:
        print(f"note: Stable-Baselines3 is not measured: {OVERLAY} is missing (add --make-envs to install it)",
              file=sys.stderr)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(overlay or ""), os.environ.get("PYTHONPATH", "")]))}

    def run(name: str, mode: str, n: int) -> float:
        out = subprocess.run([sys.executable, "-c", WORKER, name, str(n), str(ROOT), mode], env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"the {name} DQN run ({mode}) failed: {out.stderr.strip()[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    for name, mode in runners:
        if mode == "compiled":  # 2,000 steps: 250 updates after the first 1,000 steps
            seconds = 2000 / run(name, mode, 2000)
            print(f"note: {name} compile=True, the first run of 2,000 steps took {seconds:.1f} s (compiling, "
                  "or loading the compiled step from torch's cache); untimed", file=sys.stderr, flush=True)
    per_round: dict[tuple[str, str], list[float]] = {runner: [] for runner in runners}
    for _ in range(rounds):
        for name, mode in runners:
            per_round[name, mode].append(run(name, mode, steps))
    rows = []
    for (name, mode), values in per_round.items():
        ratios = [v / b for v, b in zip(values, per_round["sb3", "eager"])] if overlay is not None else []
        label = "Stable-Baselines3 2.9.2 DQN" if name == "sb3" else f"DQNAgent, {name}"
        rows.append({"runner": label + (", compile=True" if mode == "compiled" else ""),
                     "steps_per_s": statistics.median(values),
                     "ratio": statistics.median(ratios) if ratios else None,
                     "spread": (min(ratios), max(ratios)) if ratios else None})
    return rows

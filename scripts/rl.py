#!/usr/bin/env python
"""Train DQN agents whose value network is trained by amstream learners, on Gymnasium environments.

Every learner and seed gets the same agent settings (CleanRL's DQN defaults unless set). The run
shows a progress bar, evaluates the greedy policy every --eval-every steps on a separate
environment, prints a final evaluation per run and a comparison table (mean and spread over
seeds), writes TensorBoard logs with CleanRL's tags and a PNG of the evaluation curves.

    python scripts/rl.py --env CartPole-v1 --learner am-adam --total-timesteps 100000 --seed 1
    python scripts/rl.py --env CartPole-v1 --learner am-adam,backprop --seeds 1,2,3
    python scripts/rl.py --env Acrobot-v1 --learner am-adam,am-mem,backprop --seeds 1,2,3,4,5 --jobs 15
    python scripts/rl.py --tasks cartpole-physics --learner am-adam,backprop --steps-per-task 50000
    python scripts/rl.py --tasks cartpole-reversed --learner am-adam,backprop --steps-per-task 50000

With --tasks, one agent meets a sequence of environments sharing their spaces and is evaluated on
every task after each one: a task-by-task return matrix, forgetting and backward transfer.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common.py, scripts/_plots.py

import torch  # noqa: E402

import _common  # noqa: E402
from _common import CommaList, add_option, learner_column_width  # noqa: E402
from amstream import LEARNERS  # noqa: E402
from amstream.hparams import HParam  # noqa: E402
from amstream.utils import resolve_device  # noqa: E402

#: "solved" scores for the curves and the first-step column (the environments' reward thresholds)
THRESHOLDS = {"CartPole-v1": 475.0, "Acrobot-v1": -100.0, "MountainCar-v0": -110.0}


def build_parser() -> argparse.ArgumentParser:
    from agents.networks import DEFAULT_LEARNING_RATE, td_learner_settings
    from agents.tasks import TASK_SEQUENCES

    steps, positive = "[1, inf)", "(0, inf)"
    p = _common.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="CartPole-v1", help="Gymnasium environment id (discrete actions)")
    p.add_argument("--tasks", default=None, choices=sorted(TASK_SEQUENCES),
                   help="run a continual task sequence instead of --env (then --steps-per-task per task)")
    p.add_argument("--rescale-obs", action="store_true",
                   help="rescale observations from the observation space's bounds to [-1, 1] (needs finite bounds; "
                        "MountainCar's velocity is otherwise ~1/20 of its position's scale)")
    add_option(p, "--steps-per-task", HParam(50_000, "environment steps on each task with --tasks", int, steps))
    p.add_argument("--learner", action=CommaList, default="am-adam", help=f"comma-separated learners, from {', '.join(LEARNERS)}")
    p.add_argument("--seed", type=int, default=1, help="seed of a single run")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (overrides --seed), e.g. 1,2,3,4,5")
    add_option(p, "--total-timesteps", HParam(500_000, "environment steps per run", int, steps))
    add_option(p, "--n-envs", HParam(1, "sub-environments stepped together (SyncVectorEnv)", int, steps))
    g = p.add_argument_group("DQN (defaults: CleanRL's dqn.py)")
    rates = "; ".join(f"{name}: {', '.join(k for k, h in cls.defaults.items() if h.learning_rate)}"
                      for name, cls in LEARNERS.items() if any(h.learning_rate for h in cls.defaults.values()))
    add_option(g, "--learning-rate", HParam(DEFAULT_LEARNING_RATE, "rate of every learning-rate hyperparameter "
                                            f"of the learners ({rates}; CleanRL's 2.5e-4); --lr, --lr-out... "
                                            "set one of them", range=positive))
    g.add_argument("--hidden", default="120,84", help="hidden widths of the Q-network")
    add_option(g, "--buffer-size", HParam(10_000, "replay buffer capacity", int, steps))
    add_option(g, "--batch-size", HParam(128, "transitions per update", int, steps))
    add_option(g, "--gamma", HParam(0.99, "discount", range="[0, 1]"))
    add_option(g, "--learning-starts", HParam(10_000, "environment steps before the first update", int, "[0, inf)"))
    add_option(g, "--train-frequency", HParam(10, "environment steps per update", int, steps))
    add_option(g, "--gradient-steps", HParam(1, "updates (batches) each time an update is due, as SB3's "
                                             "gradient_steps", int, steps))
    add_option(g, "--target-network-frequency", HParam(500, "environment steps per target update", int, steps))
    add_option(g, "--tau", HParam(1.0, "target update: 1 = copy, < 1 = Polyak average", range="(0, 1]"))
    add_option(g, "--exploration-fraction", HParam(0.5, "fraction of the run over which epsilon falls",
                                                   range="(0, 1]"))
    add_option(g, "--start-e", HParam(1.0, "initial epsilon", range="[0, 1]"))
    add_option(g, "--end-e", HParam(0.05, "final epsilon", range="[0, 1]"))
    g.add_argument("--double-dqn", action="store_true", help="Double DQN targets")
    g.add_argument("--td-loss", default="mse", choices=("mse", "huber"), help="TD loss")
    _common.add_learner_arguments(
        p, defaults_for=lambda name: td_learner_settings(name, DEFAULT_LEARNING_RATE),
        title="learner hyperparameters (default: each learner's TD settings, agents.td_learner_settings)")
    o = p.add_argument_group("evaluation and output")
    add_option(o, "--eval-every", HParam(None, "steps between greedy evaluations (default: 20 per run)", int,
                                         steps, optional=True))
    add_option(o, "--eval-episodes", HParam(10, "episodes per periodic evaluation", int, steps))
    add_option(o, "--final-eval-episodes", HParam(20, "episodes of the final evaluation", int, steps))
    o.add_argument("--device", default="auto", help="torch device (auto: CUDA when available)")
    add_option(o, "--threads", HParam(None, "torch CPU threads (default: 1 on the CPU)", int, steps, optional=True))
    o.add_argument("--logdir", default="runs", help="TensorBoard root")
    o.add_argument("--plot", default=None, help="PNG of the curves or return matrices (default: <logdir>/rl-<env>.png)")
    o.add_argument("--json", default=None, help="also write the results to this JSON file")
    o.add_argument("--save", default=None, help="save the last run's agent here (agents.DQNAgent.load resumes it)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    add_option(o, "--jobs", HParam(1, "runs (learner x seed) in parallel processes; on the CPU each takes --threads "
                                   "threads, so up to one job per core (the runs and their results are the same as "
                                   "one by one)", int, steps))
    return p


def env_spec(args):
    """``--env``, wrapped to rescale its observations with ``--rescale-obs``."""
    from agents.envs import RescaledEnv

    return RescaledEnv(args.env) if args.rescale_obs else args.env


def agent_kwargs(args, name: str) -> dict:
    return dict(
        learner=name, n_envs=args.n_envs, hidden=tuple(_common.parse_int_list(args.hidden)),
        learning_rate=args.learning_rate, learner_kwargs=_common.learner_kwargs(name, args),
        buffer_size=args.buffer_size, batch_size=args.batch_size, gamma=args.gamma,
        learning_starts=args.learning_starts, train_frequency=args.train_frequency, gradient_steps=args.gradient_steps,
        target_update_interval=args.target_network_frequency, tau=args.tau,
        exploration_fraction=args.exploration_fraction, start_e=args.start_e, end_e=args.end_e,
        double_dqn=args.double_dqn, td_loss=args.td_loss, device=args.device, tensorboard_log=args.logdir,
    )


def run_single(args, name: str, seed: int) -> dict:
    from agents import DQNAgent

    agent = DQNAgent(env_spec(args), seed=seed, **agent_kwargs(args, name))
    eval_every = args.eval_every or max(1, args.total_timesteps // 20)
    start = time.perf_counter()
    agent.learn(args.total_timesteps, progress_bar=not args.quiet, eval_freq=eval_every,
                n_eval_episodes=args.eval_episodes)
    seconds = time.perf_counter() - start
    mean, std = agent.evaluate(args.final_eval_episodes)
    threshold = THRESHOLDS.get(args.env)
    solved_at = next((s for s, m, _ in agent.eval_history if threshold is not None and m >= threshold), None)
    if args.save:
        agent.save(args.save)
    agent.close()
    return {"learner": name, "seed": seed, "final_mean": mean, "final_std": std, "seconds": seconds,
            "sps": args.total_timesteps / seconds, "solved_at": solved_at, "eval_history": agent.eval_history,
            "episodes": len(agent.episode_returns), "dropped": agent.dropped_transitions,
            "run_dir": str(agent.run_dir) if agent.run_dir else None}


def run_tasks(args, name: str, seed: int) -> dict:
    from agents import DQNAgent
    from agents.tasks import TASK_SEQUENCES, run_task_sequence

    tasks = TASK_SEQUENCES[args.tasks]()
    agent = DQNAgent(tasks[0].make_env, seed=seed, **agent_kwargs(args, name))
    start = time.perf_counter()

    def report(i, row):
        if not args.quiet:
            print(f"{name} seed {seed}: after task {i} ({tasks[i].name}): " + " ".join(f"{r:.1f}" for r in row))

    result = run_task_sequence(agent, tasks, args.steps_per_task, n_eval_episodes=args.final_eval_episodes,
                               progress_bar=not args.quiet, on_task_end=report)
    if args.save:
        agent.save(args.save)
    agent.close()
    return {"learner": name, "seed": seed, "tasks": result.tasks, "returns": result.returns, "stds": result.stds,
            "average_return": result.average_return, "forgetting": result.forgetting,
            "bwt": result.backward_transfer, "seconds": time.perf_counter() - start}


def run_one(args, name: str, seed: int) -> dict:
    """One learner and seed; a ValueError names the learner it came from."""
    if args.threads or resolve_device(args.device).type == "cpu":
        torch.set_num_threads(args.threads or 1)
    try:
        run = run_tasks(args, name, seed) if args.tasks else run_single(args, name, seed)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if not args.tasks:
        threshold = THRESHOLDS.get(args.env)
        solved = f", first mean >= {threshold:g} at step {run['solved_at']}" if run["solved_at"] else ""
        print(f"{name} seed {seed}: final evaluation {run['final_mean']:.1f} ± {run['final_std']:.1f} over "
              f"{args.final_eval_episodes} episodes, {run['sps']:.0f} steps/s{solved}", flush=True)
    return run


def run_all(args, jobs: list[tuple[str, int]]) -> list[dict]:
    """Every (learner, seed) run, in that order: one after another, or ``--jobs`` at a time in
    separate processes (each run seeds everything itself, so the results do not depend on it)."""
    if args.jobs <= 1 or len(jobs) == 1:
        return [run_one(args, name, seed) for name, seed in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    def job_args(last: bool) -> argparse.Namespace:
        # one progress bar per process would garble the terminal; --save keeps the last run, as one by one
        return argparse.Namespace(**{**vars(args), "quiet": True, "save": args.save if last else None})

    print(f"{len(jobs)} runs, {min(args.jobs, len(jobs))} at a time", flush=True)
    with ProcessPoolExecutor(min(args.jobs, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, job_args(i == len(jobs) - 1), name, seed) for i, (name, seed) in enumerate(jobs)]
        return [f.result() for f in futures]


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        learners = _common.parse_name_list(args.learner, LEARNERS, "learner")
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else [args.seed]
        _common.parse_int_list(args.hidden)
        resolve_device(args.device)  # an unknown device: fail now
        if args.tasks and args.rescale_obs:
            raise ValueError("--rescale-obs applies to --env, not to --tasks")
        if not args.tasks:
            from agents.envs import make_vector_env

            make_vector_env(env_spec(args), 1).close()  # an unknown id, a continuous action space: fail now
    except ValueError as err:
        parser.error(" ".join(str(err).split()))

    label = args.tasks or args.env
    jobs = [(name, seed) for name in learners for seed in seeds]
    try:
        runs = run_all(args, jobs)
    except ValueError as err:  # a learner option that does not apply, a network that does not fit
        parser.error(" ".join(str(err).split()))

    import _plots

    plot = Path(args.plot) if args.plot else Path(args.logdir) / f"rl-{label}.png"
    width = learner_column_width(learners)
    if args.tasks:
        print(f"\n{'learner':<{width}} {'avg return':>12} {'forgetting':>12} {'BWT':>10} {'seconds':>8}")
        for name in learners:
            mine = [r for r in runs if r["learner"] == name]
            print(f"{name:<{width}} {_spread([r['average_return'] for r in mine]):>12} "
                  f"{_spread([r['forgetting'] for r in mine]):>12} {_spread([r['bwt'] for r in mine]):>10} "
                  f"{statistics.mean(r['seconds'] for r in mine):>8.0f}")
        for r in runs:
            print(f"\nreturn matrix, {r['learner']} seed {r['seed']} (row: after task i; column: task j)")
            for i, row in enumerate(r["returns"]):
                print(f"  {i} | " + " ".join(f"{v:7.1f}" for v in row) + f"   ({r['tasks'][i]})")
        first = {f"{r['learner']} (seed {r['seed']})": r["returns"] for r in runs if r["seed"] == seeds[0]}
        _plots.plot_score_matrices(first, plot, title=f"{args.tasks}: mean greedy return", label="return")
    else:
        threshold = THRESHOLDS.get(args.env)
        print(f"\n{'learner':<{width}} {'seeds':>5} {'final return':>16} {'steps/s':>8} {'first step >= ' + format(threshold, 'g') if threshold is not None else '':>20}")
        for name in learners:
            mine = [r for r in runs if r["learner"] == name]
            solved = [r["solved_at"] for r in mine]
            solved_text = ", ".join("-" if s is None else str(s) for s in solved)
            print(f"{name:<{width}} {len(mine):>5} {_spread([r['final_mean'] for r in mine]):>16} "
                  f"{statistics.mean(r['sps'] for r in mine):>8.0f} {solved_text:>20}")
        curves = {name: [[(s, m) for s, m, _ in r["eval_history"]] for r in runs if r["learner"] == name]
                  for name in learners}
        _plots.plot_learning_curves(curves, plot, title=f"{args.env}: greedy evaluation ({args.eval_episodes} episodes)",
                                    threshold=threshold)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"options": vars(args), "runs": runs}, indent=1))
        print(f"Results: {args.json}")
    print(f"\nTensorBoard logs under {args.logdir}  (tensorboard --logdir {args.logdir})")
    print(f"Plot: {plot}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Run a continual-learning scenario with amstream learners inside Avalanche and compare them.

Each learner trains on the benchmark's experiences in order, through ``scenarios.AMStrategy`` with
the chosen Avalanche plugins, and is evaluated on the whole test stream after every experience.
That gives the accuracy matrix R (row i: after training experience i; column j: test experience j),
from which the script reports the average accuracy (mean of the last row), forgetting and backward
transfer (``scenarios.metrics``; on online streams too, where Avalanche's own forgetting metrics stay
empty, upstream issue #1343), prints them as tables, writes Avalanche's TensorBoard logs (one folder per learner) and a
PNG heat map of the matrices.

    python scripts/continual.py --benchmark split-mnist --learner am-adam,am-mem,backprop --plugins replay
    python scripts/continual.py --benchmark permuted-mnist --online 10 --plugins ewc --ewc-lambda 100

Under ``torchrun --nproc-per-node N`` (or with ``--distributed``) every learner is data-parallel
(:func:`amstream.distributed.data_parallel`): Avalanche's distributed sampler gives each process its
shard of each experience, ``--batch-size`` / N samples of every batch of ``--batch-size`` (the same
batches as one process when the order is not shuffled, up to the N - 1 samples the sampler repeats so
that every process has as many; shuffled, a new order each epoch drawn from the run's seed, see
``scenarios.strategy.seed_distributed_shuffling``), and the processes combine their steps. Every
process evaluates the whole test stream with the same weights, so the accuracy matrix needs no
gathering: rank 0 prints it, writes TensorBoard, the plot and the JSON. Its training-epoch accuracy
and loss are those of its own shard.

    torchrun --nproc-per-node 2 scripts/continual.py --benchmark split-mnist --learner am-mem --batch-size 32

With ``--checkpoint PATH`` each learner's run is saved after every experience (its training and
its evaluation): the learner, the RNG states, the strategy's clock, every plugin's state (replay
buffers, importances, LwF's previous model) and the metrics so far (``scenarios.checkpoint``);
``--resume`` continues from the next experience and gives the same accuracy matrix as a run that was
never stopped (an experience that was interrupted is trained again from its start). Under torchrun
rank 0 writes the checkpoint once every process is found to hold the same state (compared by
digest; RWalk's scores, gathered from each process's shard, do not, so it is refused), and the run
resumes on the same or another number of processes.

    python scripts/continual.py --benchmark split-mnist --plugins replay --checkpoint ck/run.pt
    python scripts/continual.py --benchmark split-mnist --plugins replay --checkpoint ck/run.pt --resume
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common.py, scripts/_plots.py

import torch  # noqa: E402

from amstream import UnsupportedModelError, load_checkpoint, save_checkpoint, set_seed  # noqa: E402
from amstream.checkpoint import CheckpointError  # noqa: E402
from amstream.distributed import is_main_process  # noqa: E402
from amstream.hparams import HParam  # noqa: E402
from amstream.logging import make_run_dir, resumed_summary_writer  # noqa: E402
from amstream.utils import resolve_device  # noqa: E402

import _common  # noqa: E402
from _common import CommaList, add_option, build_mlp, learner_column_width, learner_names, make_learner  # noqa: E402
from _distributed import init_from_env, launched_by_torchrun, make_data_parallel, say, torchrun_world_size  # noqa: E402

BENCHMARK_NAMES = ("split-digits", "split-mnist", "split-fashion-mnist", "permuted-mnist", "rotated-mnist", "elec2")
PLUGIN_NAMES = ("replay", "replay-balanced", "gdumb", "ewc", "si", "mas", "rwalk", "lwf")


def build_parser() -> argparse.ArgumentParser:
    p = _common.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", default="split-digits", choices=BENCHMARK_NAMES,
                   help="scenario built from the local data files (split-digits needs none)")
    p.add_argument("--learner", action=CommaList, default=",".join(learner_names()),
                   help=f"comma-separated learners to compare, from {', '.join(learner_names())}")
    p.add_argument("--plugins", default="", help=f"comma-separated Avalanche plugins, from {', '.join(PLUGIN_NAMES)}")
    add_option(p, "--experiences", HParam(None, "number of experiences (default: the benchmark's)", int, "[1, inf)",
                                          optional=True))
    p.add_argument("--task-incremental", action="store_true", help="one task label per experience")
    add_option(p, "--online", HParam(None, "train each experience as an online stream of sub-experiences of "
                                     "SIZE samples", int, "[1, inf)", optional=True), metavar="SIZE")
    add_option(p, "--epochs", HParam(1, "passes over each (sub-)experience", int, "[1, inf)"))
    add_option(p, "--batch-size", HParam(16, "training mini-batch size (over all processes of a distributed run)",
                                         int, "[1, inf)"))
    p.add_argument("--no-shuffle", action="store_true",
                   help="train on each (sub-)experience in its stored order (the split benchmarks store theirs "
                        "sorted by class: for tests and ordered streams)")
    add_option(p, "--eval-batch-size", HParam(512, "evaluation mini-batch size", int, "[1, inf)"))
    p.add_argument("--hidden", default="100,100", help="hidden widths of the ReLU MLP")
    p.add_argument("--growing-head", action="store_true",
                   help="end the MLP in Avalanche's IncrementalClassifier, which adds output units as new classes arrive")
    add_option(p, "--subset", HParam(None, "MNIST-family benchmarks: keep the first N training samples", int,
                                     "[1, inf)", optional=True))
    add_option(p, "--mem-size", HParam(500, "replay / GDumb buffer size", int, "[1, inf)"))
    add_option(p, "--ewc-lambda", HParam(10.0, "EWC and RWalk penalty weight", range="[0, inf)"))
    p.add_argument("--ewc-mode", default=None, choices=("separate", "online"),
                   help="EWC importance bookkeeping (default: separate; online with --online, since Avalanche "
                        "counts every sub-experience as an experience and separate mode would keep one copy each)")
    add_option(p, "--ewc-decay", HParam(0.9, "decay factor of EWC's online mode", range="[0, 1]"))
    add_option(p, "--si-lambda", HParam(1.0, "SI penalty weight", range="[0, inf)"))
    add_option(p, "--mas-lambda", HParam(1.0, "MAS penalty weight", range="[0, inf)"))
    add_option(p, "--lwf-alpha", HParam(1.0, "LwF distillation weight (acts on the output layer)", range="[0, inf)"))
    _common.add_learner_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the class order, the weights and the data order")
    p.add_argument("--device", default="auto", help="torch device (auto: CUDA when available)")
    add_option(p, "--threads", HParam(None, "torch CPU threads (default: 1 on the CPU)", int, "[1, inf)",
                                      optional=True))
    p.add_argument("--data-dir", default=None, help="root of the data files (default: AMSTREAM_DATA)")
    p.add_argument("--logdir", default="runs", help="TensorBoard root: one folder per learner")
    p.add_argument("--plot", default=None, help="PNG heat map of the accuracy matrices (default: <logdir>/continual-<benchmark>.png)")
    p.add_argument("--json", default=None, help="also write the results (matrices, metrics, seconds, options) to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress output: neither Avalanche's per-iteration "
                   "log nor its warnings")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the processes of torchrun (set by itself when torchrun starts several): "
                        "each process trains on its shard of every batch, rank 0 prints and logs")
    c = _common.add_checkpoint_options(p, "after every experience", "at the experience after the last one saved")
    add_option(c, "--stop-after-experiences", HParam(None, "for tests: simulate an interruption: stop after N "
                                                     "experiences of this process, right after saving a checkpoint",
                                                     int, "[1, inf)", optional=True))
    return p


# options that do not change what a run computes: a checkpoint made with other values continues
_NOT_CONFIG = {"learner", "device", "threads", "data_dir", "logdir", "plot", "json", "quiet", "checkpoint", "resume",
               "allow_fresh", "stop_after_experiences", "distributed", "processes", "experiences_run"}


def run_config(args) -> dict:
    """The settings that define a learner's run (a checkpoint made with others cannot be continued)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_CONFIG}


def make_plugins(names: list[str], args):
    from avalanche.training.plugins import (
        EWCPlugin, GDumbPlugin, LwFPlugin, MASPlugin, ReplayPlugin, RWalkPlugin, SynapticIntelligencePlugin,
    )
    from avalanche.training.storage_policy import ClassBalancedBuffer

    factories = {
        "replay": lambda: ReplayPlugin(mem_size=args.mem_size),
        "replay-balanced": lambda: ReplayPlugin(mem_size=args.mem_size, storage_policy=ClassBalancedBuffer(args.mem_size)),
        "gdumb": lambda: GDumbPlugin(mem_size=args.mem_size),
        "ewc": lambda: EWCPlugin(ewc_lambda=args.ewc_lambda, **_ewc_mode(args)),
        "si": lambda: SynapticIntelligencePlugin(si_lambda=args.si_lambda),
        "mas": lambda: MASPlugin(lambda_reg=args.mas_lambda),
        "rwalk": lambda: RWalkPlugin(ewc_lambda=args.ewc_lambda),
        "lwf": lambda: LwFPlugin(alpha=args.lwf_alpha),
    }
    return [factories[name]() for name in names]


def _ewc_mode(args) -> dict:
    mode = args.ewc_mode or ("online" if args.online else "separate")
    return {"mode": mode, "decay_factor": args.ewc_decay} if mode == "online" else {"mode": mode}


def summarize(matrix: list[list[float]]) -> dict[str, float]:
    """Average accuracy (last row), forgetting and backward transfer of an accuracy matrix."""
    from scenarios.metrics import average_accuracy, backward_transfer, forgetting

    return {"average_accuracy": average_accuracy(matrix), "forgetting": forgetting(matrix),
            "bwt": backward_transfer(matrix)}


def run_learner(name, benchmark, args, device, plugin_names, input_shape, n_classes):
    """Train and evaluate one learner over the benchmark; None when it cannot be data-parallel."""
    from avalanche.logging import InteractiveLogger, TensorboardLogger
    from scenarios.benchmarks import online
    from scenarios.checkpoint import load_strategy_state, strategy_state
    from scenarios.metrics import default_cl_evaluator
    from scenarios.strategy import AMStrategy

    set_seed(args.seed)
    model = build_mlp(input_shape, _common.parse_int_list(args.hidden), n_classes)
    if args.growing_head:
        from avalanche.models import IncrementalClassifier

        last = model[-1]
        model[-1] = IncrementalClassifier(last.in_features, initial_out_features=2)
    learner = make_data_parallel(make_learner(name, model, device, **_common.learner_kwargs(name, args)),
                                 args.processes, name)
    if learner is None:
        return None
    main_process = is_main_process()
    ck_path = _common.checkpoint_path(args.checkpoint, name) if args.checkpoint else None
    saved = _saved_run(ck_path, name, args, learner)
    run_dir = None
    if main_process:
        saved_dir = saved.get("run_dir") if saved else None
        run_dir = Path(saved_dir) if saved_dir and Path(saved_dir).is_dir() else \
            make_run_dir(args.logdir, f"{args.benchmark}-{name}")
    # Avalanche refuses loggers off rank 0
    loggers = [] if not main_process else (
        [TensorboardLogger(tb_log_dir=str(run_dir))] + ([] if args.quiet else [InteractiveLogger()]))
    # accuracy, loss, forgetting and BWT that also work on online streams, the accuracy matrix, timing
    evaluator = default_cl_evaluator(loggers=loggers, online=bool(args.online))
    strategy = AMStrategy(learner=learner, train_mb_size=args.batch_size // args.processes, train_epochs=args.epochs,
                          eval_mb_size=args.eval_batch_size, plugins=make_plugins(plugin_names, args),
                          evaluator=evaluator, eval_every=-1)
    done, elapsed = 0, 0.0
    if saved:
        if args.growing_head:
            _grow_head_as_before(model, benchmark, saved["experiences_done"])
            learner.sync_parameters()
        extra = load_checkpoint(ck_path, learner)  # the learner and the RNGs; CheckpointError if it does not fit
        load_strategy_state(strategy, extra["strategy"])
        done, elapsed = extra["experiences_done"], extra["elapsed"]
        _purge_tensorboard_after(loggers, strategy.clock.train_iterations)
        say(f"{name}: resumed from {ck_path} after experience {done - 1} (step {learner.step_count})")
    for i, experience in enumerate(benchmark.train_stream):
        if i < done:
            continue
        start = time.perf_counter()
        train = online(experience, args.online, seed=args.seed) if args.online else experience
        strategy.train(train, eval_streams=[], shuffle=not args.no_shuffle)
        strategy.eval(benchmark.test_stream)
        elapsed += time.perf_counter() - start
        if not args.quiet:
            row = evaluator.accuracy_matrix.tolist()[i]
            say(f"{name}: after experience {i}: " + " ".join(f"{a:.3f}" for a in row))
        if ck_path is not None:
            state = strategy_state(strategy)
            if args.processes > 1:
                _check_processes_agree(state)  # rank 0 writes what every process holds
            if main_process:
                save_checkpoint(ck_path, learner, strategy=state, experiences_done=i + 1, elapsed=elapsed,
                                config=run_config(args), run_dir=str(run_dir))
        args.experiences_run += 1
        if args.stop_after_experiences is not None and args.experiences_run >= args.stop_after_experiences:
            _close_loggers(evaluator)
            return {"interrupted": True}
    matrix = evaluator.accuracy_matrix.tolist()
    _close_loggers(evaluator)
    return {"matrix": matrix, "seconds": elapsed, "run_dir": run_dir, "steps": learner.step_count,
            "hparams": learner.hparams(), **summarize(matrix)}


def _saved_run(ck_path: Path | None, name: str, args, learner) -> dict | None:
    """With --resume, the learner's checkpoint's values (checked against this run's settings, before
    anything is written), or None to start from scratch."""
    if not args.resume or ck_path is None:
        return None
    if not ck_path.is_file():
        say(f"{name}: no checkpoint at {ck_path}; starting from scratch (--allow-fresh)")
        return None
    extra = _common.checkpoint_extra(ck_path)
    if extra is None:
        load_checkpoint(ck_path, learner)  # an unreadable file: CheckpointError says why, nothing changes
        raise CheckpointError(f"cannot read the values saved with checkpoint {ck_path}")
    _common.check_checkpoint_config(ck_path, run_config(args), extra)
    if "experiences_done" not in extra:
        raise ValueError(f"checkpoint {ck_path} was not written by continual.py (no experience count in it)")
    return extra


def _check_processes_agree(state: dict) -> None:
    """Under a process group, one checkpoint (rank 0's) stands for every process: the strategy's state
    (each plugin, the clock, the metrics) and the RNG states must be the same on all of them (the
    learner's weights are, being data-parallel). Compared by digest; a difference stops the run on
    every process, naming the parts that differ, before anything is written."""
    import torch.distributed as dist

    parts = {f"plugin {entry['class']}": entry["state"] for entry in state["plugins"]}
    parts.update(clock=state["clock"], metrics=state["evaluator"], rng=torch.get_rng_state())
    mine = {name: _digest(value) for name, value in parts.items()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    differ = [name for name in mine if len({d[name] for d in everyone}) > 1]
    if differ:
        raise ValueError(f"--checkpoint: {', '.join(differ)} differ(s) across the {len(everyone)} processes, so "
                         "one checkpoint cannot stand for all of them; run without --checkpoint, or on one process")


def _digest(value) -> str:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def _grow_head_as_before(model, benchmark, done: int) -> None:
    """An ``IncrementalClassifier`` head as the interrupted run left it: grown by the training
    experiences done (their classes marked active) and by the evaluations after them on the whole
    test stream (which add output units only), before the checkpoint's weights are loaded into it."""
    from avalanche.models.dynamic_modules import avalanche_model_adaptation

    model.train()
    for experience in list(benchmark.train_stream)[:done]:
        avalanche_model_adaptation(model, experience)
    model.eval()
    for experience in benchmark.test_stream:
        avalanche_model_adaptation(model, experience)
    model.train()


def _purge_tensorboard_after(loggers: list, step: int) -> None:
    """A resumed run writes on in its TensorBoard folder; what the interrupted process logged after
    its last checkpoint (at iteration ``step``) is dropped (:func:`amstream.logging.resumed_summary_writer`)."""
    for logger in loggers:
        if hasattr(logger, "writer"):
            log_dir = logger.writer.log_dir
            logger.writer.close()
            logger.writer = resumed_summary_writer(log_dir, purge_step=step + 1)


def _close_loggers(evaluator) -> None:
    for p in evaluator.loggers:
        if hasattr(p, "writer"):
            p.writer.close()


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        learners = _common.parse_name_list(args.learner, learner_names(), "learner")
        plugin_names = _common.parse_name_list(args.plugins, PLUGIN_NAMES, "plugin") if args.plugins else []
        _common.parse_int_list(args.hidden)
        _common.check_checkpoint_options(args, parser)
        args.processes, args.experiences_run = 1, 0
        if args.distributed or launched_by_torchrun():
            processes = torchrun_world_size()  # settings the processes cannot share fail before Avalanche loads
            if args.batch_size % processes:
                raise ValueError(f"--batch-size {args.batch_size} is not a multiple of the {processes} processes: "
                                 "each takes an equal share of every batch")
            if args.checkpoint and "rwalk" in plugin_names:
                raise ValueError("--checkpoint with several processes and RWalk: RWalk's scores come from each "
                                 "process's shard and differ across processes, so one checkpoint cannot stand for "
                                 "all of them; run without --checkpoint, or on one process")
            # Avalanche builds loggers when its training package is imported (default arguments), and
            # refuses to off rank 0 once a process group exists: import it first.
            import scenarios.strategy  # noqa: F401
            _, args.processes, device = init_from_env(args.device)
        else:
            device = resolve_device(args.device)
        _common.check_resumable(args, learners)
        if args.threads or device.type == "cpu":
            torch.set_num_threads(args.threads or 1)
        from scenarios.benchmarks import make_benchmark

        kwargs = {"seed": args.seed}
        if args.experiences:
            kwargs["n_experiences"] = args.experiences
        if args.task_incremental:
            kwargs["task_incremental"] = True
        if args.benchmark not in ("split-digits",):
            kwargs["root"] = args.data_dir
        if args.subset and args.benchmark in ("split-mnist", "split-fashion-mnist", "permuted-mnist", "rotated-mnist"):
            kwargs["subset"] = args.subset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            benchmark = make_benchmark(args.benchmark, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        parser.error(" ".join(str(err).split()))

    first = benchmark.train_stream[0]
    input_shape = tuple(first.dataset[0][0].shape)
    n_classes = getattr(benchmark, "n_classes", None) or 1 + max(
        c for e in benchmark.train_stream for c in e.classes_in_this_experience)
    say(f"{args.benchmark}: {len(benchmark.train_stream)} experiences, input {list(input_shape)}, {n_classes} classes, "
        f"plugins: {', '.join(plugin_names) or 'none'}"
        + (f", online sub-experiences of {args.online}" if args.online else "")
        + (f", data-parallel over {args.processes} processes" if args.processes > 1 else ""))

    results = {}
    with _common.avalanche_warnings(args.quiet):
        for name in learners:
            try:
                result = run_learner(name, benchmark, args, device, plugin_names, input_shape, n_classes)
            except UnsupportedModelError as err:
                say(f"note: skipping {name}: {' '.join(str(err).split())}")
                continue
            except ValueError as err:  # an unsupported option or plugin
                parser.error(f"{name}: {' '.join(str(err).split())}")
            if result is not None and result.get("interrupted"):
                where = (f"; resume with --resume (checkpoint {_common.checkpoint_path(args.checkpoint, name)})"
                         if args.checkpoint else "")
                say(f"stopped after {args.experiences_run} experience(s) (--stop-after-experiences){where}")
                return
            if result is not None:
                results[name] = result
    if not results:
        parser.error("no learner can train this model; see the notes above")
    if not is_main_process():
        return  # every process has the same results: rank 0 reports them

    for name, r in results.items():
        print(f"\naccuracy matrix, {name} (row: after training experience i; column: test experience j)")
        for i, row in enumerate(r["matrix"]):
            print(f"  {i:>2} | " + " ".join(f"{a:.3f}" for a in row))
    width = learner_column_width(results)
    print(f"\n{'learner':<{width}} {'avg acc':>8} {'forgetting':>10} {'BWT':>8} {'steps':>7} {'seconds':>8}")
    for name, r in results.items():
        print(f"{name:<{width}} {r['average_accuracy']:>8.4f} {r['forgetting']:>10.4f} {r['bwt']:>8.4f} "
              f"{r['steps']:>7d} {r['seconds']:>8.1f}")
    import _plots

    plot = Path(args.plot) if args.plot else Path(args.logdir) / f"continual-{args.benchmark}.png"
    _plots.plot_accuracy_matrices({n: r["matrix"] for n, r in results.items()}, plot,
                                  title=f"{args.benchmark}" + (f" + {', '.join(plugin_names)}" if plugin_names else ""))
    if args.json:
        record = {"options": {k: v for k, v in vars(args).items()},
                  "results": {n: {k: (str(v) if k == "run_dir" else v) for k, v in r.items()} for n, r in results.items()}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))
        print(f"Results: {args.json}")
    print(f"\nTensorBoard logs: {', '.join(str(r['run_dir']) for r in results.values())}  (tensorboard --logdir {args.logdir})")
    print(f"Plot: {plot}")


if __name__ == "__main__":
    main()

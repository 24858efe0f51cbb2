#!/usr/bin/env python
"""Stream a data set through online learners and compare them on the same stream.

Every learner (by default every one registered in ``amstream.LEARNERS``) gets the same MLP with the
same initial weights and sees the same samples in the same order. Evaluation is prequential
(test-then-train): each mini-batch is first predicted and scored, then learned. After each pass
over the stream (an epoch) the held-out accuracy on the test split is measured. A learner that
cannot train the MLP (AM-mem and --batchnorm) is skipped with a note.

Streams:
  digits, mnist, fashion-mnist: the train split, in a seeded random order that is fixed per epoch
      (epoch e uses the permutation of seed * 1000 + e); held-out = the test split.
  elec2: the whole data set (split "all", 45,312 rows) in time order, never shuffled; "held-out" is
      the last 20% of it in time (split "test"), which the stream also contains, so for elec2 it
      measures the fit to the most recent period rather than generalization to unseen data.

Run ``python scripts/stream.py --help`` for the options. TensorBoard: ``tensorboard --logdir runs``
(every scalar is plotted against the number of samples seen; a resumed run continues its folder).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common.py, scripts/_plots.py

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from amstream import (  # noqa: E402
    LEARNERS, PrequentialResult, UnsupportedModelError, iter_prequential, load_checkpoint, save_checkpoint, set_seed,
)
from amstream.data import DATASETS, data_dir, iter_samples, load_dataset  # noqa: E402
from amstream.hparams import HParam  # noqa: E402
from amstream.distributed import is_main_process  # noqa: E402
from amstream.logging import NullLogger, TensorBoardLogger, make_run_dir  # noqa: E402
from amstream.utils import resolve_device  # noqa: E402

import _common  # noqa: E402
from _distributed import ShardedLearning, init_from_env, launched_by_torchrun, make_data_parallel, say  # noqa: E402
from _common import CommaList, add_option, evaluate_accuracy, learner_column_width, learner_names, make_learner  # noqa: E402

POSITIVE = "[1, inf)"


def build_parser() -> argparse.ArgumentParser:
    parser = _common.Parser(
        prog="stream.py",
        description="Stream a data set through online learners and compare their prequential "
        "(test-then-train) and held-out accuracy.",
        epilog="elec2 is streamed in time order (split 'all'); its held-out set is the last 20% of "
        "that stream. The image data sets stream their train split, shuffled per epoch.",
    )
    d = parser.add_argument_group("data")
    d.add_argument("--dataset", default="digits", choices=DATASETS,
                   help="data set; digits is embedded (scikit-learn's 8x8 digits, 1,438 train / 359 test "
                   "samples) and needs no files")
    d.add_argument("--data-dir", default=None, help="root of the real data files (default: $AMSTREAM_DATA if "
                   f"set, else ~/.cache/amstream; now {data_dir()})")
    add_option(d, "--max-samples", HParam(None, "use only the first N samples of the training stream (for "
                                          "smoke tests; default: all)", int, POSITIVE, optional=True))
    m = parser.add_argument_group("learners and model")
    m.add_argument("--learner", action=CommaList, default=",".join(learner_names()),
                   help=f"comma-separated learners to compare, from {', '.join(learner_names())}")
    m.add_argument("--model", default="mlp", choices=_common.MODELS,
                   help="the network: mlp (a ReLU MLP of --hidden widths), lenet5 (28x28 images), elman or gru "
                        "(a recurrent network of --hidden's first width reading an image one row per time step, "
                        "Elec2's features as one step; elman is the network of admm-rnn)")
    m.add_argument("--hidden", default="100,100", help="comma-separated hidden widths of the ReLU MLP "
                   "('' = no hidden layer)")
    m.add_argument("--batchnorm", action="store_true", help="add BatchNorm1d after each hidden Linear "
                   "(learners that cannot train it, such as am-mem, are skipped)")
    add_option(m, "--batch-size", HParam(10, "samples per learning step (mini-batch of the stream)", int, POSITIVE))
    add_option(m, "--epochs", HParam(1, "passes over the training stream (1 = a pure single-pass stream)", int,
                                     POSITIVE))
    add_option(m, "--lr-halve-epochs", HParam(None, "halve every learning rate each N epochs (converted to "
                                              "--lr-halve-every steps; default: constant rates)", int, POSITIVE,
                                              optional=True))
    m.add_argument("--device", default="auto", help="torch device: auto (CUDA when available), cpu, cuda, cuda:1, ...")
    add_option(m, "--threads", HParam(None, "torch CPU threads (default: 1 when the device is the CPU: the "
                                      "per-batch operations are small, and extra threads gain little on idle "
                                      "cores but slow every step badly on busy ones)", int, POSITIVE,
                                      optional=True))
    m.add_argument("--seed", type=int, default=0, help="seed of the initial weights (the same for every "
                   "learner) and of the stream order")
    _common.add_learner_arguments(parser)
    o = parser.add_argument_group("evaluation and output")
    add_option(o, "--eval-every", HParam(None, "samples between points of the prequential curve (default: "
                                         "about 100 points per run)", int, POSITIVE, optional=True))
    add_option(o, "--log-every", HParam(10, "steps between TensorBoard records of the step statistics", int,
                                        POSITIVE))
    o.add_argument("--logdir", default="runs", help="TensorBoard root: one run folder <dataset>-<learner>-<time> "
                   "per learner")
    o.add_argument("--plot", default=None, help="PNG of the accuracy curves (default: <logdir>/stream-<dataset>.png)")
    o.add_argument("--json", default=None, help="also write the results (curves, held-out accuracy per epoch, "
                   "seconds, steps, options) to this JSON file")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel over the processes of torchrun (set by itself when torchrun starts "
                             "several): every process predicts each batch and learns its shard of it, rank 0 "
                             "prints, logs and writes checkpoints; e.g. torchrun --nproc-per-node 2 scripts/stream.py "
                             "--learner am-mem --dataset mnist --batch-size 200")
    c = _common.add_checkpoint_options(parser, "every --checkpoint-every steps and at the end",
                                       "exactly where they stopped")
    add_option(c, "--checkpoint-every", HParam(500, "steps between checkpoints (with --checkpoint)", int, POSITIVE))
    add_option(c, "--stop-after-steps", HParam(None, "for tests: simulate an interruption: stop after N steps "
                                               "of this process, right after saving a checkpoint", int, POSITIVE,
                                               optional=True))
    return parser


def parse_args(argv=None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.learners = _common.parse_name_list(args.learner, learner_names(), "learner")
        args.hidden_widths = _common.parse_int_list(args.hidden)
    except ValueError as err:
        parser.error(str(err))
    _common.check_checkpoint_options(args, parser)
    if args.batchnorm and args.batch_size < 2:
        parser.error("--batchnorm needs --batch-size >= 2 (batch statistics of one sample are undefined)")
    return args, parser


def load_data(args):
    """The training stream and the held-out set."""
    if args.dataset == "elec2":
        train, test = load_dataset("elec2", "all", args.data_dir), load_dataset("elec2", "test", args.data_dir)
    else:
        train, test = load_dataset(args.dataset, "train", args.data_dir), load_dataset(args.dataset, "test", args.data_dir)
    if args.max_samples is not None and args.max_samples < len(train):
        train = train.subset(range(args.max_samples))
    if args.model in _common.RECURRENT_MODELS:
        train, test = (dataclasses.replace(d, x=_common.as_sequences(d.x)) for d in (train, test))
    if args.batchnorm and len(train) % args.batch_size == 1:
        train = train.subset(range(len(train) - 1))
        say("note: dropped the last training sample so that no BatchNorm batch has one sample")
    tail = len(train) % args.batch_size
    if args.processes > 1 and 0 < tail < args.processes:
        train = train.subset(range(len(train) - tail))
        say(f"note: dropped the last {tail} training sample(s): every process needs a share of every batch")
    return train, test


class Run:
    """One learner's pass over the stream: its position, counts and logs, saved and restored."""

    def __init__(self, name: str, learner, args, stream_config: dict) -> None:
        self.name, self.learner, self.args, self.stream_config = name, learner, args, stream_config
        self.epoch, self.index, self.batches, self.elapsed, self.rolled_back = 0, 0, 0, 0.0, 0
        self.result, self.test_curve = PrequentialResult(), []
        self.run_dir: Path | None = None
        self.ck_path = _common.checkpoint_path(args.checkpoint, name) if args.checkpoint else None

    def resume(self) -> None:
        ck = self.ck_path
        if not (self.args.resume and ck.is_file()):
            if self.args.resume:
                say(f"{self.name}: no checkpoint at {ck}; starting from scratch (--allow-fresh)")
            return
        _common.check_checkpoint_config(ck, self.stream_config)
        extra = load_checkpoint(ck, self.learner)  # CheckpointError (a ValueError) if it does not fit
        self.epoch, self.index, self.batches = extra["epoch"], extra["index"], extra["batches"]
        self.elapsed, self.rolled_back = extra["elapsed"], extra["rolled_back"]
        self.result = PrequentialResult.from_state_dict(extra["prequential"])
        self.test_curve = [tuple(p) for p in extra["test_curve"]]
        run_dir = extra.get("run_dir")
        if run_dir and Path(run_dir).is_dir():
            self.run_dir = Path(run_dir)
        where = (f"at epoch {self.epoch + 1}, sample {self.index}" if self.epoch < self.args.epochs
                 else f"after epoch {self.epoch} (finished)")
        say(f"{self.name}: resumed from {ck} {where} ({self.result.n_seen} samples seen, "
              f"step {self.learner.step_count})")

    def open_logger(self) -> TensorBoardLogger | NullLogger:
        if not is_main_process():
            return NullLogger()
        if self.run_dir is not None:  # continue the interrupted run's folder, without duplicate steps
            return TensorBoardLogger(self.run_dir, purge_step=self.result.n_seen + 1)
        self.run_dir = make_run_dir(self.args.logdir, f"{self.args.dataset}-{self.name}")
        writer = TensorBoardLogger(self.run_dir)
        skip = {"learner", "learners", "hidden_widths", "learner_set"}
        hparams = {**{k: v for k, v in vars(self.args).items() if k not in skip
                      and k not in _common.learner_options()}, "learner": self.name,
                   **{f"{self.name}/{k}": v for k, v in self.learner.hparams().items()}}
        writer.log_text("hparams", "\n".join(f"| {k} | {v} |" for k, v in
                                             [("option", "value"), ("---", "---"), *hparams.items()]))
        return writer

    def save(self, epoch: int, index: int) -> None:
        """Everything needed to continue exactly from (epoch, index)."""
        if self.ck_path is not None and is_main_process():  # every rank's state is the same
            save_checkpoint(self.ck_path, self.learner, epoch=epoch, index=index, batches=self.batches,
                            elapsed=self.elapsed, rolled_back=self.rolled_back, prequential=self.result.state_dict(),
                            test_curve=self.test_curve, config=self.stream_config, run_dir=str(self.run_dir))


def stream_learner(run: Run, train, test, n_train: int, eval_every: int, budget: list[int]) -> bool:
    """Test-then-train over the epochs left; returns False when --stop-after-steps interrupted it.
    ``budget[0]`` counts the steps of this process, over all learners."""
    args, learner = run.args, run.learner
    order = "stream" if args.dataset == "elec2" else "shuffle"
    writer = run.open_logger()
    bar = tqdm(total=args.epochs * n_train, initial=run.result.n_seen, desc=f"{run.name:>8}", unit="sample",
               disable=args.quiet or not is_main_process(), dynamic_ncols=True, leave=True)
    if args.processes > 1:
        learner = ShardedLearning(learner, args.process_rank, args.processes)
    try:
        for epoch in range(run.epoch, args.epochs):
            samples = iter_samples(train, order, seed=args.seed * 1000 + epoch, start=run.index)
            n_at_epoch_start = run.result.n_seen - run.index
            n_points = len(run.result.curve)
            tick = time.perf_counter()
            for result, info in iter_prequential(samples, learner, batch_size=args.batch_size,
                                                 every=eval_every, result=run.result):
                run.elapsed += time.perf_counter() - tick  # time in predict + learn (and the data)
                run.batches += 1
                budget[0] += 1
                run.rolled_back += int(info.rolled_back)
                bar.update(result.n_seen - n_at_epoch_start - run.index)
                run.index = result.n_seen - n_at_epoch_start
                if run.batches % args.log_every == 0:
                    writer.log_step(info, result.n_seen)
                    bar.set_postfix(acc=f"{result.accuracy:.3f}", refresh=False)
                if len(result.curve) > n_points:
                    n_points = len(result.curve)
                    writer.record("prequential/accuracy", result.accuracy, result.n_seen)
                if run.batches % args.checkpoint_every == 0:
                    run.save(epoch, run.index)
                if args.stop_after_steps and budget[0] >= args.stop_after_steps:
                    run.save(epoch, run.index)
                    return False
                tick = time.perf_counter()
            run.index = 0
            test_acc = evaluate_accuracy(learner, test)
            run.test_curve.append((epoch + 1, test_acc))
            if args.epochs > 1 and is_main_process():
                tqdm.write(f"{run.name}: epoch {epoch + 1}/{args.epochs} held-out accuracy {test_acc:.4f}")
            writer.record("test/accuracy", test_acc, run.result.n_seen)
            run.save(epoch + 1, 0)
        return True
    finally:
        bar.set_postfix(acc=f"{run.result.accuracy:.3f}")
        bar.close()
        writer.close()


def print_summary(results: dict, args, n_train: int) -> None:
    print()
    # wall s: time in test-then-train steps only (no held-out evaluation, logging or checkpoints)
    width = learner_column_width(results)
    print(f"{'learner':<{width}} {'prequential':>11} {'held-out':>9} {'best (epoch)':>13} {'wall s':>8} "
          f"{'samples/s':>10} {'rolled back':>11}")
    for name, r in results.items():
        best_epoch, best = max(r["test_curve"], key=lambda p: p[1]) if r["test_curve"] else (0, r["held_out"])
        print(f"{name:<{width}} {r['prequential']:>11.4f} {r['held_out']:>9.4f} {f'{best:.4f} ({best_epoch})':>13} "
              f"{r['seconds']:>8.2f} {r['samples_per_s']:>10.0f} {r['rolled_back']:>11d}")
    print()
    plot_path = Path(args.plot) if args.plot else Path(args.logdir) / f"stream-{args.dataset}.png"
    import _plots  # Matplotlib is imported only here, when there is something to draw

    _plots.plot_stream({n: r["curve"] for n, r in results.items()}, plot_path,
                       test={n: r["test_curve"] for n, r in results.items()},
                       epoch_samples=n_train if args.epochs > 1 else None,
                       title=f"{args.dataset}: {n_train} samples x {args.epochs} epoch(s), batch {args.batch_size}")
    print("TensorBoard logs: " + ", ".join(str(r["run_dir"]) for r in results.values())
          + f"  (tensorboard --logdir {args.logdir})")
    print(f"Plot: {plot_path}")
    if args.checkpoint:
        print("Checkpoints: " + ", ".join(str(_common.checkpoint_path(args.checkpoint, n)) for n in results))


def main(argv=None) -> None:
    args, parser = parse_args(argv)
    with _common.clean_errors(parser):
        args.process_rank, args.processes = 0, 1
        if args.distributed or launched_by_torchrun():
            args.process_rank, args.processes, device = init_from_env(args.device)
            if args.batch_size < args.processes:
                raise ValueError(f"--batch-size {args.batch_size} is smaller than the {args.processes} processes: "
                                 "each needs a share of every batch")
        else:
            device = resolve_device(args.device)
        if args.threads or device.type == "cpu":
            torch.set_num_threads(args.threads or 1)
        _common.check_resumable(args, args.learners)
        train, test = load_data(args)
        n_train = len(train)
        steps_per_epoch = math.ceil(n_train / args.batch_size)
        eval_every = args.eval_every or max(args.batch_size, args.epochs * n_train // 100)
        # what defines the stream: a checkpoint made with other values cannot be continued
        stream_config = {"dataset": args.dataset, "n_train": n_train, "model": args.model, "hidden": args.hidden_widths,
                         "batchnorm": args.batchnorm, "batch_size": args.batch_size, "seed": args.seed}
        say(f"{args.dataset}: stream of {n_train} samples x {args.epochs} epoch(s) "
              f"({'time order' if args.dataset == 'elec2' else 'shuffled per epoch'}), held-out {len(test)}, "
              f"{args.model} {list(train.x.shape[1:])} -> "
              f"{args.hidden_widths if args.model == 'mlp' else args.hidden_widths[:1] if args.model in _common.RECURRENT_MODELS else 'conv'} -> {train.n_classes}, batch {args.batch_size}, "
              f"device {device}")

        results, budget = {}, [0]
        for name in args.learners:
            set_seed(args.seed)  # the same initial weights for every learner
            model = _common.build_model(args.model, tuple(train.x.shape[1:]), args.hidden_widths, train.n_classes,
                                        args.batchnorm)
            kwargs = _common.learner_kwargs(name, args)
            if args.lr_halve_epochs and "lr_halve_every" in LEARNERS[name].defaults:
                kwargs.setdefault("lr_halve_every", args.lr_halve_epochs * steps_per_epoch)
            try:
                learner = make_data_parallel(make_learner(name, model, device, **kwargs), args.processes, name)
            except UnsupportedModelError as err:
                say(f"note: skipping {name}: {' '.join(str(err).split())}")
                continue
            if learner is None:
                continue
            run = Run(name, learner, args, stream_config)
            run.resume()
            if not stream_learner(run, train, test, n_train, eval_every, budget):
                where = f"; resume with --resume (checkpoint {run.ck_path})" if run.ck_path else ""
                say(f"stopped after {budget[0]} steps (--stop-after-steps){where}")
                return
            result = run.result
            if not result.curve or result.curve[-1][0] != result.n_seen:
                result.curve.append((result.n_seen, result.accuracy))
            held_out = run.test_curve[-1][1] if run.test_curve else evaluate_accuracy(learner, test)
            results[name] = {
                "prequential": result.accuracy, "held_out": held_out, "seconds": run.elapsed,
                "samples_per_s": result.n_seen / run.elapsed if run.elapsed > 0 else float("nan"),
                "rolled_back": run.rolled_back, "curve": list(result.curve), "test_curve": run.test_curve,
                "run_dir": run.run_dir, "steps": learner.step_count, "hparams": learner.hparams(),
            }
        if not results:
            raise ValueError("no learner can train this model; see the notes above")
        if not is_main_process():
            return
        print_summary(results, args, n_train)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            record = {"options": {k: v for k, v in vars(args).items()}, "results": results}
            Path(args.json).write_text(json.dumps(record, indent=1, default=str))
            print(f"Results: {args.json}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Stream a data set through online learners and compare them on the same stream.

Every learner (AM-Adam, AM-mem, backprop) gets the same MLP with the same initial weights and sees
the same samples in the same order. Evaluation is prequential (test-then-train): each mini-batch is
first predicted and scored, then learned. After each pass over the stream (an epoch) the held-out
accuracy on the test split is measured.

Streams:
  digits, mnist, fashion-mnist: the train split, in a seeded random order that is fixed per epoch
      (epoch e uses the permutation of seed * 1000 + e); held-out = the test split.
  elec2: the whole data set (split "all", 45,312 rows) in time order, never shuffled; "held-out" is
      the last 20% of it in time (split "test"), which the stream also contains, so for elec2 it
      measures the fit to the most recent period rather than generalization to unseen data.

Run ``python scripts/stream.py --help`` for the options. TensorBoard: ``tensorboard --logdir runs``
(every scalar is plotted against the number of samples seen).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common.py, scripts/_plots.py

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from amstream import PrequentialResult, iter_prequential, load_checkpoint, save_checkpoint, set_seed  # noqa: E402
from amstream.data import DATASETS, data_dir, iter_samples, load_dataset  # noqa: E402
from amstream.logging import TensorBoardLogger, make_run_dir  # noqa: E402
from amstream.utils import resolve_device  # noqa: E402

import _common  # noqa: E402
from _common import LEARNER_NAMES, build_mlp, evaluate_accuracy, hparam_help, make_learner  # noqa: E402


def _opt(default, help: str, **argparse_kwargs):
    """A dataclass field that carries its command-line help (and argparse extras)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class Args:
    # --- data
    dataset: str = _opt("digits", "data set; digits is embedded (scikit-learn's 8x8 digits, 1,438 "
                        "train / 359 test samples) and needs no files", choices=DATASETS)
    data_dir: str | None = _opt(None, "root of the real data files (default: $AMSTREAM_DATA if set, "
                                f"else ~/.cache/amstream; now {data_dir()})", type=str)
    max_samples: int | None = _opt(None, "use only the first N samples of the training stream "
                                   "(for smoke tests; default: all)", type=int)
    # --- learners and model
    learner: str = _opt(",".join(LEARNER_NAMES), "comma-separated learners to compare, from "
                        f"{', '.join(LEARNER_NAMES)}")
    hidden: str = _opt("100,100", "comma-separated hidden widths of the ReLU MLP ('' = no hidden layer)")
    batchnorm: bool = _opt(False, "add BatchNorm1d after each hidden Linear (am-mem does not support "
                           "it and is skipped)")
    batch_size: int = _opt(10, "samples per learning step (mini-batch of the stream)")
    epochs: int = _opt(1, "passes over the training stream (1 = a pure single-pass stream)")
    device: str = _opt("auto", "torch device: auto (CUDA when available), cpu, cuda, cuda:1, ...")
    threads: int | None = _opt(None, "torch CPU threads (default: 1 when the device is the CPU: the "
                               "per-batch operations are small, and extra threads gain little on idle "
                               "cores but slow every step badly on busy ones)", type=int)
    seed: int = _opt(0, "seed of the initial weights (the same for every learner) and of the stream order")
    # --- hyperparameters: None = the learner's own default
    mu: float | None = _opt(None, hparam_help("mu"), type=float)
    code_steps: int | None = _opt(None, hparam_help("code_steps"), type=int)
    code_lr: float | None = _opt(None, hparam_help("code_lr"), type=float)
    lr: float | None = _opt(None, hparam_help("lr"), type=float)
    lr_out: float | None = _opt(None, hparam_help("lr_out"), type=float)
    bp_lr: float | None = _opt(None, hparam_help("bp_lr"), type=float)
    bp_optimizer: str = _opt("adam", "optimizer of backprop", choices=("adam", "sgd"))
    lr_halve_epochs: int | None = _opt(None, "halve every learning rate each N epochs (converted to "
                                       "steps; default: constant rates)", type=int)
    prox: str | None = _opt(None, hparam_help("prox"), type=str, choices=("paper", "official"))
    reduction: str | None = _opt(None, hparam_help("reduction"), type=str, choices=("mean", "sum"))
    bn_stats: str | None = _opt(None, hparam_help("bn_stats"), type=str, choices=("forward", "all"))
    output_fit: str | None = _opt(None, hparam_help("output_fit"), type=str, choices=("codes", "forward"))
    memory: str | None = _opt(None, hparam_help("memory"), type=str, choices=("sum", "mean", "forget"))
    forget: float | None = _opt(None, hparam_help("forget"), type=float)
    solver: str | None = _opt(None, hparam_help("solver"), type=str, choices=("sweep", "solve"))
    damping: float | None = _opt(None, hparam_help("damping"), type=float)
    damping_scale: str | None = _opt(None, hparam_help("damping_scale"), type=str, choices=("mean", "diagonal"))
    # --- evaluation and output
    eval_every: int | None = _opt(None, "samples between points of the prequential curve (default: "
                                  "about 100 points per run)", type=int)
    log_every: int = _opt(10, "steps between TensorBoard records of the step statistics")
    logdir: str = _opt("runs", "TensorBoard root: one run folder <dataset>-<learner>-<time> per learner")
    plot: str | None = _opt(None, "PNG of the accuracy curves (default: <logdir>/stream-<dataset>.png)",
                            type=str)
    # --- checkpoints
    checkpoint: str | None = _opt(None, "checkpoint file; one per learner, named PATH with the learner "
                                  "inserted before the suffix (ck.pt -> ck-am-adam.pt); written "
                                  "atomically every --checkpoint-every steps and at the end",
                                  type=str, metavar="PATH")
    checkpoint_every: int = _opt(500, "steps between checkpoints (with --checkpoint)")
    resume: bool = _opt(False, "continue from the --checkpoint files exactly where they stopped "
                        "(a learner without a checkpoint starts from scratch)")
    stop_after_steps: int | None = _opt(None, "for tests: simulate an interruption: stop after N steps "
                                        "of this process, right after saving a checkpoint", type=int)
    quiet: bool = _opt(False, "no progress bars")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` except where the default is None/False (the help explains those)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS \
                and "%(default)" not in help:
            help += " (default: %(default)s)"
        return help


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="stream.py", formatter_class=_HelpFormatter,
        description="Stream a data set through online learners (AM-Adam, AM-mem, backprop) and "
        "compare their prequential (test-then-train) and held-out accuracy.",
        epilog="elec2 is streamed in time order (split 'all'); its held-out set is the last 20% of "
        "that stream. The image data sets stream their train split, shuffled per epoch.",
    )
    for f in dataclasses.fields(Args):
        meta = dict(f.metadata)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", **meta)
        else:
            meta.setdefault("type", type(f.default))
            parser.add_argument(flag, default=f.default, **meta)
    return parser


def parse_args(argv=None) -> tuple[Args, argparse.ArgumentParser]:
    parser = build_parser()
    args = Args(**vars(parser.parse_args(argv)))
    for name in ("batch_size", "epochs", "max_samples", "eval_every", "log_every", "checkpoint_every",
                 "lr_halve_epochs", "stop_after_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    try:
        _common.parse_name_list(args.learner, LEARNER_NAMES, "learner")
        _common.parse_int_list(args.hidden)
    except ValueError as err:
        parser.error(str(err))
    if args.resume and not args.checkpoint:
        parser.error("--resume needs --checkpoint PATH")
    if args.batchnorm and args.batch_size < 2:
        parser.error("--batchnorm needs --batch-size >= 2 (batch statistics of one sample are undefined)")
    if args.batchnorm and _common.parse_name_list(args.learner, LEARNER_NAMES) == ["am-mem"]:
        parser.error("am-mem does not support --batchnorm (its hidden layers must be plain Linear); "
                     "drop --batchnorm or add another learner")
    return args, parser


@contextlib.contextmanager
def clean_errors(parser: argparse.ArgumentParser):
    """Bad settings, data or checkpoints end with a one-line message and exit code 2."""
    try:
        yield
    except (ValueError, FileNotFoundError, ImportError) as err:
        hint = " (or pass --data-dir)" if isinstance(err, FileNotFoundError) else ""
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(err).split())}{hint}\n")


def checkpoint_config(path: Path) -> dict | None:
    """The stream settings a checkpoint of this script was made with (None if unreadable)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["extra"].get("config", {})
    except Exception:  # noqa: BLE001 - load_checkpoint reports unreadable files
        return None


def checkpoint_path(path: str, learner: str) -> Path:
    p = Path(path)
    return p.with_name(f"{p.stem}-{learner}{p.suffix}")


def main(argv=None) -> None:
    args, parser = parse_args(argv)
    with clean_errors(parser):
        learners = _common.parse_name_list(args.learner, LEARNER_NAMES, "learner")
        hidden = _common.parse_int_list(args.hidden)
        if args.batchnorm and "am-mem" in learners:
            learners.remove("am-mem")
            print("note: skipping am-mem: it does not support BatchNorm (--batchnorm)")
        device = resolve_device(args.device)
        if args.threads or device.type == "cpu":
            torch.set_num_threads(args.threads or 1)

        # ---- data: the training stream and the held-out set
        if args.dataset == "elec2":
            train = load_dataset("elec2", "all", args.data_dir)
            test = load_dataset("elec2", "test", args.data_dir)
        else:
            train = load_dataset(args.dataset, "train", args.data_dir)
            test = load_dataset(args.dataset, "test", args.data_dir)
        if args.max_samples is not None and args.max_samples < len(train):
            train = train.subset(range(args.max_samples))
        if args.batchnorm and len(train) % args.batch_size == 1:
            train = train.subset(range(len(train) - 1))
            print("note: dropped the last training sample so that no BatchNorm batch has one sample")
        order = "stream" if args.dataset == "elec2" else "shuffle"
        n_train = len(train)
        steps_per_epoch = math.ceil(n_train / args.batch_size)
        eval_every = args.eval_every or max(args.batch_size, args.epochs * n_train // 100)
        options = vars(args) | {"lr_halve_every": args.lr_halve_epochs and args.lr_halve_epochs * steps_per_epoch}
        # what defines the stream: a checkpoint made with other values cannot be continued
        stream_config = {"dataset": args.dataset, "n_train": n_train, "hidden": hidden,
                         "batchnorm": args.batchnorm, "batch_size": args.batch_size, "seed": args.seed}
        print(f"{args.dataset}: stream of {n_train} samples x {args.epochs} epoch(s) "
              f"({'time order' if order == 'stream' else 'shuffled per epoch'}), held-out {len(test)}, "
              f"MLP {list(train.x.shape[1:])} -> {hidden} -> {train.n_classes}, batch {args.batch_size}, "
              f"device {device}")

        results = {}  # learner -> summary
        steps_this_process = 0
        for name in learners:
            # ---- learner: same initial weights for every learner
            set_seed(args.seed)
            model = build_mlp(tuple(train.x.shape[1:]), hidden, train.n_classes, args.batchnorm)
            overrides = _common.overrides_for(name, options)
            if name == "backprop":
                overrides["optimizer"] = args.bp_optimizer
            learner = make_learner(name, model, device, **overrides)
            group_names = [g.get("name", f"group{i}") for opt in learner.optimizers()
                           for i, g in enumerate(opt.param_groups)]

            # ---- stream position and counts, possibly from a checkpoint
            epoch, index, batches, elapsed, rolled_back = 0, 0, 0, 0.0, 0
            result, test_curve = PrequentialResult(), []
            ck_path = checkpoint_path(args.checkpoint, name) if args.checkpoint else None
            if args.resume and ck_path.is_file():
                saved = checkpoint_config(ck_path)
                if saved is not None and saved != stream_config:
                    diff = {k: v for k, v in saved.items() if stream_config.get(k) != v} or saved
                    raise ValueError(f"checkpoint {ck_path} was made with other settings {diff}; "
                                     f"this run has { {k: stream_config.get(k) for k in diff} }")
                extra = load_checkpoint(ck_path, learner)  # CheckpointError (a ValueError) if it does not fit
                epoch, index, batches = extra["epoch"], extra["index"], extra["batches"]
                elapsed, rolled_back = extra["elapsed"], extra["rolled_back"]
                result = PrequentialResult.from_state_dict(extra["prequential"])
                test_curve = [tuple(p) for p in extra["test_curve"]]
                where = (f"at epoch {epoch + 1}, sample {index}" if epoch < args.epochs
                         else f"after epoch {epoch} (finished)")
                print(f"{name}: resumed from {ck_path} {where} ({result.n_seen} samples seen, "
                      f"step {learner.step_count})")
            elif args.resume:
                print(f"{name}: no checkpoint at {ck_path}; starting from scratch")

            run_dir = make_run_dir(args.logdir, f"{args.dataset}-{name}")
            writer = TensorBoardLogger(run_dir)
            hparams = {**{k: v for k, v in vars(args).items() if k not in _common.HPARAM_OPTIONS},
                       "learner": name, **{f"{name}/{k}": v for k, v in getattr(learner, "hparams", dict)().items()}}
            writer.log_text("hparams", "\n".join(f"| {k} | {v} |" for k, v in
                                                 [("option", "value"), ("---", "---"), *hparams.items()]))

            def save(epoch, index):  # everything needed to continue exactly from (epoch, index)
                if ck_path is not None:
                    save_checkpoint(ck_path, learner, epoch=epoch, index=index, batches=batches, elapsed=elapsed,
                                    rolled_back=rolled_back, prequential=result.state_dict(),
                                    test_curve=test_curve, config=stream_config)

            bar = tqdm(total=args.epochs * n_train, initial=result.n_seen, desc=f"{name:>8}", unit="sample",
                       disable=args.quiet, dynamic_ncols=True, leave=True)
            interrupted = False
            for epoch in range(epoch, args.epochs):
                # ---- one pass over the stream, test-then-train
                samples = iter_samples(train, order, seed=args.seed * 1000 + epoch, start=index)
                n_at_epoch_start = result.n_seen - index
                n_points = len(result.curve)
                tick = time.perf_counter()
                for result, info in iter_prequential(samples, learner, batch_size=args.batch_size,
                                                     every=eval_every, result=result):
                    elapsed += time.perf_counter() - tick  # time in predict + learn (and the data)
                    batches += 1
                    steps_this_process += 1
                    rolled_back += int(info.rolled_back)
                    bar.update(result.n_seen - n_at_epoch_start - index)
                    index = result.n_seen - n_at_epoch_start
                    if batches % args.log_every == 0:
                        writer.log_step(info, result.n_seen, group_names)
                        bar.set_postfix(acc=f"{result.accuracy:.3f}", refresh=False)
                    if len(result.curve) > n_points:
                        n_points = len(result.curve)
                        writer.record("prequential/accuracy", result.accuracy, result.n_seen)
                    if batches % args.checkpoint_every == 0:
                        save(epoch, index)
                    if args.stop_after_steps and steps_this_process >= args.stop_after_steps:
                        save(epoch, index)
                        interrupted = True
                        break
                    tick = time.perf_counter()
                if interrupted:
                    break
                # ---- end of the epoch: held-out accuracy
                index = 0
                test_acc = evaluate_accuracy(learner, test)
                test_curve.append((epoch + 1, test_acc))
                if args.epochs > 1:
                    tqdm.write(f"{name}: epoch {epoch + 1}/{args.epochs} held-out accuracy {test_acc:.4f}")
                writer.record("test/accuracy", test_acc, result.n_seen)
                save(epoch + 1, 0)
            bar.set_postfix(acc=f"{result.accuracy:.3f}")
            bar.close()
            writer.close()
            if interrupted:
                where = f"; resume with --resume (checkpoint {ck_path})" if ck_path else ""
                print(f"stopped after {steps_this_process} steps (--stop-after-steps){where}")
                return

            if not result.curve or result.curve[-1][0] != result.n_seen:
                result.curve.append((result.n_seen, result.accuracy))
            held_out = test_curve[-1][1] if test_curve else evaluate_accuracy(learner, test)
            results[name] = {
                "prequential": result.accuracy, "held_out": held_out, "seconds": elapsed,
                "samples_per_s": result.n_seen / elapsed if elapsed > 0 else float("nan"),
                "rolled_back": rolled_back, "curve": list(result.curve), "test_curve": test_curve,
                "run_dir": run_dir,
            }

        # ---- summary
        print()
        # wall s: time in test-then-train steps only (no held-out evaluation, logging or checkpoints)
        print(f"{'learner':<10} {'prequential':>11} {'held-out':>9} {'best (epoch)':>13} {'wall s':>8} "
              f"{'samples/s':>10} {'rolled back':>11}")
        for name, r in results.items():
            best_epoch, best = max(r["test_curve"], key=lambda p: p[1]) if r["test_curve"] else (0, r["held_out"])
            print(f"{name:<10} {r['prequential']:>11.4f} {r['held_out']:>9.4f} {f'{best:.4f} ({best_epoch})':>13} "
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
            print("Checkpoints: " + ", ".join(str(checkpoint_path(args.checkpoint, n)) for n in results))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Soak test: stream millions of samples through every registered learner and watch its memory.

A streaming learner must run for as long as its stream lasts: its resident memory (RSS) has to stay
flat once warmed up. Each learner streams Elec2 (45,312 rows, in time order, on repeat) through
``learn_one`` with dict features, first with a micro-batch of ``--micro-batch`` samples for
``--samples`` samples, then one sample per step for ``--single-samples`` samples, on an 8-32-2 ReLU
MLP. RSS is sampled every ``--every`` samples. Each learner runs in its own process, so that one
learner's allocations do not blur the next one's figures.

Reported per learner and phase: RSS after warm-up (the first ``--warmup`` fraction of the phase),
at the end, and the slope of a least-squares line through the samples after warm-up, in MB per
100,000 samples (flat: about 0). A PNG shows RSS against samples seen.

    python scripts/soak.py                                        # 2,000,000 + 200,000 samples each
    python scripts/soak.py --samples 200000 --single-samples 20000 --learner backprop
    python scripts/soak.py --against c05dc48 --samples 300000     # the same stream on another revision
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Only the standard library and torch at the top: the worker processes re-import this file, and with
# --against they import another revision's amstream, which may lack this tree's helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

FEATURES = ("date", "day", "period", "nswprice", "nswdemand", "vicprice", "vicdemand", "transfer")


def parse_args(argv=None):
    from _common import CommaList, Parser, add_option, learner_names, parse_name_list
    from amstream.hparams import HParam

    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--learner", action=CommaList, default=",".join(learner_names()),
                   help=f"comma-separated learners, from {', '.join(learner_names())}")
    add_option(p, "--samples", HParam(2_000_000, "samples streamed with the micro-batch", int, "[1, inf)"))
    add_option(p, "--single-samples", HParam(200_000, "samples streamed then one per step", int, "[0, inf)"))
    add_option(p, "--micro-batch", HParam(16, "samples per step in the first phase", int, "[1, inf)"))
    add_option(p, "--every", HParam(10_000, "samples between RSS readings", int, "[1, inf)"))
    add_option(p, "--warmup", HParam(0.1, "fraction of each phase before the flatness is measured", range="[0, 1)"))
    p.add_argument("--data-dir", default=None, help="root of the data files (default: AMSTREAM_DATA)")
    p.add_argument("--against", default=None, metavar="REV",
                   help="run the workers on this git revision of amstream (exported with git archive) instead "
                        "of this tree, to measure before and after a change")
    p.add_argument("--json", default=None, help="write the RSS series and the summary to this JSON file")
    p.add_argument("--plot", default="runs/soak.png", help="PNG of RSS against samples")
    args = p.parse_args(argv)
    try:
        args.learners = parse_name_list(args.learner, learner_names(), "learner")
    except ValueError as err:
        p.error(str(err))
    return args


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak_one(name: str, args_dict: dict) -> dict:
    """One learner, in a fresh process: both phases, RSS every ``every`` samples."""
    from amstream import LEARNERS, set_seed
    from amstream.data import load_elec2

    torch.set_num_threads(1)
    data = load_elec2(args_dict["data_dir"])
    rows = [dict(zip(FEATURES, map(float, x))) for x in data.x.tolist()]
    labels = data.y.tolist()
    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(len(FEATURES), 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    learner = LEARNERS[name](model, device="cpu")
    series = {}
    for phase, n, batch in (("micro-batch", args_dict["samples"], args_dict["micro_batch"]),
                            ("one sample", args_dict["single_samples"], 1)):
        if n == 0:
            continue
        learner.set_micro_batch(batch)
        points, start = [], time.perf_counter()
        for i in range(n):
            j = i % len(rows)
            learner.learn_one(rows[j], labels[j])
            if (i + 1) % args_dict["every"] == 0 or i + 1 == n:
                points.append((i + 1, _rss_mb()))
        series[phase] = {"points": points, "seconds": time.perf_counter() - start, "batch": batch}
    import amstream

    return {"learner": name, "series": series, "steps": learner.step_count, "amstream": amstream.__file__}


def summarize(points: list[tuple[int, float]], warmup: float) -> dict:
    n = points[-1][0]
    after = [(s, r) for s, r in points if s >= warmup * n] or points[-2:]
    xs, ys = [s for s, _ in after], [r for _, r in after]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else 0.0
    return {"rss_after_warmup": after[0][1], "rss_end": after[-1][1], "max": max(ys),
            "slope_mb_per_100k": slope * 1e5}


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            # spawned workers start from this process's sys.path: the revision goes first
            archive = subprocess.run(["git", "archive", args.against], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
            sys.path.insert(0, tmp)
        results = run_workers(args)
    report(results, args)


def run_workers(args) -> list[dict]:
    settings = {k: getattr(args, k) for k in ("samples", "single_samples", "micro_batch", "every", "data_dir")}
    ctx = multiprocessing.get_context("spawn")
    results = []
    for name in args.learners:
        with ctx.Pool(1) as pool:
            results.append(pool.apply(soak_one, (name, settings)))
        r = results[-1]
        for phase, s in r["series"].items():
            summary = summarize(s["points"], args.warmup)
            s.update(summary)
            print(f"{name:>9} {phase:>11}: {s['points'][-1][0]:>9,} samples in {s['seconds']:7.0f} s, RSS "
                  f"{summary['rss_after_warmup']:.0f} -> {summary['rss_end']:.0f} MB, slope "
                  f"{summary['slope_mb_per_100k']:+.3f} MB per 100k samples ({r['amstream']})", flush=True)
    return results


def report(results: list[dict], args) -> None:
    settings = {k: getattr(args, k) for k in ("samples", "single_samples", "micro_batch", "every", "against")}
    print()
    print(f"| learner | phase | samples | samples/s | RSS after warm-up (MB) | RSS at end (MB) | "
          f"slope after warm-up (MB per 100k samples) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        for phase, s in r["series"].items():
            n = s["points"][-1][0]
            print(f"| {r['learner']} | {phase} ({s['batch']}) | {n:,} | {n / s['seconds']:,.0f} | "
                  f"{s['rss_after_warmup']:.1f} | {s['rss_end']:.1f} | {s['slope_mb_per_100k']:+.3f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"options": settings, "results": results}, indent=1))
    import _plots

    _plots.plot_soak({f"{r['learner']}, {phase}": s["points"] for r in results for phase, s in r["series"].items()},
                     args.plot)
    print(f"\nPlot: {args.plot}")


if __name__ == "__main__":
    main()

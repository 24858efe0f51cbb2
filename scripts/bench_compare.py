#!/usr/bin/env python
"""Step times of this tree against another revision, side by side in one run.

Two worker processes, one importing ``amstream`` from this working tree and one from a git
revision exported to a temporary folder (``git archive``), build the same learners on the same
784-100-100-10 MLP and MNIST batches. The parent asks them in turn for ``--steps`` timed steps of
each learner, ``--rounds`` times, so both see the same machine conditions; a learner's ratio is the
median of its per-round ratios (this tree / the revision: below 1 is faster).

    python scripts/bench_compare.py --against HEAD~1 --threads 1
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Parser, add_option  # noqa: E402
from amstream.hparams import HParam  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The worker uses only what every revision of the API has: the learner classes, learn(), load_mnist.
WORKER = r"""
import json, sys, time, torch
import amstream
from amstream.data import load_mnist
torch.set_num_threads(int(sys.argv[1]))
batch = int(sys.argv[2])
train = load_mnist("train", root=sys.argv[3] or None)
x, y = train.x[:4000], train.y[:4000]
batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, 4000 - batch + 1, batch)]
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 100), torch.nn.ReLU(),
                               torch.nn.Linear(100, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
kw = {"compile": True} if sys.argv[4] == "1" else {}  # --compile: every learner with compile=True
learners = {"backprop-adam": amstream.Backprop(mlp(), lr=0.003, device="cpu", **kw),
            "am-adam": amstream.AMAdam(mlp(), device="cpu", **kw),
            "am-adam (autograd path)": amstream.AMAdam(mlp(), fast=False, device="cpu", **kw),
            "am-mem": amstream.AMMem(mlp(), device="cpu", **kw)}
cursor = {k: 0 for k in learners}
def run(name, n):
    for _ in range(n):
        bx, by = batches[cursor[name] % len(batches)]
        learners[name].learn(bx, by)
        cursor[name] += 1
print(json.dumps({"file": amstream.__file__, "learners": list(learners)}), flush=True)
for line in sys.stdin:
    name, n = json.loads(line)
    start = time.perf_counter()
    run(name, n)
    print(json.dumps((time.perf_counter() - start) / n * 1e3), flush=True)
"""


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", default="HEAD", help="git revision to compare this working tree with")
    add_option(p, "--threads", HParam(1, "torch CPU threads of each worker", int, "[1, inf)"))
    add_option(p, "--batch-size", HParam(200, "samples per step", int, "[1, inf)"))
    add_option(p, "--rounds", HParam(15, "interleaved timing rounds", int, "[1, inf)"))
    add_option(p, "--steps", HParam(10, "steps per learner, worker and round", int, "[1, inf)"))
    add_option(p, "--warmup", HParam(10, "untimed steps per learner and worker", int, "[0, inf)"))
    p.add_argument("--data-dir", default=None, help="root of the MNIST files (default: AMSTREAM_DATA)")
    p.add_argument("--compile", action="store_true", help="build every learner with compile=True (the warm-up "
                   "steps then include the compilation: give --warmup 3 or more)")
    return p.parse_args(argv)


def start_worker(path: Path, args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(args.threads), str(args.batch_size),
                             args.data_dir or "", "1" if args.compile else "0"], cwd=path, env=env,
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    header = json.loads(proc.stdout.readline())
    if not header["file"].startswith(str(path)):
        raise RuntimeError(f"the worker for {path} imported amstream from {header['file']}")
    return proc


def ask(worker: subprocess.Popen, name: str, n: int) -> float:
    worker.stdin.write(json.dumps([name, n]) + "\n")
    worker.stdin.flush()
    return json.loads(worker.stdout.readline())


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.against], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        revision = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout.strip()
        workers = {"this tree": start_worker(ROOT, args), revision: start_worker(old, args)}
        names = ["backprop-adam", "am-adam", "am-adam (autograd path)", "am-mem"]
        for worker in workers.values():
            for name in names:
                ask(worker, name, max(args.warmup, 1))
        times = {(w, n): [] for w in workers for n in names}
        for _ in range(args.rounds):
            for name in names:
                for label, worker in workers.items():
                    times[(label, name)].append(ask(worker, name, args.steps))
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    print(f"Step time{' (compile=True)' if args.compile else ''}, MNIST 784-100-100-10 MLP, batch {args.batch_size}, "
          f"{args.threads} thread(s) per worker, "
          f"{args.rounds} interleaved rounds x {args.steps} steps (median ms; ratio IQR in brackets)")
    print(f"command: python scripts/bench_compare.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print()
    print(f"| learner | {revision}: ms/step | this tree: ms/step | ratio (this tree / {revision}) |")
    print("|---|---:|---:|---:|")
    for name in names:
        new, old_times = times[("this tree", name)], times[(revision, name)]
        ratios = sorted(a / b for a, b in zip(new, old_times))
        q1, q3 = ratios[len(ratios) // 4], ratios[min(len(ratios) - 1, 3 * len(ratios) // 4)]
        print(f"| {name} | {statistics.median(old_times):.2f} | {statistics.median(new):.2f} | "
              f"{statistics.median(ratios):.2f}x [{q1:.2f}, {q3:.2f}] |")


if __name__ == "__main__":
    main()

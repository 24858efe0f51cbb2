#!/usr/bin/env python
"""Step times of this tree against another revision, side by side in one run.

Two worker processes, one importing ``amstream`` from this working tree and one from a git
revision exported to a temporary folder (``git archive``), build the same learners on the same
784-100-100-10 MLP and MNIST batches. The parent asks them in turn for ``--steps`` timed steps of
each learner, ``--rounds`` times, so both see the same machine conditions; a learner's ratio is the
median of its per-round ratios (this tree / the revision: below 1 is faster). Each learner's MNIST
test accuracy after the same steps on the same batches is printed beside it: a change meant to be
faster, not to learn differently, shows the same number (or one within rounding's reach).

    python scripts/bench_compare.py --against HEAD~1 --threads 1
    python scripts/bench_compare.py --against HEAD~1 --hidden 4096,4096 --batch-size 2048 \
        --learner backprop-adam,am-adam --rounds 3 --steps 1 --warmup 1
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

from _common import CommaList, Parser, add_option, parse_int_list, parse_name_list  # noqa: E402
import amstream  # noqa: E402
from amstream.hparams import HParam  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: the four of section 2's table, then every registered learner by its name (its defaults)
LEARNERS = ["backprop-adam", "am-adam", "am-adam (autograd path)", "am-mem"]
LEARNERS += [name for name in amstream.LEARNERS if name not in LEARNERS]

# The worker uses only what every revision of the API has: the learner classes and their registry,
# learn(), load_mnist.
WORKER = r"""
import json, sys, time, torch
import amstream
from amstream.data import load_mnist
torch.set_num_threads(int(sys.argv[1]))
batch = int(sys.argv[2])
train = load_mnist("train", root=sys.argv[3] or None)
test = load_mnist("test", root=sys.argv[3] or None)
n = max(4000, 2 * batch)
x, y = train.x[:n], train.y[:n]
batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n - batch + 1, batch)]
widths = [784, *json.loads(sys.argv[5])]
sequences = sys.argv[7] == "1"  # --sequences: each image as 28 rows of 28 pixels through an Elman network
if sequences:
    batches = [(bx.reshape(-1, 28, 28), by) for bx, by in batches]
test_x = test.x.reshape(-1, 28, 28) if sequences else test.x
def mlp():
    torch.manual_seed(0)
    if sequences:
        from amstream.models import ElmanRNN
        return ElmanRNN(28, widths[1], 10)
    layers = [torch.nn.Flatten()]
    for d_in, d_out in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(d_in, d_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(widths[-1], 10))
kw = {"compile": True} if sys.argv[4] == "1" else {}  # --compile: every learner with compile=True
makers = {"backprop-adam": lambda: amstream.Backprop(mlp(), lr=0.003, device="cpu", **kw),
          "am-adam": lambda: amstream.AMAdam(mlp(), device="cpu", **kw),
          "am-adam (autograd path)": lambda: amstream.AMAdam(mlp(), fast=False, device="cpu", **kw),
          "am-mem": lambda: amstream.AMMem(mlp(), device="cpu", **kw)}
def make(name):  # any other name: the registered learner with its defaults
    return makers[name]() if name in makers else amstream.LEARNERS[name](mlp(), device="cpu", **kw)
learners = {name: make(name) for name in json.loads(sys.argv[6])}
cursor = {k: 0 for k in learners}
def run(name, n):
    for _ in range(n):
        bx, by = batches[cursor[name] % len(batches)]
        learners[name].learn(bx, by)
        cursor[name] += 1
print(json.dumps({"file": amstream.__file__, "learners": list(learners)}), flush=True)
for line in sys.stdin:
    name, n = json.loads(line)
    if n == "accuracy":  # of the learner's model after its steps, on the MNIST test images
        correct = sum(int((learners[name].predict(test_x[i:i + 1000]).argmax(1) == test.y[i:i + 1000]).sum())
                      for i in range(0, len(test.y), 1000))
        print(json.dumps(100.0 * correct / len(test.y)), flush=True)
        continue
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
    p.add_argument("--hidden", default="100,100", help="hidden widths of the 784-...-10 ReLU MLP (default: 100,100)")
    p.add_argument("--sequences", action="store_true", help="read each image as 28 rows of 28 pixels through an "
                   "Elman network (amstream.models.ElmanRNN) of the first --hidden width: the recurrent learners")
    p.add_argument("--learner", action=CommaList, default=",".join(LEARNERS[:4]),
                   help=f"comma-separated learners to time, from {', '.join(LEARNERS)} (default: the first "
                   "four; the others are the registered learners with their defaults, on the MLP)")
    args = p.parse_args(argv)
    try:
        args.hidden = parse_int_list(args.hidden)
        args.learner = parse_name_list(args.learner, LEARNERS, "learner")
    except ValueError as err:
        p.error(str(err))
    return args


def start_worker(path: Path, args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(args.threads), str(args.batch_size),
                             args.data_dir or "", "1" if args.compile else "0", json.dumps(args.hidden),
                             json.dumps(args.learner), "1" if args.sequences else "0"], cwd=path, env=env,
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    header = json.loads(proc.stdout.readline())
    if not header["file"].startswith(str(path)):
        raise RuntimeError(f"the worker for {path} imported amstream from {header['file']}")
    return proc


def ask(worker: subprocess.Popen, name: str, n: int | str) -> float:
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
        names = args.learner
        for worker in workers.values():
            for name in names:
                ask(worker, name, max(args.warmup, 1))
        times = {(w, n): [] for w in workers for n in names}
        for _ in range(args.rounds):
            for name in names:
                for label, worker in workers.items():
                    times[(label, name)].append(ask(worker, name, args.steps))
        accuracy = {(w, n): ask(workers[w], n, "accuracy") for w in workers for n in names}
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    network = (f"row-sequential Elman network, hidden {args.hidden[0]}" if args.sequences
               else f"{'-'.join(str(w) for w in [784, *args.hidden, 10])} MLP")
    print(f"Step time{' (compile=True)' if args.compile else ''}, MNIST {network}, batch {args.batch_size}, "
          f"{args.threads} thread(s) per worker, "
          f"{args.rounds} interleaved rounds x {args.steps} steps (median ms; ratio IQR in brackets)")
    print(f"command: python scripts/bench_compare.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print()
    print(f"| learner | {revision}: ms/step | this tree: ms/step | ratio (this tree / {revision}) | "
          f"test accuracy after the same steps, {revision} / this tree |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        new, old_times = times[("this tree", name)], times[(revision, name)]
        ratios = sorted(a / b for a, b in zip(new, old_times))
        q1, q3 = ratios[len(ratios) // 4], ratios[min(len(ratios) - 1, 3 * len(ratios) // 4)]
        print(f"| {name} | {statistics.median(old_times):.2f} | {statistics.median(new):.2f} | "
              f"{statistics.median(ratios):.2f}x [{q1:.2f}, {q3:.2f}] | "
              f"{accuracy[(revision, name)]:.2f}% / {accuracy[('this tree', name)]:.2f}% |")


if __name__ == "__main__":
    main()

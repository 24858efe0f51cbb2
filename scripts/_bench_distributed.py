"""The distributed section of ``scripts/bench.py``: throughput against the number of processes.

N worker processes (gloo, one torch thread each, a file rendezvous) train the same learner on the
same MNIST batches of ``--batch-size``, each on its shard (``amstream.distributed.data_parallel``);
the time of ``--distributed-steps`` steps after a warm-up gives samples per second of the whole job,
and rank 0 reports the payload of its collectives per step (all-reduced and gathered buffers).
Speed-ups are ratios to one process run in the same invocation. On a machine with fewer free cores
than processes the ranks share cores and the speed-up says so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[6] + "/scripts")
import amstream
from amstream.data import load_mnist
from amstream.distributed import data_parallel
from _common import build_mlp
rank, world, init, name, batch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
steps, warmup, hidden = int(sys.argv[7]), int(sys.argv[8]), [int(h) for h in sys.argv[9].split(",")]
overlap, settings = sys.argv[11] == "1", json.loads(sys.argv[12])
torch.set_num_threads(1)
if world > 1:
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world)
train = load_mnist("train", root=sys.argv[10] or None)
torch.manual_seed(0)
kwargs = {**({"lr": 0.003} if name == "backprop" else {}), **settings}
learner = amstream.LEARNERS[name](build_mlp((1, 28, 28), hidden, 10), device="cpu", **kwargs)
if world > 1:
    learner = data_parallel(learner, overlap=overlap)
lo, hi = rank * batch // world, (rank + 1) * batch // world
def run(first, n):
    for i in range(first, first + n):
        j = (i * batch) % (len(train) - batch)
        learner.learn(train.x[j + lo:j + hi], train.y[j + lo:j + hi])
run(0, warmup)
if world > 1:
    dist.barrier()
start = time.perf_counter()
before = learner._parallel.bytes_reduced if world > 1 else 0
run(warmup, steps)
if world > 1:
    dist.barrier()
seconds = time.perf_counter() - start
per_step = ((learner._parallel.bytes_reduced - before) / steps) if world > 1 else 0
if rank == 0:
    print(json.dumps({"samples_per_s": steps * batch / seconds, "bytes_per_step": per_step}), flush=True)
if world > 1:
    # The result is out; leave without tearing gloo down: a rank whose peer had already closed its
    # sockets could abort inside destroy_process_group ("terminate called without an active
    # exception", seen once in CI), failing a run that had measured everything.
    sys.stdout.flush()
    dist.barrier()
    os._exit(0)
"""


def distributed_throughput(learners: list[tuple[str, dict]], processes: list[int], *, batch: int, steps: int,
                           warmup: int, hidden: str, data_dir: str | None, overlap: bool = False) -> list[dict]:
    """Samples per second of each learner (name, hyperparameters) on each number of processes, with
    speed-ups over 1; with
    ``overlap``, the runs on several processes also with each layer's all-reduce started as soon as
    its gradient is ready (``data_parallel(..., overlap=True)``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
    rows = []
    for name, settings in learners:
        label = name + "".join(f", {key}={value}" for key, value in settings.items())
        base = None
        runs = [(world, False) for world in processes] + [(world, True) for world in processes if overlap and world > 1]
        for world, overlapped in runs:
            with tempfile.TemporaryDirectory() as tmp:
                init = os.path.join(tmp, "init")
                procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(rank), str(world), init, name, str(batch),
                                           str(ROOT), str(steps), str(warmup), hidden, data_dir or "",
                                           "1" if overlapped else "0", json.dumps(settings)],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                         for rank in range(world)]
                outs = [p.communicate(timeout=1800) for p in procs]
            for p, (_, err) in zip(procs, outs):
                if p.returncode != 0:
                    raise RuntimeError(f"the {name} run on {world} processes failed: {err.strip()[-2000:]}")
            result = json.loads(outs[0][0].strip().splitlines()[-1])
            base = base or result["samples_per_s"]
            rows.append({"learner": label + (" (overlap)" if overlapped else ""), "processes": world, **result,
                         "speedup": result["samples_per_s"] / base})
    return rows

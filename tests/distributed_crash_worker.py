"""One process of the crash test: ``python distributed_crash_worker.py RANK WORLD INIT_FILE OUT``.

Both ranks make an AM-mem learner data-parallel and step on their shards; at the third step rank 1
fails inside the step with an error that is not an input error (as a bug or an out-of-memory would)
and its process exits. Rank 0 must not wait for it until the process group's timeout (10 minutes
here, as torchrun's default): its next collective fails as soon as the peer's connection closes.
"""
from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import amstream
from amstream.distributed import data_parallel
from distributed_worker import batches, mlp


def main(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))
    learner = data_parallel(amstream.AMMem(mlp(), device="cpu"))
    for step, (x, y) in enumerate(batches()):
        if step == 2 and rank == 1:
            def broken(*args, **kwargs):
                raise RuntimeError("a failure inside the step on rank 1")
            learner._fit_hidden_extra = broken  # after the code update's collectives, before the memories'
        half = x.shape[0] // 2
        learner.learn(x[:half], y[:half]) if rank == 0 else learner.learn(x[half:], y[half:])
    torch.save("finished", out)  # never reached: rank 1 fails, rank 0's collective with it fails


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])

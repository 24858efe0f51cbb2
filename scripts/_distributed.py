"""The scripts under ``torchrun``: the process group from the environment, and a learner that learns
its rank's shard of each batch.

``torchrun --nproc-per-node N scripts/stream.py ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init_from_env` joins
them into one process group (gloo on CPUs, NCCL on GPUs, one GPU per local rank). Every rank reads
the whole stream and predicts every batch (their weights are identical, so are their predictions:
the prequential counts, the held-out accuracy and the checkpoints are the same on every rank, with no
communication), and learns only its shard of it (:class:`ShardedLearning`), through a learner made
data-parallel by :func:`amstream.distributed.data_parallel`. Rank 0 alone prints, logs and writes
checkpoints.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from amstream.distributed import data_parallel, is_main_process
from amstream.utils import resolve_device

__all__ = ["ShardedLearning", "init_from_env", "launched_by_torchrun", "make_data_parallel", "say",
           "torchrun_world_size"]


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_world_size() -> int:
    """The number of processes torchrun started, from its environment, before any process group
    exists (so that settings the processes cannot share are refused before anything is loaded)."""
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"--distributed needs torchrun's environment (missing {', '.join(missing)}): start the "
                         "script with torchrun --nproc-per-node N")
    return int(os.environ["WORLD_SIZE"])


def init_from_env(device: str) -> tuple[int, int, torch.device]:
    """Join the process group described by torchrun's environment; ``(rank, world size, device)``.
    ``device="auto"``: the local rank's GPU when there are GPUs, else the CPU."""
    torchrun_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    return dist.get_rank(), dist.get_world_size(), resolved


def say(message: str) -> None:
    """Print on rank 0 only (every process of a distributed run would print the same)."""
    if is_main_process():
        print(message)


def make_data_parallel(learner, processes: int, name: str):
    """``learner`` (registered as ``name``) made data-parallel over the process group when there are
    several processes (as is otherwise); None, after saying why on rank 0, when it cannot be (the
    caller skips it)."""
    if processes == 1:
        return learner
    try:
        return data_parallel(learner)
    except ValueError as err:
        if "cannot be data-parallel" not in str(err):
            raise
        say(f"note: skipping {name}: {err}")
        return None


class ShardedLearning:
    """``learner`` for :func:`amstream.iter_prequential`, learning only this rank's shard of each batch
    (rows ``[r b / N, (r + 1) b / N)`` of a batch of ``b``); predictions are on the whole batch.
    Every batch needs at least one sample per rank (the caller trims the stream's tail)."""

    def __init__(self, learner, rank: int, world_size: int) -> None:
        self.learner, self.rank, self.world_size = learner, rank, world_size

    def __getattr__(self, name):  # predict, _as_sample, _as_label...: the learner's own
        return getattr(self.learner, name)

    def learn(self, x: torch.Tensor, y: torch.Tensor):
        b = x.shape[0]
        if b < self.world_size:
            raise ValueError(f"a batch of {b} samples cannot be shared by {self.world_size} processes")
        lo, hi = self.rank * b // self.world_size, (self.rank + 1) * b // self.world_size
        return self.learner.learn(x[lo:hi], y[lo:hi])

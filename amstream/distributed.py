"""Data parallelism over ``torch.distributed``: N processes, each with a shard of every batch, take
the steps one process would take on the whole batches.

``data_parallel(learner)`` (in every process of an initialized process group: ``torchrun``, the
gloo backend on CPUs, NCCL on GPUs) makes a learner's steps collective:

- Before the step, the processes agree on the batch: each reports whether its shard passed the
  input checks and how many samples it holds (one all-reduce of two numbers). A shard refused on
  one rank raises its :class:`~amstream.validation.InputError` there and a :class:`PeerInputError`
  on the others: every rank leaves the step, none waits for a collective the others never reach.
- Gradients are combined before every optimizer step (a hook on each of the learner's torch
  optimizers): each rank's gradient of its shard's mean loss, weighted by its share of the batch,
  summed over the ranks in one flat all-reduce: exactly the gradient of the whole batch's mean loss.
  This covers backprop, AM-Adam's layer-wise Adam steps and AM-mem's output layer. With
  ``overlap=True``, learners whose layers' gradients are ready one layer at a time (AM-Adam, AM-mem's
  output layer, LocoProp) start each layer's all-reduce in the background as soon as it is computed
  (:meth:`DataParallelContext.start_gradient_reduce`), so that it overlaps the next layer's work;
  the hook then waits for them. That is more, smaller messages: it pays where the links and cores
  have room to spare (NCCL between GPUs), not on a small CPU machine, where gloo's threads compete
  with the computation (BENCHMARKS.md, section 13: slower on 2 vCPUs), hence off by default.
- Alternating minimization's codes are per sample, so each rank updates its own shard's codes; with
  the reference's mean-reduced code objective a code's step depends on the batch size, so the code
  step sizes are scaled by the rank's share of the batch (the step the whole batch would take).
- AM-mem's co-activation memories are sums of per-sample outer products: the increments ``aᵀa`` and
  ``cᵀa`` are all-reduced before the memories move, so every rank solves the same system, the one a
  single process solves on the whole batch. When a layer's memories are larger than the batch's
  inputs and codes (``d_in² + d_out d_in > B (d_in + d_out)``), AM-mem can instead gather the rows
  (:meth:`DataParallelContext.gather_rows`) and update the memories from the whole batch on every
  rank (its ``parallel_memory`` option): less to send, the update's arithmetic repeated everywhere.
- The non-finite rollback is decided together: one rank's NaN rolls back the step on every rank.

Weights, optimizer states and memories stay identical on every rank, so a checkpoint written by one
rank (rank 0: :func:`is_main_process`) resumes on any number of processes. A learner that cannot be
made data-parallel this way says why (:attr:`Learner.data_parallel`) and is refused.

References: alternating minimization's layer-wise independence (Choromanska et al., "Beyond
Backprop", ICML 2019) and the sufficient statistics of online dictionary learning (Mairal et al.,
ICML 2009) are what make the exact reduction possible; the gradient all-reduce is that of
``torch.nn.parallel.DistributedDataParallel`` (Li et al., VLDB 2020).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .validation import InputError

__all__ = ["DataParallelContext", "PeerInputError", "data_parallel", "is_main_process"]


class PeerInputError(InputError):
    """Another rank refused its shard of this batch; this rank's learner is unchanged too."""


def is_main_process() -> bool:
    """True outside a process group and on its rank 0 (the process that writes checkpoints and logs)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class DataParallelContext:
    """The collectives of a data-parallel learner, on ``group`` (default: the world)."""

    def __init__(self, group=None, overlap: bool = False) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("data_parallel needs an initialized torch.distributed process group "
                               "(torchrun, or torch.distributed.init_process_group in every process)")
        self.group, self.overlap = group, overlap
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.share = 1.0  # this rank's samples / the whole batch's, set by agree_on_batch
        self.batch_size = 0  # the whole batch's, over every rank
        self.shard_sizes: list[int] = []  # every rank's samples of the batch, in rank order
        self.bytes_reduced = 0  # collective payload so far (all-reduced buffers, gathered buffers)
        self._pending: list[tuple] = []  # background gradient all-reduces: (work, flat buffer, gradients)
        self.background_reduces = 0  # how many were started (overlapped with the next layer's work)

    def _device(self, tensor_device: torch.device) -> torch.device:
        # gloo reduces CPU tensors; NCCL needs them on the rank's GPU
        return torch.device("cpu") if dist.get_backend(self.group) == "gloo" else tensor_device

    def agree_on_batch(self, ok: bool, n_samples: int, device: torch.device) -> bool:
        """Whether every rank accepted its shard; sets :attr:`share` and :attr:`batch_size`."""
        if self._pending:  # reduces a failed step started and never finished: complete them, drop them
            self._finish_pending()
        flags = torch.tensor([0.0 if ok else 1.0, float(n_samples if ok else 0)], dtype=torch.float64,
                             device=self._device(device))
        gathered = [torch.empty_like(flags) for _ in range(self.world_size)]
        dist.all_gather(gathered, flags, group=self.group)
        self.bytes_reduced += flags.numel() * flags.element_size()
        refused = sum(int(f[0]) for f in gathered)
        if refused == 0:
            self.shard_sizes = [int(f[1]) for f in gathered]
            self.batch_size = sum(self.shard_sizes)
            self.share = n_samples / self.batch_size
        return refused == 0

    def gather_rows(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The whole batch's rows of each per-sample tensor ``(shard, ...)``, the ranks' shards in rank
        order (as one process would hold them): one all-gather of the shards, padded to the largest."""
        dtype = tensors[0].dtype
        if any(t.dtype != dtype for t in tensors):
            raise ValueError("gather_rows takes tensors of one dtype")
        widths = [t[0].numel() if t.shape[0] else math.prod(t.shape[1:]) for t in tensors]
        rows, largest = tensors[0].shape[0], max(self.shard_sizes)
        device = self._device(tensors[0].device)
        flat = torch.zeros(largest, sum(widths), dtype=dtype, device=device)
        flat[:rows] = torch.cat([t.reshape(rows, -1).to(device) for t in tensors], dim=1)
        parts = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(parts, flat, group=self.group)
        self.bytes_reduced += flat.numel() * flat.element_size() * self.world_size  # the gathered buffer
        whole = torch.cat([part[:n] for part, n in zip(parts, self.shard_sizes)]).to(tensors[0].device)
        return [block.reshape(-1, *t.shape[1:]) for block, t in zip(whole.split(widths, dim=1), tensors)]

    def all_true(self, value: bool, device: torch.device) -> bool:
        """True when ``value`` is True on every rank."""
        flag = torch.tensor([1.0 if value else 0.0], device=self._device(device))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        self.bytes_reduced += flag.numel() * flag.element_size()
        return bool(flag.item() == 1.0)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place: one all-reduce of a flat buffer (per dtype)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            device = self._device(group[0].device)
            flat = torch.cat([t.reshape(-1).to(device) for t in group])
            dist.all_reduce(flat, group=self.group)
            self.bytes_reduced += flat.numel() * flat.element_size()
            offset = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t))
                offset += n

    def start_gradient_reduce(self, grads: list[torch.Tensor]) -> None:
        """Begin combining these final gradients (``sum_r share_r * grad_r``) in the background: one
        asynchronous all-reduce, finished by :meth:`combine_gradients` before the optimizer step.
        Every rank must start the same reduces in the same order, and nothing may add to these
        gradients afterwards (a penalty or proximal term is added before, or not at all)."""
        grads = [g for g in grads if g is not None]
        if not grads:
            return
        if self.share != 1.0:
            torch._foreach_mul_(grads, self.share)
        device = self._device(grads[0].device)
        flat = torch.cat([g.reshape(-1).to(device) for g in grads])
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.bytes_reduced += flat.numel() * flat.element_size()
        self.background_reduces += 1
        self._pending.append((work, flat, grads))

    def _finish_pending(self) -> set[int]:
        """Wait for the background reduces and write their results; the ids of the gradients done."""
        done: set[int] = set()
        for work, flat, grads in self._pending:
            work.wait()
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[offset:offset + n].view_as(g))
                offset += n
                done.add(id(g))
        self._pending.clear()
        return done

    def combine_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """The whole batch's gradient from the shards': ``sum_r share_r * grad_r`` (each rank's
        gradient is that of its shard's mean loss); those started in the background are waited for."""
        done = self._finish_pending() if self._pending else ()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None and id(p.grad) not in done]
        if not grads:
            return
        if self.share != 1.0:
            torch._foreach_mul_(grads, self.share)
        self.sum_(grads)


def data_parallel(learner, group=None, *, overlap: bool = False):
    """Make ``learner``'s steps data-parallel over ``group`` (see the module docstring); returns it.
    ``overlap``: start each layer's gradient all-reduce as soon as the layer's gradient is ready
    (layer-wise learners; the results are the same).

    Call it in every process, on learners built alike (same class, hyperparameters and initial
    weights: seed each process the same, or load one checkpoint everywhere). Each process then
    steps on its own shard of every batch.

    Raises:
        RuntimeError: no initialized process group.
        ValueError: a learner that cannot be data-parallel (the reason is its ``data_parallel``).
    """
    reason = learner._data_parallel_refusal()
    if reason is not None:
        raise ValueError(f"{type(learner).__name__} cannot be data-parallel: {reason}")
    if learner._parallel is not None:
        raise ValueError(f"this {type(learner).__name__} is data-parallel already")
    context = DataParallelContext(group, overlap)
    learner._parallel = context
    for optimizer in learner.optimizers():
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: context.combine_gradients(opt))
    return learner

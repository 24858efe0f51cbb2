"""One process of tests/test_distributed.py: ``python distributed_worker.py RANK WORLD INIT_FILE OUT``.

Every rank builds the same learners (same seed), makes them data-parallel over gloo and plays the
script of :func:`script` on its shard of each batch, saving its learners' states after each phase.
The parent plays the same script in one process on the whole batches and compares.
"""
from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

import amstream
from amstream.distributed import PeerInputError, data_parallel
from amstream.models import ElmanRNN
from amstream.validation import InputError

LEARNERS = {"am-mem": {}, "am-adam": {}, "backprop": {"lr": 3e-3}, "locoprop-m": {}, "locoprop-s": {},
            "frank-wolfe": {"lr": 3e-3}, "admm-softmax": {}, "admm-softmax-batch": {"mode": "batch"},
            "am-mem-admm-output": {"output_rule": "admm-softmax"}, "sbpca-power": {"mode": "power"},
            "sbe-power": {"mode": "power", "lr": 0.01}, "am-rnn": {"lr": 1e-2, "lr_out": 3e-2}, "dladmm": {},
            "admm-rnn": {}, "am-adam-overlap": {}, "am-mem-overlap": {}, "locoprop-m-overlap": {},
            "am-mem-gather": {"parallel_memory": "gather"}, "am-mem-reduce": {"parallel_memory": "reduce"}}


def make(name: str, **kwargs):
    """The registered learner ``name``, or a variant named ``<learner>-<what>`` (its kwargs in LEARNERS);
    AM-RNN and ADMMiRNN on an Elman network that reads each sample's 10 features as 5 steps of 2."""
    registered = next(n for n in sorted(amstream.LEARNERS, key=len, reverse=True) if name.startswith(n))
    if registered in ("am-rnn", "admm-rnn"):
        torch.manual_seed(0)
        return amstream.LEARNERS[registered](ElmanRNN(2, 8, 3).double(), device="cpu", **kwargs)
    return amstream.LEARNERS[registered](mlp(), device="cpu", **kwargs)


def inputs(name: str, x: torch.Tensor) -> torch.Tensor:
    """The batch as the learner ``name`` reads it (sequences of 5 steps of 2 features for AM-RNN)."""
    return x.view(x.shape[0], 5, 2) if name.startswith(("am-rnn", "admm-rnn")) else x


def mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3)).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(24, 10, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g))
            for _ in range(8)]


#: (phase, batch index, how the batch is cut between 2 ranks: rank 0 takes rows [:cut])
SCRIPT = [("equal", 0, 12), ("equal", 1, 12), ("equal", 2, 12), ("unequal", 3, 16), ("unequal", 4, 7),
          ("bad-input", 5, 12), ("after-bad-input", 5, 12), ("non-finite", 6, 12), ("after-non-finite", 7, 12)]


def shard(x, y, cut, rank):
    return (x[:cut], y[:cut]) if rank == 0 else (x[cut:], y[cut:])


def main(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    # the variants named <learner>-overlap start each layer's gradient all-reduce as soon as it is ready
    learners = {name: data_parallel(make(name, **kw), overlap=name.endswith("-overlap")) for name, kw in LEARNERS.items()}
    data = batches()
    record: dict = {}
    for phase, index, cut in SCRIPT:
        x, y = shard(*data[index], cut, rank)
        if phase == "bad-input" and rank == 1:
            x = x.clone()
            x[0, 0] = float("nan")
        if phase == "non-finite" and rank == 1:
            x = torch.sign(x) * 1.7e308  # finite inputs whose forward pass overflows on this rank only
        for name, learner in learners.items():
            outcome = "stepped"
            try:
                if phase == "non-finite" and rank == 1 and name.startswith("am-rnn"):
                    # tanh saturates the overflowing inputs; a NaN loss on this rank only instead
                    info = learner.step(inputs(name, x), lambda out: F.cross_entropy(out, y) * float("nan"))
                else:
                    info = learner.learn(inputs(name, x), y)
                outcome = "rolled back" if info.rolled_back else "stepped"
            except PeerInputError:
                outcome = "peer refused"
            except InputError:
                outcome = "refused"
            record[(phase, name)] = (outcome, {k: v.clone() for k, v in learner.model.state_dict().items() if torch.is_tensor(v)},
                                     learner.step_count)
    if rank == 0:
        record["checkpoints"] = {name: learner.state_dict() for name, learner in learners.items()}
        record["background_reduces"] = {name: learner._parallel.background_reduces for name, learner in learners.items()}
        record["bytes"] = {name: learner._parallel.bytes_reduced for name, learner in learners.items()}
    torch.save(record, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])

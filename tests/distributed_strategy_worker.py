"""One process of the AMStrategy data-parallel test: ``python distributed_strategy_worker.py RANK WORLD
INIT_FILE OUT`` (WORLD 1 is the single-process reference, without a process group).

Split digits, two experiences, a float64 MLP, replay, no shuffling (the stored order, sorted by
class: the learners learn little, but the batches are those of one process): each learner trains through
``AMStrategy`` with Avalanche's distributed sampler (``train_mb_size`` = 16 / WORLD per process) and
is evaluated on the whole test stream after each experience. Saves the accuracy matrices, the final
weights and the steps.
"""
from __future__ import annotations

import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import amstream
from amstream.distributed import data_parallel

LEARNERS = ("am-mem", "am-adam", "backprop")
BATCH = 16


def run(name: str, world: int) -> dict:
    from avalanche.core import SupervisedPlugin
    from avalanche.training.plugins import ReplayPlugin

    class Float64(SupervisedPlugin):
        """The digits (float32) as float64 inputs of the float64 model."""

        def before_training_iteration(self, strategy, **kwargs):
            strategy.mbatch[0] = strategy.mbatch[0].double()

        before_eval_iteration = before_training_iteration

    from scenarios.benchmarks import make_benchmark
    from scenarios.metrics import default_cl_evaluator
    from scenarios.strategy import AMStrategy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        benchmark = make_benchmark("split-digits", n_experiences=2, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 10)).double()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    learner = amstream.LEARNERS[name](model, device="cpu")
    if world > 1:
        learner = data_parallel(learner)
    evaluator = default_cl_evaluator(loggers=[])
    strategy = AMStrategy(learner=learner, train_mb_size=BATCH // world, evaluator=evaluator,
                          plugins=[Float64(), ReplayPlugin(mem_size=64)])
    for experience in benchmark.train_stream:
        strategy.train(experience, eval_streams=[], shuffle=False)
        strategy.eval(benchmark.test_stream)
    return {"matrix": evaluator.accuracy_matrix.tolist(), "steps": learner.step_count, "initial": initial,
            "weights": {k: v.clone() for k, v in model.state_dict().items()}}


def main(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        import scenarios.strategy  # noqa: F401  (Avalanche makes loggers at import: before the group exists)

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
    torch.save({name: run(name, world) for name in LEARNERS}, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])

"""Data parallelism (amstream.distributed): 2 processes on gloo, each with a shard of every batch,
end exactly where one process ends on the whole batches (float64), agree on bad input and on
rollbacks without hanging, and write a checkpoint that resumes in one process.

The two ranks run ``tests/distributed_worker.py`` as subprocesses; the timeout is the test's (a
hung collective fails the test instead of blocking the suite).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import amstream
from amstream.distributed import data_parallel, is_main_process

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

HERE = Path(__file__).parent


def _spawn_ranks(script: str, tmp: Path, world: int, timeout: float, hung: str) -> tuple[list, list]:
    """Start ``script RANK WORLD INIT_FILE OUT`` as ``world`` processes and wait for them (the test
    fails with ``hung`` after ``timeout`` seconds); the processes and their (stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    procs = [subprocess.Popen([sys.executable, str(HERE / script), str(rank), str(world),
                               str(tmp / "init"), str(tmp / f"rank{rank}.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(world)]
    try:
        return procs, [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(hung)


def _run_ranks(script: str, tmp: Path, world: int = 2) -> list:
    """Run ``script RANK WORLD INIT_FILE OUT`` as ``world`` processes; their saved records."""
    procs, outputs = _spawn_ranks(script, tmp, world, 240,
                                  "the data-parallel ranks did not finish within 240 s: a collective hung")
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The two ranks' records (one run of the worker script for every test of this module)."""
    return _run_ranks("distributed_worker.py", tmp_path_factory.mktemp("dist"))


@pytest.mark.slow
def test_avalanche_strategy_on_two_ranks_learns_what_one_process_learns(tmp_path):
    """AMStrategy under a process group: Avalanche's distributed sampler shards each experience (and
    the replay buffer), the data-parallel learners combine the shards (8 + 8 samples per step against
    one process's 16), every rank evaluates the whole test stream: the same weights (float64, up to
    the order of sums) and the same accuracy matrices on both ranks as one process."""
    import distributed_strategy_worker as strategy_worker

    two = _run_ranks("distributed_strategy_worker.py", tmp_path)
    for name in strategy_worker.LEARNERS:
        one = strategy_worker.run(name, world=1)
        assert one["steps"] > 50
        for rank in two:
            assert rank[name]["steps"] == one["steps"] and rank[name]["matrix"] == one["matrix"], name
            assert _max_difference(rank[name]["weights"], one["weights"]) < 1e-9, name
        assert _max_difference(one["weights"], one["initial"]) > 1e-2, name  # the steps moved the weights


def single_process_records() -> dict:
    """The same script in one process on the whole batches (refused and rolled-back steps change
    nothing, so they are skipped)."""
    learners = {name: worker.make(name, **kw) for name, kw in worker.LEARNERS.items()}
    data = worker.batches()
    record = {}
    for phase, index, _ in worker.SCRIPT:
        for name, learner in learners.items():
            if phase not in ("bad-input", "non-finite"):
                x, y = data[index]
                learner.learn(worker.inputs(name, x), y)
            record[(phase, name)] = ({k: v.clone() for k, v in learner.model.state_dict().items() if torch.is_tensor(v)},
                                     learner.step_count)
    return record, learners


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if torch.is_tensor(a[k]))


@pytest.mark.parametrize("name", list(worker.LEARNERS))
def test_two_ranks_with_shards_end_where_one_process_ends_on_whole_batches(ranks, name):
    reference, _ = single_process_records()
    for phase, _, cut in worker.SCRIPT:
        expected, steps = reference[(phase, name)]
        for rank, record in enumerate(ranks):
            outcome, state, rank_steps = record[(phase, name)]
            assert rank_steps == steps, (phase, rank)
            # exact but for the order of floating-point sums (float64): shards of 12/12, 16/8, 7/17
            assert _max_difference(state, expected) < 1e-9, (phase, rank, outcome)


def test_layer_wise_learners_overlap_their_gradient_reduces_when_asked(ranks):
    """With overlap=True, AM-Adam (every layer), AM-mem (its Adam output layer) and LocoProp start
    each layer's all-reduce as soon as its gradient is ready (the exactness tests above run the
    "-overlap" variants through that path); by default, and for backprop, whose gradients come out
    of one backward pass, they are combined at the optimizer step."""
    started = ranks[0]["background_reduces"]
    steps = sum(1 for phase, _, _ in worker.SCRIPT if phase != "bad-input")  # the steps that reach the fit
    assert started["am-adam-overlap"] == 3 * steps  # three layers per step
    assert started["am-mem-overlap"] == steps  # the output layer
    assert started["locoprop-m-overlap"] > 0
    assert all(started[name] == 0 for name in started if not name.endswith("-overlap"))


def test_am_mem_gathers_rows_or_reduces_memories_whichever_sends_less(ranks):
    """parallel_memory="gather" sends the batch's inputs and codes (B (d_in + d_out) floats per layer)
    instead of the memory increments (d_in (d_in + d_out)); both give one process's weights (the
    exactness test above runs "am-mem-gather" and "am-mem-reduce"). In this small network the batch
    (24) is larger than every layer's input (11, 17 with the bias): the default, "auto", reduces."""
    sent = ranks[0]["bytes"]
    assert sent["am-mem-gather"] > sent["am-mem-reduce"] == sent["am-mem"]


@pytest.mark.parametrize("name", list(worker.LEARNERS))
def test_bad_input_on_one_rank_stops_the_step_on_both_without_hanging(ranks, name):
    assert ranks[1][("bad-input", name)][0] == "refused"  # its own InputError
    assert ranks[0][("bad-input", name)][0] == "peer refused"  # PeerInputError: no rank waits
    assert ranks[0][("after-bad-input", name)][0] == ranks[1][("after-bad-input", name)][0] == "stepped"


@pytest.mark.parametrize("name", list(worker.LEARNERS))
def test_one_ranks_non_finite_step_rolls_back_every_rank(ranks, name):
    for record in ranks:
        outcome, state, _ = record[("non-finite", name)]
        assert outcome == "rolled back"
        assert _max_difference(state, record[("after-bad-input", name)][1]) == 0.0  # exactly as before
    assert ranks[0][("after-non-finite", name)][0] == "stepped"


@pytest.mark.parametrize("name", list(worker.LEARNERS))
def test_a_checkpoint_of_two_ranks_resumes_in_one_process(ranks, name):
    _, reference = single_process_records()
    resumed = worker.make(name, **worker.LEARNERS[name])
    resumed.load_state_dict(ranks[0]["checkpoints"][name])
    x, y = worker.batches()[0]
    reference[name].learn(worker.inputs(name, x), y)
    resumed.learn(worker.inputs(name, x), y)
    assert _max_difference(resumed.model.state_dict(), reference[name].model.state_dict()) < 1e-9


def test_a_rank_that_fails_mid_step_ends_the_job_instead_of_hanging_it(tmp_path):
    """Not an input error: rank 1 raises inside its step and exits; rank 0, in the step's next
    collective, fails within seconds (gloo sees the closed connection) instead of waiting for the
    10-minute process-group timeout. Under torchrun the agent then stops every process."""
    procs, outputs = _spawn_ranks("distributed_crash_worker.py", tmp_path, 2, 120,
                                  "rank 0 kept waiting for the failed rank 1")
    assert procs[1].returncode != 0 and "a failure inside the step on rank 1" in outputs[1][1]
    assert procs[0].returncode != 0 and not (tmp_path / "rank0.pt").exists()
    assert "Connection closed by peer" in outputs[0][1] or "Connection reset" in outputs[0][1], outputs[0][1][-2000:]


def test_learners_that_cannot_be_data_parallel_say_why(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert is_main_process()
        with pytest.raises(ValueError, match="SBE cannot be data-parallel: with mode='stream' its recursion"):
            data_parallel(amstream.LEARNERS["sbe"](worker.mlp(), device="cpu"))
        with pytest.raises(ValueError, match="step_size='backtracking' evaluates the batch's objective"):
            data_parallel(amstream.DLADMM(worker.mlp(), device="cpu", step_size="backtracking"))
        with pytest.raises(ValueError, match="same_batch=True its inner steps re-evaluate the batch"):
            data_parallel(amstream.LEARNERS["frank-wolfe"](worker.mlp(), device="cpu", same_batch=True))
        bn = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        with pytest.raises(ValueError, match="BatchNorm's batch statistics would be each shard's"):
            data_parallel(amstream.AMAdam(bn, device="cpu"))
        learner = data_parallel(amstream.AMAdam(worker.mlp(), device="cpu"))
        with pytest.raises(ValueError, match="data-parallel already"):
            data_parallel(learner)
    finally:
        dist.destroy_process_group()


def test_data_parallel_needs_a_process_group():
    with pytest.raises(RuntimeError, match="needs an initialized torch.distributed process group"):
        data_parallel(amstream.AMAdam(worker.mlp(), device="cpu"))


def test_a_continual_checkpoint_needs_every_process_to_hold_the_same_state(tmp_path):
    """continual.py under torchrun: rank 0 writes one checkpoint for all processes, so before writing
    every process compares digests of each plugin's state, the clock, the metrics and the RNG; a
    plugin whose state differs on one rank stops every rank (none left waiting), naming it alone."""
    results = _run_ranks("distributed_agreement_worker.py", tmp_path)
    for message in results:
        assert "plugin RWalkPlugin differ(s) across the 2 processes" in message, message
        assert "ReplayPlugin" not in message and "clock" not in message

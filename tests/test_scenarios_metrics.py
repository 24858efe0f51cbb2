"""scenarios.metrics: forgetting/BWT on online streams, the accuracy matrix, the default evaluator."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

avalanche = pytest.importorskip("avalanche")  # a declared dependency: present wherever the suite runs

from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from amstream import AMMem  # noqa: E402
from scenarios.benchmarks import online, split_digits  # noqa: E402
from scenarios.metrics import (  # noqa: E402
    AccuracyMatrix,
    average_accuracy,
    backward_transfer,
    default_cl_evaluator,
    forgetting,
    online_bwt_metrics,
    online_forgetting_metrics,
    original_experience_id,
)
from scenarios.strategy import AMStrategy  # noqa: E402

N_EXP = 5
SF, SB = "StreamForgetting/eval_phase/test_stream", "StreamBWT/eval_phase/test_stream"


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def benchmark():
    return split_digits(N_EXP, seed=0)


def quiet_evaluator(*metrics):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No loggers specified"
        return EvaluationPlugin(*metrics, loggers=[])


def run(benchmark, is_online, metrics, n_exp=N_EXP):
    """Train AM-mem on the first n_exp experiences (online: sub-experiences of 32 samples),
    evaluating on the test stream after each original experience."""
    torch.manual_seed(0)
    matrix = AccuracyMatrix()
    evaluator = quiet_evaluator(accuracy_metrics(experience=True, stream=True), *metrics, matrix)
    strategy = AMStrategy(learner=AMMem(mlp(), device="cpu"), train_mb_size=16, eval_mb_size=512,
                          evaluator=evaluator, eval_every=-1)
    results = []
    for exp in benchmark.train_stream[:n_exp]:
        if is_online:
            strategy.train(online(exp, experience_size=32), eval_streams=[])
        else:
            strategy.train(exp, eval_streams=[])
        results.append(strategy.eval(benchmark.test_stream))
    return results, evaluator, matrix


@pytest.fixture(scope="module")
def online_avalanche(benchmark):
    return run(benchmark, True, [forgetting_metrics(experience=True, stream=True),
                                 bwt_metrics(experience=True, stream=True)])


@pytest.fixture(scope="module")
def online_ours(benchmark):
    return run(benchmark, True, [online_forgetting_metrics(), online_bwt_metrics()])


def by_prefix(results: dict, prefix: str) -> dict:
    return {k: v for k, v in results.items() if k.startswith(prefix)}


def test_avalanche_forgetting_is_empty_on_online_streams(online_avalanche):
    """Upstream bug ContinualAI/avalanche#1343: the trained id is the sub-experience index, which
    never matches a test experience, so no initial accuracy is recorded: no per-experience values,
    stream values stuck at 0. This is why online_forgetting_metrics exists."""
    results, evaluator, _ = online_avalanche
    for res in results:
        assert not by_prefix(res, "ExperienceForgetting/") and not by_prefix(res, "ExperienceBWT/")
        assert res[SF] == 0.0 and res[SB] == 0.0
    assert not [k for k in evaluator.get_all_metrics() if k.startswith(("ExperienceForgetting", "ExperienceBWT"))]


def test_online_forgetting_reports_positive_forgetting(online_ours):
    results, _, _matrix = online_ours
    final = results[-1]
    exp_forgetting = by_prefix(final, "ExperienceForgetting/eval_phase/test_stream/Task000/Exp")
    # every experience trained before the last one has a value, the last one has none
    assert sorted(k[-3:] for k in exp_forgetting) == [f"{j:03d}" for j in range(N_EXP - 1)]
    assert all(v > 0.1 for v in exp_forgetting.values())  # class-incremental, no replay: forgets
    assert final[SF] > 0.4
    assert final[SB] == pytest.approx(-final[SF])
    for j in range(N_EXP - 1):
        assert final[f"ExperienceBWT/eval_phase/test_stream/Task000/Exp{j:03d}"] == pytest.approx(
            -exp_forgetting[f"ExperienceForgetting/eval_phase/test_stream/Task000/Exp{j:03d}"])
    assert results[0][SF] == 0.0  # after the first experience there is nothing to forget yet
    assert not by_prefix(results[0], "ExperienceForgetting/")


def test_accuracy_matrix_on_online_stream(online_ours):
    results, evaluator, matrix = online_ours
    R = matrix.matrix
    assert R.shape == (N_EXP, N_EXP) and not torch.isnan(R).any()
    assert matrix.tolist() == R.tolist() and torch.equal(matrix.result(), R)
    assert (R.diagonal() > 0.85).all()  # AM-mem learns each new experience from one online pass
    assert (R.triu(1) == 0).all()  # class-incremental: unseen classes are never predicted
    for i, res in enumerate(results):  # row i = the per-experience accuracies after experience i
        for j in range(N_EXP):
            assert R[i, j] == pytest.approx(res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"], abs=1e-6)
    # published to the loggers once per evaluation, the last value being the final matrix
    _xs, values = evaluator.get_all_metrics()["AccuracyMatrix/eval_phase/test_stream"]
    assert len(values) == N_EXP and torch.equal(values[-1], R) and values[0].shape == (1, N_EXP)


def test_helpers_agree_with_the_evaluator(online_ours, benchmark):
    results, _, matrix = online_ours
    R, final = matrix.matrix, results[-1]
    sizes = [len(exp.dataset) for exp in benchmark.test_stream]
    accs = [final[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] for j in range(N_EXP)]
    assert average_accuracy(R) == pytest.approx(sum(accs) / N_EXP, abs=1e-6)
    assert average_accuracy(R, weights=sizes) == pytest.approx(
        final["Top1_Acc_Stream/eval_phase/test_stream/Task000"], abs=1e-6)
    assert backward_transfer(R) == pytest.approx(final[SB], abs=1e-6)
    assert backward_transfer(R) == pytest.approx(-final[SF], abs=1e-6)
    # Chaudhry's max-based forgetting equals Avalanche's when the best accuracy is the diagonal's
    assert torch.equal(R[:-1, :-1].max(dim=0).values, R.diagonal()[:-1])
    assert forgetting(R) == pytest.approx(final[SF], abs=1e-6)
    for i in range(1, N_EXP):  # and after every intermediate experience too
        assert backward_transfer(R[:i + 1]) == pytest.approx(results[i][SB], abs=1e-6)


def test_batch_stream_matches_avalanche(benchmark):
    """On batch (non-online) streams ours emit exactly Avalanche's names and values."""
    metrics = {"avalanche": [forgetting_metrics(experience=True, stream=True), bwt_metrics(experience=True, stream=True)],
               "ours": [online_forgetting_metrics(), online_bwt_metrics()]}
    runs = {label: run(benchmark, False, m, n_exp=3) for label, m in metrics.items()}
    ava, ours = (runs[k][1].get_all_metrics() for k in ("avalanche", "ours"))
    keys = {k for k in ava if "Forgetting" in k or "BWT" in k}
    assert keys == {k for k in ours if "Forgetting" in k or "BWT" in k}
    assert "ExperienceForgetting/eval_phase/test_stream/Task000/Exp000" in keys
    for k in keys:
        assert ava[k] == ours[k], k
    assert runs["ours"][1].get_last_metrics()[SF] > 0.15  # the values are not trivially zero
    torch.testing.assert_close(runs["ours"][2].matrix, runs["avalanche"][2].matrix)


def test_helpers_on_a_hand_made_matrix():
    R = [[0.9, 0.0, 0.0],
         [0.6, 0.8, 0.0],
         [0.7, 0.5, 0.95]]
    assert average_accuracy(R) == pytest.approx((0.7 + 0.5 + 0.95) / 3)
    assert average_accuracy(R, weights=[1, 1, 2]) == pytest.approx((0.7 + 0.5 + 1.9) / 4)
    assert backward_transfer(R) == pytest.approx(((0.7 - 0.9) + (0.5 - 0.8)) / 2)  # -0.25
    assert forgetting(R) == pytest.approx(((0.9 - 0.7) + (0.8 - 0.5)) / 2)  # 0.25
    # the max over earlier rows, not the diagonal: experience 0 peaked after training 1
    R2 = [[0.5, 0.1, 0.0], [0.8, 0.9, 0.0], [0.6, 0.9, 0.7]]
    assert forgetting(R2) == pytest.approx(((0.8 - 0.6) + (0.9 - 0.9)) / 2)  # 0.1
    assert backward_transfer(R2) == pytest.approx(((0.6 - 0.5) + (0.9 - 0.9)) / 2)  # 0.05
    assert forgetting(torch.tensor(R2)) == pytest.approx(0.1)
    assert forgetting([[0.9, 0.1]]) == backward_transfer([[0.9, 0.1]]) == 0.0
    assert average_accuracy([[0.5, float("nan")]]) == 0.5
    with pytest.raises(ValueError):
        forgetting([[0.9], [0.5]])  # fewer columns than rows
    with pytest.raises(ValueError):
        backward_transfer([0.9, 0.5])


def test_original_experience_id(benchmark):
    exp = benchmark.train_stream[2]
    assert original_experience_id(exp) == 2
    subs = list(online(exp, experience_size=64))
    assert [s.current_experience for s in subs[:2]] == [0, 1]  # the sub-experience index
    assert {original_experience_id(s) for s in subs} == {2}
    assert {original_experience_id(s.train()) for s in subs} == {2}


def test_default_cl_evaluator(benchmark, tmp_path):
    from avalanche.logging import TensorboardLogger

    evaluator = default_cl_evaluator(loggers=[TensorboardLogger(tb_log_dir=str(tmp_path))], online=True)
    assert isinstance(evaluator.accuracy_matrix, AccuracyMatrix)
    strategy = AMStrategy(learner=AMMem(mlp(), device="cpu"), train_mb_size=16, eval_mb_size=512,
                          evaluator=evaluator)
    for exp in benchmark.train_stream[:2]:
        strategy.train(online(exp, experience_size=64), eval_streams=[])
        results = strategy.eval(benchmark.test_stream[:2])
    for name in ("Top1_Acc_Stream/eval_phase/test_stream/Task000", "Loss_Stream/eval_phase/test_stream/Task000",
                 "ExperienceForgetting/eval_phase/test_stream/Task000/Exp000", SF, SB,
                 "Time_Stream/eval_phase/test_stream/Task000", "Time_Epoch/train_phase/train_online_stream/Task000",
                 "AccuracyMatrix/eval_phase/test_stream", "Top1_Acc_Epoch/train_phase/train_online_stream/Task000"):
        assert name in results, name
    assert evaluator.accuracy_matrix.matrix.shape == (2, 2)
    assert results[SF] > 0
    assert list(tmp_path.glob("events.out.tfevents.*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = default_cl_evaluator(loggers=[])  # quiet: no "No loggers specified" warning
    assert {type(m).__name__ for m in batch.metrics} >= {"ExperienceForgetting", "StreamBWT", "AccuracyMatrix"}

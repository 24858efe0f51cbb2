"""Continual-learning metrics that also work on online streams, and a ready-made evaluator.

Avalanche 0.6.0's forgetting and BWT metrics come out empty on online streams (upstream issue
ContinualAI/avalanche#1343): ``GenericExperienceForgetting.before_training_exp`` stores
``strategy.experience.current_experience`` as the trained experience id, and for an
``OnlineCLExperience`` that is the sub-experience's index in the online stream, which never matches
a test experience id, so the "initial" accuracy of an experience is never recorded. The metrics here
key on ``origin_experience.current_experience`` (the original experience id) instead, and are
otherwise Avalanche's own classes (same names, so the same TensorBoard tags).

- :func:`online_forgetting_metrics`, :func:`online_bwt_metrics`: drop-in replacements for
  Avalanche's ``forgetting_metrics`` / ``bwt_metrics``.
- :class:`AccuracyMatrix`: ``R[i][j]`` = accuracy on test experience ``j`` after training (original)
  experience ``i``, with :func:`average_accuracy`, :func:`forgetting` and :func:`backward_transfer`
  (from :mod:`amstream.metrics`, re-exported here).
- :func:`default_cl_evaluator`: accuracy, loss, forgetting, BWT, the accuracy matrix and timing.

Timing uses Avalanche's own ``timing_metrics`` (train epoch time; eval experience and stream time).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from avalanche.evaluation.metric_definitions import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import phase_and_task, stream_type
from avalanche.evaluation.metrics import (
    Accuracy,
    ExperienceBWT,
    ExperienceForgetting,
    StreamBWT,
    StreamForgetting,
    accuracy_metrics,
    bwt_metrics,
    forgetting_metrics,
    loss_metrics,
    timing_metrics,
)
from avalanche.logging import InteractiveLogger
from avalanche.training.plugins import EvaluationPlugin

from amstream.metrics import average_accuracy, backward_transfer, forgetting

__all__ = [
    "AccuracyMatrix", "OnlineExperienceBWT", "OnlineExperienceForgetting", "OnlineStreamBWT",
    "OnlineStreamForgetting", "average_accuracy", "backward_transfer", "default_cl_evaluator",
    "forgetting", "online_bwt_metrics", "online_forgetting_metrics", "original_experience_id",
]


def original_experience_id(experience: Any) -> int:
    """The id of the original experience that ``experience`` comes from.

    Args:
        experience: An Avalanche experience; an ``OnlineCLExperience`` (which has an
            ``origin_experience``) or any batch experience.

    Returns:
        ``experience.origin_experience.current_experience`` for an online sub-experience,
        ``experience.current_experience`` otherwise.
    """
    try:
        origin = experience.origin_experience
    except (AttributeError, ValueError):  # ValueError: Avalanche's MaskedAttributeError
        origin = None
    return (origin if origin is not None else experience).current_experience


class _OriginKeyed:
    """Mixin for Avalanche's forgetting/BWT metrics: the trained experience is the original one."""

    def before_training_exp(self, strategy) -> None:
        assert strategy.experience is not None
        self.train_exp_id = original_experience_id(strategy.experience)


class OnlineExperienceForgetting(_OriginKeyed, ExperienceForgetting):
    """Avalanche's ``ExperienceForgetting``, keyed on the original training experience."""


class OnlineStreamForgetting(_OriginKeyed, StreamForgetting):
    """Avalanche's ``StreamForgetting``, keyed on the original training experience."""


class OnlineExperienceBWT(_OriginKeyed, ExperienceBWT):
    """Avalanche's ``ExperienceBWT``, keyed on the original training experience."""


class OnlineStreamBWT(_OriginKeyed, StreamBWT):
    """Avalanche's ``StreamBWT``, keyed on the original training experience."""


def online_forgetting_metrics(experience: bool = True, stream: bool = True) -> list[PluginMetric]:
    """Forgetting metrics that work on online (and batch) streams.

    Same names and values as Avalanche's ``forgetting_metrics`` on batch streams
    (``ExperienceForgetting/eval_phase/test_stream/Task000/Exp000``,
    ``StreamForgetting/eval_phase/test_stream``): accuracy when the experience was last trained
    minus current accuracy, for test experiences trained before the last training experience.

    Args:
        experience: Include the per-experience forgetting.
        stream: Include the forgetting averaged over the stream.

    Returns:
        A list of plugin metrics for an ``EvaluationPlugin``.
    """
    return ([OnlineExperienceForgetting()] if experience else []) + (
        [OnlineStreamForgetting()] if stream else [])


def online_bwt_metrics(experience: bool = True, stream: bool = True) -> list[PluginMetric]:
    """Backward-transfer metrics (``-forgetting``) that work on online (and batch) streams.

    Args:
        experience: Include the per-experience BWT (``ExperienceBWT/...``).
        stream: Include the BWT averaged over the stream (``StreamBWT/...``).

    Returns:
        A list of plugin metrics for an ``EvaluationPlugin``.
    """
    return ([OnlineExperienceBWT()] if experience else []) + (
        [OnlineStreamBWT()] if stream else [])


class AccuracyMatrix(PluginMetric[torch.Tensor]):
    """Accuracy matrix ``R[i][j]``: accuracy on eval experience ``j`` after training experience ``i``.

    Rows are keyed by the ORIGINAL id of the last training experience (so an online stream's
    sub-experiences all fill the row of their original experience), columns by the eval experience
    id. Only evaluations on the stream named ``stream_name`` are recorded; an evaluation before any
    training is ignored; a later evaluation after the same training experience overwrites the row.
    After each such evaluation the matrix is emitted as a tensor under
    ``AccuracyMatrix/eval_phase/<stream>_stream`` (TensorBoard shows it as a histogram).

    Unlike Avalanche's ``AccuracyMatrixPluginMetric`` (rows = number of ``train()`` calls, every
    eval stream written into the same matrix), rows follow the experience ids, so it is right both
    for ``strategy.train(bm.train_stream)`` and for one ``train(online(exp, n))`` call per experience.

    Args:
        stream_name: The eval stream to record (``"test"`` for ``bm.test_stream``).
    """

    def __init__(self, stream_name: str = "test") -> None:
        super().__init__()
        self.stream_name = stream_name
        self._accuracy = Accuracy()
        self._train_exp_id: int | None = None
        self._rows: dict[int, dict[int, float]] = {}

    def reset(self) -> None:
        """Forget every recorded accuracy (and the last training experience)."""
        self._accuracy.reset()
        self._train_exp_id = None
        self._rows = {}

    def result(self) -> torch.Tensor:
        """The matrix (see :attr:`matrix`)."""
        return self.matrix

    @property
    def matrix(self) -> torch.Tensor:
        """``R`` as a float64 tensor of shape (last trained id + 1, largest eval id + 1); cells
        never measured (e.g. rows of experiences not evaluated after) are NaN."""
        if not self._rows:
            return torch.empty(0, 0, dtype=torch.float64)
        n_cols = 1 + max(j for row in self._rows.values() for j in row)
        R = torch.full((1 + max(self._rows), n_cols), float("nan"), dtype=torch.float64)
        for i, row in self._rows.items():
            for j, acc in row.items():
                R[i, j] = acc
        return R

    def tolist(self) -> list[list[float]]:
        """``R`` as a nested list."""
        return self.matrix.tolist()

    def _recording(self, strategy) -> bool:
        return self._train_exp_id is not None and stream_type(strategy.experience) == self.stream_name

    def before_training_exp(self, strategy) -> None:
        self._train_exp_id = original_experience_id(strategy.experience)

    def before_eval_exp(self, strategy) -> None:
        self._accuracy.reset()

    def after_eval_iteration(self, strategy) -> None:
        super().after_eval_iteration(strategy)
        if self._recording(strategy):
            self._accuracy.update(strategy.mb_output, strategy.mb_y)

    def after_eval_exp(self, strategy) -> None:
        if self._recording(strategy):
            row = self._rows.setdefault(self._train_exp_id, {})
            row[strategy.experience.current_experience] = float(self._accuracy.result())

    def after_eval(self, strategy) -> list[MetricValue] | None:
        if not self._recording(strategy) or self._train_exp_id not in self._rows:
            return None
        phase, _ = phase_and_task(strategy)
        name = f"{self}/{phase}_phase/{self.stream_name}_stream"
        return [MetricValue(self, name, self.matrix, strategy.clock.train_iterations)]

    def __str__(self) -> str:
        return "AccuracyMatrix"


def default_cl_evaluator(loggers: Sequence[Any] | None = None, online: bool = False) -> EvaluationPlugin:
    """An ``EvaluationPlugin`` with the usual continual-learning metrics.

    Metrics: accuracy and loss (train epoch, eval experience and stream), forgetting and BWT
    (experience and stream; :func:`online_forgetting_metrics` / :func:`online_bwt_metrics` when
    ``online``, Avalanche's own otherwise: on batch streams both give the same values), an
    :class:`AccuracyMatrix` on the test stream, and Avalanche's ``timing_metrics`` (train epoch
    time, eval experience and stream time). On an online stream each sub-experience is one epoch.

    Args:
        loggers: Avalanche loggers; ``None`` gives an ``InteractiveLogger``, ``[]`` logs nothing
            (without Avalanche's "No loggers specified" warning).
        online: Whether the strategy trains on online sub-experiences (``scenarios.benchmarks.online``).

    Returns:
        The evaluator; its :class:`AccuracyMatrix` is ``evaluator.accuracy_matrix``.
    """
    forgetting_factory, bwt_factory = ((online_forgetting_metrics, online_bwt_metrics) if online
                                       else (forgetting_metrics, bwt_metrics))
    matrix = AccuracyMatrix()
    metrics = [
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True, experience=True, stream=True),
        forgetting_factory(experience=True, stream=True),
        bwt_factory(experience=True, stream=True),
        matrix,
        timing_metrics(epoch=True, experience=True, stream=True),
    ]
    loggers = [InteractiveLogger()] if loggers is None else list(loggers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        evaluator = EvaluationPlugin(*metrics, loggers=loggers)
    evaluator.accuracy_matrix = matrix
    return evaluator

"""Summaries of a score matrix ``R``: ``R[i][j]`` = score on task ``j`` after training on task ``i``.

The score is whatever the caller measures: accuracy for supervised continual learning
(``scenarios.metrics.AccuracyMatrix``), the mean evaluation return for a sequence of reinforcement
learning tasks (``agents.tasks``). Torch only, so every layer of the toolkit can use them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["average_accuracy", "backward_transfer", "forgetting"]


def _as_matrix(R: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
    R = torch.as_tensor(R, dtype=torch.float64)
    if R.dim() != 2 or R.shape[0] < 1 or R.shape[1] < R.shape[0]:
        raise ValueError(f"R must be a (T, >= T) matrix of scores, got shape {tuple(R.shape)}")
    return R


def average_accuracy(R: torch.Tensor | Sequence[Sequence[float]],
                     weights: Sequence[float] | None = None) -> float:
    """Average accuracy after the last training experience: the mean of the last row of ``R``.

    ``ACC`` of Lopez-Paz & Ranzato (2017), "Gradient Episodic Memory for Continual Learning";
    ``A_T`` of Chaudhry et al. (2018), "Riemannian Walk for Incremental Learning". NaN cells are
    skipped. With ``weights`` (e.g. the test experiences' sizes) it is the pooled accuracy over
    the whole test stream, Avalanche's ``Top1_Acc_Stream``.

    Args:
        R: The score matrix, ``R[i][j]`` = score (accuracy, return) on task ``j`` after training ``i``.
        weights: Optional weight of each column.

    Returns:
        The (weighted) mean of ``R[-1]``.
    """
    last = _as_matrix(R)[-1]
    w = torch.ones_like(last) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    known = ~torch.isnan(last)
    return float((last[known] * w[known]).sum() / w[known].sum())


def forgetting(R: torch.Tensor | Sequence[Sequence[float]]) -> float:
    """Average forgetting of Chaudhry et al. (2018), "Riemannian Walk for Incremental Learning".

    ``F = mean_{j < T-1} (max_{i < T-1} R[i][j] - R[T-1][j])`` with ``T`` the number of rows: the
    drop from the best accuracy ever reached on ``j`` to the final one. It equals ``-BWT`` (and
    Avalanche's ``StreamForgetting``) when every ``max`` is reached on the diagonal.

    Args:
        R: The score matrix (T rows, at least T columns).

    Returns:
        The average forgetting; 0.0 for a single row.
    """
    R = _as_matrix(R)
    T = R.shape[0]
    if T < 2:
        return 0.0
    best = R[:T - 1, :T - 1].nan_to_num(float("-inf")).max(dim=0).values
    return float((best - R[T - 1, :T - 1]).mean())


def backward_transfer(R: torch.Tensor | Sequence[Sequence[float]]) -> float:
    """Backward transfer of Lopez-Paz & Ranzato (2017), "Gradient Episodic Memory for CL".

    ``BWT = mean_{j < T-1} (R[T-1][j] - R[j][j])``: negative when the model forgets. This is what
    Avalanche's ``StreamBWT`` reports after the last training experience (and ``-StreamForgetting``).

    Args:
        R: The score matrix (T rows, at least T columns).

    Returns:
        The backward transfer; 0.0 for a single row.
    """
    R = _as_matrix(R)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float((R[T - 1, :T - 1] - R.diagonal()[:T - 1]).mean())

"""Boundary checks for learner inputs: every problem becomes a ``ValueError`` that names it.

The checks run before a learner touches any state, so a rejected batch leaves the learner exactly
as it was. Each costs at most one host sync per batch (never inside the inner loops).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["InputError", "check_inputs", "check_batchnorm_batch", "check_targets", "is_classification_criterion"]


class InputError(ValueError):
    """A batch, a sample or a label was rejected; the learner's state is unchanged."""


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_inputs(x: object) -> torch.Tensor:
    """Validate a batch of inputs ``x`` of shape ``(B, *sample_shape)``: type, batch, dtype, values."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"inputs must be a torch.Tensor of shape (batch, ...), got {type(x).__name__}")
    if x.dim() < 2:
        raise InputError(
            f"inputs must have a batch dimension: expected shape (batch, ...), got {_shape(x)}; "
            "use learn_one/predict_one for a single sample"
        )
    if x.shape[0] == 0:
        raise InputError("empty batch: inputs have 0 samples")
    if not x.is_floating_point():
        raise InputError(f"inputs must be floating point (e.g. torch.float32), got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise InputError("inputs contain NaN or Inf values")
    return x


def check_batchnorm_batch(x: torch.Tensor, *, training: bool, has_batchnorm: bool) -> None:
    if training and has_batchnorm and x.shape[0] == 1:
        raise InputError(
            "batch of one sample with BatchNorm in training mode: batch statistics need at least 2 "
            "samples; use a micro-batch (batch_size >= 2) or a model without BatchNorm"
        )


def is_classification_criterion(criterion: object) -> bool:
    return isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss))


def check_targets(y: object, *, batch_size: int, n_outputs: int, classification: bool) -> torch.Tensor:
    """Validate targets: class indices in ``[0, n_outputs)`` or finite regression targets."""
    if not isinstance(y, torch.Tensor):
        raise InputError(f"targets must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() == 0 or y.shape[0] != batch_size:
        raise InputError(f"targets must have {batch_size} rows (one per input), got shape {_shape(y)}")
    if classification:
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise InputError(f"class labels must be an integer tensor (torch.long), got {y.dtype}")
        if y.dim() != 1:
            raise InputError(f"class labels must have shape ({batch_size},), got {_shape(y)}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_outputs:
            raise InputError(
                f"class label out of range: labels must lie in [0, {n_outputs - 1}] for a model with "
                f"{n_outputs} outputs, got values in [{lo}, {hi}]"
            )
        return y
    if not y.is_floating_point():
        raise InputError(f"regression targets must be floating point, got {y.dtype}")
    if not bool(torch.isfinite(y).all()):
        raise InputError("targets contain NaN or Inf values")
    return y

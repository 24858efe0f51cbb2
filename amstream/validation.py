"""Boundary checks: a batch is checked in one pass against the learner's declared input.

Every problem becomes an :class:`InputError` (a ``ValueError``) that names it and the expected form.
The checks run before a learner touches any state, so a rejected batch leaves the learner exactly as
it was, and they cost one host sync per batch: the NaN/Inf test of the inputs and the range of the
labels are read back together.

A model with a ``vocab_size`` attribute (:mod:`amstream.models`) reads token ids: integer batches
``(batch, time)`` whose values are checked against the vocabulary in the same host sync.

The declared input is a per-sample shape. Entries that are ``None`` may vary from batch to batch
(the time dimension of a sequence for a recurrent model); the others are fixed. Until the first
batch fixes it, a shape is *pending*: a zero sample runs through the model (in eval mode, so no
state changes) to check that it fits and to read the number of outputs, and the learner commits it
only once its step has been accepted.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["InputError", "InputSpec", "is_classification_criterion", "finite_in_float32"]


#: integer label types converted to torch.long (the type every torch classification loss takes)
_NARROW_INTEGERS = (torch.int8, torch.uint8, torch.int16, torch.int32)


class InputError(ValueError):
    """A batch, a sample or a label was rejected; the learner's state is unchanged."""


def _shape(shape) -> str:
    return "(" + ", ".join("T" if s is None else str(s) for s in shape) + ")"


def is_classification_criterion(criterion: object) -> bool:
    return isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss))


@dataclass
class _Fixed:
    sample_shape: tuple  # with None for dimensions that may vary
    output_shape: tuple  # of one sample's output, as seen at the probe


class InputSpec:
    """The inputs a learner accepts, and the one-pass check of a batch against them.

    Args:
        probe: ``probe(sample_shape, dtype) -> output`` runs one zero sample through the model
            without changing any state; it raises :class:`InputError` (or ``RuntimeError``) when
            the shape does not fit.
        device: where accepted batches are moved.
        input_shape: the declared per-sample shape (``None`` entries vary), or None: fixed by the
            first batch.
        recurrent: the model has a recurrent layer: when the shape is taken from the first batch,
            samples of shape ``(time, features)`` may have any number of time steps.
        min_train_batch: the smallest training batch (2 with BatchNorm: batch statistics of one
            sample are undefined).
        vocab_size: the model reads token ids in ``[0, vocab_size)`` rather than float features.
    """

    def __init__(self, probe: Callable[[tuple, torch.dtype], torch.Tensor], device: torch.device, *,
                 input_shape: tuple | None = None, recurrent: bool = False, min_train_batch: int = 1,
                 vocab_size: int | None = None) -> None:
        self._probe = probe
        self.vocab_size = vocab_size
        self.device = device
        self.recurrent = bool(recurrent)
        self.min_train_batch = int(min_train_batch)
        self.fixed: _Fixed | None = None
        self.pending: _Fixed | None = None
        self._declared = None if input_shape is None else tuple(input_shape)

    # ------------------------------------------------------------------------------- the shape
    @property
    def sample_shape(self) -> tuple | None:
        return None if self.fixed is None else self.fixed.sample_shape

    @property
    def n_outputs(self) -> int | None:
        return None if self.fixed is None else _n_outputs(self.fixed.output_shape)

    def declare(self, dtype: torch.dtype) -> None:
        """Fix the declared ``input_shape`` now (a probe with the model's dtype)."""
        if self._declared is not None:
            self.fixed = self._probe_shape(self._declared, dtype)

    def commit(self) -> None:
        """The batch that was checked last was accepted: its sample shape is now the learner's."""
        if self.pending is not None:
            self.fixed, self.pending = self.pending, None

    def reset(self, sample_shape: tuple | None) -> None:
        """Forget the shape, or fix it (a checkpoint's) with a probe in the model's dtype."""
        self.fixed, self.pending = None, None
        if sample_shape is not None:
            self.fixed = self._probe_shape(tuple(sample_shape), None)

    def reprobe(self) -> None:
        """Read the number of outputs again (the model's output layer grew)."""
        if self.fixed is not None:
            self.fixed = self._probe_shape(self.fixed.sample_shape, None)

    def _probe_shape(self, shape: tuple, dtype: torch.dtype | None) -> _Fixed:
        if self.vocab_size is not None:
            dtype = torch.long
        concrete = tuple(1 if s is None else s for s in shape)
        try:
            out = self._probe(concrete, dtype)
        except InputError:
            raise
        except RuntimeError as err:
            raise InputError(f"inputs of sample shape {concrete} do not fit the model: "
                             f"{' '.join(str(err).split())}") from None
        return _Fixed(shape, tuple(out.shape[1:]))

    # ---------------------------------------------------------------------------- the one pass
    def check(self, x: object, y: object = None, *, training: bool, classification: bool = False,
              validate: bool = True, dtype: torch.dtype | None = None,
              finite: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x, y)`` on the learner's device, after every check; raises :class:`InputError`.

        ``dtype``: the model's floating dtype, which floating inputs and regression targets are
        converted to (a float64 array from numpy for a float32 model, as river and scikit-learn take
        it; torch's own layers would refuse the mix deep inside a step). Class labels in a narrower
        integer type become ``torch.long``. With ``validate=False`` the batch is only moved to the
        device and converted. ``finite=True``: the inputs are known to be finite (a sample checked on
        the host as it was converted, see :func:`finite_in_float32`), so their NaN/Inf test is skipped.
        """
        if isinstance(x, torch.Tensor):
            x = x.to(self.device, dtype if dtype is not None and x.is_floating_point() else None, non_blocking=True)
        if isinstance(y, torch.Tensor):
            y = y.to(self.device, dtype if dtype is not None and y.is_floating_point() else None, non_blocking=True)
            if classification and y.dtype in _NARROW_INTEGERS:  # numpy's int32, raw uint8 image labels
                y = y.long()
        if not validate:
            return x, y  # type: ignore[return-value]
        # finite as float32 stays finite in a wider dtype only (float16 overflows above 65504)
        finite = finite and isinstance(x, torch.Tensor) and x.dtype in _AT_LEAST_FLOAT32
        self.pending = None
        self._check_structure(x, self.vocab_size)
        fixed = self._check_sample_shape(x)
        if training and x.shape[0] < self.min_train_batch:
            raise InputError(
                f"batch of {x.shape[0]} sample with BatchNorm in training mode: batch statistics need at "
                f"least {self.min_train_batch} samples; use a micro-batch (batch_size >= 2) or a model "
                "without BatchNorm")
        # A sum is finite exactly when the elements are, unless it overflows: a non-finite sum is
        # confirmed element by element (isfinite(x).all() is ~20x slower than a sum on the CPU).
        flags = list(torch.aminmax(x)) if self.vocab_size is not None else [] if finite else [x.sum()]
        if y is not None:
            # a sequence model's per-step outputs have as many positions as the batch has steps
            steps = x.shape[1] if fixed.sample_shape and fixed.sample_shape[0] is None else None
            flags += self._check_targets(y, x.shape[0], fixed.output_shape, classification, steps)
        if x.device.type == "cpu":  # no sync to save: read each flag, without the stack's extra kernels
            values = [f.item() for f in flags]
        else:
            values = torch.stack([f.to(torch.float64) for f in flags]).tolist()  # the one host sync
        if self.vocab_size is not None:
            lo, hi = int(values.pop(0)), int(values.pop(0))
            if lo < 0 or hi >= self.vocab_size:
                raise InputError(f"token id out of range: ids must lie in [0, {self.vocab_size - 1}] for a model "
                                 f"with a vocabulary of {self.vocab_size}, got values in [{lo}, {hi}]")
        elif not finite and not math.isfinite(values.pop(0)) and not bool(torch.isfinite(x).all()):
            raise InputError("inputs contain NaN or Inf values")
        if y is not None and len(values) == 2:  # class labels: their range
            lo, hi = int(values[0]), int(values[1])
            n = _n_outputs(fixed.output_shape)
            if lo < 0 or hi >= n:
                raise InputError(f"class label out of range: labels must lie in [0, {n - 1}] for a model "
                                 f"with {n} outputs, got values in [{lo}, {hi}]")
        elif y is not None and len(values) == 1 and not math.isfinite(values[0]) and not bool(torch.isfinite(y).all()):
            raise InputError("targets contain NaN or Inf values")
        return x, y

    def host_label_ok(self, label: object, classification: bool, dtype: torch.dtype | None = None) -> bool:
        """Whether one sample's label, a plain Python number, is valid against the fixed shape, seen
        on the host without a kernel: a class index in range for a model with one output vector
        per sample, or a regression target finite in the model's floating ``dtype`` (float32 or
        wider). False means "not shown here", not "invalid": the caller then checks the label
        tensor the usual way (with its error)."""
        fixed = self.fixed
        if fixed is None:
            return False
        if classification:
            return type(label) is int and len(fixed.output_shape) == 1 and 0 <= label < fixed.output_shape[0]
        return type(label) is float and dtype in _AT_LEAST_FLOAT32 and finite_in_float32((label,))

    @staticmethod
    def _check_structure(x: object, vocab_size: int | None = None) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"inputs must be a torch.Tensor of shape (batch, ...), got {type(x).__name__}")
        if vocab_size is not None:
            if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool or x.dim() != 2:
                raise InputError(f"this model reads token ids: inputs must be an integer tensor (torch.long) of "
                                 f"shape (batch, time), got {x.dtype} of shape {_shape(x.shape)}")
            if x.numel() == 0:
                raise InputError(f"empty batch: inputs of shape {_shape(x.shape)} hold no tokens")
            return
        if x.dim() < 2:
            raise InputError(f"inputs must have a batch dimension: expected shape (batch, ...), got "
                             f"{_shape(x.shape)}; use learn_one/predict_one for a single sample")
        if x.shape[0] == 0:
            raise InputError("empty batch: inputs have 0 samples")
        if not x.is_floating_point():
            raise InputError(f"inputs must be floating point (e.g. torch.float32), got {x.dtype}")

    def _check_sample_shape(self, x: torch.Tensor) -> _Fixed:
        sample = tuple(x.shape[1:])
        known = self.fixed.sample_shape if self.fixed is not None else self._declared
        if known is not None:
            fits = len(sample) == len(known) and all(k is None or k == s for k, s in zip(known, sample))
            if not fits:
                varying = " (T: any length)" if None in known else ""
                raise InputError(
                    f"wrong input shape: expected inputs of shape {_shape(('batch', *known))}{varying}, got "
                    f"{tuple(x.shape)}; the sample shape is fixed by the first batch (or input_shape=) and a "
                    "batch needs a leading batch dimension")
            if self.fixed is not None:
                return self.fixed
        sequence = len(sample) == (1 if self.vocab_size is not None else 2)  # (time,) ids or (time, features)
        shape = (None, *sample[1:]) if self.recurrent and sequence else sample
        probed = self._probe_shape(sample, x.dtype)
        self.pending = _Fixed(shape, probed.output_shape)
        return self.pending

    @staticmethod
    def _check_targets(y: object, batch: int, output_shape: tuple, classification: bool,
                       steps: int | None = None) -> list[torch.Tensor]:
        if not isinstance(y, torch.Tensor):
            raise InputError(f"targets must be a torch.Tensor, got {type(y).__name__}")
        if y.dim() == 0 or y.shape[0] != batch:
            raise InputError(f"targets must have {batch} rows (one per input), got shape {_shape(y.shape)}")
        if not classification:
            if not y.is_floating_point():
                raise InputError(f"regression targets must be floating point, got {y.dtype}")
            return [y.sum()]
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise InputError(f"class labels must be an integer tensor (torch.long), got {y.dtype}")
        expected = (batch, *output_shape[1:])
        if steps is not None and len(output_shape) == 2:  # (classes, time): one label per step
            expected = (batch, steps)
        if tuple(y.shape) != expected:
            hint = ""
            if len(output_shape) > 1:
                hint = (f"; the model maps one sample to outputs of shape {_shape(output_shape)}, read as "
                        f"{output_shape[0]} classes x {_shape(output_shape[1:])} positions: a model that "
                        "should give one prediction per sample must end in a layer that maps the whole "
                        "sample to one vector (flatten a sequence, or use a recurrent model)")
            raise InputError(f"class labels must have shape {_shape(expected)}, got {_shape(y.shape)}{hint}")
        return list(torch.aminmax(y))


#: floating dtypes in which a value finite as float32 stays finite
_AT_LEAST_FLOAT32 = (torch.float32, torch.float64)
#: the largest finite float32
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def finite_in_float32(values: tuple | list) -> bool:
    """True when Python floats are all finite and stay finite as float32 (checked on the host, no
    kernel). False may also mean "not sure" (a sum that overflowed float64): check the tensor."""
    # NaN or an infinity anywhere makes the sum non-finite
    return math.isfinite(sum(values)) and (not values or max(map(abs, values)) <= _FLOAT32_MAX)


def _n_outputs(output_shape: tuple) -> int:
    return int(output_shape[0]) if output_shape else 1

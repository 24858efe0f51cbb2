"""River-style streaming: one sample at a time, optional micro-batches, prequential evaluation.

Every learner has ``learn_one`` / ``learn_many`` / ``predict_one`` / ``predict_proba_one``.
A sample may be a tensor, a NumPy array, a list of numbers or a dict of features (the feature order
is the key order of the first dict seen; later dicts must have the same keys). With
``micro_batch > 1`` the learner buffers samples and learns from each full micro-batch (GPU kernels
want more than one sample); ``flush()`` learns from a partial one.

``prequential(samples, learner)`` is the test-then-train protocol of online learning (river's
``progressive_val_score``): each batch is first predicted and scored, then learned.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from .validation import InputError, finite_in_float32, is_classification_criterion

__all__ = ["StreamingMixin", "PrequentialResult", "prequential", "iter_prequential"]


class StreamingMixin:
    """The one-sample API, mixed into :class:`~amstream.learners.base.Learner`."""

    micro_batch: int = 1

    def _init_stream(self, micro_batch: int = 1) -> None:
        self.micro_batch = micro_batch
        self._buffer_x: list[torch.Tensor] = []
        self._buffer_y: list[torch.Tensor] = []
        self._feature_names: tuple | None = None

    def set_micro_batch(self, size: int) -> None:
        """Learn from every ``size`` buffered samples (1: learn at every ``learn_one``)."""
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"micro batch size must be an integer >= 1, got {size!r}")
        self.flush()
        self.micro_batch = int(size)

    def _stream_state(self) -> dict:
        """The micro-batch size, the buffered samples and the feature order (part of state_dict)."""
        return {
            "micro_batch": self.micro_batch,
            "buffer_x": torch.stack(self._buffer_x) if self._buffer_x else None,
            "buffer_y": torch.stack(self._buffer_y) if self._buffer_y else None,
            "feature_names": None if self._feature_names is None else list(self._feature_names),
        }

    def _load_stream_state(self, state: dict | None) -> None:
        if state is None:  # a state without a stream part: nothing buffered
            self._init_stream(self.micro_batch)
            return
        self.micro_batch = int(state["micro_batch"])
        bx, by = state["buffer_x"], state["buffer_y"]
        self._buffer_x = [] if bx is None else [t.cpu() for t in bx.unbind(0)]
        self._buffer_y = [] if by is None else [t.cpu() for t in by.unbind(0)]
        names = state["feature_names"]
        self._feature_names = None if names is None else tuple(names)

    # ------------------------------------------------------------------------------- conversion
    def _as_sample(self, x: object) -> torch.Tensor:
        return self._convert_sample(x).sample

    def _convert_sample(self, x: object) -> _Converted:
        """``x`` as a tensor; a sample of plain Python floats (river's dict of features) is also
        checked for NaN/Inf on the host, where it costs less than a kernel."""
        if isinstance(x, dict):
            x = self._feature_values(x)
        if (isinstance(x, (list, tuple)) and self.inputs.vocab_size is None and x
                and all(type(v) is float for v in x)):
            finite = finite_in_float32(x)
            with contextlib.nullcontext() if finite else np.errstate(over="ignore"):  # inf: refused by the check
                # np.array rounds each float to float32 as the general path below does
                return _Converted(torch.from_numpy(np.array(x, dtype=np.float32)), tuple(x), finite)
        if isinstance(x, (list, tuple)):
            try:
                x = np.asarray(x)  # no dtype: strings must stay strings, to be refused below
            except (TypeError, ValueError) as err:
                raise InputError(f"sample features must be numbers: {err}") from None
        if isinstance(x, np.ndarray):
            if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
                raise InputError(f"sample features must be real numbers, got numpy dtype {x.dtype}")
            tokens = self.inputs.vocab_size is not None and np.issubdtype(x.dtype, np.integer)
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64 if tokens else np.float32))
        if not isinstance(x, torch.Tensor):
            raise InputError(f"a sample must be a tensor, array, list or dict, got {type(x).__name__}")
        return _Converted(x)

    def _feature_values(self, x: dict) -> list:
        """A dict sample's values in the feature order (the key order of the first dict seen)."""
        names = tuple(x)
        if names != self._feature_names:
            if self._feature_names is None:
                self._feature_names = names
            elif set(names) != set(self._feature_names):
                missing = sorted(set(self._feature_names) - set(names), key=str)
                extra = sorted(set(names) - set(self._feature_names), key=str)
                raise InputError(f"feature dict keys changed: missing {missing}, unexpected {extra}")
        return [x[k] for k in self._feature_names]

    def _as_label(self, y: object) -> torch.Tensor:
        if isinstance(y, torch.Tensor):
            return y.reshape(()) if y.numel() == 1 else y
        if isinstance(y, (bool, np.bool_)):
            raise InputError(f"label must be a class index or a number, got {y!r}")
        # through numpy: a third of torch.tensor's cost for one number
        if isinstance(y, (int, np.integer)):
            try:
                return torch.from_numpy(np.array(int(y), dtype=np.int64))
            except OverflowError:
                raise InputError(f"label {y!r} does not fit a 64-bit integer: labels are class indices") from None
        if isinstance(y, (float, np.floating)):
            value = float(y)
            if finite_in_float32((value,)):
                return torch.from_numpy(np.array(value, dtype=np.float32))
            return torch.tensor(value, dtype=torch.float32)  # inf or NaN: refused by the target check
        array = np.asarray(y)
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):  # a class name, None
            raise InputError(f"label must be a class index or a number, got {y!r}: map class names to indices "
                             "first (for example {'DOWN': 0, 'UP': 1})")
        return torch.as_tensor(array)

    # ----------------------------------------------------------------- test-then-train's sample
    def _remember_sample(self, x: object, converted: _Converted) -> None:
        """Keep ``predict_one``'s conversion of ``x``, checked against the learner's fixed shape, for
        the ``learn_one`` of the same sample that follows it in test-then-train."""
        fixed = self.inputs.fixed
        self._sample_memo = None if converted.values is None or fixed is None else (x, converted, fixed)

    def _recall_sample(self, x: object) -> tuple[_Converted, bool]:
        """``(x converted, whether it passed predict_one's input check)``: predict_one's conversion
        when ``x`` is the very object it was given, holding the very same values (Python floats
        are immutable, so equal identities mean equal data) and the learner's input shape has not
        changed since; else a fresh conversion, unchecked."""
        memo, self._sample_memo = self._sample_memo, None
        if memo is not None and memo[0] is x and memo[2] is self.inputs.fixed:
            converted = memo[1]
            values = self._feature_values(x) if isinstance(x, dict) else x
            if len(values) == len(converted.values) and all(map(operator.is_, values, converted.values)):
                return converted, True
        return self._convert_sample(x), False

    _sample_memo: tuple | None = None

    # ------------------------------------------------------------------------------------ verbs
    def learn_one(self, x: object, y: object) -> None:
        """Learn from one sample (buffered when ``micro_batch > 1``). Returns None, like river.

        A buffered sample is checked when it arrives (shape, dtype, NaN/Inf, label), so a bad
        sample is refused by its own call and never spoils the samples buffered before it. In
        test-then-train, a sample of Python floats that ``predict_one`` has just checked is not
        converted and checked again; a label given as a Python number is checked on the host.
        """
        converted, checked = self._recall_sample(x)
        sample, label = converted.sample, self._as_label(y)
        if self.micro_batch == 1:
            self.learn(sample[None], label[None])
            return
        if self._buffer_x and sample.shape != self._buffer_x[0].shape:
            raise InputError(
                f"sample shape {tuple(sample.shape)} differs from the buffered samples' "
                f"{tuple(self._buffer_x[0].shape)}"
            )
        if not (checked and self.inputs.host_label_ok(y, is_classification_criterion(self.criterion),
                                                      self._params[0].dtype)):
            self._check(sample.unsqueeze(0), label.unsqueeze(0), training=False, finite=converted.finite)
        self._buffer_x.append(sample)
        self._buffer_y.append(label)
        if len(self._buffer_x) >= self.micro_batch:
            self.flush()

    def flush(self) -> None:
        """Learn from the buffered samples now (a partial micro-batch); no-op when empty.

        The buffer is emptied only once the learner has accepted the batch.
        """
        if not self._buffer_x:
            return
        self.learn(torch.stack(self._buffer_x), torch.stack(self._buffer_y))
        self._buffer_x, self._buffer_y = [], []

    def learn_many(self, X: object, y: object) -> None:
        """Learn from a batch given as a tensor, an array or a list of samples (dicts included, as
        ``learn_one`` takes them) and their labels."""
        if isinstance(X, (list, tuple)) and X and isinstance(X[0], dict):
            X = torch.stack([self._as_sample(x) for x in X])
        elif not isinstance(X, torch.Tensor):
            tokens = self.inputs.vocab_size is not None
            try:
                X = torch.as_tensor(np.asarray(X, dtype=np.int64 if tokens else np.float32))
            except (TypeError, ValueError) as err:
                raise InputError(f"samples must be numbers: {err}") from None
        if not isinstance(y, torch.Tensor):
            y = torch.stack([self._as_label(v) for v in y]) if isinstance(y, (list, tuple)) else self._as_label(y)
        self.learn(X, y)

    def _predict_one_output(self, x: object) -> torch.Tensor:
        """The network output for one sample (remembered for the ``learn_one`` that may follow)."""
        self._sample_memo = None
        converted = self._convert_sample(x)
        out = self._predict(converted.sample.unsqueeze(0), finite=converted.finite)[0]
        self._remember_sample(x, converted)
        return out

    def predict_proba_one(self, x: object) -> dict[int, float] | list[dict[int, float]]:
        """Class probabilities ``{class: p}`` (softmax of the output) for one sample; for a model
        with an output per position (per time step: ``(classes, time)``), one dict per position."""
        probs = torch.softmax(self._predict_one_output(x).float(), dim=0)
        if probs.dim() > 1:
            return [{i: float(p) for i, p in enumerate(col)} for col in probs.flatten(1).t().tolist()]
        return {i: float(p) for i, p in enumerate(probs.tolist())}

    def predict_one(self, x: object) -> int | list[int]:
        """Most likely class for one sample (a list, one per position, for per-step outputs)."""
        out = self._predict_one_output(x)
        if out.dim() > 1:  # classes first, as nn.CrossEntropyLoss reads them
            return out.argmax(dim=0).flatten().tolist()
        return int(out.argmax())


class _Converted(NamedTuple):
    """A sample as a tensor; ``values``: the Python floats it was made from (None: another form),
    ``finite``: they were checked for NaN/Inf on the host."""

    sample: torch.Tensor
    values: tuple | None = None
    finite: bool = False


# ---------------------------------------------------------------------------------- prequential
@dataclass
class PrequentialResult:
    """Outcome of a prequential run.

    Attributes:
        n_seen: samples scored (and then learned).
        n_correct: predictions that were correct before their samples were learned.
        n_predictions: predictions scored: one per sample, or one per position (time step) for a
            model with an output per position.
        curve: ``(n_seen, cumulative accuracy)`` every ``every`` samples.
        losses: task loss of each learned batch (host floats, taken every ``every`` samples).
    """

    n_seen: int = 0
    n_correct: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    n_predictions: int | None = None  # None: one per sample (n_seen)

    @property
    def accuracy(self) -> float:
        n = self.n_seen if self.n_predictions is None else self.n_predictions
        return self.n_correct / n if n else float("nan")

    def state_dict(self) -> dict:
        return {"n_seen": self.n_seen, "n_correct": self.n_correct, "curve": list(self.curve),
                "losses": list(self.losses), "n_predictions": self.n_predictions}

    @classmethod
    def from_state_dict(cls, state: dict) -> PrequentialResult:
        return cls(state["n_seen"], state["n_correct"], [tuple(p) for p in state["curve"]],
                   [tuple(p) for p in state["losses"]], state.get("n_predictions"))


def _batches(samples: Iterable, batch_size: int, learner: StreamingMixin) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    xs, ys = [], []
    for x, y in samples:
        xs.append(learner._as_sample(x))
        ys.append(learner._as_label(y))
        if len(xs) == batch_size:
            yield torch.stack(xs), torch.stack(ys)
            xs, ys = [], []
    if xs:
        yield torch.stack(xs), torch.stack(ys)


def iter_prequential(samples: Iterable, learner, *, batch_size: int = 1, every: int = 100,
                     result: PrequentialResult | None = None) -> Iterator[tuple[PrequentialResult, object]]:
    """Test-then-train over ``samples`` (an iterable of ``(x, y)``), yielding after every batch.

    Yields ``(result, step_info)``; the caller can log, checkpoint or stop at any point. Pass a
    ``result`` from a checkpoint to continue its counts.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    result = result or PrequentialResult()
    next_mark = (result.n_seen // every + 1) * every
    for X, y in _batches(samples, int(batch_size), learner):
        predicted = learner.predict(X).argmax(dim=1)  # classes are dim 1, per position too (B, C, T)
        correct = (predicted == y.to(predicted.device)).sum()
        info = learner.learn(X, y)
        if y.dim() > 1 or result.n_predictions is not None:  # a prediction per position
            result.n_predictions = (result.n_predictions or result.n_seen) + y.numel()
        result.n_seen += len(y)
        result.n_correct += int(correct)
        if result.n_seen >= next_mark:
            result.curve.append((result.n_seen, result.accuracy))
            result.losses.append((result.n_seen, float(info.loss)))
            next_mark = (result.n_seen // every + 1) * every
        yield result, info


def prequential(samples: Iterable, learner, *, batch_size: int = 1, every: int = 100) -> PrequentialResult:
    """Run :func:`iter_prequential` to the end and return the result."""
    result = PrequentialResult()
    for result, _ in iter_prequential(samples, learner, batch_size=batch_size, every=every, result=result):
        pass
    if not result.curve or result.curve[-1][0] != result.n_seen:
        result.curve.append((result.n_seen, result.accuracy))
    return result

"""The learner contract shared by every method: validate, step, roll back, predict, save.

A learner owns a model and the state that trains it. Its core verb is ``step(x, loss_fn)``: one
update on a sample or mini-batch, where ``loss_fn(output) -> scalar`` is the task loss (a per-call
loss lets a DQN agent pass a masked TD loss and Avalanche pass plugin penalties). ``learn(x, y)``
is ``step`` with the learner's criterion. Learners never print or log: they return a
:class:`StepInfo` record and callers decide what to do with it.
"""
from __future__ import annotations

import abc
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple, Union

import torch
from torch import nn

from ..blocks import Blocks, blocks_from_sequential
from ..stream import StreamingMixin
from ..utils import resolve_device
from ..validation import (
    InputError,
    check_batchnorm_batch,
    check_inputs,
    check_targets,
    is_classification_criterion,
)

__all__ = ["Learner", "StepInfo", "NonFiniteStepError", "LossFn", "Penalty", "add_penalty_grads_"]

LossFn = Callable[[torch.Tensor], torch.Tensor]
#: a scalar function of the model's parameters added to the objective (EWC, SI, L2 to a reference):
#: a callable returning the penalty, recomputed at every weight step, or a tensor with its graph
Penalty = Union[Callable[[], torch.Tensor], torch.Tensor, None]


def add_penalty_grads_(penalty: Penalty, params: list[torch.nn.Parameter]) -> None:
    """Add ``d penalty / d p`` to ``p.grad`` for each parameter (no-op for None).

    A penalty that depends on parameters only is separable across layers, so each layer can take
    its own part in its local update; no gradient travels through the network.
    """
    if penalty is None:
        return
    with torch.enable_grad():
        value = penalty() if callable(penalty) else penalty
        if not (isinstance(value, torch.Tensor) and value.dim() == 0):
            raise ValueError(f"penalty must be a scalar tensor, got {type(value).__name__} "
                             f"of shape {getattr(value, 'shape', None)}")
        if not value.requires_grad:
            return  # a constant: no gradient
        grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=not callable(penalty))
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)


class NonFiniteStepError(RuntimeError):
    """A step produced NaN/Inf weights, codes or losses; it was rolled back before this was raised."""


class StepInfo(NamedTuple):
    """What one step did. Tensors are detached and stay on the device (no host sync to build it).

    Attributes:
        loss: task loss of the network output before the update.
        local_losses: per hidden block, the weight-fitting loss (empty for backprop).
        code_displacement: per hidden code, ``||c_new - c_forward|| / ||c_forward||``.
        mu: the penalty weight used in this step (0 for backprop).
        lrs: learning rate of each parameter group, in order.
        batch_size: number of samples in the step.
        rolled_back: True when the step produced non-finite values and was undone.
        seconds: wall time of the step (host clock; on a GPU it may not include queued kernels).
    """

    loss: torch.Tensor
    local_losses: tuple = ()
    code_displacement: tuple = ()
    mu: float = 0.0
    lrs: tuple = ()
    batch_size: int = 0
    rolled_back: bool = False
    seconds: float = 0.0


class _Snapshot:
    """Pre-allocated shadow copies of the tensors a step mutates, to undo a non-finite step."""

    def __init__(self) -> None:
        self._shadows: list[torch.Tensor] = []
        self._sources: list[torch.Tensor] = []

    def take(self, tensors: list[torch.Tensor]) -> None:
        if len(tensors) != len(self._shadows) or any(
            s.shape != t.shape or s.dtype != t.dtype or s.device != t.device
            for s, t in zip(self._shadows, tensors)
        ):
            self._shadows = [torch.empty_like(t) for t in tensors]
        self._sources = tensors
        if tensors:
            torch._foreach_copy_(self._shadows, tensors)

    def restore(self) -> None:
        if self._sources:
            with torch.no_grad():
                torch._foreach_copy_(self._sources, self._shadows)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], set[int]]:
    tensors = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
    return tensors, {id(p) for p in optimizer.state}


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """One host sync: the max-abs of every tensor, all at once."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors, float("inf"))
    return bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all())


class Learner(StreamingMixin, abc.ABC):
    """Base class. Subclasses implement ``_step`` and list their optimizers and extra state.

    Args:
        model: an ``nn.Sequential`` network (see :mod:`amstream.blocks`).
        criterion: the default task loss for :meth:`learn`; ``nn.CrossEntropyLoss()`` if None.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        on_nonfinite: ``"warn"`` (roll back, warn, flag in StepInfo) or ``"raise"`` (roll back and
            raise :class:`NonFiniteStepError`).
        validate: check every batch at the boundary (shape, dtype, NaN/Inf, label range).
        input_shape: the shape of one sample; if None it is fixed by the first batch.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        criterion: nn.Module | None = None,
        device: str | torch.device = "auto",
        on_nonfinite: str = "warn",
        validate: bool = True,
        input_shape: tuple | None = None,
    ) -> None:
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.blocks: Blocks = blocks_from_sequential(self.model)
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.on_nonfinite = on_nonfinite
        self.validate = validate
        self.step_count = 0
        self.input_shape: tuple | None = None  # per-sample shape, fixed by the first accepted batch
        self.n_outputs: int | None = None
        self._pending_shape: tuple | None = None  # (sample shape, outputs) of a batch being checked
        self._snapshot = _Snapshot()
        self._synced_parameters = self._parameter_ids()
        self._init_stream()
        self.model.train()
        if input_shape is not None:
            self._fix_input_shape(tuple(input_shape))

    # ----------------------------------------------------------------------------------- contract
    #: plain attributes a step may change, restored together with the tensors on rollback
    _counters: tuple[str, ...] = ("step_count",)

    @abc.abstractmethod
    def _step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        """One update on a validated batch (the method's own rule); returns its StepInfo."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every torch optimizer the learner steps (their state is guarded and checkpointed)."""
        return []

    def _extra_tensors(self) -> list[torch.Tensor]:
        """Learner-owned tensors mutated by a step besides weights and optimizer state."""
        return []

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------------------ growing models
    def _parameter_ids(self) -> tuple[int, ...]:
        return tuple(id(p) for p in self.model.parameters())

    def sync_parameters(self) -> bool:
        """Follow a model whose layers were replaced, such as a classifier that adds units when new
        classes appear (Avalanche's ``IncrementalClassifier``). Runs before every step; returns
        True when the parameters had changed.

        Each block's optimizer group takes the block's current parameters. New parameters start
        with fresh optimizer state and replaced ones lose theirs (what Avalanche does for its own
        optimizers); the number of outputs, which bounds the accepted labels, is read again.

        Raises:
            ValueError: an optimizer group that does not belong to a block (a custom optimizer
                factory that renamed its groups) while the parameters changed.
        """
        ids = self._parameter_ids()
        if ids == self._synced_parameters:
            return False
        for opt in self.optimizers():
            for group in opt.param_groups:
                name = str(group.get("name", ""))
                if not (name.startswith("block") and name[5:].isdigit()):
                    raise ValueError(
                        f"the model's parameters changed, but optimizer group {name!r} belongs to no "
                        "block; keep the per-block groups ('block<i>') that the learner creates"
                    )
                group["params"] = self.blocks[int(name[5:])].parameters()
            live = {p for group in opt.param_groups for p in group["params"]}
            for p in [p for p in opt.state if p not in live]:
                del opt.state[p]
        if self.input_shape is not None:
            with torch.no_grad():
                was_training = self.model.training
                self.model.eval()
                try:
                    dtype = next(self.model.parameters()).dtype
                    out = self.model(torch.zeros((1, *self.input_shape), dtype=dtype, device=self.device))
                finally:
                    self.model.train(was_training)
            self.n_outputs = out.shape[-1] if out.dim() > 1 else 1
        self._synced_parameters = ids
        self._on_parameters_changed()
        return True

    def _on_parameters_changed(self) -> None:
        """Hook for subclasses that cache views of the layers."""

    # ---------------------------------------------------------------------------------- the verbs
    def step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        """One update on a batch ``x`` of shape ``(B, *sample_shape)`` for the loss ``loss_fn(output)``.

        ``penalty``: an optional scalar function of the parameters (a callable, or a tensor with its
        graph) minimized together with the loss, e.g. a continual-learning regularizer. Each layer
        adds its gradient to its own update (AM-mem: only its Adam-trained output layer).

        Bad input raises :class:`~amstream.validation.InputError` (a ``ValueError``) and changes
        nothing. A step that yields non-finite weights, codes or loss is undone.
        """
        self.sync_parameters()
        return self._guarded_step(self._prepare_inputs(x, training=True), loss_fn, penalty)

    def _guarded_step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        if self._pending_shape is not None:  # the batch passed every check: its shape is now fixed
            self.input_shape, self.n_outputs = self._pending_shape
            self._pending_shape = None
        start = time.perf_counter()
        guarded = self._guarded_tensors()
        self._snapshot.take(guarded[0])
        counters = {name: getattr(self, name) for name in self._counters}
        try:
            info = self._step(x, loss_fn, penalty)
        except BaseException:
            self._rollback(guarded[1], counters)
            raise
        if not all_finite(self._check_tensors(info)):
            self._rollback(guarded[1], counters)
            message = (
                f"step {self.step_count} produced non-finite weights, codes or loss and was rolled "
                "back (lower the learning rates or check the inputs)"
            )
            if self.on_nonfinite == "raise":
                raise NonFiniteStepError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            return info._replace(rolled_back=True, seconds=time.perf_counter() - start)
        self.step_count += 1
        return info._replace(seconds=time.perf_counter() - start)

    def learn(self, x: torch.Tensor, y: torch.Tensor, penalty: Penalty = None) -> StepInfo:
        """``step(x, lambda out: criterion(out, y), penalty)`` after checking the targets."""
        self.sync_parameters()
        x = self._prepare_inputs(x, training=True)
        y = self._prepare_targets(y, x)
        criterion = self.criterion
        return self._guarded_step(x, lambda out: criterion(out, y), penalty)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Network output for a batch, in eval mode, without building a graph."""
        x = self._prepare_inputs(x, training=False)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                return self.model(x)
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: weights, optimizer states, counters, memories."""
        return {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers()],
            "step_count": self.step_count,
            "extra": self._extra_state(),
            "input_shape": self.input_shape,
        }

    def load_state_dict(self, state: dict) -> None:
        optimizers = self.optimizers()
        if len(state["optimizers"]) != len(optimizers):
            raise ValueError(
                f"state has {len(state['optimizers'])} optimizer states, this learner has "
                f"{len(optimizers)}: was it saved from a different learner class or model?"
            )
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        self.step_count = int(state["step_count"])
        self._load_extra_state(state.get("extra", {}))
        shape = state.get("input_shape")
        self.input_shape, self.n_outputs = None, None
        if shape is not None:
            self._fix_input_shape(tuple(shape))

    # ---------------------------------------------------------------------------------- internals
    def _prepare_inputs(self, x: torch.Tensor, *, training: bool) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            x = x.to(self.device, non_blocking=True)
        if self.validate:
            check_inputs(x)
            self._probe_shape(tuple(x.shape), x.dtype)
            check_batchnorm_batch(x, training=training, has_batchnorm=self.blocks.has_batchnorm)
        return x

    def _prepare_targets(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(y, torch.Tensor):
            y = y.to(self.device, non_blocking=True)
        if self.validate:
            n_outputs = self.n_outputs if self._pending_shape is None else self._pending_shape[1]
            check_targets(
                y, batch_size=x.shape[0], n_outputs=n_outputs or 0,
                classification=is_classification_criterion(self.criterion),
            )
        return y

    @torch.no_grad()
    def _probe_shape(self, shape: tuple, dtype: torch.dtype) -> None:
        """Fix the sample shape on first use: one zero sample through the model in eval mode (no
        state change) checks that it fits; later batches must have the same sample shape."""
        sample_shape = shape[1:]
        self._pending_shape = None
        if self.input_shape is not None:
            if sample_shape != self.input_shape:
                expected = ", ".join(["batch", *map(str, self.input_shape)])
                raise InputError(
                    f"wrong input shape: expected inputs of shape ({expected}), got {shape}; the "
                    "sample shape is fixed by the first batch (or input_shape=) and a batch needs a "
                    "leading batch dimension"
                )
            return
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(torch.zeros((1, *sample_shape), dtype=dtype, device=self.device))
        except RuntimeError as err:
            raise InputError(
                f"inputs of sample shape {sample_shape} do not fit the model: {err}"
            ) from None
        finally:
            self.model.train(was_training)
        self._pending_shape = (sample_shape, out.shape[-1] if out.dim() > 1 else 1)

    def _fix_input_shape(self, sample_shape: tuple) -> None:
        self._probe_shape((1, *sample_shape), next(self.model.parameters()).dtype)
        self.input_shape, self.n_outputs = self._pending_shape
        self._pending_shape = None

    def _guarded_tensors(self) -> tuple[list[torch.Tensor], list[tuple[torch.optim.Optimizer, set]]]:
        tensors = [p for p in self.model.parameters()] + [b for b in self.model.buffers()]
        opt_keys = []
        for opt in self.optimizers():
            opt_tensors, keys = _optimizer_tensors(opt)
            tensors += opt_tensors
            opt_keys.append((opt, keys))
        tensors += self._extra_tensors()
        return tensors, opt_keys

    def _rollback(self, opt_keys: list, counters: dict) -> None:
        self._snapshot.restore()
        for name, value in counters.items():
            setattr(self, name, value)
        # Parameters that got optimizer state during the failed step go back to having none.
        for opt, keys in opt_keys:
            for p in [p for p in opt.state if id(p) not in keys]:
                del opt.state[p]

    def _check_tensors(self, info: StepInfo) -> list[torch.Tensor]:
        return [*self.model.parameters(), *self._extra_tensors(), info.loss.reshape(1)]

    def hparams(self) -> dict:
        """The learner's hyperparameters (for logs and run tables)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(blocks={len(self.blocks)}, device={self.device}, steps={self.step_count})"

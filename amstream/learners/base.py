"""The learner contract shared by every method: validate, step, roll back, predict, save.

A learner owns a model and the state that trains it. Its core verb is ``step(x, loss_fn)``: one
update on a sample or mini-batch, where ``loss_fn(output) -> scalar`` is the task loss (a per-call
loss lets a DQN agent pass a masked TD loss and Avalanche pass plugin penalties). ``learn(x, y)``
is ``step`` with the learner's criterion. Learners never print or log: they return a
:class:`StepInfo` record and callers decide what to do with it.

:class:`Learner` knows nothing of how a method updates the weights: it accepts any ``nn.Module``.
Methods that work layer by layer build on :class:`~amstream.learners.blockwise.BlockLearner`.
A method declares its hyperparameters once, in ``defaults`` (:mod:`amstream.hparams`), and is made
available everywhere by one line in :data:`amstream.LEARNERS`.
"""
from __future__ import annotations

import abc
import functools
import inspect
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from .. import hparams as hp
from ..compiled import CompiledFunction, StepScalars, mark_static, resolve_compile
from ..functional import CriterionLoss
from ..optim.adam_update import adam_state, fused_adam_step_
from ..stream import StreamingMixin
from ..utils import eval_mode, resolve_device
from ..validation import InputError, InputSpec, is_classification_criterion
from .groups import named_parameter_groups, sync_groups_
from .state import (FrozenParameters, Snapshot, all_finite, check_model_state, clone_tensors, load_optimizer_state_,
                    optimizer_tensors)

__all__ = ["Learner", "StepInfo", "NonFiniteStepError", "LossFn", "Penalty", "fused_kwargs"]

LossFn = Callable[[torch.Tensor], torch.Tensor]
#: a scalar function of the model's parameters added to the objective (EWC, SI, L2 to a reference):
#: a callable returning the penalty, recomputed at every weight step, or a tensor with its graph
Penalty = Callable[[], torch.Tensor] | torch.Tensor | None


def fused_kwargs(optimizer: type, params) -> dict:
    """``{"fused": True}`` when torch has a fused implementation of ``optimizer`` for ``params``
    (Adam and AdamW with floating-point parameters on the CPU or CUDA), else ``{}``.

    The fused kernel updates every tensor of a parameter group in one call: the same rule, about
    half the time of the default implementation for the small networks of a stream (a 8-32-2 MLP:
    109 us against 233 us per step on one CPU thread).
    """
    if optimizer not in (torch.optim.Adam, torch.optim.AdamW):
        return {}
    params = list(params)
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if ok and params else {}


def autograd_of_its_own(method: Callable) -> Callable:
    """A learner's step runs with autograd on, whatever the caller's mode: inside ``torch.no_grad()``
    or ``torch.inference_mode()`` (an evaluation or an acting loop) a step would otherwise fail in
    some rules and not others, since each manages its own graphs (as a torch optimizer's
    ``step(closure)`` turns gradients on for its closure). Tensors made in inference mode are
    cloned first, as autograd cannot record them (new here)."""

    @functools.wraps(method)
    def step(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return method(self, *args, **kwargs)
        with torch.inference_mode(False), torch.enable_grad():
            args = tuple(a.clone() if isinstance(a, torch.Tensor) and a.is_inference() else a for a in args)
            kwargs = {k: v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v
                      for k, v in kwargs.items()}
            return method(self, *args, **kwargs)

    return step


class ScalarLoss:
    """A caller's loss function, checked to give one number for the batch: a per-sample loss
    (``reduction="none"``) would otherwise fail deep inside a step with autograd's or a solver's own
    error, different for each learner. The step's guard undoes anything done before the check."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        loss = self.fn(out)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise InputError(f"loss_fn must return the batch's loss as one number (a 0-dim tensor), got {got}; "
                             "reduce a per-sample loss, e.g. with .mean()")
        return loss


class _FixedHyperparameter(property):
    """A declared hyperparameter as a read-only attribute (see :func:`_fixed_hyperparameter`)."""


def _fixed_hyperparameter(name: str, learning_rate: bool) -> property:
    """A declared hyperparameter as a read-only attribute. The constructor built the learner from it
    (its parameter groups, memories, compiled graphs, the sizes of its buffers), and ``hparams()``,
    the logs and the run tables report it: an assignment after construction would change what they
    report and, for many hyperparameters, nothing that a step reads. The value lives in the
    instance's ``__dict__``, where the constructor puts every hyperparameter."""

    def read(self) -> Any:
        try:
            return self.__dict__[name]
        except KeyError:  # a subclass that does not declare it
            raise AttributeError(f"{type(self).__name__} has no hyperparameter {name!r}") from None

    def refuse(self, value: Any) -> None:
        owner = type(self).__name__
        if learning_rate:
            raise AttributeError(f"{owner}.{name} is the learning rate its parameter groups started from, "
                                 "set at construction: change the rate through learner.param_groups (each group's "
                                 "'lr', as torch's schedulers do), or build a new learner")
        raise AttributeError(f"{owner}.{name} is a hyperparameter, set at construction (the learner was built "
                             "from it, and hparams() and the logs report it): build a new learner with the new "
                             f"value, e.g. {owner}(model, **{{**learner.hparams(), {name!r}: value}})")

    what = "the initial learning rate" if learning_rate else "the hyperparameter"
    see = "; see ``param_groups``" if learning_rate else ""
    return _FixedHyperparameter(read, refuse, doc=f"{what} ``{name}`` (read-only{see})")


class NonFiniteStepError(RuntimeError):
    """A step produced NaN/Inf weights, codes or losses; it was rolled back before this was raised."""


@dataclass(frozen=True)
class StepInfo:
    """What one step did. Tensors are detached and stay on the device (no host sync to build it).

    Attributes:
        loss: task loss of the network output before the update.
        batch_size: number of samples in the step.
        lrs: learning rate of each parameter group, by group name.
        diagnostics: the method's own records, by TensorBoard tag: a scalar (``"am/mu"``) or a
            tuple with one value per layer (``"am/local_loss"``), tensors or floats. Loggers write
            every entry without knowing the method.
        rolled_back: True when the step produced non-finite values and was undone.
        seconds: wall time of the step (host clock; on a GPU it may not include queued kernels).
    """

    loss: torch.Tensor
    batch_size: int = 0
    lrs: Mapping[str, float] = field(default_factory=dict)
    diagnostics: Mapping[str, Any] = field(default_factory=dict)
    rolled_back: bool = False
    seconds: float = 0.0


class _PendingForward(NamedTuple):
    x: torch.Tensor  # held so that its memory is not reused by another batch meanwhile
    key: tuple
    weights: tuple
    payload: Any


_COMMON = [
    inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default) for name, default in (
        ("criterion", None), ("device", "auto"), ("on_nonfinite", "warn"), ("validate", True),
        ("input_shape", None), ("compile", False))),
]


class Learner(StreamingMixin, abc.ABC):
    """Base class of every method. Subclasses set ``self.optimizer`` and implement ``_step``.

    Args:
        model: any ``nn.Module`` mapping a batch ``(B, *sample_shape)`` to outputs ``(B, ...)``
            (methods that work layer by layer need an ``nn.Sequential``: see ``BlockLearner``).
        criterion: the default task loss for :meth:`learn`; ``nn.CrossEntropyLoss()`` if None.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        on_nonfinite: ``"warn"`` (roll back, warn, flag in StepInfo) or ``"raise"`` (roll back and
            raise :class:`NonFiniteStepError`).
        validate: check every batch at the boundary (shape, dtype, NaN/Inf, label range).
        input_shape: the shape of one sample, ``None`` for a dimension of any length (the time
            steps of a sequence); if None it is fixed by the first batch (a model with a recurrent
            layer then takes ``(time, features)`` samples of any number of time steps).
        compile: ``True`` runs the learner's pure tensor functions (the model's forward pass, the
            code updates of alternating minimization, the ADMM updates; the whole step as one graph,
            on CUDA one CUDA graph, where the learner can) through ``torch.compile``; ``"auto"``: on
            CUDA only; ``False`` (default): eagerly. Same results and checkpoints (:mod:`amstream.compiled`).
        **hyperparameters: the class's ``defaults`` (see below).
    """

    #: hyperparameter declarations: name -> HParam (the single source of defaults, types, ranges)
    defaults: ClassVar[Mapping[str, hp.HParam]] = {}
    #: settings for a kind of task, over the defaults; ``"td"``: regression on bootstrapped targets
    #: (temporal-difference learning), used by ``agents.DQNAgent`` for a learner given by name
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: configurations of the generated conformance suite (tests/test_conformance.py): name suffix ->
    #: {"kwargs": {...}, "model": "mlp" | "mlp-bn" | "cnn" | "gru", "one_sample": (kwargs, accuracy floor)}
    conformance_cases: ClassVar[Mapping[str, Mapping[str, Any]]] = {"": {}}
    #: plain attributes a step may change, restored together with the tensors on rollback
    _counters: ClassVar[tuple[str, ...]] = ("step_count",)
    #: True when :func:`amstream.distributed.data_parallel` makes this method's steps on N shards
    #: those of one process on the whole batches; else the reason it cannot
    data_parallel: ClassVar[bool | str] = "its updates have not been made data-parallel yet"
    #: the collectives of a data-parallel learner (:mod:`amstream.distributed`), None in one process
    _parallel = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # each hyperparameter becomes an attribute: it must not shadow the learner's own
        reserved = {p.name for p in _COMMON} | {"inputs", "step_count", "micro_batch", "defaults", "presets"}
        clashes = sorted(reserved & set(cls.defaults))
        if clashes:
            raise TypeError(f"{cls.__name__}.defaults declares reserved names {clashes}")
        # ... and a read-only one: only the constructor sets it (a class may define its own property)
        for name, declared in cls.defaults.items():
            existing = inspect.getattr_static(cls, name, _FixedHyperparameter)
            if existing is _FixedHyperparameter or isinstance(existing, _FixedHyperparameter):
                setattr(cls, name, _fixed_hyperparameter(name, declared.learning_rate))
        cls.__signature__ = hp.signature(_COMMON, cls.defaults)
        if cls.__doc__ and "Hyperparameters (declared" not in cls.__doc__ and cls.defaults:
            cls.__doc__ = inspect.cleandoc(cls.__doc__) + "\n\n" + hp.docstring(cls.defaults)

    def __init__(self, model: nn.Module, *, criterion: nn.Module | None = None, device: str | torch.device = "auto",
                 on_nonfinite: str = "warn", validate: bool = True, input_shape: tuple | None = None,
                 compile: bool | str = False, **hyperparameters: Any) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
        if not any(True for _ in model.parameters()):
            raise ValueError(f"the model ({type(model).__name__}) has no parameters, so nothing can be trained")
        self.__dict__.update(hp.resolve(type(self).__name__, self.defaults, hyperparameters))
        self.device = resolve_device(device)
        self.compile = resolve_compile(compile, self.device)
        self._compiled_functions: dict[str, CompiledFunction] = {}
        self._step_scalars = StepScalars()  # the step sizes a compiled whole step takes as a tensor
        self.model = model.to(self.device)
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.on_nonfinite, self.validate = on_nonfinite, bool(validate)
        self.step_count = 0
        recurrent = any(isinstance(m, nn.RNNBase) or getattr(m, "is_recurrent", False) for m in self.model.modules())
        has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        self.inputs = InputSpec(self._probe, self.device, input_shape=input_shape,
                                recurrent=recurrent, min_train_batch=2 if has_batchnorm else 1,
                                vocab_size=getattr(self.model, "vocab_size", None))
        self._snapshot = Snapshot()
        self._pending: _PendingForward | None = None
        self._refresh_tensor_lists()
        self._init_stream()
        self.model.train()
        self.inputs.declare(next(self.model.parameters()).dtype)

    # ----------------------------------------------------------------------------------- contract
    @abc.abstractmethod
    def _step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        """One update on a validated batch (the method's own rule); returns its StepInfo.

        The output of :meth:`forward_for_step` on this very batch, if any, is
        ``self._take_pending(x)``.
        """

    #: the torch optimizer holding the learner's named parameter groups (set by the subclass)
    optimizer: torch.optim.Optimizer

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every torch optimizer the learner steps (their state is guarded and checkpointed)."""
        return [self.optimizer]

    @property
    def param_groups(self) -> list[dict]:
        """The named parameter groups (one per layer or block), as schedulers and plugins see them."""
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _optimizer_step(self) -> None:
        """``self.optimizer.step()``; for a fused Adam the same kernels called directly
        (:func:`~amstream.optim.adam_update.fused_adam_step_`: a tenth of a one-sample step is the
        Python around them), else the optimizer's own step."""
        if not fused_adam_step_(self.optimizer):
            self.optimizer.step()

    def _compiled(self, name: str, fn: Callable, fullgraph: bool = False) -> Callable:
        """``fn`` itself, or with ``compile=True`` its compiled version (made once per name)."""
        if not self.compile:
            return fn
        compiled = self._compiled_functions.get(name)
        if compiled is None or compiled.fn is not fn:
            compiled = self._compiled_functions[name] = CompiledFunction(fn, f"{type(self).__name__}: {name}",
                                                                          self.device, fullgraph)
        return compiled

    # ------------------------------------------------------------------------ the captured step
    def _whole_step_refusal(self) -> str | None:
        """Why ``compile=True`` can never run this learner's whole step as one graph, for this model
        and these settings (a sentence, said once at the first step), ``""`` for nothing to say, or
        None (it can)."""
        return ""

    def _tell_whole_step_refusal(self) -> bool:
        """True when the whole step cannot be one graph; says why once (a learner that has a
        whole-step graph but not for this model or these settings)."""
        reason = self._whole_step_refusal()
        if reason and not self._whole_step_told:
            self._whole_step_told = True
            warnings.warn(f"compile=True: {type(self).__name__}'s steps are compiled piece by piece, not as one "
                          f"graph (one CUDA graph on a GPU), because {reason}", UserWarning, stacklevel=6)
        return reason is not None

    _whole_step_told = False

    def _whole_step_states(self, groups: list[tuple[dict, list[nn.Parameter]]], penalty: Penalty) -> list | None:
        """``[(params, Adam state)]`` for each ``(param group, its parameters)`` of ``groups``, for a
        compiled whole step, or None where the step must take the eager path: ``compile=False``, a
        penalty, data parallelism, an optimizer other than plain Adam, or a parameter whose Adam
        state torch has not made yet (at its first step)."""
        if not self.compile or penalty is not None or self._parallel is not None:
            return None
        if not isinstance(self.optimizer, torch.optim.Adam):
            return None
        states = []
        for group, params in groups:
            state = adam_state(self.optimizer, group, params)
            if state is None:
                return None
            states.append((params, state))
        return states

    def _run_whole_step(self, fn: Callable, states: list, *args: Any) -> Any:
        """``fn(self, *args, states)`` compiled as one graph (``fullgraph``), on CUDA one CUDA graph:
        its outputs then live in the graph's memory until the next replay, so the caller copies those
        that outlive the step (:meth:`_outlives_step`)."""
        if self.device.type == "cuda":
            mark_static([states, self._static_tensors()])  # updated in place by the graph
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled("the whole step", fn, fullgraph=True)(self, *args, states)

    def _static_tensors(self) -> list[torch.Tensor]:
        """Tensors of the learner's own (not weights or optimizer state) that a whole step updates in
        place, always the same ones (AM-mem's memories)."""
        return []

    def _outlives_step(self, tensors: Any) -> Any:
        """A tensor (or tuple/list of them) of a whole step's outputs that the caller keeps: copied on
        CUDA, where the next replay of the graph would overwrite it."""
        if self.device.type != "cuda":
            return tensors
        if isinstance(tensors, torch.Tensor):
            return tensors.clone()
        return type(tensors)(t.clone() for t in tensors)

    @staticmethod
    def _set_grads(states: list, grads: list[list[torch.Tensor]]) -> None:
        """``p.grad`` of every parameter from a whole step's gradients, as after an eager step
        (Synaptic Intelligence reads them)."""
        for (params, _), group_grads in zip(states, grads):
            for p, grad in zip(params, group_grads):
                p.grad = grad

    def _model_call(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward pass (compiled with ``compile=True``)."""
        return self._compiled("the model's forward pass", self.model)(x)

    def _clear_grads(self) -> None:
        """``zero_grad(set_to_none=True)`` over the model's parameters, without the optimizer's
        per-call machinery (17 us of a 0.5 ms one-sample step)."""
        for p in self._params:
            p.grad = None

    def _named_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """The model's parameters in the named groups of the learner's optimizer."""
        return named_parameter_groups(self.model)

    def _extra_tensors(self) -> list[torch.Tensor]:
        """Learner-owned tensors mutated by a step besides weights and optimizer state."""
        return []

    def _commit_step(self) -> None:
        """Called once a step has passed its checks: a learner whose step writes new state beside the
        old (instead of in place, so that a rollback has nothing to restore) makes it current here."""

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def _probe(self, sample_shape: tuple, dtype: torch.dtype | None) -> torch.Tensor:
        """One zero sample through the model, in eval mode and without a graph (no state changes)."""
        dtype = dtype or next(self.model.parameters()).dtype
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.model(torch.zeros((1, *sample_shape), dtype=dtype, device=self.device))
        finally:
            self.model.train(was_training)

    @property
    def input_shape(self) -> tuple | None:
        """The accepted per-sample shape (``None`` entries: any length), once fixed."""
        return self.inputs.sample_shape

    @property
    def n_outputs(self) -> int | None:
        """The model's number of outputs (classes), once the input shape is fixed."""
        return self.inputs.n_outputs

    def _settle_hyperparameter(self, name: str, value: Any) -> None:
        """For a constructor only: fill in a hyperparameter whose default depends on the model (the
        memories' dtype from the weights'), so that ``hparams()`` reports what the learner uses."""
        self.__dict__[name] = value

    def hparams(self) -> dict:
        """The learner's hyperparameters (for logs and run tables): every declared one, by name."""
        return {name: getattr(self, name) for name in self.defaults}

    # ------------------------------------------------------------------------------ growing models
    def _refresh_tensor_lists(self) -> None:
        # The step reuses these lists (walking the module tree costs ~10 us a time); a model whose
        # layers are replaced is noticed by sync_parameters, which refreshes them.
        self._params = list(self.model.parameters())
        self._buffers = list(self.model.buffers())
        self._has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        self._synced_parameters = tuple(map(id, self._params))

    def sync_parameters(self) -> bool:
        """Follow a model whose layers were replaced, such as a classifier that adds units when new
        classes appear (Avalanche's ``IncrementalClassifier``). Runs before every step; returns
        True when the parameters had changed: each named group takes its layers' current
        parameters, new ones start with fresh optimizer state, and the number of outputs, which
        bounds the accepted labels, is read again."""
        if tuple(map(id, self.model.parameters())) == self._synced_parameters:
            return False
        self._refresh_tensor_lists()
        groups = self._named_groups()
        for opt in self.optimizers():
            sync_groups_(opt, groups)
        self.inputs.reprobe()
        self._on_parameters_changed()
        return True

    def _on_parameters_changed(self) -> None:
        """Hook for subclasses that cache views of the layers."""

    # ---------------------------------------------------------------------------------- the verbs
    @autograd_of_its_own
    def step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        """One update on a batch ``x`` of shape ``(B, *sample_shape)`` for the loss ``loss_fn(output)``.

        ``penalty``: an optional scalar function of the parameters (a callable, or a tensor with its
        graph) minimized together with the loss, e.g. a continual-learning regularizer.

        Bad input raises :class:`~amstream.validation.InputError` (a ``ValueError``) and changes
        nothing. A step that yields non-finite weights, codes or loss is undone.
        """
        self.sync_parameters()
        if not self._is_pending(x):
            x, _ = self._check_training(x, None)
        elif self._parallel is not None:
            self._agree_on_batch(x)
        if getattr(loss_fn, "gradient", None) is None:  # not one of amstream's closed-form losses
            loss_fn = ScalarLoss(loss_fn)
        return self._guarded_step(x, loss_fn, penalty)

    @autograd_of_its_own
    def learn(self, x: torch.Tensor, y: torch.Tensor, penalty: Penalty = None) -> StepInfo:
        """``step(x, lambda out: criterion(out, y), penalty)`` after checking the targets.

        During this step the checked targets are ``self._labels``, for rules that solve the
        criterion itself rather than differentiate it (see :meth:`_cross_entropy_labels`)."""
        self.sync_parameters()
        x, y = self._check_training(x, y)
        self._labels = y
        try:
            return self._guarded_step(x, CriterionLoss(self.criterion, y), penalty)
        finally:
            self._labels = None

    _labels: torch.Tensor | None = None

    def _cross_entropy_labels(self, labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """``labels`` (default: those of the step under way, when it came from :meth:`learn`) if the
        criterion is a plain ``nn.CrossEntropyLoss`` (mean reduction, no class weights, no label
        smoothing) and they are class indices (one per sample, or per position), else None: a rule
        with a closed form for the softmax cross-entropy (an ADMM Z-step) may use them; with None it
        must treat the loss as a black box."""
        labels = self._labels if labels is None else labels
        c = self.criterion
        if labels is None or type(c) is not nn.CrossEntropyLoss or labels.dim() == 0 or labels.is_floating_point():
            return None
        if c.weight is not None or c.label_smoothing != 0.0 or c.reduction != "mean":
            return None
        return labels

    def forward_for_step(self, x: torch.Tensor) -> torch.Tensor:
        """The output of the next step's forward pass, computed ahead of the step.

        For callers that need the network output before the update (``AMStrategy`` hands the
        logits to Avalanche's metrics and plugins): the next :meth:`step` on the same batch, with
        the weights unchanged, reuses this pass, so every training iteration runs one forward pass
        and draws one set of dropout masks. The output carries the graph through which a penalty on
        it (a distillation loss) reaches the learner: the whole network for backprop, the output
        layer for methods that fit each layer to its own targets.
        """
        self.sync_parameters()
        x, _ = self._check_training(x, None)  # data-parallel: every rank leaves here if one refuses
        payload, out = self._forward_for_step(x)
        self._pending = _PendingForward(x, self._batch_key(x), self._weight_versions(), payload)
        return out

    def _forward_for_step(self, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """``(payload for _step, output)``; by default the training forward pass with its graph."""
        out = self.model(x)
        return out, out

    def _take_pending(self, x: torch.Tensor) -> Any:
        """The payload of :meth:`forward_for_step` if it ran on this very batch with the current
        weights (else None); it is used once."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.key == self._batch_key(x) and pending.weights == self._weight_versions():
            return pending.payload
        return None

    def _is_pending(self, x: torch.Tensor) -> bool:
        pending = self._pending
        return pending is not None and x is pending.x and pending.key == self._batch_key(x)

    @staticmethod
    def _batch_key(x: torch.Tensor) -> tuple:
        return (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, x._version)

    def _weight_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._params)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Network output for a batch, in eval mode, without building a graph."""
        return self._predict(x)

    @torch.no_grad()
    def _predict(self, x: torch.Tensor, *, finite: bool = False) -> torch.Tensor:
        """:meth:`predict`; ``finite``: the inputs were checked for NaN/Inf on the host already."""
        x, _ = self._check(x, None, training=False, finite=finite)
        with eval_mode(self.model):
            return self._model_call(x)

    # ------------------------------------------------------------------------------ the guard
    def _check(self, x, y, *, training: bool, finite: bool = False):
        dtype = self._params[0].dtype
        return self.inputs.check(x, y, training=training, validate=self.validate,
                                 classification=is_classification_criterion(self.criterion),
                                 dtype=dtype if dtype.is_floating_point else None, finite=finite)

    def _check_training(self, x, y):
        """:meth:`_check` of a training batch; a data-parallel learner's ranks then agree on it
        (a shard refused on one rank stops the step on every rank, with no rank left waiting)."""
        if self._parallel is None:
            return self._check(x, y, training=True)
        try:
            x, y = self._check(x, y, training=True)
        except Exception:
            self._parallel.agree_on_batch(False, 0, self.device)
            raise
        self._agree_on_batch(x)
        return x, y

    def _agree_on_batch(self, x: torch.Tensor) -> None:
        from ..distributed import PeerInputError  # the distributed module imports the learners' errors

        if not self._parallel.agree_on_batch(True, x.shape[0], self.device):
            self.inputs.pending = None
            raise PeerInputError("another rank refused its shard of this batch (its error is in that rank's "
                                 "output); no rank took the step")

    def _data_parallel_refusal(self) -> str | None:
        """Why this learner cannot be data-parallel (None: it can); see :attr:`data_parallel`."""
        if type(self).data_parallel is not True:
            return type(self).data_parallel
        if self._has_batchnorm:
            return "BatchNorm's batch statistics would be each shard's, not the whole batch's"
        if getattr(self.model, "stateful", False):
            return "a stateful sequence model carries each shard's own hidden state"
        return None

    def _reduction(self) -> dict:
        """Keywords of an update that sums over samples: ``{}`` in one process; data-parallel, the
        in-place sum over the processes (``reduce``) and the whole batch's size (``batch_size``)."""
        if self._parallel is None:
            return {}
        return {"reduce": self._parallel.sum_, "batch_size": self._parallel.batch_size}

    @property
    def _global_batch_share(self) -> float:
        """This process's share of the batch being learned (1 in one process)."""
        return 1.0 if self._parallel is None else self._parallel.share

    def _guarded_step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        self.inputs.commit()  # the batch passed every check: its shape is now the learner's
        if self.compile and self.step_count == 0:
            self._tell_whole_step_refusal()  # a learner whose steps are never one graph says why, once
        start = time.perf_counter()
        tensors, opt_keys = self._guarded_tensors()
        self._snapshot.take(tensors)
        counters = {name: getattr(self, name) for name in self._counters}
        frozen = [p for p in self._params if not p.requires_grad]
        held = FrozenParameters(frozen, self.optimizers()) if frozen else None
        try:
            info = self._step(x, loss_fn, penalty)
            if held is not None:
                held.restore()
            finite = all_finite(self._check_tensors(info))
            if self._parallel is not None:  # one rank's NaN rolls the step back on every rank
                finite = self._parallel.all_true(finite, self.device)
        except BaseException:
            self._rollback(opt_keys, counters)
            raise
        finally:
            self._pending = None
        if not finite:
            self._rollback(opt_keys, counters)
            message = (f"step {self.step_count} produced non-finite weights, codes or loss and was rolled "
                       "back (lower the learning rates or check the inputs)")
            if self.on_nonfinite == "raise":
                raise NonFiniteStepError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            return replace(info, rolled_back=True, seconds=time.perf_counter() - start)
        self._snapshot.release()
        self._commit_step()
        self.step_count += 1
        # the record was made by this step's _step: set its time in place (a dataclass replace
        # costs 5 us, 1% of a one-sample step)
        object.__setattr__(info, "seconds", time.perf_counter() - start)
        return info

    def _guarded_tensors(self) -> tuple[list[torch.Tensor], list[tuple[torch.optim.Optimizer, set]]]:
        tensors = [*self._params, *self._buffers]
        opt_keys = []
        for opt in self.optimizers():
            opt_tensors, keys = optimizer_tensors(opt)
            tensors += opt_tensors
            opt_keys.append((opt, keys))
        return tensors + self._extra_tensors(), opt_keys

    def _rollback(self, opt_keys: list, counters: dict) -> None:
        self._snapshot.restore()
        self._snapshot.release()
        for name, value in counters.items():
            setattr(self, name, value)
        # Parameters that got optimizer state during the failed step go back to having none.
        for opt, keys in opt_keys:
            for p in [p for p in opt.state if id(p) not in keys]:
                del opt.state[p]

    def _check_tensors(self, info: StepInfo) -> list[torch.Tensor]:
        return [*self._params, *self._extra_tensors(), info.loss.reshape(1)]

    # ------------------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: weights, optimizer states, counters, memories, the
        stream's buffered samples. Like ``nn.Module.state_dict``, its tensors are the live ones."""
        return {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers()],
            "counters": {name: getattr(self, name) for name in self._counters},
            "extra": self._extra_state(),
            "input_shape": None if self.inputs.sample_shape is None else list(self.inputs.sample_shape),
            "stream": self._stream_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a state (copied: the learner shares no tensor with its source). A state that does
        not fit raises a ``ValueError`` naming what differs, and changes nothing."""
        if not isinstance(state, Mapping) or "model" not in state or "optimizers" not in state:
            raise ValueError("not a learner state: expected the dict of Learner.state_dict()")
        optimizers = self.optimizers()
        if len(state["optimizers"]) != len(optimizers):
            raise ValueError(f"state has {len(state['optimizers'])} optimizer states, this learner has "
                             f"{len(optimizers)}: was it saved from a different learner class or model?")
        check_model_state(self.model, state["model"])
        state = clone_tensors(state)
        backup = clone_tensors(self.state_dict())
        try:
            self._load(state)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
            self._load(backup)
            raise ValueError(f"the state does not fit this learner: {' '.join(str(err).split())}") from None

    def _load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.optimizers(), state["optimizers"]):
            load_optimizer_state_(opt, opt_state)
        counters = state.get("counters", {"step_count": state.get("step_count", 0)})
        for name in self._counters:
            setattr(self, name, type(getattr(self, name))(counters[name]))
        self._load_extra_state(state.get("extra", {}))
        self.inputs.reset(state.get("input_shape"))
        self._load_stream_state(state.get("stream"))
        self._pending = None
        self._refresh_tensor_lists()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__}, device={self.device}, steps={self.step_count})"

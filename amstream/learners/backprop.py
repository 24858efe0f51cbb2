"""The end-to-end backpropagation baseline behind the same learner API.

Every amstream learner is compared with this one on the same network, batch and device: one
forward pass, one backward pass of the task loss through the whole network, one optimizer step
(Rumelhart, Hinton, Williams, "Learning representations by back-propagating errors", Nature 1986).
It takes any ``nn.Module``: an MLP, a CNN, a model with ``nn.GRU``/``nn.LSTM`` inside, a bare
``nn.Linear``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..hparams import HParam
from ..optim.adam_update import adam_update_
from ..schedules import apply_lr_halving_
from .base import Learner, LossFn, Penalty, StepInfo, fused_kwargs
from .penalty import penalty_value

__all__ = ["Backprop", "OPTIMIZERS"]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}


def _optimizer_type_or_factory(value: object) -> bool:
    return callable(value)


class Backprop(Learner):
    """Backpropagation with any torch optimizer, one named parameter group per layer.

    Minimizes the task loss (plus an optional penalty of the parameters) by the optimizer's steps on
    its end-to-end gradient.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from amstream import Backprop
        >>> learner = Backprop(nn.Linear(4, 3), optimizer="sgd", lr=0.1, device="cpu")
        >>> info = learner.learn(torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> learner.predict(torch.randn(2, 4)).shape
        torch.Size([2, 3])
    """

    data_parallel = True  # gradients of the mean loss, as DistributedDataParallel (amstream.distributed)

    defaults = {
        "optimizer": HParam("adam", "the optimizer: a name, a torch.optim.Optimizer subclass, or a factory "
                            "params -> Optimizer", str, choices=tuple(OPTIMIZERS),
                            accepts=_optimizer_type_or_factory),
        "lr": HParam(1e-3, "learning rate of the optimizer", range="(0, inf)", learning_rate=True),
        "optimizer_kwargs": HParam(None, "extra keyword arguments of the optimizer (momentum, betas, ...)",
                                   object, optional=True, cli=False),
        "lr_halve_every": HParam(None, "halve the learning rate every this many steps (None: constant)", int,
                                 "[1, inf)", optional=True),
    }
    conformance_cases = {
        "adam": {"kwargs": {"lr": 3e-3}, "one_sample": ({}, 0.55)},  # measured 0.702
        "sgd": {"kwargs": {"optimizer": "sgd", "optimizer_kwargs": {"momentum": 0.9}, "lr": 0.05},
                "one_sample": ({"lr": 0.01}, 0.30)},  # measured 0.426
        "gru": {"model": "gru", "kwargs": {"lr": 3e-3}},
        "elman": {"model": "elman", "kwargs": {"lr": 3e-3}},
    }

    #: the torch optimizer; the constructor receives the declared choice here and replaces it with the
    #: optimizer it names (so this hyperparameter is not a read-only attribute, as the others are)
    optimizer: torch.optim.Optimizer | None = None

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__(model, **kwargs)
        groups = [{"params": params, "name": name} for name, params in self._named_groups()]
        kw = dict(self.optimizer_kwargs or {})
        choice = self.optimizer
        if isinstance(choice, str):
            if not {"fused", "foreach", "capturable", "differentiable"} & set(kw):  # the user's choice stands
                kw = {**fused_kwargs(OPTIMIZERS[choice], self.model.parameters()), **kw}
            self.optimizer = OPTIMIZERS[choice](groups, lr=self.lr, **kw)
        elif isinstance(choice, type) and issubclass(choice, torch.optim.Optimizer):
            self.optimizer = choice(groups, lr=self.lr, **kw)
        else:
            self.optimizer = choice(groups)
            if not isinstance(self.optimizer, torch.optim.Optimizer):
                raise ValueError(f"the optimizer factory returned {type(self.optimizer).__name__}, "
                                 "not a torch.optim.Optimizer")
        self._optimizer_choice = choice
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])

    def _step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        apply_lr_halving_(self.optimizer, self.step_count, self.lr_halve_every)
        out = self._take_pending(x)  # the output of forward_for_step on this batch, graph included
        if out is None:
            plan = self._whole_step_plan(penalty)
            if plan is not None:
                return self._captured_step(x, loss_fn, *plan)
        self._clear_grads()
        if out is None:
            out = self._model_call(x)
        loss = loss_fn(out)
        total = loss if penalty is None else loss + penalty_value(penalty)
        total.backward()
        self._optimizer_step()
        return StepInfo(loss=loss.detach(), batch_size=x.shape[0],
                        lrs={g["name"]: g["lr"] for g in self.optimizer.param_groups})

    # ------------------------------------------------------------------------ the captured step
    def _whole_step_plan(self, penalty: Penalty) -> tuple[list, list] | None:
        """The parameter names and ``(params, Adam state)`` of each group for :meth:`_whole_step`, or
        None where the step takes the eager path (:meth:`_whole_step_refusal`,
        :meth:`Learner._whole_step_states`)."""
        if not self.compile or self._tell_whole_step_refusal():
            return None
        params = [g["params"] for g in self.optimizer.param_groups]
        states = self._whole_step_states(list(zip(self.optimizer.param_groups, params)), penalty)
        return None if states is None else (parameter_names(self.model, params), states)

    def _whole_step_refusal(self) -> str | None:
        reason = traced_model_refusal(self)
        if reason is not None:
            return reason
        if not isinstance(self.optimizer, torch.optim.Adam):
            return f"the optimizer is {type(self.optimizer).__name__}; the traced update is Adam's"
        return None

    def _captured_step(self, x: torch.Tensor, loss_fn: LossFn, names: list, states: list) -> StepInfo:
        """The step as one compiled function (:meth:`_whole_step`)."""
        groups = self.optimizer.param_groups
        scalars = self._step_scalars.get([g["lr"] for g in groups], self._params[0])
        adam = tuple((*g["betas"], g["eps"]) for g in groups)
        loss, grads = self._run_whole_step(type(self)._whole_step, states, x, loss_fn, scalars, names, adam)
        self._set_grads(states, grads)
        return StepInfo(loss=self._outlives_step(loss), batch_size=x.shape[0],
                        lrs={g["name"]: g["lr"] for g in groups})

    def _whole_step(self, x: torch.Tensor, loss_fn: LossFn, scalars: torch.Tensor, names: list, adam: tuple,
                    states: list) -> tuple[torch.Tensor, list]:
        """Forward pass, backward pass and Adam step as one pure function of the tensors, for
        ``torch.compile`` (``fullgraph``; one CUDA graph on a GPU): the gradient by
        ``torch.func.grad_and_value`` of the loss of ``torch.func.functional_call`` (``.backward()``
        would end the graph), Adam by :func:`~amstream.optim.adam_update.adam_update_` on the
        optimizer's own state. ``scalars``: each group's learning rate; ``adam``: each group's
        ``(beta1, beta2, eps)``; ``states``: each group's parameters and Adam state, named by
        ``names``. The same arithmetic as the eager step (tested to float tolerance); new here."""
        with torch.no_grad():
            loss, group_grads = model_gradients(self.model, x, loss_fn, states, names)
            for k, ((params, state), gs, (beta1, beta2, eps)) in enumerate(zip(states, group_grads, adam)):
                adam_update_(params, gs, state, lr=scalars[k], beta1=beta1, beta2=beta2, eps=eps)
        return loss, group_grads

    def hparams(self) -> dict:
        values = super().hparams()
        choice = self._optimizer_choice
        values["optimizer"] = choice if isinstance(choice, str) else getattr(choice, "__name__", repr(choice))
        return values


def traced_model_refusal(learner: Learner) -> str | None:
    """Why the model's forward and backward passes cannot be traced into a whole-step graph by
    :func:`model_gradients` (a sentence), or None."""
    if learner.inputs.recurrent:
        return "the model has a recurrent layer"
    if learner._buffers:
        return ("the model has buffers (such as BatchNorm's running statistics), which the traced forward pass "
                "would not update")
    return None


def parameter_names(model: nn.Module, groups: list[list[nn.Parameter]]) -> list[list[str]]:
    """The model's name of each parameter of each group (:func:`model_gradients` addresses them so)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] for p in params] for params in groups]


def model_gradients(model: nn.Module, x: torch.Tensor, loss_fn: LossFn, states: list,
                    names: list[list[str]]) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """The loss of ``model(x)`` and its gradient w.r.t. each group's parameters (``states``: each
    group's ``(params, optimizer state)``, named by ``names``), by ``torch.func.grad_and_value`` of
    the loss of ``torch.func.functional_call``: ``.backward()`` would end a compiled graph."""
    trainable = {name: p.detach() for (params, _), group_names in zip(states, names)
                 for name, p in zip(group_names, params)}

    def loss_of(values: dict) -> torch.Tensor:
        return loss_fn(torch.func.functional_call(model, values, (x,)))

    grads, loss = torch.func.grad_and_value(loss_of)(trainable)
    return loss, [[grads[name] for name in group_names] for group_names in names]

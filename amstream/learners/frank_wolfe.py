"""Frank-Wolfe training behind the learner API (Yue, Li, Saligrama, Zhang, ICPR 2020).

The method is an optimizer (:class:`amstream.optim.FrankWolfe`: a Frank-Wolfe inner loop in a ball of
radius ``lr`` around the weights, then an Adam step along the displacement it found); this learner
runs it on the backpropagated gradients of any model, the recurrent ones of the paper included
(truncated backprop through time is a stateful model, :mod:`amstream.models`, over consecutive
windows). ``Backprop(model, optimizer=amstream.optim.FrankWolfe)`` gives the reference's
fresh-batch schedule too; this learner adds the same-batch option and the declared hyperparameters.
"""
from __future__ import annotations

import torch
from torch import nn

from ..hparams import HParam
from ..optim import FrankWolfe
from ..optim.frank_wolfe import frank_wolfe_state, frank_wolfe_update_, inner_position
from .backprop import model_gradients, parameter_names, traced_model_refusal
from .base import Learner, LossFn, Penalty, StepInfo
from .penalty import penalty_value

__all__ = ["FrankWolfeLearner"]


class FrankWolfeLearner(Learner):
    """Frank-Wolfe directions and Adam steps on the end-to-end gradient (registered ``frank-wolfe``).

    Each call of :meth:`step` (``learn``) on a batch is one Frank-Wolfe inner step; the Adam step
    comes every ``inner_steps`` batches (the reference: a new batch for each inner step), or, with
    ``same_batch=True``, all inner steps run on the one batch and every call ends with an Adam step
    (the model's buffers, a carried hidden state or BatchNorm statistics, are restored before each
    re-evaluation, so they advance once per batch). ``faithful=True``: the reference's cumulative
    iterate ``p += D_k`` (see :mod:`amstream.optim.frank_wolfe`). StepInfo's loss is the loss at
    the weights the call started from.
    """

    data_parallel = True  # gradients of the mean loss, combined before each optimizer step

    defaults = {
        "lr": HParam(1e-3, "radius of the Frank-Wolfe ball and learning rate of the Adam step", range="(0, inf)",
                     learning_rate=True),
        "inner_steps": HParam(2, "Frank-Wolfe steps per Adam step (1: Adam on per-tensor normalized gradients)",
                              int, "[1, inf)"),
        "same_batch": HParam(False, "run every inner step on the same batch (False: one inner step per batch, "
                             "as the reference)", bool),
        "faithful": HParam(False, "the reference's cumulative iterate (p += D_k) instead of Frank-Wolfe's", bool),
        "beta1": HParam(0.9, "Adam's first-moment decay", range="[0, 1)"),
        "beta2": HParam(0.999, "Adam's second-moment decay", range="[0, 1)"),
        "eps": HParam(1e-8, "Adam's denominator offset", range="[0, inf)"),
    }
    conformance_cases = {
        "": {"kwargs": {"lr": 3e-3}, "one_sample": ({"lr": 1e-3}, 0.3)},
        "same-batch": {"kwargs": {"lr": 3e-3, "same_batch": True, "inner_steps": 3}},
        "faithful": {"kwargs": {"lr": 3e-3, "faithful": True}},
        "elman": {"model": "elman", "kwargs": {"lr": 1e-2}},
    }

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__(model, **kwargs)
        groups = [{"params": params, "name": name} for name, params in self._named_groups()]
        self.optimizer = FrankWolfe(groups, lr=self.lr, inner_steps=self.inner_steps, betas=(self.beta1, self.beta2),
                                    eps=self.eps, faithful=self.faithful)

    def _data_parallel_refusal(self) -> str | None:
        if self.same_batch:
            return ("with same_batch=True its inner steps re-evaluate the batch inside the optimizer's step, "
                    "after the gradients would have been combined")
        return super()._data_parallel_refusal()

    def _step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        out = self._take_pending(x)
        if out is None:
            plan = self._whole_step_plan(penalty)
            if plan is not None:
                return self._captured_step(x, loss_fn, *plan)
        first_loss: list[torch.Tensor] = []
        before = clone_all(self._buffers) if self.same_batch else []
        after_first: list[torch.Tensor] = []

        def evaluate() -> torch.Tensor:
            nonlocal out
            self.optimizer.zero_grad(set_to_none=True)
            if out is None:
                if first_loss:  # a re-evaluation: the buffers as they were before the batch
                    copy_all_(self._buffers, before)
                out = self.model(x)
            loss = loss_fn(out)
            total = loss if penalty is None else loss + penalty_value(penalty)
            total.backward()
            out = None
            if not first_loss:
                first_loss.append(loss.detach())
                after_first.extend(clone_all(self._buffers) if self.same_batch else [])
            return loss

        if self.same_batch:
            self.optimizer.step(evaluate)
            copy_all_(self._buffers, after_first)  # the buffers advance once, as one pass would
        else:
            evaluate()
            self._optimizer_step()
        return StepInfo(loss=first_loss[0], batch_size=x.shape[0],
                        lrs={g["name"]: g["lr"] for g in self.optimizer.param_groups})

    # ------------------------------------------------------------------------ the captured step
    def _whole_step_refusal(self) -> str | None:
        if self.same_batch:
            return "same_batch=True re-evaluates the batch inside the optimizer's step (its steps run eagerly)"
        return traced_model_refusal(self)

    def _whole_step_plan(self, penalty: Penalty) -> tuple | None:
        """What :meth:`_whole_step` takes besides the batch, or None where the step takes the eager
        path: ``compile=False``, a refusal (:meth:`_whole_step_refusal`), a penalty, data
        parallelism, or a parameter without its Frank-Wolfe state yet (made at its first step)."""
        if not self.compile or self._tell_whole_step_refusal() or penalty is not None or self._parallel is not None:
            return None
        groups = self.optimizer.param_groups
        states = [(g["params"], frank_wolfe_state(self.optimizer, g["params"])) for g in groups]
        if any(state is None for _, state in states):
            return None
        positions = [inner_position(self.optimizer.state[g["params"][0]]["step"], g["inner_steps"]) for g in groups]
        # each group's inner step and rule settings are fixed per graph (T graphs at most); its
        # learning rate and Adam step number are inputs
        rules = tuple((k, g["inner_steps"], g["faithful"], g["betas"], g["eps"])
                      for (k, _), g in zip(positions, groups))
        scalars = self._step_scalars.get([g["lr"] for g in groups] + [step for _, step in positions], self._params[0])
        return parameter_names(self.model, [g["params"] for g in groups]), rules, scalars, states

    def _captured_step(self, x: torch.Tensor, loss_fn: LossFn, names: list, rules: tuple, scalars: torch.Tensor,
                       states: list) -> StepInfo:
        """The step as one compiled function (:meth:`_whole_step`); the step counters, on the CPU,
        advance outside it."""
        loss, grads = self._run_whole_step(type(self)._whole_step, states, x, loss_fn, scalars, names, rules)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self.optimizer.state[p]["step"] += 1
        self._set_grads(states, grads)
        return StepInfo(loss=self._outlives_step(loss), batch_size=x.shape[0],
                        lrs={g["name"]: g["lr"] for g in self.optimizer.param_groups})

    def _whole_step(self, x: torch.Tensor, loss_fn: LossFn, scalars: torch.Tensor, names: list, rules: tuple,
                    states: list) -> tuple[torch.Tensor, list]:
        """Forward pass, backward pass and one Frank-Wolfe inner step (with Adam's step at the round's
        end) as one pure function of the tensors, for ``torch.compile`` (``fullgraph``; one CUDA graph
        on a GPU): the optimizer's own rule (:func:`~amstream.optim.frank_wolfe.frank_wolfe_update_`)
        on its own state. ``scalars``: each group's learning rate, then its Adam step number. The
        same arithmetic as the eager step (tested to float tolerance); new here."""
        with torch.no_grad():
            loss, group_grads = model_gradients(self.model, x, loss_fn, states, names)
            n = len(states)
            for i, ((params, state), grads, (k, T, faithful, betas, eps)) in enumerate(zip(states, group_grads, rules)):
                frank_wolfe_update_(params, grads, state, k=k, lr=scalars[i], adam_step=scalars[n + i], inner_steps=T,
                                    faithful=faithful, betas=betas, eps=eps)
        return loss, group_grads


def clone_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


@torch.no_grad()
def copy_all_(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """Copy ``sources`` into ``targets`` in place, taking their shapes (a carried state's follows the batch)."""
    for t, s in zip(targets, sources):
        t.resize_(s.shape).copy_(s)

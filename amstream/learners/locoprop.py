"""LocoProp: every layer fitted to a local target made from one backward pass.

Amid, Anil, Warmuth, "LocoProp: Enhancing BackProp via Local Loss Optimization", AISTATS 2022
(official code: ``google-research/google-research``, ``locoprop/locoprop_training.ipynb``).

One forward and one backward pass give, for every layer m, its input ``X_m``, its pre-activation
``a_m = X_m W_m^T + b_m`` and the gradient ``g_m = dL/da_m``. Each layer then gets a target and is
fitted to it by ``T`` local steps of its own optimizer, every layer in parallel from the same pass:

- LocoProp-S: target ``a_m - gamma g_m`` for the pre-activation, squared loss
  ``1/2 ||X_m W^T + b - (a_m - gamma g_m)||^2``;
- LocoProp-M: target ``f(a_m) - gamma g_m`` for the post-activation, the Bregman matching loss of the
  layer's transfer function ``f`` (relu, leaky relu, tanh, sigmoid, identity; softmax or sigmoid for
  the output layer), whose gradient in the pre-activation is ``f(X_m W^T + b) - target``.

Both are summed over the batch. The first local step moves every layer along ``gamma`` times its
backprop gradient (with plain SGD it *is* a backprop step of rate ``gamma * lr``); the exact minimizer
of the local loss is a preconditioned update. The local learning rate decays within each batch,
``lr * max(1 - k/T, 0.25)`` at local step ``k``, and the local optimizer keeps its state across
batches, as in the reference. New here: the explicit proximal term of the paper's objective
(``prox``; the reference regularizes only through the few local steps), the S variant (the reference
runs M), the local optimizers besides its TF1 RMSProp (:class:`amstream.optim.TFRMSprop`), and
closed-form local gradients for Linear layers (Conv and BatchNorm layers through autograd).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import Block, UnsupportedModelError, frozen_batchnorm_stats
from ..functional import LinearBlockView, linear_view, task_loss_gradient, through_linear_block
from ..hparams import HParam, override
from ..optim import TFRMSprop
from ..optim.adam_update import adam_update_
from .base import LossFn, Penalty, StepInfo, fused_kwargs
from .blockwise import BlockLearner
from .penalty import add_penalty_grads_, frozen_penalty
from .state import gradients_or_zeros

__all__ = ["LocoProp", "LocoPropS", "LOCAL_OPTIMIZERS"]

LOCAL_OPTIMIZERS = ("rmsprop-tf", "rmsprop", "adam", "sgd")
OUTPUT_TRANSFERS = ("auto", "identity", "softmax", "sigmoid")
#: elementwise monotone transfer functions: the gradient of a convex F, so D_F is a matching loss
_TRANSFERS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


def _identity(a: torch.Tensor) -> torch.Tensor:
    return a


def _softmax_rows(a: torch.Tensor) -> torch.Tensor:
    return torch.softmax(a, dim=1)


def _transfer_fn(name: str, module: nn.Module | None):
    # the same function object at every step: a compiled local gradient is specialized on it
    if name == "identity":
        return _identity
    if name == "softmax":
        return _softmax_rows
    if name == "sigmoid":
        return torch.sigmoid
    if name == "tanh":
        return torch.tanh
    if name == "relu":
        return torch.relu
    return functools.partial(F.leaky_relu, negative_slope=module.negative_slope)


def local_linear_gradient(inp: torch.Tensor, a: torch.Tensor, target: torch.Tensor, fn, scale: float,
                          with_bias: bool) -> tuple:
    """The gradient of a Linear layer's local loss ``sum D_F(a, target)`` at its pre-activation
    ``a = inp W^T + b`` (the matching loss of the transfer ``fn``: its gradient w.r.t. ``a`` is
    ``fn(a) - target``), scaled by ``scale``: ``(dW, db or None, ||fn(a) - target||)``. A pure function:
    ``compile=True`` runs it through torch.compile (one graph per transfer function; the layer's
    product stays outside, so that the graphs do not multiply with the first step's reuse of ``a``)."""
    r = fn(a) - target
    scaled = r if scale == 1.0 else r * scale
    return scaled.T @ inp, scaled.sum(0) if with_bias else None, torch.linalg.vector_norm(r)


class LocoProp(BlockLearner):
    """LocoProp-M (``variant="M"``, the reference's) or LocoProp-S (``variant="S"``).

    The reference's own settings (the MNIST deep autoencoder, a loss summed over pixels) are
    ``presets["reference"]``; the defaults were chosen for mean-reduced classification losses on
    digits (BENCHMARKS.md, section 9).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from amstream import LocoProp
        >>> learner = LocoProp(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), device="cpu")
        >>> info = learner.learn(torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> len(info.diagnostics["locoprop/residual"])
        2
    """

    data_parallel = True  # targets per sample, local losses summed over samples (amstream.distributed)
    _local_grad_scale = 1.0

    defaults = {
        "variant": HParam("M", "M: post-activation targets f(a) - gamma g with the transfer function's matching "
                          "loss (the reference); S: pre-activation targets a - gamma g with a squared loss", str,
                          choices=("M", "S")),
        "gamma": HParam(10.0, "step of the targets along the backprop gradient (the reference's "
                        "activation_learning_rate, 10)", range="(0, inf)"),
        "local_steps": HParam(10, "local optimizer steps per layer and batch, T (reference 10)", int, "[1, inf)"),
        "local_optimizer": HParam("adam", "the layers' local optimizer: rmsprop-tf (TensorFlow 1's RMSProp, the "
                                  "reference's), rmsprop (PyTorch's), adam or sgd", str, choices=LOCAL_OPTIMIZERS),
        "lr": HParam(1e-3, "base learning rate of the local steps (the reference: 1e-5 with rmsprop-tf and a "
                     "summed loss)", range="(0, inf)", learning_rate=True),
        "local_lr_decay": HParam(True, "decay the local learning rate within each batch, lr max(1 - k/T, 0.25) "
                                 "at local step k (the reference)", bool),
        "momentum": HParam(0.0, "momentum of rmsprop, rmsprop-tf and sgd (the reference: 0.999)", range="[0, 1)"),
        "decay": HParam(0.9, "decay of the mean square of rmsprop and rmsprop-tf (the reference: 0.9)",
                        range="[0, 1)"),
        "eps": HParam(1e-8, "epsilon of rmsprop, rmsprop-tf and adam (the reference: 1e-5)", range="(0, inf)"),
        "prox": HParam(0.0, "weight of the proximal term (prox/2) ||W - W_batch_start||^2 of the paper's local "
                       "objective (new here; the reference has none)", range="[0, inf)"),
        "output_transfer": HParam("auto", "the output layer's transfer function for the M variant: auto "
                                  "(softmax for cross-entropy, sigmoid for BCEWithLogitsLoss, else identity), "
                                  "identity, softmax or sigmoid", str, choices=OUTPUT_TRANSFERS),
    }
    #: TD regression: the Q-values are the outputs themselves, whatever the learner's criterion
    presets = {
        "td": {"output_transfer": "identity"},
        # the official notebook's deep autoencoder: a sigmoid output inside a loss summed over pixels
        "reference": {"gamma": 10.0, "local_steps": 10, "local_optimizer": "rmsprop-tf", "lr": 1e-5,
                      "momentum": 0.999, "decay": 0.9, "eps": 1e-5, "local_lr_decay": True,
                      "output_transfer": "sigmoid"},
    }
    conformance_cases = {
        "": {"one_sample": ({}, 0.5)},
        "tf": {"kwargs": {"local_optimizer": "rmsprop-tf", "lr": 1e-4, "momentum": 0.9}},
        "bn": {"model": "mlp-bn"},
        "cnn": {"model": "cnn"},
    }

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self._transfers = [self._hidden_transfer(b) for b in self.blocks.hidden]
        groups = [{"params": b.parameters(), "name": f"block{b.index}"} for b in self.blocks if b.parameters()]
        self.optimizer = self._make_optimizer(groups)
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self._on_parameters_changed()

    # ------------------------------------------------------------------------------ construction
    def _make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        name = self.local_optimizer
        if name == "rmsprop-tf":
            return TFRMSprop(groups, lr=self.lr, decay=self.decay, momentum=self.momentum, eps=self.eps)
        if name == "rmsprop":
            return torch.optim.RMSprop(groups, lr=self.lr, alpha=self.decay, momentum=self.momentum, eps=self.eps,
                                       foreach=True)
        if name == "adam":  # fused where torch has it: its state lives on the device (a CUDA graph needs that)
            params = [p for g in groups for p in g["params"]]
            return torch.optim.Adam(groups, lr=self.lr, eps=self.eps,
                                    **(fused_kwargs(torch.optim.Adam, params) or {"foreach": True}))
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, foreach=True)

    def _hidden_transfer(self, block: Block) -> tuple[str, nn.Module | None]:
        """The transfer function after ``block``: the activation that opens the next block."""
        following = self.blocks[block.index + 1].pre
        acts = [m for m in following if not isinstance(m, (nn.Flatten, nn.Identity, nn.Dropout, nn.MaxPool1d,
                                                            nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d))]
        if not acts:
            return "identity", None
        if self.variant == "M" and (len(acts) > 1 or type(acts[0]) not in _TRANSFERS):
            raise UnsupportedModelError(
                f"LocoProp-M needs a monotone elementwise transfer function after block {block.index} "
                f"({', '.join(t.__name__ for t in _TRANSFERS)}); found {', '.join(type(m).__name__ for m in acts)}. "
                "Use LocoProp-S (variant='S'), whose targets are pre-activations")
        return _TRANSFERS.get(type(acts[0]), "identity"), acts[0]

    def _output_transfer(self) -> str:
        if self.output_transfer != "auto":
            return self.output_transfer
        if self.blocks.output.post:
            return "identity"
        if isinstance(self.criterion, (nn.CrossEntropyLoss,)):
            return "softmax"
        if isinstance(self.criterion, nn.BCEWithLogitsLoss):
            return "sigmoid"
        return "identity"

    def _on_parameters_changed(self) -> None:
        self._views: list[LinearBlockView | None] = [linear_view(b) for b in self.blocks]

    # ------------------------------------------------------------------------------------ step
    def _forward_graph(self, x: torch.Tensor):
        """Inputs X_m and pre-activations a_m of every block, and the output, with the graph."""
        inputs, pre_acts, c = [], [], x
        for block in self.blocks:
            inp = block.pre(c)
            c = block.lin(inp)
            inputs.append(inp)
            pre_acts.append(c)
        return inputs, pre_acts, self.blocks.output.post(c)

    def _forward_for_step(self, x: torch.Tensor):
        inputs, pre_acts, out = self._forward_graph(x)
        return (inputs, pre_acts, out), out

    def _step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        pending = self._take_pending(x)
        if pending is None:
            states = self._whole_step_plan(loss_fn, penalty)
            if states is not None:
                return self._captured_step(x, loss_fn, states)
        inputs, pre_acts, out = pending if pending is not None else self._forward_graph(x)
        loss = loss_fn(out)
        # a penalty given as a tensor may reach back through this pass (LwF): keep its graph
        grads = gradients_or_zeros(loss, pre_acts, retain_graph=penalty is not None and not callable(penalty))
        with torch.no_grad():
            inputs = [t.detach() for t in inputs]
            pre_acts = [t.detach() for t in pre_acts]
            fns = self._transfer_fns()
            # Data-parallel: g is the gradient of the shard's mean loss; the whole batch's is `share`
            # times it, and the local losses are sums over samples, so each rank's gradient is scaled
            # by 1/share before the optimizer's hook weights it by share and sums (a plain sum).
            share = self._global_batch_share
            self._local_grad_scale = 1.0 / share
            targets = [fn(a) - (self.gamma * share) * g for fn, a, g in zip(fns, pre_acts, grads)]
            anchors = [p.detach().clone() for p in self._params] if self.prox else None
        penalty = frozen_penalty(penalty, self._params)  # its gradient at the batch's start, before any step
        residuals = self._local_steps(inputs, pre_acts, targets, fns, penalty, anchors)
        return StepInfo(loss=loss.detach(), batch_size=x.shape[0],
                        lrs={g["name"]: g["lr"] for g in self.optimizer.param_groups},
                        diagnostics={"locoprop/residual": residuals})

    def _transfer_fns(self) -> list:
        """Each block's transfer function ``f`` of its local loss (the identity for LocoProp-S)."""
        if self.variant != "M":
            return [_transfer_fn("identity", None)] * len(self.blocks)
        return [_transfer_fn(name, module) for name, module in [*self._transfers, (self._output_transfer(), None)]]

    # ------------------------------------------------------------------------ the captured step
    def _whole_step_refusal(self) -> str | None:
        if any(view is None for view in self._views):
            return "a block is not Linear(activation(input)), so its local gradient needs autograd"
        if not isinstance(self.optimizer, torch.optim.Adam):
            return f"the local optimizer is {self.local_optimizer}; the traced update is Adam's"
        return None

    def _whole_step_plan(self, loss_fn: LossFn, penalty: Penalty) -> list | None:
        """Each block's parameters and Adam state for :meth:`_whole_step`, or None where the step
        takes the eager path (:meth:`_whole_step_refusal`, :meth:`Learner._whole_step_states`, a
        task loss without a closed-form gradient)."""
        if not self.compile or self._tell_whole_step_refusal():
            return None
        return self._linear_whole_step_states(self._views, self.optimizer.param_groups, loss_fn, penalty)

    def _captured_step(self, x: torch.Tensor, loss_fn: LossFn, states: list) -> StepInfo:
        """The step as one compiled function (:meth:`_whole_step`)."""
        groups = self.optimizer.param_groups
        scalars = self._step_scalars.get([g["lr"] for g in groups], self._params[0])
        adam = tuple((*g["betas"], g["eps"]) for g in groups)
        loss, residuals, grads = self._run_whole_step(type(self)._whole_step, states, x, loss_fn, scalars, adam)
        self._set_grads(states, grads)
        return StepInfo(loss=self._outlives_step(loss), batch_size=x.shape[0], lrs={g["name"]: g["lr"] for g in groups},
                        diagnostics={"locoprop/residual": self._outlives_step(residuals)})

    def _whole_step(self, x: torch.Tensor, loss_fn: LossFn, scalars: torch.Tensor, adam: tuple,
                    states: list) -> tuple:
        """The step as one pure function of the tensors for ``torch.compile`` (``fullgraph``; one CUDA
        graph on a GPU): the forward pass, the backward pass to every pre-activation in closed form
        (each block is ``Linear(activation(input))``), the targets, and the ``T`` local steps of every
        layer with Adam (:func:`~amstream.optim.adam_update.adam_update_` on the optimizer's own state,
        the learning rates ``scalars`` times the in-batch decay, each group's ``(beta1, beta2, eps)`` in
        ``adam``). The same arithmetic as the eager step (tested to float tolerance); new here."""
        with torch.no_grad():
            inputs, pre_acts, c = [], [], x
            for view in self._views:
                inputs.append(view.inputs(c))
                c = view.linear(inputs[-1])
                pre_acts.append(c)
            loss = loss_fn(c)
            g = task_loss_gradient(c, loss_fn)
            grads_a = [g]
            for view, a in zip(reversed(self._views[1:]), reversed(pre_acts[:-1])):
                g = through_linear_block(view, a, g)
                grads_a.insert(0, g)
            fns = self._transfer_fns()
            targets = [fn(a) - self.gamma * g for fn, a, g in zip(fns, pre_acts, grads_a)]
            anchors = [[p.clone() for p in params] for params, _ in states] if self.prox else None
            T = self.local_steps
            first, last, grads = [], [], []
            for k in range(T):
                factor = max(1.0 - k / T, 0.25) if self.local_lr_decay else 1.0
                last, grads = [], []
                for i, (view, inp, a, target, fn) in enumerate(zip(self._views, inputs, pre_acts, targets, fns)):
                    bias = view.linear.bias
                    grad_w, grad_b, norm = local_linear_gradient(
                        inp, a if k == 0 else view.linear(inp), target, fn, 1.0, bias is not None)
                    block_grads = [grad_w] if bias is None else [grad_w, grad_b]
                    if anchors is not None:
                        block_grads = [gr + self.prox * (p - anchor)
                                       for gr, p, anchor in zip(block_grads, states[i][0], anchors[i])]
                    grads.append(block_grads)
                    last.append(norm)
                if k == 0:
                    first = last
                for i, ((params, state), block_grads, (beta1, beta2, eps)) in enumerate(zip(states, grads, adam)):
                    adam_update_(params, block_grads, state, lr=scalars[i] * factor, beta1=beta1, beta2=beta2, eps=eps)
            residuals = tuple(r / f.clamp_min(torch.finfo(f.dtype).tiny) for r, f in zip(last, first))
        return loss, residuals, grads

    def _local_steps(self, inputs, pre_acts, targets, fns, penalty, anchors) -> tuple:
        """T local steps of every layer on its own loss; returns each layer's last residual norm
        relative to its first (1: no progress towards the target, 0: reached)."""
        base = [g["lr"] for g in self.optimizer.param_groups]  # a scheduler's rate, restored after
        first: list[torch.Tensor] = []
        last: list[torch.Tensor] = []
        T = self.local_steps
        # data-parallel with overlap: nothing is added to a layer's gradient after it is computed (no
        # proximal term, no penalty), so its all-reduce can start at once
        overlap = self._parallel is not None and self._parallel.overlap and anchors is None and penalty is None
        try:
            for k in range(T):
                factor = max(1.0 - k / T, 0.25) if self.local_lr_decay else 1.0
                for group, lr in zip(self.optimizer.param_groups, base):
                    group["lr"] = lr * factor
                self.optimizer.zero_grad(set_to_none=True)
                last = []
                for block, view, inp, a, t, fn in zip(self.blocks, self._views, inputs, pre_acts, targets, fns):
                    last.append(self._local_grad(block, view, inp, a if k == 0 else None, t, fn))
                    if overlap:  # combined in the background while the next layer's gradient is computed
                        self._parallel.start_gradient_reduce([p.grad for p in block.lin.parameters()])
                if k == 0:
                    first = last
                if anchors is not None:
                    with torch.no_grad():
                        for p, anchor in zip(self._params, anchors):
                            if p.grad is not None:
                                p.grad.add_(p - anchor, alpha=self.prox)
                add_penalty_grads_(penalty, self._params)
                self._optimizer_step()
        finally:
            for group, lr in zip(self.optimizer.param_groups, base):
                group["lr"] = lr
        return tuple(r / f.clamp_min(torch.finfo(f.dtype).tiny) for r, f in zip(last, first))

    def _local_grad(self, block: Block, view, inp, pre_act, target, fn) -> torch.Tensor:
        """Set the layer's ``.grad`` to its local loss's gradient (summed over the batch); returns
        the residual's norm. ``pre_act``: the forward pre-activation when the weights have not moved."""
        if view is not None:  # Linear: closed form, no autograd (compiled with compile=True)
            with torch.no_grad():
                weight, bias = view.linear.weight, view.linear.bias
                a = pre_act if pre_act is not None else F.linear(inp, weight, bias)
                grad_w, grad_b, norm = self._compiled("the local gradient", local_linear_gradient)(
                    inp, a, target, fn, self._local_grad_scale, bias is not None)
                weight.grad = grad_w
                if bias is not None:
                    bias.grad = grad_b
                return norm
        with torch.enable_grad(), frozen_batchnorm_stats(self.model):  # Conv, BatchNorm: autograd
            a = block.lin(inp)
            r = (fn(a) - target).detach()
            params = [p for p in block.lin.parameters() if p.requires_grad]  # none: a frozen block
            local = torch.autograd.grad(a, params, grad_outputs=r * self._local_grad_scale,
                                        allow_unused=True) if params else ()
        for p, g in zip(params, local):
            p.grad = g
        return torch.linalg.vector_norm(r)


class LocoPropS(LocoProp):
    """LocoProp-S: pre-activation targets ``a - gamma g`` and a squared local loss (Amid et al., 2022)."""

    defaults = override(LocoProp.defaults, variant="S")

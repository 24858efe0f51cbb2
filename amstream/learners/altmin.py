"""Online alternating minimization with auxiliary variables: the shared machinery and AM-Adam.

Choromanska, Cowen, Kumaravel, Luss, Rigotti, Rish, Kingsbury, Tejwani, Bouneffouf, "Beyond
Backprop: Online Alternating Minimization with Auxiliary Variables", ICML 2019 (PMLR 97:1193-1202).

Per mini-batch (or single sample) the learner minimizes

    L(f_out(c_L), y) + mu * sum_l ||c_l - f_l(c_{l-1})||^2

by alternating: (1) a forward pass gives the codes ``c_l``; (2) the codes are updated from the top
layer down with a few Nesterov-momentum steps each, anchored to their forward values; (3) every
layer's weights are fitted to its own input and output codes, independently of the other layers
(the output layer on the task loss).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import Block, frozen_batchnorm_stats
from ..functional import (PROX_MODES, REDUCTIONS, batch_norm_backward, batch_norm_train, linear_view,
                          linear_weight_grads, linear_weight_grads_, step_cap_may_bind, task_loss_gradient,
                          update_codes)
from ..optim.adam_update import adam_update_
from ..hparams import HParam
from ..schedules import apply_lr_halving_, mu_at
from .base import LossFn, Penalty, StepInfo, fused_kwargs
from .blockwise import BlockLearner
from .penalty import add_penalty_grads_

__all__ = ["OUTPUT_FITS", "AMAdam", "AltMinLearner"]

#: where the output block is fitted (``output_fit``): at the updated codes or the forward codes
OUTPUT_FITS = ("codes", "forward")


class AltMinLearner(BlockLearner):
    """Base of the AM learners: forward with codes, top-down code update, weight fits.

    Subclasses choose which blocks their Adam optimizer trains (``_adam_blocks``) and may add a
    different rule for the hidden weights (``_fit_hidden_extra``). The proximity term's official
    flavour (``prox="official"``), BatchNorm statistics from every step (``bn_stats="all"``) and
    the mean-reduced objective reproduce the reference code (``IBM/online-alt-min``); the step-size
    cap, the sum reduction and ``output_fit="forward"`` are new here.
    """

    defaults = {
        "mu": HParam(0.003, "penalty weight mu_0 of the objective (reference 0.003)", range="(0, inf)"),
        "d_mu": HParam(0.0, "increment of mu per step; the ramp stops at mu_max", range="[0, inf)"),
        "mu_max": HParam(None, "cap of the mu ramp (None: 10 * mu, as the reference)", range="(0, inf)",
                         optional=True),
        "code_steps": HParam(5, "Nesterov-momentum steps per code and batch (reference 5)", int, "[0, inf)"),
        "code_lr": HParam(0.3, "code step size, one value or one per hidden code (reference 0.3)",
                          range="(0, inf)", per_layer=True),
        "code_momentum": HParam(0.9, "Nesterov momentum of the code steps (reference 0.9)", range="[0, 1)"),
        "cap_code_steps": HParam(True, "cap each hidden code's step size at 1/L, L the curvature bound of its "
                                 "objective, so code steps stay stable when the next layer's weights grow "
                                 "(new here; inactive while code_lr is below the cap)", bool),
        "lr_out": HParam(0.008, "Adam learning rate of the output layer (reference 0.008)", range="(0, inf)",
                         learning_rate=True),
        "weight_steps": HParam(1, "Adam steps per batch on each local loss (reference 1)", int, "[1, inf)"),
        "betas": HParam((0.9, 0.999), "Adam's (beta1, beta2)", object, cli=False),
        "adam_eps": HParam(1e-8, "Adam's epsilon", range="(0, inf)", cli=False),
        "lr_halve_every": HParam(None, "halve every learning rate each this many steps (None: constant; the "
                                 "reference halves every 8 epochs)", int, "[1, inf)", optional=True),
        "lambda_c": HParam(0.0, "L1 weight on the codes (reference 0)", range="[0, inf)"),
        "reduction": HParam("mean", "code-loss reduction: mean (the reference: hidden codes move about "
                            "1/(batch*width) as far as the last one) or sum (the objective summed over "
                            "samples: per-element steps independent of batch size and width)", str,
                            choices=REDUCTIONS),
        "prox": HParam("paper", "proximity term: paper (detached anchor, the paper's intent) or official (the "
                       "reference code's, whose gradient is exactly zero)", str, choices=PROX_MODES),
        "bn_stats": HParam("forward", "BatchNorm running statistics: forward (from the plain forward pass only) "
                           "or all (also every code and weight step, as the reference code)", str,
                           choices=("forward", "all")),
        "fast": HParam(True, "closed-form gradients for blocks Linear(activation(c)) (the same values as "
                       "autograd, far fewer kernel launches); other blocks always use autograd", bool),
        "output_fit": HParam("codes", "where the output layer is fitted to the task loss: codes (the paper: at "
                             "the updated last code, so it sees the residual) or forward (at the forward "
                             "code: the task loss's own gradient for that layer; new here, BENCHMARKS.md "
                             "section 7)", str, choices=OUTPUT_FITS),
    }
    #: TD regression: fitting the output layer at the forward codes kept bootstrapped Q-values from
    #: running away (BENCHMARKS.md, section 7)
    presets = {"td": {"output_fit": "forward"}}

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__(model, **kwargs)
        n_codes = len(self.blocks.hidden)
        if isinstance(self.code_lr, list):
            if len(self.code_lr) != n_codes:
                raise ValueError(f"code_lr has {len(self.code_lr)} values but the model has {n_codes} codes")
            self.code_lrs = list(self.code_lr)
        else:
            self.code_lrs = [self.code_lr] * n_codes
        self._last_codes: list[torch.Tensor] = []
        # One parameter group per block, so that schedulers and plugins that call zero_grad or read
        # param_groups reach every layer. Blocks whose weights are solved rather than stepped
        # (AM-mem's hidden layers) get lr 0 and "solved": True; they never have a gradient at
        # Adam's step, so Adam keeps no state for them.
        adam = {b.index for b in self._adam_blocks()}
        groups = [
            {"params": b.parameters(), "lr": self._block_lr(b) if b.index in adam else 0.0,
             "name": f"block{b.index}", "solved": b.index not in adam}
            for b in self.blocks
            if b.parameters()
        ]
        for g in groups:
            g["initial_lr"] = g["lr"]
        implementation = fused_kwargs(torch.optim.Adam, self.model.parameters()) or {"foreach": True}
        self.optimizer = torch.optim.Adam(groups, betas=tuple(self.betas), eps=self.adam_eps, **implementation)
        self._on_parameters_changed()

    def _on_parameters_changed(self) -> None:
        # closed-form weight gradients when every Adam-trained block is Linear(activation(c))
        views = [linear_view(b) for b in self._adam_blocks()]
        self._views = views if self.fast and all(v is not None for v in views) else None
        # the whole step's: the same, and blocks ending in a BatchNorm1d too (its backward in closed form)
        views = [linear_view(b, batchnorm=True) for b in self._adam_blocks()]
        self._whole_views = views if self.fast and all(v is not None for v in views) else None
        # each hidden code's next block, whose weight its step cap bounds (None: no cap)
        self._cap_views = [linear_view(b) for b in self.blocks.hidden[1:]]

    # --------------------------------------------------------------------------- subclass hooks
    def _adam_blocks(self) -> list[Block]:
        return list(self.blocks)

    def _block_lr(self, block: Block) -> float:
        return self.lr_out

    def _hidden_loss(self, block: Block, inp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(block(inp), target)

    def _fit_hidden_extra(self, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                          loss_fn: LossFn, forward_codes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Weight rule for blocks outside Adam (AM-mem's hidden layers, and its output layer with
        ``output_rule="admm-softmax"``); returns the hidden blocks' local losses. ``forward_codes``:
        the codes of this step's forward pass (the first layer's prediction at its current weights)."""
        return []

    # ------------------------------------------------------------------------------------ step
    @property
    def current_mu(self) -> float:
        return mu_at(self.step_count, self.mu, self.d_mu, self.mu_max)

    @torch.no_grad()
    def _forward_for_step(self, x: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        """The step's own forward pass (codes; BatchNorm running statistics update here), and the
        output layer applied again to the detached last code, with a graph: a penalty on the
        output reaches the output layer only, as every hidden layer fits its own codes."""
        codes, out = self.blocks.forward_with_codes(x)
        last = codes[-1] if codes else x
        with torch.enable_grad(), frozen_batchnorm_stats(self.model):
            logits = self.blocks.output(last)
        return (codes, out), logits

    def _forward_pass(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The forward codes of ``x``: those of :meth:`forward_for_step` if it ran on this very
        batch with the current weights, else a fresh no-grad pass."""
        pending = self._take_pending(x)
        if pending is not None:
            return pending
        with torch.no_grad():
            return self.blocks.forward_with_codes(x)

    def _step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        mu = self.current_mu
        factor = apply_lr_halving_(self.optimizer, self.step_count, self.lr_halve_every)
        # Data-parallel: each rank moves its own shard's codes; a mean-reduced code objective's step
        # scales with 1/batch, so the step sizes take the rank's share to be the whole batch's.
        if self.reduction == "mean":
            factor *= self._global_batch_share
        code_lrs = [lr * factor for lr in self.code_lrs]
        caps = self._code_caps(x.shape[0], code_lrs)
        states = self._whole_step_plan(loss_fn, penalty)
        if states is not None:
            return self._captured_step(x, loss_fn, mu, code_lrs, caps, states)

        # (1) forward pass; BatchNorm running statistics update here only
        codes, out = self._forward_pass(x)
        with torch.no_grad():
            loss = loss_fn(out).detach()

        with self._frozen_bn_stats():
            # (2) codes, top-down
            new_codes = self._compiled("the code update", update_codes)(
                codes, self.blocks.hidden, self.blocks.output, loss_fn, mu=mu,
                steps=self.code_steps, lrs=code_lrs, momentum=self.code_momentum,
                prox=self.prox, lambda_c=self.lambda_c, fast=self.fast, reduction=self.reduction,
                cap_steps=caps,
            ) if codes else []
            # (3) weights: every block on its own input/output codes
            inputs = self._fit_inputs(x, codes, new_codes)
            if self._views is not None:
                local = self._fit_weights_fast(inputs, new_codes, codes, loss_fn, penalty)
            else:
                local = self._fit_weights(inputs, new_codes, codes, loss_fn, penalty)

        self._last_codes = new_codes
        return self._step_info(x, loss, mu, local, _displacement(new_codes, codes))

    def _fit_inputs(self, x: torch.Tensor, codes: list[torch.Tensor], new_codes: list[torch.Tensor]) -> list:
        """Each block's input for its weight fit: the updated codes below it (the output block's is
        the forward code with ``output_fit="forward"``)."""
        inputs = [x, *new_codes]
        if self.output_fit == "forward" and codes:
            inputs[-1] = codes[-1]
        return inputs

    def _step_info(self, x: torch.Tensor, loss: torch.Tensor, mu: float, local: list, displacement: tuple) -> StepInfo:
        return StepInfo(
            loss=loss, batch_size=x.shape[0], lrs={g["name"]: g["lr"] for g in self.optimizer.param_groups},
            diagnostics={"am/mu": mu, "am/local_loss": tuple(local), "am/code_displacement": displacement},
        )

    # ------------------------------------------------------------------------ the captured step
    #: whether ``compile=True`` may run the whole step as one graph (:meth:`_whole_step`): the
    #: Adam-trained blocks and the rule of the others (:meth:`_solved_blocks_fit`) as tensor functions
    _captures_whole_step = False

    def _whole_step_refusal(self) -> str | None:
        """Why this learner's steps can never be one compiled graph (None: they can)."""
        if not self._captures_whole_step:
            return ""  # a method without a whole-step graph: nothing to say
        if self._whole_views is None:
            return ("a block is not Linear(activation(code)), optionally followed by BatchNorm1d (or fast=False), "
                    "so its gradient needs autograd")
        if self._has_batchnorm and self.bn_stats == "all":
            return "bn_stats='all' updates BatchNorm's running statistics at every code and weight step"
        return None

    def _whole_step_plan(self, loss_fn: LossFn, penalty: Penalty) -> list | None:
        """The Adam-trained blocks' parameters and Adam states for :meth:`_whole_step`, or None
        where the step takes the eager path (:meth:`_whole_step_refusal`,
        :meth:`Learner._whole_step_states`, and a task loss without a closed-form gradient)."""
        if not self.compile or self._tell_whole_step_refusal():
            return None
        groups = [g for g in self.optimizer.param_groups if not g.get("solved")]
        return self._linear_whole_step_states(self._whole_views, groups, loss_fn, penalty)

    def _code_caps(self, batch: int, code_lrs: list[float]) -> tuple[bool, ...]:
        """Which hidden codes' step sizes the cap may clamp this step (``cap_code_steps``), told on the
        host before the code update (:func:`~amstream.functional.step_cap_may_bind`), so that neither
        the eager nor the compiled update computes a bound that cannot bind."""
        flags = [self.cap_code_steps and view is not None and step_cap_may_bind(view, batch, self.reduction, lr)
                 for view, lr in zip(self._cap_views, code_lrs)]
        return (*flags, False)  # the last code's task loss has no cap

    def _captured_step(self, x: torch.Tensor, loss_fn: LossFn, mu: float, code_lrs: list[float],
                       caps: tuple[bool, ...], states: list) -> StepInfo:
        """The step as one compiled function (:meth:`_whole_step`)."""
        lrs = [g["lr"] for g in self.optimizer.param_groups if not g.get("solved")]
        scalars = self._step_scalars.get([mu, *code_lrs, *lrs], self._params[0])
        loss, new_codes, local, displacement, grads = self._run_whole_step(
            type(self)._whole_step, states, x, loss_fn, self._take_pending(x), scalars, caps, self._solved_state())
        self._set_grads(states, grads)
        self._count_samples(x.shape[0])
        self._last_codes = new_codes  # checked for finiteness right after the step, before any replay
        return self._step_info(x, self._outlives_step(loss), mu, self._outlives_step(local),
                               self._outlives_step(displacement))

    def _solved_blocks_fit(self, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                           forward_codes: list[torch.Tensor], solved: tuple) -> list[torch.Tensor]:
        """The tensor part of the rule for blocks outside Adam, traced into the whole step (AM-mem's
        memory updates and solves) on the tensors of :meth:`_solved_state`; returns their local
        losses. Python counters it would change are advanced by :meth:`_count_samples`, outside the
        graph."""
        return []

    def _solved_state(self) -> tuple:
        """The tensors the rule for blocks outside Adam reads and writes this step (AM-mem: its
        current memories and those the step writes), an argument of the whole step: read from the
        learner inside the graph, which of two alternating sets is current would be a graph each."""
        return ()

    def _count_samples(self, batch_size: int) -> None:
        """Counters of the rule for blocks outside Adam, after a whole step (AM-mem's samples seen)."""

    def _whole_step(self, x: torch.Tensor, loss_fn: LossFn, forward: tuple | None, scalars: torch.Tensor,
                    caps: tuple[bool, ...], solved: tuple, states: list) -> tuple:
        """Everything of one step that touches tensors, as one pure function of them for
        ``torch.compile`` (``fullgraph``): the forward codes (or ``forward``, those of
        :meth:`forward_for_step`), the top-down code update, each block's closed-form local gradient
        and its Adam update (:func:`~amstream.optim.adam_update.adam_update_` on the optimizer's own
        state: ``states`` has each block's parameters and their Adam state, so checkpoints do not
        depend on the path, and the graph does not read the optimizer object, which torch.compile
        would guard by identity). ``scalars``: ``mu``, the code step sizes and each block's learning
        rate as one tensor, so that a new value needs no new graph. ``caps``: which hidden codes' step
        caps may bind (:meth:`_code_caps`; a graph per pattern, which rarely changes). ``solved``:
        :meth:`_solved_state`. The same arithmetic as the eager step (tested to float tolerance); new
        here."""
        with torch.no_grad():  # inside, so that the compiled frame is this function's own
            return self._whole_step_no_grad(x, loss_fn, forward, scalars, caps, solved, states)

    def _whole_step_no_grad(self, x: torch.Tensor, loss_fn: LossFn, forward: tuple | None, scalars: torch.Tensor,
                            caps: tuple[bool, ...], solved: tuple, states: list) -> tuple:
        n_codes = len(self.blocks.hidden)
        codes, out = forward if forward is not None else self.blocks.forward_with_codes(x)
        loss = loss_fn(out)
        new_codes = update_codes(
            codes, self.blocks.hidden, self.blocks.output, loss_fn, mu=scalars[0], steps=self.code_steps,
            lrs=[scalars[1 + i] for i in range(n_codes)], momentum=self.code_momentum, prox=self.prox,
            lambda_c=self.lambda_c, fast=True, reduction=self.reduction, cap_steps=caps, batchnorm=True,
        ) if codes else []
        inputs = self._fit_inputs(x, codes, new_codes)
        beta1, beta2 = self.betas
        local, grads = [], []
        for step in range(self.weight_steps):
            local, grads = [], []
            for block, view in zip(self._adam_blocks(), self._whole_views):
                a = view.inputs(inputs[block.index])
                g_out, item, bn_grads = self._local_gradient(block, view, a, new_codes, codes, loss_fn, step)
                if item is not None:
                    local.append(item)
                grads.append(linear_weight_grads(view, a, g_out, self._lambda_w if item is not None else 0.0)
                             + bn_grads)
            for k, ((params, state), block_grads) in enumerate(zip(states, grads)):
                adam_update_(params, block_grads, state, lr=scalars[1 + n_codes + k], beta1=beta1, beta2=beta2,
                             eps=self.adam_eps)
        local += self._solved_blocks_fit(inputs, new_codes, codes, solved)
        return loss, new_codes, local, _displacement(new_codes, codes), grads

    def _adam_params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups if not g.get("solved") for p in g["params"]]

    def _fit_weights(self, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                     forward_codes: list[torch.Tensor], loss_fn: LossFn, penalty: Penalty = None) -> list:
        hidden = self.blocks.hidden
        adam_hidden = [b for b in self._adam_blocks() if b is not self.blocks.output]
        local: list[torch.Tensor] = []
        for _ in range(self.weight_steps):
            # The local losses share no parameters and their inputs are detached codes, so one
            # backward of their sum gives every layer exactly its own gradient: one fused Adam step.
            self.optimizer.zero_grad(set_to_none=True)
            losses = [self._hidden_loss(b, inputs[b.index], targets[b.index]) for b in adam_hidden]
            total = loss_fn(self.blocks.output(inputs[len(hidden)]))
            for item in losses:
                total = total + item
            total.backward()
            add_penalty_grads_(penalty, self._adam_params())
            self._optimizer_step()
            local = [item.detach() for item in losses]
        # p.grad keeps the last local gradient, as after a backprop step (Synaptic Intelligence reads it).
        return local + self._fit_hidden_extra(inputs, targets, loss_fn, forward_codes)

    @torch.no_grad()
    def _fit_weights_fast(self, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                          forward_codes: list[torch.Tensor], loss_fn: LossFn, penalty: Penalty = None) -> list:
        """``_fit_weights`` with closed-form gradients for Linear blocks (the same Adam step)."""
        # data-parallel with overlap: each layer's gradient is combined in the background while the
        # next one is computed (unless a penalty is still to be added to them)
        overlap = self._parallel is not None and self._parallel.overlap and penalty is None
        local: list[torch.Tensor] = []
        for step in range(self.weight_steps):
            local = []
            for block, view in zip(self._adam_blocks(), self._views):
                a = view.inputs(inputs[block.index])
                g_out, loss, _ = self._local_gradient(block, view, a, targets, forward_codes, loss_fn, step)
                if loss is not None:
                    local.append(loss)
                linear_weight_grads_(view, a, g_out, self._lambda_w if loss is not None else 0.0)
                if overlap:
                    self._parallel.start_gradient_reduce([p.grad for p in view.linear.parameters()])
            add_penalty_grads_(penalty, self._adam_params())
            self._optimizer_step()
            if step + 1 < self.weight_steps:
                self.optimizer.zero_grad(set_to_none=True)
        return local + self._fit_hidden_extra(inputs, targets, loss_fn, forward_codes)

    @property
    def _lambda_w(self) -> float:
        """L1 weight on the hidden weights (AM-Adam's ``lambda_w``; 0 for the other rules)."""
        return getattr(self, "lambda_w", 0.0) if self.blocks.hidden else 0.0

    def _local_gradient(self, block: Block, view, a: torch.Tensor, targets: list[torch.Tensor],
                        forward_codes: list[torch.Tensor], loss_fn: LossFn,
                        step: int) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """The gradient of ``block``'s local loss w.r.t. the output of its Linear layer on ``a``, that
        loss (None for the output block, whose loss is the task's) and the gradients of the block's
        BatchNorm (``[]`` without one): ``MSE(block(a), c)`` with ``lambda_w mean|W|`` for a hidden
        block, the task loss for the output block."""
        # The first layer's input is x, which no code update changes: its prediction is the forward
        # code, so the widest matmul is not recomputed (unless a BatchNorm's backward needs it).
        forward_prediction = block is not self.blocks.output and block.index == 0 and step == 0
        z = None if forward_prediction and view.bn is None else view.linear(a)
        if forward_prediction:
            out = forward_codes[0]
        else:
            out = z if view.bn is None else batch_norm_train(view.bn, z)
        if block is self.blocks.output:
            g, loss = task_loss_gradient(out, loss_fn), None
        else:
            residual = out - targets[block.index]
            loss = residual.square().mean()
            if self._lambda_w:
                loss = loss + self._lambda_w * view.linear.weight.abs().mean()
            g = residual.mul_(2.0 / residual.numel())
        if view.bn is None:
            return g, loss, []
        g_z, g_gamma, g_beta = batch_norm_backward(view.bn, z, g)
        return g_z, loss, [g_gamma, g_beta]

    # ------------------------------------------------------------------------------- internals
    def _frozen_bn_stats(self):
        """Use batch statistics without updating running ones (unless bn_stats == "all")."""
        if self.bn_stats == "all" or not self._has_batchnorm:
            return contextlib.nullcontext()
        return frozen_batchnorm_stats(self.model)

    def _check_tensors(self, info: StepInfo) -> list[torch.Tensor]:
        return super()._check_tensors(info) + list(self._last_codes)


def _displacement(new_codes: list[torch.Tensor], codes: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """How far the code update moved each code, relative to its forward value."""
    return tuple(torch.linalg.vector_norm(n - c) / torch.linalg.vector_norm(c).clamp_min(1e-12)
                 for n, c in zip(new_codes, codes))


class AMAdam(AltMinLearner):
    """AM-Adam: alternating minimization whose weight rule is Adam on each layer's local loss.

    Hidden block l minimizes ``MSE(f_l(c_{l-1}), c_l) [+ lambda_w mean|W_l|]`` and the output block
    the task loss ``L(f_out(c_L), y)``, with one Adam parameter group per block (Choromanska et al.,
    ICML 2019, Sec. 3). Defaults follow the reference code (``IBM/online-alt-min``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from amstream import AMAdam
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> learner = AMAdam(model, device="cpu")
        >>> info = learner.learn(torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> learner.predict(torch.randn(2, 4)).shape
        torch.Size([2, 3])
    """

    data_parallel = True  # gradients of mean losses; codes per sample (amstream.distributed)
    _captures_whole_step = True

    defaults = {
        **AltMinLearner.defaults,
        "lr": HParam(0.008, "Adam learning rate of the hidden layers (reference 0.008)", range="(0, inf)",
                     learning_rate=True),
        "lambda_w": HParam(0.0, "L1 weight on the hidden weights (reference 0)", range="[0, inf)"),
    }
    #: TD regression: the reference mu (0.003, tuned for cross-entropy) weighs a TD loss 333x against
    #: the codes' proximity and the loss grew; mu = 1.0 learned CartPole (BENCHMARKS.md, section 7)
    presets = {"td": {**AltMinLearner.presets["td"], "mu": 1.0}}
    conformance_cases = {
        "": {"one_sample": ({"lr": 3e-3, "lr_out": 3e-3, "code_lr": 0.1, "mu": 0.03}, 0.60)},  # measured 0.719
        "official": {"kwargs": {"prox": "official"},
                     "one_sample": ({"lr": 3e-3, "lr_out": 3e-3, "code_lr": 0.1, "mu": 0.03}, 0.60)},
        "bn": {"model": "mlp-bn"},
        "cnn": {"model": "cnn", "one_sample": ({"lr": 3e-3, "lr_out": 3e-3, "mu": 0.3}, 0.20)},  # measured 0.287
    }

    def _block_lr(self, block: Block) -> float:
        return self.lr_out if block is self.blocks.output else self.lr

    def _hidden_loss(self, block: Block, inp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(block(inp), target)
        if self.lambda_w:
            loss = loss + self.lambda_w * sum(p.abs().mean() for p in block.parameters() if p.dim() > 1)
        return loss

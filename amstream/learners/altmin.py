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
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import Block, frozen_batchnorm_stats
from ..functional import PROX_MODES, REDUCTIONS, linear_view, linear_weight_grads_, task_loss_grad, update_codes
from ..schedules import apply_lr_halving_, mu_at
from .base import Learner, LossFn, Penalty, StepInfo, add_penalty_grads_

__all__ = ["OUTPUT_FITS", "AMAdam", "AltMinLearner"]

#: where the output block is fitted (``output_fit``): at the updated codes or the forward codes
OUTPUT_FITS = ("codes", "forward")


class AltMinLearner(Learner):
    """Base of the AM learners: forward with codes, top-down code update, weight fits.

    Subclasses choose which blocks their Adam optimizer trains (``_adam_blocks``) and may add a
    different rule for the hidden weights (``_fit_hidden_extra``).

    Args:
        model: an ``nn.Sequential`` (see :mod:`amstream.blocks`).
        mu: penalty weight ``mu_0`` of the objective (reference default 0.003).
        d_mu: increment of mu per step; the ramp stops at ``mu_max`` (default ``10 * mu``).
        code_steps: Nesterov-momentum steps per code and batch (reference 5).
        code_lr: code step size, one value or one per hidden code (reference 0.3).
        code_momentum: Nesterov momentum of the code steps (reference 0.9).
        cap_code_steps: cap each hidden code's step size at 1/L, L the curvature bound of its
            objective (:func:`amstream.functional.hidden_code_step_cap`), so that code steps stay
            stable when the next layer's weights grow (not in the reference, where a fixed step
            made AM-mem blow up late in a Permuted-MNIST stream). Inactive while ``code_lr`` is
            below the cap, as it practically always is with the reference's mean-reduced objective.
        lr_out: Adam learning rate of the output block (reference 0.008).
        weight_steps: Adam steps per batch on each local loss (reference 1).
        lr_halve_every: halve every learning rate each this many steps (reference: every 8 epochs).
        lambda_c: L1 weight on the codes (reference 0).
        reduction: ``"mean"`` (reference: every code loss is a mean over its elements, so hidden
            codes move about 1/(B d) as far as the last one) or ``"sum"`` (the objective summed over
            the batch: per-element code steps independent of batch size and width). See
            :func:`amstream.functional.code_objective`.
        prox: ``"paper"`` (detached proximity anchor, the paper's intent) or ``"official"`` (the
            reference code's zero-gradient proximity term, to compare with its numbers).
        bn_stats: ``"forward"``: BatchNorm running statistics are updated only by the plain forward
            pass; ``"all"``: also by every code and weight step, as in the reference code (bug A8).
        fast: closed-form gradients for blocks ``Linear(activation(c))`` (same values as autograd,
            far fewer kernel launches); Conv/BatchNorm/custom blocks always use autograd.
        output_fit: where the output block is fitted to the task loss. ``"codes"`` (the paper and
            the reference code): at the updated last code, whose task loss the code step has
            already reduced, so the output layer sees only the residual (which Adam rescales to
            full-size steps). ``"forward"``: at the forward pass's last code, the task loss's own
            gradient for that layer (as backprop's); the hidden layers still fit the codes. For
            bootstrapped regression (DQN) the residual fit let the Q-values run away (measured,
            ``agents.DQN_LEARNER_DEFAULTS``); on the digits stream the paper's rule had the
            better prequential accuracy (BENCHMARKS.md, section 7), so it stays the default.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        criterion: nn.Module | None = None,
        mu: float = 0.003,
        d_mu: float = 0.0,
        mu_max: float | None = None,
        code_steps: int = 5,
        code_lr: float | Sequence[float] = 0.3,
        code_momentum: float = 0.9,
        cap_code_steps: bool = True,
        lr_out: float = 0.008,
        weight_steps: int = 1,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        lr_halve_every: int | None = None,
        lambda_c: float = 0.0,
        reduction: str = "mean",
        prox: str = "paper",
        bn_stats: str = "forward",
        fast: bool = True,
        output_fit: str = "codes",
        device: str | torch.device = "auto",
        on_nonfinite: str = "warn",
        validate: bool = True,
        input_shape: tuple | None = None,
    ) -> None:
        _check_positive(mu=mu, code_lr=code_lr, lr_out=lr_out)
        _check_nonnegative(d_mu=d_mu, lambda_c=lambda_c, code_momentum=code_momentum)
        if int(code_steps) < 0 or int(weight_steps) < 1:
            raise ValueError(f"need code_steps >= 0 and weight_steps >= 1, got {code_steps}, {weight_steps}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if prox not in PROX_MODES:
            raise ValueError(f"prox must be one of {PROX_MODES}, got {prox!r}")
        if bn_stats not in ("forward", "all"):
            raise ValueError(f"bn_stats must be 'forward' or 'all', got {bn_stats!r}")
        if output_fit not in OUTPUT_FITS:
            raise ValueError(f"output_fit must be one of {OUTPUT_FITS}, got {output_fit!r}")
        super().__init__(model, criterion=criterion, device=device, on_nonfinite=on_nonfinite,
                         validate=validate, input_shape=input_shape)
        n_codes = len(self.blocks.hidden)
        if isinstance(code_lr, (int, float)):
            code_lrs = [float(code_lr)] * n_codes
        else:
            code_lrs = [float(v) for v in code_lr]
            if len(code_lrs) != n_codes:
                raise ValueError(f"code_lr has {len(code_lrs)} values but the model has {n_codes} codes")
        self.mu, self.d_mu, self.mu_max = float(mu), float(d_mu), mu_max
        self.code_steps, self.code_lrs, self.code_momentum = int(code_steps), code_lrs, float(code_momentum)
        self.lr_out, self.weight_steps, self.lr_halve_every = float(lr_out), int(weight_steps), lr_halve_every
        self.lambda_c, self.prox, self.bn_stats, self.fast = float(lambda_c), prox, bn_stats, bool(fast)
        self.reduction, self.cap_code_steps, self.output_fit = reduction, bool(cap_code_steps), output_fit
        self._last_codes: list[torch.Tensor] = []
        self._pending_forward: tuple | None = None
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
        self.optimizer = torch.optim.Adam(groups, betas=betas, eps=adam_eps, foreach=True)
        self._on_parameters_changed()

    def _on_parameters_changed(self) -> None:
        # closed-form weight gradients when every Adam-trained block is Linear(activation(c))
        views = [linear_view(b) for b in self._adam_blocks()]
        self._views = views if self.fast and all(v is not None for v in views) else None

    # --------------------------------------------------------------------------- subclass hooks
    def _adam_blocks(self) -> list[Block]:
        return list(self.blocks)

    def _block_lr(self, block: Block) -> float:
        return self.lr_out

    def _hidden_loss(self, block: Block, inp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(block(inp), target)

    def _fit_hidden_extra(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> list[torch.Tensor]:
        """Weight rule for hidden blocks outside Adam (AM-mem); returns their local losses."""
        return []

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    # ------------------------------------------------------------------------------------ step
    @property
    def current_mu(self) -> float:
        return mu_at(self.step_count, self.mu, self.d_mu, self.mu_max)

    @torch.no_grad()
    def forward_for_step(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the next step's forward pass ahead of it: returns ``(codes, output)``.

        For callers that need the network output before the update (``AMStrategy`` hands the
        logits to Avalanche's metrics and plugins): the next :meth:`step` on the same batch, with
        the weights unchanged, reuses these codes instead of computing them again. BatchNorm
        running statistics are updated here, as the step's own forward pass would.
        """
        self.sync_parameters()
        x = self._prepare_inputs(x, training=True)
        codes, out = self.blocks.forward_with_codes(x)
        # Holding x keeps its memory from being reused by another batch while the pass is pending.
        self._pending_forward = (x, self._batch_key(x), self._weight_versions(), codes, out)
        return codes, out

    def _prepare_inputs(self, x: torch.Tensor, *, training: bool) -> torch.Tensor:
        pending = self._pending_forward
        if training and pending is not None and x is pending[0] and pending[1] == self._batch_key(x):
            return x  # checked by forward_for_step and unchanged since
        return super()._prepare_inputs(x, training=training)

    @staticmethod
    def _batch_key(x: torch.Tensor) -> tuple:
        return (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, x._version)

    def _weight_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.model.parameters())

    def _forward_pass(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The forward codes of ``x``: those of :meth:`forward_for_step` if it ran on this very
        batch with the current weights, else a fresh no-grad pass."""
        pending, self._pending_forward = self._pending_forward, None
        if pending is not None and pending[1] == self._batch_key(x) and pending[2] == self._weight_versions():
            return pending[3], pending[4]
        with torch.no_grad():
            return self.blocks.forward_with_codes(x)

    def _step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        mu = self.current_mu
        factor = apply_lr_halving_(self.optimizer, self.step_count, self.lr_halve_every)
        code_lrs = [lr * factor for lr in self.code_lrs]

        # (1) forward pass; BatchNorm running statistics update here only
        codes, out = self._forward_pass(x)
        with torch.no_grad():
            loss = loss_fn(out).detach()

        with self._frozen_bn_stats():
            # (2) codes, top-down
            new_codes = update_codes(
                codes, self.blocks.hidden, self.blocks.output, loss_fn, mu=mu,
                steps=self.code_steps, lrs=code_lrs, momentum=self.code_momentum,
                prox=self.prox, lambda_c=self.lambda_c, fast=self.fast, reduction=self.reduction,
                cap_steps=self.cap_code_steps,
            ) if codes else []
            # (3) weights: every block on its own input/output codes (the output block at the
            # forward code with output_fit="forward")
            inputs = [x, *new_codes]
            if self.output_fit == "forward" and codes:
                inputs[-1] = codes[-1]
            if self._views is not None:
                local = self._fit_weights_fast(inputs, new_codes, codes, loss_fn, penalty)
            else:
                local = self._fit_weights(inputs, new_codes, loss_fn, penalty)

        self._last_codes = new_codes
        displacement = tuple(
            torch.linalg.vector_norm(n - c) / torch.linalg.vector_norm(c).clamp_min(1e-12)
            for n, c in zip(new_codes, codes)
        )
        return StepInfo(
            loss=loss, local_losses=tuple(local), code_displacement=displacement, mu=mu,
            lrs=tuple(g["lr"] for g in self.optimizer.param_groups), batch_size=x.shape[0],
        )

    def _adam_params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups if not g.get("solved") for p in g["params"]]

    def _fit_weights(self, inputs: list[torch.Tensor], targets: list[torch.Tensor], loss_fn: LossFn,
                     penalty: Penalty = None) -> list:
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
            self.optimizer.step()
            local = [item.detach() for item in losses]
        # p.grad keeps the last local gradient, as after a backprop step (Synaptic Intelligence reads it).
        return local + self._fit_hidden_extra(inputs, targets)

    @torch.no_grad()
    def _fit_weights_fast(self, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                          forward_codes: list[torch.Tensor], loss_fn: LossFn, penalty: Penalty = None) -> list:
        """``_fit_weights`` with closed-form gradients for Linear blocks (the same Adam step)."""
        n_hidden = len(self.blocks.hidden)
        lambda_w = getattr(self, "lambda_w", 0.0) if n_hidden else 0.0
        local: list[torch.Tensor] = []
        for step in range(self.weight_steps):
            local = []
            for block, view in zip(self._adam_blocks(), self._views):
                a = view.inputs(inputs[block.index])
                if block is self.blocks.output:
                    out = view.linear(a)
                    g_out = task_loss_grad(out, loss_fn)[1]
                    linear_weight_grads_(view, a, g_out)
                    continue
                # The first layer's input is x, which no code update changes: its prediction is
                # the forward code, so the widest matmul is not recomputed.
                pred = forward_codes[0] if block.index == 0 and step == 0 else view.linear(a)
                residual = pred - targets[block.index]
                loss = residual.square().mean()
                local.append(loss + lambda_w * view.linear.weight.abs().mean() if lambda_w else loss)
                linear_weight_grads_(view, a, residual.mul_(2.0 / residual.numel()), lambda_w)
            add_penalty_grads_(penalty, self._adam_params())
            self.optimizer.step()
            if step + 1 < self.weight_steps:
                self.optimizer.zero_grad(set_to_none=True)
        return local + self._fit_hidden_extra(inputs, targets)

    # ------------------------------------------------------------------------------- internals
    def _frozen_bn_stats(self):
        """Use batch statistics without updating running ones (unless bn_stats == "all")."""
        return contextlib.nullcontext() if self.bn_stats == "all" else frozen_batchnorm_stats(self.model)

    def _check_tensors(self, info: StepInfo) -> list[torch.Tensor]:
        return super()._check_tensors(info) + list(self._last_codes)

    def hparams(self) -> dict:
        return {
            "mu": self.mu, "d_mu": self.d_mu, "mu_max": self.mu_max, "code_steps": self.code_steps,
            "code_lr": self.code_lrs, "code_momentum": self.code_momentum,
            "cap_code_steps": self.cap_code_steps, "output_fit": self.output_fit, "lr_out": self.lr_out,
            "weight_steps": self.weight_steps, "lr_halve_every": self.lr_halve_every,
            "lambda_c": self.lambda_c, "reduction": self.reduction, "prox": self.prox, "bn_stats": self.bn_stats,
        }


class AMAdam(AltMinLearner):
    """AM-Adam: alternating minimization whose weight rule is Adam on each layer's local loss.

    Hidden block l minimizes ``MSE(f_l(c_{l-1}), c_l) [+ lambda_w mean|W_l|]`` and the output block
    the task loss ``L(f_out(c_L), y)``, with one Adam parameter group per block (Choromanska et al.,
    ICML 2019, Sec. 3). Defaults follow the reference code (``IBM/online-alt-min``).

    Args:
        lr: Adam learning rate of the hidden blocks (reference 0.008).
        lambda_w: L1 weight on the hidden weights (reference 0).
        **kwargs: see :class:`AltMinLearner`.

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

    def __init__(self, model: nn.Module, *, lr: float = 0.008, lambda_w: float = 0.0, **kwargs) -> None:
        _check_positive(lr=lr)
        _check_nonnegative(lambda_w=lambda_w)
        self.lr, self.lambda_w = float(lr), float(lambda_w)
        super().__init__(model, **kwargs)

    def _block_lr(self, block: Block) -> float:
        return self.lr_out if block is self.blocks.output else self.lr

    def _hidden_loss(self, block: Block, inp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(block(inp), target)
        if self.lambda_w:
            loss = loss + self.lambda_w * sum(p.abs().mean() for p in block.parameters() if p.dim() > 1)
        return loss

    def hparams(self) -> dict:
        return {**super().hparams(), "lr": self.lr, "lambda_w": self.lambda_w}


def _check_positive(**values) -> None:
    for name, value in values.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"invalid {name}: {value!r} (must be > 0)")


def _check_nonnegative(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"invalid {name}: {value!r} (must be >= 0)")

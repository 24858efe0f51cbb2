"""AM-mem: alternating minimization whose hidden weights are solved from co-activation memories.

Choromanska et al., "Beyond Backprop", ICML 2019, Sec. 3 (AM-mem), following the surrogate of
Mairal et al., "Online dictionary learning for sparse coding", ICML 2009. For each hidden Linear
layer with input ``a = sigma(c_{l-1})`` (plus a constant 1 column for the bias) and code ``c = c_l``:

    A_l += a^T a,    B_l += c^T a,    W_l = argmin_W 1/2 Tr(W A W^T) - Tr(W B^T) [+ L1]

i.e. ``W A = B``, the least-squares fit of the layer to every (input, code) pair seen so far. The
reference code solves it with one Gauss-Seidel sweep over the columns of W per batch, warm-started
(a Python loop, one host sync per column). Here that sweep is a few GEMMs and triangular solves (exact); a full
Cholesky solve and an L1 proximal (FISTA) variant are options. The output layer is trained with
Adam on the task loss, as in the paper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import Block, UnsupportedModelError
from ..memory import gauss_seidel_sweep_, memory_solve, proximal_sweep, update_memory_
from .altmin import AltMinLearner, _check_nonnegative

__all__ = ["AMMem"]

MEMORY_MODES = ("sum", "mean", "forget")
SOLVERS = ("sweep", "solve")
DAMPING_SCALES = ("mean", "diagonal")


class AMMem(AltMinLearner):
    """AM-mem learner.

    Defaults. The reference code has no driver script for AM-mem, so these were chosen here, on
    digits (batch 1, 10, 32) and MNIST (batch 200); BENCHMARKS.md has the runs. AM-Adam's
    ``mu=0.003, code_lr=0.3`` make the last code move several times its own norm on the first
    batches, and an exact solve follows it and diverges. With the reference's mean-reduced code
    losses the lower codes barely move, so the lower layers stay near their initialization (one
    MNIST epoch: 77-86%). What works on both data sets: the objective summed over samples
    (``reduction="sum"``), memories that forget (``forget=0.3``) so that the solve stops fitting
    codes made by old weights, and a damped solve (``damping=1.0``) that keeps rarely-active
    inputs from getting huge weights (one MNIST epoch: 93.4%; digits at batch 1: 84%).

    Args:
        mu, code_lr, reduction: as in :class:`AltMinLearner`, with AM-mem's own defaults.
        memory: ``"sum"`` (running sums, the reference's eta = 0), ``"mean"`` (running means: same
            solution, bounded magnitudes) or ``"forget"`` (exponential forgetting by ``forget``).
        forget: forgetting factor eta in ``A <- (1 - eta) A + eta a^T a`` when ``memory="forget"``.
        solver: ``"sweep"`` (one exact Gauss-Seidel sweep per batch, warm-started, as the reference)
            or ``"solve"`` (the converged fixed point, by Cholesky).
        sweeps: Gauss-Seidel sweeps per batch with ``solver="sweep"``.
        damping: weight of a proximal term ``(lam/2) ||W - W_old||^2`` with ``lam = damping *
            mean(diag A)``, which turns the system into ``W (A + lam I) = B + lam W_old`` (0: the
            reference's undamped system).
        damping_scale: how ``lam`` is scaled per input. ``"mean"``: one ``lam`` for every input, as
            above; an input whose second moment is far below the mean diagonal then moves only a
            ``A_jj / (A_jj + lam)`` fraction of its exact step per sweep (MountainCar's velocity,
            ~1e-4 against ~0.4, moves 0.02% a sweep). ``"diagonal"``: ``lam_j = damping * A_jj``
            (Levenberg-Marquardt's scaling), so every input's column moves ``1 / (1 + damping)`` of
            its exact coordinate step, whatever the input's scale. Measured (BENCHMARKS.md, section
            7): slightly worse on digits (prequential 87.0% against 89.5%) and divergent on
            MountainCar, where rarely-active ReLU inputs (tiny ``A_jj``) lose the mean's brake.
        lambda_w: L1 weight (in units of ``A_jj``, as the reference); > 0 switches to FISTA.
        prox_iterations: FISTA iterations per batch when ``lambda_w > 0``.
        ridge: relative ridge of the full solve (with single samples the memories stay
            rank-deficient for a long time); ``eps``: diagonal guard of the sweep.
        memory_dtype: dtype of A and B (default: the model's; float64 keeps long sums exact).
        **kwargs: code-update and output-layer options of :class:`AltMinLearner`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mu: float = 0.3,
        code_lr: float = 0.1,
        reduction: str = "sum",
        memory: str = "forget",
        forget: float = 0.3,
        solver: str = "sweep",
        sweeps: int = 1,
        lambda_w: float = 0.0,
        prox_iterations: int = 10,
        ridge: float = 1e-3,
        damping: float = 1.0,
        damping_scale: str = "mean",
        eps: float = 1e-10,
        memory_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if damping_scale not in DAMPING_SCALES:
            raise ValueError(f"damping_scale must be one of {DAMPING_SCALES}, got {damping_scale!r}")
        if memory == "forget" and not 0.0 < forget <= 1.0:
            raise ValueError(f"forget must be in (0, 1] with memory='forget', got {forget!r}")
        _check_nonnegative(lambda_w=lambda_w, ridge=ridge, eps=eps, damping=damping)
        if int(sweeps) < 1 or int(prox_iterations) < 1:
            raise ValueError("sweeps and prox_iterations must be >= 1")
        self.memory, self.forget, self.solver = memory, float(forget), solver
        self.sweeps, self.lambda_w, self.prox_iterations = int(sweeps), float(lambda_w), int(prox_iterations)
        self.ridge, self.eps = float(ridge), float(eps)
        self.damping, self.damping_scale = float(damping), damping_scale
        super().__init__(model, mu=mu, code_lr=code_lr, reduction=reduction, **kwargs)
        self._check_hidden_blocks()
        self.memory_dtype = memory_dtype or next(self.model.parameters()).dtype
        self._memories: list[tuple[torch.Tensor, torch.Tensor]] = []
        for block in self.blocks.hidden:
            layer: nn.Linear = block.weight_layer  # type: ignore[assignment]
            d_in = layer.in_features + (layer.bias is not None)
            kw = {"dtype": self.memory_dtype, "device": self.device}
            self._memories.append((torch.zeros(d_in, d_in, **kw), torch.zeros(layer.out_features, d_in, **kw)))
        self.samples_seen = 0

    _counters = (*AltMinLearner._counters, "samples_seen")

    def _adam_blocks(self) -> list[Block]:
        return [self.blocks.output]

    def _check_hidden_blocks(self) -> None:
        for block in self.blocks.hidden:
            lin = list(block.lin)
            if len(lin) != 1 or type(lin[0]) is not nn.Linear:
                raise UnsupportedModelError(
                    f"AM-mem needs every hidden code layer to be a single nn.Linear (no BatchNorm, no "
                    f"Conv); block {block.index} is {block.describe()}. Use AMAdam for this model."
                )
            if any(True for _ in block.pre.parameters()):
                raise UnsupportedModelError(
                    f"AM-mem needs parameter-free activations; block {block.index} has trainable "
                    f"parameters in {block.describe()}"
                )

    def _fit_hidden_extra(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> list[torch.Tensor]:
        local = []
        for block, (A, Bm) in zip(self.blocks.hidden, self._memories):
            layer: nn.Linear = block.weight_layer  # type: ignore[assignment]
            with torch.no_grad():
                a = block.pre(inputs[block.index]).flatten(1)
                if layer.bias is not None:
                    a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
                c = targets[block.index].flatten(1)
                update_memory_(A, Bm, a.to(A.dtype), c.to(A.dtype), mode=self.memory,
                               count=self.samples_seen, forget=self.forget)
                # A fresh [W | b] copy in the memory dtype: the sweep updates it in place.
                if layer.bias is not None:
                    W = torch.cat([layer.weight, layer.bias[:, None]], dim=1).to(A.dtype)
                else:
                    W = layer.weight.detach().to(A.dtype, copy=True)
                W = self._solve(W, A, Bm).to(layer.weight.dtype)
                layer.weight.copy_(W[:, : layer.in_features])
                if layer.bias is not None:
                    layer.bias.copy_(W[:, -1])
                local.append(F.mse_loss(a @ W.T, c))
        self.samples_seen += inputs[0].shape[0]
        return local

    def _solve(self, W: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor) -> torch.Tensor:
        # Proximal term (lam/2)||W - W_old||^2: the system becomes W (A + lam I) = Bm + lam W_old.
        lam = self._damping_shift(A)
        if self.lambda_w > 0 or self.solver == "solve":
            if self.damping:
                A = A + torch.diag_embed(lam.expand(A.shape[0]))
                Bm = Bm + lam * W
            if self.lambda_w > 0:
                return proximal_sweep(W, A, Bm, self.lambda_w, self.prox_iterations)
            return memory_solve(A, Bm, self.ridge)
        anchor = W.clone() if self.sweeps > 1 else W  # the proximal anchor: the weights before the step
        for _ in range(self.sweeps):  # in place; the damping is a shift of the sweep's diagonal
            gauss_seidel_sweep_(W, A, Bm, self.eps, shift=lam, anchor=anchor)
        return W

    def _damping_shift(self, A: torch.Tensor) -> torch.Tensor | float:
        """The proximal weight: a scalar (``"mean"``) or one per input column (``"diagonal"``)."""
        if not self.damping:
            return 0.0
        if self.damping_scale == "diagonal":
            return self.damping * torch.diagonal(A)
        return self.damping * torch.diagonal(A).mean()

    def _extra_tensors(self) -> list[torch.Tensor]:
        return [t for pair in self._memories for t in pair]

    def _extra_state(self) -> dict:
        return {"memories": [[A, Bm] for A, Bm in self._memories], "samples_seen": self.samples_seen}

    def _load_extra_state(self, state: dict) -> None:
        for (A, Bm), (A_new, B_new) in zip(self._memories, state["memories"]):
            A.copy_(A_new)
            Bm.copy_(B_new)
        self.samples_seen = int(state["samples_seen"])

    def hparams(self) -> dict:
        return {**super().hparams(), "memory": self.memory, "forget": self.forget, "solver": self.solver,
                "sweeps": self.sweeps, "damping": self.damping,
                "damping_scale": self.damping_scale, "lambda_w": self.lambda_w, "ridge": self.ridge}

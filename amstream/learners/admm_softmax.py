"""ADMM-Softmax: multinomial logistic regression by the alternating direction method of multipliers.

Wu Fung, Tyrvainen, Ruthotto, Haber, "ADMM-Softmax: an ADMM approach for multinomial logistic
regression", Electronic Transactions on Numerical Analysis 52:214-229, 2020 (arXiv 1901.09450);
reference code ``swufung/ADMMSoftmax`` (MATLAB).

The problem, row-major here (one row per sample: ``D`` is ``(N, n)``, the features with a 1 for the
bias; ``W`` is ``(C, n)``, weight and bias; ``C1`` the one-hot labels)::

    min_W  sum_i CE(W d_i, c_i) + alpha/2 ||L (W - W_ref)^T||^2     split as    Z = D W^T

and the scaled ADMM iteration on it:

- W-step, a linear least-squares problem: ``(rho D^T D + alpha M) W^T = rho D^T (Z + U) + alpha M W_ref^T``
  with ``M = L^T L`` (``L = I``, or the per-channel image Laplacian of the reference's features);
- Z-step, one small smooth strongly convex problem per sample,
  ``z_i = argmin CE(z, c_i) + rho/2 ||z - (W d_i - u_i)||^2``, solved by Newton's method whose
  Hessian ``rho I + diag(p) - p p^T`` is inverted by Sherman-Morrison in O(C) per sample;
- dual step ``U <- U + Z - D W^T``; primal residual ``||Z - D W^T||``, dual residual
  ``||rho D^T (Z - Z_old)||``, and the reference's adaptive rho (x2 or /2 when one residual exceeds
  ten times the other, the scaled dual rescaled to match).

New here, besides the row-major batched form: the Z-step's Sherman-Morrison Newton vectorized over
the batch (the reference runs a Newton-CG over all samples jointly), factorizations cached per rho
(one eigendecomposition serves every rho when ``L = I``), the rho-clipping fix (the reference's
rescale of ``U`` after clipping is a no-op; ``faithful=True`` keeps it), a Z-step for any loss
(L-BFGS through autograd: ``step`` with a custom loss, such as a DQN's), and the streaming mode:
``D^T D`` and ``D^T (Z + U)`` kept as running sums (or means, or with forgetting, as AM-mem's
memories) over the batches seen, each new batch solved with its own ``Z`` and ``U``. The reference's
whole-data-set run is :meth:`ADMMSoftmax.fit`.

Every layer before the model's last ``nn.Linear`` is a fixed feature map, not trained (the paper's
"extreme learning" features: a random convolution with tanh). ADMM-Softmax trains a linear
classifier on given features.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import UnsupportedModelError
from ..hparams import HParam
from ..memory import update_memory_
from ..utils import RunClock
from .base import Learner, LossFn, Penalty, StepInfo
from .groups import ParameterGroups
from .penalty import frozen_penalty, penalty_value

__all__ = ["ADMMSoftmax", "softmax_prox_newton", "newton_direction", "newton_step", "armijo_trial", "newton_kernels",
           "prox_lbfgs", "NormalEquations", "image_laplacian", "update_rho", "StreamingSoftmaxADMM"]

MEMORY_MODES = ("sum", "mean", "forget")
MODES = ("stream", "batch")
REGULARIZERS = ("identity", "laplacian")


# ------------------------------------------------------------------------------------- the Z-step
def _prox_ce_objective(Z: torch.Tensor, Y: torch.Tensor, V: torch.Tensor, rho: float) -> torch.Tensor:
    """Per-sample ``CE(z, y) + rho/2 ||z - v||^2`` with the cross-entropy from log-softmax."""
    return torch.logsumexp(Z, dim=1) - (Z * Y).sum(1) + 0.5 * rho * (Z - V).square().sum(1)


def newton_direction(P: torch.Tensor, G: torch.Tensor, rho: float) -> torch.Tensor:
    """``H^{-1} g`` for every row, ``H = diag(rho + p) - p p^T``, by Sherman-Morrison in O(C) per row:
    ``a + b (p.a) / (1 - p.b)`` with ``a = g / (rho + p)``, ``b = p / (rho + p)``, the denominator
    computed as ``rho sum_k b_k`` (the same number, since ``sum p = 1``, without the cancellation)."""
    scale = rho + P
    a, b = G / scale, P / scale
    return a + b * ((P * a).sum(1, keepdim=True) / (rho * b.sum(1, keepdim=True)))


def newton_step(Z: torch.Tensor, V: torch.Tensor, Y: torch.Tensor, f: torch.Tensor, previous: torch.Tensor,
                rho: float, tol: float, eps: float) -> tuple[torch.Tensor, ...]:
    """One Newton direction of :func:`softmax_prox_newton` for every row and its tests (a pure tensor
    function, compiled with ``compile=True``): ``(S, decrease, largest |gradient|, active rows,
    rounding of the objective)``.

    The rounding: near the optimum a row's cross-entropy is the small difference of ``logsumexp(z)``
    and ``z.y``, each up to ``max|z| + log C`` in size, and the objective's rounding is that of
    those terms, not of the small objective (whose own rounding made float32 rows halve steps they
    could not measure, up to 30 times)."""
    P = torch.softmax(Z, dim=1)
    G = P - Y + rho * (Z - V)
    S = newton_direction(P, G, rho)
    decrease = (G * S).sum(1)  # g^T H^-1 g > 0: S is a descent direction of a strictly convex function
    largest = G.abs().amax(1)
    stalled = (0.5 * decrease <= 100 * eps * (1.0 + f.abs())) & (largest > 0.5 * previous)
    active = (largest > tol * (1.0 + rho * (Z - V).abs().amax(1))) & ~stalled
    rounding = 4 * eps * (f.abs() + 2 * (Z.abs().amax(1) + math.log(Z.shape[1])))
    return S, decrease, largest, active, rounding


def armijo_trial(Z: torch.Tensor, f: torch.Tensor, S: torch.Tensor, t: torch.Tensor, decrease: torch.Tensor,
                 active: torch.Tensor, slack: torch.Tensor, V: torch.Tensor, Y: torch.Tensor, rho: float,
                 armijo: float) -> tuple[torch.Tensor, ...]:
    """One backtracking trial of :func:`softmax_prox_newton` (a pure tensor function): the rows still
    searching take ``Z - t S`` where it decreases their objective enough, the others halve ``t``.
    Returns ``(Z, f, rows still searching, t)``."""
    Z_try = Z - t[:, None] * S
    f_try = _prox_ce_objective(Z_try, Y, V, rho)
    ok = f_try <= f - armijo * t * decrease + slack
    accept = active & ok
    Z = torch.where(accept[:, None], Z_try, Z)
    f = torch.where(accept, f_try, f)
    active = active & ~ok
    return Z, f, active, torch.where(active, 0.5 * t, t)


def newton_kernels(learner: Learner) -> tuple[Callable, Callable] | None:
    """The learner's compiled :func:`newton_step` and :func:`armijo_trial` with ``compile=True`` (the
    ``kernels`` of :func:`softmax_prox_newton`), else None (eager)."""
    if not learner.compile:
        return None
    return learner._compiled("the Newton step", newton_step), learner._compiled("the Armijo trial", armijo_trial)


@torch.no_grad()
def softmax_prox_newton(V: torch.Tensor, Y: torch.Tensor, rho: float, Z0: torch.Tensor | None = None, *,
                        iterations: int = 100, tol: float | None = None, armijo: float = 1e-4,
                        max_halvings: int = 30, kernels: tuple[Callable, Callable] | None = None,
                        ) -> tuple[torch.Tensor, int]:
    """``argmin_Z sum_i CE(z_i, y_i) + rho/2 ||z_i - v_i||^2``, each row by Newton's method.

    The Hessian of row ``i`` is ``H = diag(rho + p) - p p^T`` (``p = softmax(z_i)``), a diagonal minus
    a rank-one term, so ``H^{-1} g = a + b (p.a) / (1 - p.b)`` with ``a = g / (rho + p)`` and
    ``b = p / (rho + p)`` (Sherman-Morrison), O(C) per row. The denominator is computed as
    ``rho sum_k p_k / (rho + p_k)`` (equal to ``1 - p.b``, without its cancellation), positive for
    every ``rho > 0``. Each row takes its own Armijo backtracking step, so the iteration converges from
    any start (the objective is strongly convex).

    Args:
        V: ``(N, C)`` the centres ``D W^T - U``; Y: ``(N, C)`` one-hot (or any probability) targets.
        rho: the penalty, > 0. Z0: the start (default ``V``).
        iterations: at most this many Newton steps.
        tol: a row has converged when its gradient's largest entry is below
            ``tol (1 + rho max|z - v|)``, the size of its terms (default: 10 x the dtype's machine
            epsilon, near the rounding of the gradient itself), or when its gradient stopped
            shrinking while the predicted decrease is at the objective's rounding (a tiny rho makes
            the problem so ill-conditioned that the first test cannot be met); the iteration stops
            when all rows have converged.
        kernels: ``(newton_step, armijo_trial)``, or their compiled versions (a learner's
            ``compile=True``); the tests of convergence stay on the host, one sync per Newton step
            and per backtracking trial.

    Returns:
        ``(Z, newton_steps_taken)``.
    """
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    step, trial = kernels or (newton_step, armijo_trial)
    eps = torch.finfo(V.dtype).eps
    tol = 10 * eps if tol is None else tol
    Z = (V if Z0 is None else Z0).clone()
    f = _prox_ce_objective(Z, Y, V, rho)
    taken = 0
    previous = torch.full_like(f, math.inf)
    for _ in range(iterations):
        S, decrease, previous, active, slack = step(Z, V, Y, f, previous, rho, tol, eps)
        if not bool(active.any()):  # one host sync per Newton step
            break
        taken += 1
        # a step that the objective's rounding (slack) cannot resolve is taken
        t = torch.ones_like(decrease)
        for _ in range(max_halvings):
            Z, f, active, t = trial(Z, f, S, t, decrease, active, slack, V, Y, rho, armijo)
            if not bool(active.any()):
                break
    return Z, taken


def prox_lbfgs(loss: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor, rho: float,
               Z0: torch.Tensor | None = None, *, iterations: int = 50) -> torch.Tensor:
    """``argmin_Z loss(Z) + rho/2 ||Z - V||^2`` for any differentiable scalar ``loss`` (L-BFGS with a
    strong-Wolfe line search, through autograd): the Z-step of a task loss other than the
    cross-entropy (a DQN's temporal-difference loss, a distillation term)."""
    Z = (V if Z0 is None else Z0).detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([Z], lr=1.0, max_iter=iterations, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        value = loss(Z) + 0.5 * rho * (Z - V).square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        if not bool(torch.isfinite(loss(Z.detach()))):
            return torch.full_like(V, math.nan)  # nothing to minimize: the step guard rolls the step back
        try:
            opt.step(closure)
        except RuntimeError:
            if bool(torch.isfinite(Z).all()) and bool(torch.isfinite(loss(Z.detach()))):
                raise
            return torch.full_like(V, math.nan)  # the line search ran into an overflow of the loss
    return Z.detach()


# ------------------------------------------------------------------------------------- the W-step
class NormalEquations:
    """Solves ``(offset + rho G + alpha M) X = R`` for changing ``rho`` with factorizations cached.

    ``M = None`` means the identity: one symmetric eigendecomposition ``G = Q diag(lam) Q^T`` then
    serves every rho, ``X = Q ((Q^T R) / (rho lam + alpha))`` (``eigen=True``, worth it when G stays
    fixed over many iterations, as in a full-batch run); otherwise a Cholesky factor per distinct rho
    (rho moves by factors of 2, so few distinct values recur).
    """

    def __init__(self, G: torch.Tensor, alpha: float, M: torch.Tensor | None = None, *, eigen: bool = False,
                 offset: torch.Tensor | None = None) -> None:
        if eigen and offset is not None:
            raise ValueError("the eigendecomposition serves every rho only without an offset")
        self.G, self.alpha, self.M, self.offset = G, float(alpha), M, offset
        self._eig = None
        if eigen and M is None:
            lam, Q = torch.linalg.eigh(G)
            self._eig = (lam.clamp_min(0.0), Q)  # G is a Gram matrix: negative eigenvalues are rounding
        self._cholesky: dict[float, torch.Tensor] = {}

    def solve(self, rho: float, R: torch.Tensor) -> torch.Tensor:
        if self._eig is not None:
            lam, Q = self._eig
            return Q @ ((Q.T @ R) / (rho * lam + self.alpha)[:, None])
        factor = self._cholesky.get(rho)
        if factor is None:
            A = rho * self.G if self.offset is None else torch.add(self.offset, self.G, alpha=rho)
            if self.M is None:
                A.diagonal().add_(self.alpha)
            else:
                A.add_(self.M, alpha=self.alpha)
            factor, info = torch.linalg.cholesky_ex(A)
            ridge = 10 * torch.finfo(A.dtype).eps * float(torch.diagonal(A).abs().max()) + 1e-30
            for _ in range(8):  # singular to working precision (alpha = 0, or float32): the smallest ridge that works
                if int(info) == 0:
                    break
                shifted = A.clone()
                shifted.diagonal().add_(ridge)
                factor, info = torch.linalg.cholesky_ex(shifted)
                ridge *= 100
            # still failing: A is not finite; the non-finite solution makes the step guard roll the step back
            self._cholesky[rho] = factor
        return torch.cholesky_solve(R, factor)


def image_laplacian(shape: tuple[int, int, int], bias: bool = True, *, dtype=torch.float32) -> torch.Tensor:
    """``L``: the 5-point Laplacian of each channel of ``(channels, height, width)`` features
    (reflecting boundaries), block-diagonal over channels and scaled by ``1 / n_features``, with 1 on
    the bias entry, as the reference's smoothness regularizer. Returns the dense ``(n, n)`` matrix."""
    channels, height, width = shape

    def second_difference(n: int) -> torch.Tensor:
        d = -2.0 * torch.eye(n, dtype=torch.float64)
        d += torch.diag(torch.ones(n - 1, dtype=torch.float64), 1) + torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)
        if n > 1:
            d[0, 0] = d[-1, -1] = -1.0  # reflecting (Neumann) ends: constants are not penalized
        else:
            d[0, 0] = 0.0
        return d

    lap = torch.kron(torch.eye(height, dtype=torch.float64), second_difference(width)) + torch.kron(
        second_difference(height), torch.eye(width, dtype=torch.float64))
    n_features = channels * height * width
    L = torch.block_diag(*([lap] * channels)) / n_features
    if bias:
        L = torch.block_diag(L, torch.ones(1, 1, dtype=torch.float64))
    return L.to(dtype)


def update_rho(rho: float, U: torch.Tensor, r_primal: float, r_dual: float, *, mu: float = 10.0,
               scale: float = 2.0, bounds: tuple[float, float] = (1e-16, 1e3), faithful: bool = False) -> float:
    """The reference's residual balancing: rho x scale (and ``U / scale``) when the primal residual
    exceeds ``mu`` times the dual one, rho / scale (``U x scale``) in the opposite case; then rho is
    clipped to ``bounds``. ``U`` is the scaled dual ``Y / rho``, so it is rescaled in place by
    ``rho_old / rho_new``; after a clip, the reference multiplies ``U`` by ``rho / bound`` *after*
    setting ``rho = bound``, a no-op, so the scaled dual no longer matches rho: ``faithful=True`` keeps
    that, the default rescales by the clipped change. Returns the new rho."""
    new = rho
    if r_primal > mu * r_dual:
        new = rho * scale
    elif r_dual > mu * r_primal:
        new = rho / scale
    if new == rho:
        return rho
    U.mul_(rho / new)
    clipped = min(max(new, bounds[0]), bounds[1])
    if clipped != new and not faithful:
        U.mul_(new / clipped)
    return clipped


# ------------------------------------------------------------------------------ streaming solver
class StreamingSoftmaxADMM:
    """ADMM-Softmax on a stream of batches, for any linear output layer (the learner's, AM-mem's).

    Each past batch ``b`` stays in the W-step as its augmented-Lagrangian term at the end of its own
    iterations, ``rho_b/2 ||D_b W^T - (Z_b + U_b)||^2``: a quadratic model of its loss whose gradient
    at the batch's solution is the loss gradient (``-rho_b D_b^T U_b = D_b^T grad CE``). So the
    memories are weighted by each batch's own rho, ``G = sum rho_b D_b^T D_b`` and
    ``H = sum rho_b (Z_b + U_b)^T D_b`` (running sums, means or with forgetting, as
    :func:`amstream.memory.update_memory_`); the scaled duals of old batches, ``Y_b / rho_b``, would
    not survive a change of rho otherwise. :meth:`update` runs ``iterations`` ADMM iterations on one
    batch with its own ``Z`` (started at ``D W^T``) and ``U`` (started at 0),
    ``(G + rho D^T D + alpha M) W^T = H^T + rho D^T (Z + U)``, and folds the batch in; with
    ``memory=None`` the batch is solved alone (no memories).
    """

    def __init__(self, n_in: int, n_out: int, *, dtype: torch.dtype, device: torch.device, iterations: int = 2,
                 rho: float = 1.0, adaptive_rho: bool = True, rho_mu: float = 10.0,
                 rho_bounds: tuple[float, float] = (1e-16, 1e3), alpha: float = 1e-3, M: torch.Tensor | None = None,
                 memory: str | None = "sum", forget: float = 0.05, z_iterations: int = 50,
                 z_tol: float | None = None, faithful: bool = False,
                 newton_kernels: tuple[Callable, Callable] | None = None) -> None:
        if memory is not None and memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES} or None, got {memory!r}")
        self.iterations, self.adaptive_rho, self.rho_mu = iterations, adaptive_rho, rho_mu
        self.rho_bounds, self.alpha, self.M = tuple(rho_bounds), alpha, M
        self.memory, self.forget, self.faithful = memory, forget, faithful
        self.z_iterations, self.z_tol = z_iterations, z_tol
        self.newton_kernels = newton_kernels  # softmax_prox_newton's, compiled or None
        self.G = torch.zeros(n_in, n_in, dtype=dtype, device=device)
        self.H = torch.zeros(n_out, n_in, dtype=dtype, device=device)
        self.rho = float(rho)
        self.samples_seen = 0

    def _memory_weights(self, batch: int) -> tuple[float, float]:
        """(weight of the memories, weight of the new batch) in this update."""
        if self.memory is None:
            return 0.0, 1.0
        if self.memory == "sum":
            return 1.0, 1.0
        if self.memory == "mean":
            total = self.samples_seen + batch
            return self.samples_seen / total, 1.0 / total
        return 1.0 - self.forget, self.forget

    def z_step(self, V: torch.Tensor, Y: torch.Tensor | None, loss_fn: LossFn | None, rho: float,
               Z0: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Newton with the one-hot targets ``Y``; else L-BFGS on ``batch x loss_fn`` (a mean-reduced
        task loss times the batch size: the sum the reference minimizes)."""
        if Y is not None:
            return softmax_prox_newton(V, Y, rho, Z0, iterations=self.z_iterations, tol=self.z_tol,
                                       kernels=self.newton_kernels)[0]
        batch = V.shape[0]
        return prox_lbfgs(lambda Z: batch * loss_fn(Z.to(out_dtype)), V, rho, Z0, iterations=self.z_iterations)

    def update(self, D: torch.Tensor, W: torch.Tensor, Y: torch.Tensor | None, loss_fn: LossFn | None, *,
               out_dtype: torch.dtype, linear_term: torch.Tensor | None = None,
               reduce: Callable[[list[torch.Tensor]], None] | None = None,
               batch_size: int | None = None) -> tuple[torch.Tensor, dict]:
        """ADMM iterations on the batch ``D`` (rows with the bias 1) from the weights ``W`` (``[W | b]``);
        ``linear_term``: a penalty's gradient, added to the W-step's objective. Returns the new
        weights and the diagnostics (residuals, rho).

        Data-parallel (``reduce``: sums tensors over the processes in place; ``batch_size``: the whole
        batch's): ``D`` is this process's shard; every sum over samples (the Gram matrix, the W-step's
        right-hand side, the residuals, the memories' increments) is reduced, the Z-step and the duals
        are per sample, so every process solves the whole batch's W-steps."""
        batch = D.shape[0] if batch_size is None else batch_size
        keep, new = self._memory_weights(batch)
        DtD = D.T @ D
        if reduce is not None:
            reduce([DtD])
        solver = NormalEquations(new * DtD, self.alpha, self.M, offset=keep * self.G if keep else None)
        Z = D @ W.T
        U = torch.zeros_like(Z)
        rho = self.rho
        r_primal = r_dual = torch.zeros((), dtype=W.dtype, device=W.device)
        for _ in range(self.iterations):
            # W-step: (keep G + rho new D^T D + alpha M) W^T = keep H^T + rho new D^T (Z + U) (+ alpha M W_ref^T, W_ref = 0)
            R = D.T @ (Z + U)
            if reduce is not None:
                reduce([R])
            R = rho * new * R
            if keep:
                R = R + keep * self.H.T
            if linear_term is not None:
                R = R - linear_term.T
            W = solver.solve(rho, R).T
            # Z-step per sample around D W^T - U, then the scaled dual step
            DW = D @ W.T
            Z_old = Z
            Z = self.z_step(DW - U, Y, loss_fn, rho, Z, out_dtype)
            U = U + Z - DW
            primal_sq, dual = (Z - DW).square().sum().reshape(1), D.T @ (Z - Z_old)
            if reduce is not None:
                reduce([primal_sq, dual])
            r_primal = primal_sq[0].sqrt()
            r_dual = rho * new * dual.norm()
            if self.adaptive_rho:
                rho = update_rho(rho, U, float(r_primal), float(r_dual), mu=self.rho_mu, bounds=self.rho_bounds,
                                 faithful=self.faithful)
        if self.memory is not None:  # the batch's term, weighted by its own rho: sqrt(rho) on both sides
            if reduce is None:
                root = math.sqrt(rho)
                update_memory_(self.G, self.H, root * D, root * (Z + U), mode=self.memory, count=self.samples_seen,
                               forget=self.forget)
            else:  # the shards' increments add up; D^T D is reduced already
                H_increment = (Z + U).T @ D
                reduce([H_increment])
                self.G.mul_(keep).add_(DtD, alpha=new * rho)
                self.H.mul_(keep).add_(H_increment, alpha=new * rho)
        self.samples_seen += batch
        self.rho = rho
        return W, {"admm/primal_residual": r_primal, "admm/dual_residual": r_dual, "admm/rho": rho}

    def objective(self, out: torch.Tensor, Y: torch.Tensor | None, loss_fn: LossFn | None, W: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
        """The batch's part of the ADMM objective: the summed task loss plus the regularizer."""
        if Y is not None:
            data = (torch.logsumexp(out, 1) - (out * Y).sum(1)).sum()
        else:
            data = out.shape[0] * loss_fn(out.to(out_dtype)).to(out.dtype)
        reg = W.square().sum() if self.M is None else ((W @ self.M) * W).sum()
        return data + 0.5 * self.alpha * reg


# ------------------------------------------------------------------------------------- the learner
class ADMMSoftmax(Learner):
    """ADMM-Softmax: the output Linear layer fitted by ADMM on the layers before it as fixed features.

    Streams by default (``mode="stream"``): the least-squares statistics of the batches seen are kept
    as memories, and each batch runs ``iterations`` ADMM iterations with its own ``Z`` and ``U`` (new
    here). ``mode="batch"`` solves each batch alone, as the reference solves its data set;
    :meth:`fit` runs the reference's full-batch iteration on a whole data set. The faithful settings
    are ``presets["reference"]``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from amstream import ADMMSoftmax
        >>> learner = ADMMSoftmax(nn.Linear(4, 3), device="cpu")
        >>> info = learner.learn(torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> sorted(info.diagnostics)[:2]
        ['admm/dual_residual', 'admm/objective']
    """

    data_parallel = True  # sums over samples reduced, Z and U per sample (StreamingSoftmaxADMM.update)

    defaults = {
        "mode": HParam("stream", "stream (running least-squares memories over batches, each batch with its own Z "
                       "and U; new) or batch (every batch solved alone, as the reference solves its data set)",
                       str, choices=MODES),
        "iterations": HParam(2, "ADMM iterations (W-step, Z-step, dual step) per batch", int, "[1, inf)"),
        "rho": HParam(1.0, "initial penalty rho (the reference's driver: 1e-8)", range="(0, inf)"),
        "adaptive_rho": HParam(True, "balance the residuals: rho x2 or /2 when one exceeds rho_mu times the other",
                               bool),
        "rho_mu": HParam(10.0, "residual ratio that triggers a change of rho", range="(1, inf)", cli=False),
        "rho_bounds": HParam((1e-16, 1e3), "clip rho to this interval (the reference's)", object, cli=False),
        "alpha": HParam(1e-3, "weight of the regularizer alpha/2 ||L (W - W_ref)^T||^2 (W_ref = 0; "
                        "per sample seen with memory='mean')", range="[0, inf)"),
        "regularizer": HParam("identity", "L: identity (Tikhonov) or laplacian (per-channel image Laplacian of "
                              "the features, scaled by 1/n, as the reference; needs feature_shape)", str,
                              choices=REGULARIZERS),
        "feature_shape": HParam(None, "(channels, height, width) of the features for regularizer='laplacian'",
                                object, optional=True, cli=False),
        "memory": HParam("forget", "mode='stream': least-squares memories as running sums (every batch counts as "
                         "in one full-batch problem), mean, or forget (exponential forgetting by forget; the "
                         "default: an old batch's targets Z + U were made by the weights of its time)", str,
                         choices=MEMORY_MODES),
        "forget": HParam(0.05, "forgetting factor of memory='forget'", range="(0, 1]"),
        "z_iterations": HParam(50, "Newton (or, for a custom loss, L-BFGS) iterations of the Z-step at most", int,
                               "[1, inf)"),
        "z_tol": HParam(1e-5, "the Newton Z-step stops when every gradient entry is below z_tol (1 + rho |z - v|) "
                        "(the reference's Newton-CG: 1e-4, relative)", range="(0, inf)", cli=False),
        "faithful": HParam(False, "keep the reference's rho clipping, which leaves U unscaled", bool),
        "memory_dtype": HParam(torch.float64, "dtype of the memories, the solves and Z, U (the reference computes "
                               "in double precision; the Gram matrix of a long stream is too ill-conditioned for "
                               "a float32 Cholesky factorization; None: the model's dtype)", object, optional=True,
                               cli=False),
    }
    presets = {
        # the reference's MNIST driver: rho_0 = 1e-8, alpha = 0.1, Newton to convergence, its rho clipping
        "reference": {"mode": "batch", "rho": 1e-8, "alpha": 0.1, "z_iterations": 100, "faithful": True},
        # bootstrapped targets move: forget old statistics
        "td": {"memory": "forget", "forget": 0.1, "z_iterations": 20},
    }
    conformance_cases = {
        "": {"one_sample": ({}, 0.5)},
        "forget": {"kwargs": {"memory": "forget", "iterations": 1}},
    }
    _counters = ("step_count", "current_rho", "samples_seen")

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.output_layer = self._find_output_layer()
        self.features = self.model[:-1] if isinstance(self.model, nn.Sequential) else nn.Identity()
        self.optimizer = ParameterGroups([{"name": name, "params": params, "lr": 0.0}
                                          for name, params in self._named_groups()])
        self._settle_hyperparameter("memory_dtype", self.memory_dtype or self.output_layer.weight.dtype)
        n = self.output_layer.in_features + (self.output_layer.bias is not None)
        self.admm = StreamingSoftmaxADMM(
            n, self.output_layer.out_features, dtype=self.memory_dtype, device=self.device,
            iterations=self.iterations, rho=self.rho, adaptive_rho=self.adaptive_rho, rho_mu=self.rho_mu,
            rho_bounds=tuple(self.rho_bounds), alpha=self.alpha, M=self._regularizer_matrix(n),
            memory=self.memory if self.mode == "stream" else None, forget=self.forget,
            z_iterations=self.z_iterations, z_tol=self.z_tol, faithful=self.faithful,
            newton_kernels=newton_kernels(self))

    # rho and the sample count live in the solver; as attributes here, the step guard restores them
    @property
    def current_rho(self) -> float:
        return self.admm.rho

    @current_rho.setter
    def current_rho(self, value: float) -> None:
        self.admm.rho = float(value)

    @property
    def samples_seen(self) -> int:
        return self.admm.samples_seen

    @samples_seen.setter
    def samples_seen(self, value: int) -> None:
        self.admm.samples_seen = int(value)

    # ------------------------------------------------------------------------------- the model
    def _find_output_layer(self) -> nn.Linear:
        layer = self.model[-1] if isinstance(self.model, nn.Sequential) and len(self.model) else self.model
        if type(layer) is not nn.Linear:
            raise UnsupportedModelError(
                f"ADMM-Softmax fits a linear classifier: the model must be an nn.Linear or an nn.Sequential "
                f"ending in one (the layers before it are fixed features); its last module is {type(layer).__name__}")
        return layer

    def _named_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        return [("output", [p for p in self.output_layer.parameters()])]

    def _regularizer_matrix(self, n: int) -> torch.Tensor | None:
        if self.regularizer == "identity":
            return None
        if self.feature_shape is None or len(self.feature_shape) != 3:
            raise ValueError("regularizer='laplacian' needs feature_shape=(channels, height, width) of the features")
        if math.prod(self.feature_shape) + (self.output_layer.bias is not None) != n:
            raise ValueError(f"feature_shape {tuple(self.feature_shape)} has {math.prod(self.feature_shape)} features, "
                             f"the output layer takes {self.output_layer.in_features}")
        L = image_laplacian(tuple(self.feature_shape), self.output_layer.bias is not None,
                            dtype=torch.float64).to(self.device)
        return (L.T @ L).to(self.memory_dtype)

    def _design(self, x: torch.Tensor) -> torch.Tensor:
        """``D``: the fixed features of a batch, flattened, with a 1 column for the bias."""
        with torch.no_grad():
            feats = self.features(x).flatten(1).to(self.memory_dtype)
        if self.output_layer.bias is not None:
            feats = torch.cat([feats, torch.ones_like(feats[:, :1])], dim=1)
        return feats

    def _weights(self) -> torch.Tensor:
        layer = self.output_layer
        W = layer.weight.detach()
        if layer.bias is not None:
            W = torch.cat([W, layer.bias.detach()[:, None]], dim=1)
        return W.to(self.memory_dtype)

    @torch.no_grad()
    def _write(self, W: torch.Tensor) -> None:
        layer = self.output_layer
        layer.weight.copy_(W[:, : layer.in_features])
        if layer.bias is not None:
            layer.bias.copy_(W[:, -1])

    # ------------------------------------------------------------------------------- the verbs
    def _forward_for_step(self, x: torch.Tensor):
        D = self._design(x)
        out = self.output_layer(D[:, : self.output_layer.in_features].to(self.output_layer.weight.dtype))
        return D, out  # the output's graph reaches the output layer only: the features are fixed

    def _whole_step_refusal(self) -> str | None:
        return "it tests convergence on the host between its compiled Newton steps and Armijo trials"

    def _step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        D = self._take_pending(x)
        if D is None:
            D = self._design(x)
        dtype = self.output_layer.weight.dtype
        W = self._weights()
        with torch.no_grad():
            loss = loss_fn((D @ W.T).to(dtype)).detach()
        labels = self._cross_entropy_labels()  # learn() with a cross-entropy: the Newton Z-step
        Y = None if labels is None else F.one_hot(labels, W.shape[0]).to(W.dtype)
        W, diagnostics = self.admm.update(D, W, Y, loss_fn, out_dtype=dtype,
                                          linear_term=self._penalty_gradient(penalty), **self._reduction())
        self._write(W.to(dtype))
        self._optimizer_step()
        with torch.no_grad():
            diagnostics["admm/objective"] = self.admm.objective(D @ W.T, Y, loss_fn, W, dtype)
        return StepInfo(loss=loss, batch_size=D.shape[0], lrs={"output": 0.0}, diagnostics=diagnostics)

    def _penalty_gradient(self, penalty: Penalty) -> torch.Tensor | None:
        """A penalty of the parameters (EWC) enters the W-step linearized at the batch's start: its
        gradient ``[dW | db]``, a linear term of the least-squares problem. Without its curvature it
        pulls only once the weights have left its minimum, and more weakly than under a gradient
        learner's repeated steps."""
        params = list(self.output_layer.parameters())
        frozen = frozen_penalty(penalty, params)
        if frozen is None:
            return None
        if callable(frozen):  # a callable penalty: differentiate it at the current weights
            with torch.enable_grad():
                value = penalty_value(frozen)
                if not value.requires_grad:
                    return None
                grads = torch.autograd.grad(value, params, allow_unused=True)
        else:
            grads = frozen.grads
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        G = grads[0] if len(grads) == 1 else torch.cat([grads[0], grads[1][:, None]], dim=1)
        return G.to(self.memory_dtype)

    # ------------------------------------------------------------------------------- full batch
    def fit(self, x: torch.Tensor, y: torch.Tensor, *, iterations: int = 100, seconds: float | None = None,
            callback: Callable[[int, dict], None] | None = None) -> list[dict]:
        """The reference's run: ADMM on the whole data set ``(x, y)``, ``Z`` and ``U`` for every sample,
        ``D^T D`` factorized once (one eigendecomposition for every rho when ``L = I``), at most
        ``iterations`` iterations or ``seconds`` of wall time (the reference's driver stops after
        500 s). ``callback(iteration, record)`` runs after each iteration (for validation curves);
        its time is not counted. Returns the records: iteration, seconds, rho, residuals, objective.
        The memories of the streaming mode are not used or changed."""
        self.sync_parameters()
        x, y = self._check(x, y, training=True)
        self.inputs.commit()
        D = self._design(x)
        W = self._weights()
        labels = self._cross_entropy_labels(y)
        Y = None if labels is None else F.one_hot(labels, W.shape[0]).to(W.dtype)
        loss_fn = None if Y is not None else (lambda out: self.criterion(out, y))
        clock = RunClock(seconds)
        admm = self.admm
        solver = NormalEquations(D.T @ D, admm.alpha, admm.M, eigen=True)
        Z, U, rho = D @ W.T, torch.zeros(D.shape[0], W.shape[0], dtype=W.dtype, device=W.device), admm.rho
        records = []
        for it in range(1, iterations + 1):
            W = solver.solve(rho, rho * (D.T @ (Z + U))).T
            DW = D @ W.T
            Z_old = Z
            Z = admm.z_step(DW - U, Y, loss_fn, rho, Z, self.output_layer.weight.dtype)
            U = U + Z - DW
            r_primal, r_dual = float((Z - DW).norm()), float(rho * (D.T @ (Z - Z_old)).norm())
            if admm.adaptive_rho:
                rho = update_rho(rho, U, r_primal, r_dual, mu=admm.rho_mu, bounds=admm.rho_bounds,
                                 faithful=admm.faithful)
            if not bool(torch.isfinite(W).all()):
                raise FloatingPointError(f"ADMM-Softmax fit: non-finite weights at iteration {it}; the "
                                         "weights were left as they were before it")
            self._write(W.to(self.output_layer.weight.dtype))
            self.current_rho = rho
            self.step_count += 1
            record = {"iteration": it, "seconds": clock.elapsed(), "rho": rho,
                      "primal_residual": r_primal, "dual_residual": r_dual}
            records.append(record)
            clock.call(callback, it, record)
            if clock.spent:
                break
        return records

    # ------------------------------------------------------------------------------- state
    def _extra_tensors(self) -> list[torch.Tensor]:
        return [self.admm.G, self.admm.H]

    def _extra_state(self) -> dict:
        return {"memories": [self.admm.G, self.admm.H]}

    def _load_extra_state(self, state: dict) -> None:
        G, H = state["memories"]
        self.admm.G.copy_(G)
        self.admm.H.copy_(H)

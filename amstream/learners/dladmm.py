"""dlADMM: deep learning by ADMM with backward-then-forward sweeps.

Wang, Yu, Chen, Zhao, "ADMM for Efficient Deep Learning with Global Convergence", KDD 2019;
reference code ``xianggebenben/dlADMM`` (PyTorch MLP version). For a ReLU network with layers
``z_l = a_{l-1} W_l^T + b_l`` and ``a_l = relu(z_l)`` (row-major here: one row per sample), the
reference relaxes every hidden constraint into a quadratic penalty of weight rho and keeps a dual
``u`` only on the last linear constraint; the loss is the softmax cross-entropy summed over samples::

    R(z_L; y) + sum_{l<L} rho/2 (||z_l - a_{l-1} W_l^T - b_l||^2 + ||a_l - relu(z_l)||^2)
              + rho/2 ||z_L - a_{L-1} W_L^T - b_L + u/rho||^2

Each iteration sweeps backward (``z_L, b_L, W_L, a_{L-1}, z_{L-1}, b_{L-1}, W_{L-1}, ..., W_1``), then
forward (``W_1, b_1, z_1, a_1, ..., W_L, b_L, z_L``), then ``u <- u + rho (z_L - a_{L-1} W_L^T - b_L)``:

- ``b``: the exact minimizer, ``b - mean(a W^T + b - z - u/rho)``;
- hidden ``z``: per element, the better of ``min(m, 0)`` and ``max((m + a)/2, 0)`` with
  ``m = a_{l-1} W^T + b`` (:func:`relu_z_update`);
- last ``z``: FISTA on ``CE(z) + rho/2 ||z - (a W^T + b - u/rho)||^2`` with the reference's step 4,
  momentum and stopping rule, from log-softmax (:func:`fista_last_z`), or Newton's method
  (``z_solver="newton"``, new: the Sherman-Morrison Newton of ADMM-Softmax);
- ``W`` and ``a``: one linearized (proximal-gradient) step each, ``W - grad/theta`` and
  ``a - grad/tau``. ``step_size="backtracking"`` doubles theta (tau) until the quadratic upper bound
  holds, as the reference, but persists the values between calls and stops with a clear error after
  ``max_backtracks`` doublings (the reference can loop forever); ``step_size="bound"`` (new) takes
  ``theta = rho lambda_max(a^T a)`` and ``tau = rho (||W_next||_2^2 + 1)`` from warm-started power
  iterations, with no trial evaluations.

Modes: :meth:`DLADMM.fit` is the reference's full-batch run (auxiliaries ``a``, ``z``, ``u`` for every
training sample, its rho schedule: ``rho <- min(10 rho, 0.1)`` and theta, tau x 10 when the training
cost rose three iterations in a row). ``learn``/``step`` stream (new): each batch gets auxiliaries
from a forward pass of the current weights and a zero dual (a per-sample dual has no meaning for the
next batch's samples), runs ``iterations`` dlADMM iterations, and the weights carry over.

New here besides those: row-major batched form, log-softmax everywhere (the reference exponentiates
without the max shift and patches overflows), independent initial draws (the reference reseeds
before every tensor), persisted step sizes.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import UnsupportedModelError
from ..hparams import HParam
from ..utils import RunClock
from .admm_softmax import newton_kernels, prox_lbfgs, softmax_prox_newton
from .base import Learner, LossFn, Penalty, StepInfo
from .groups import ParameterGroups

__all__ = ["DLADMM", "FullBatchRun", "relu_z_update", "bias_update", "fista_last_z", "rho_schedule", "BacktrackingError"]

STEP_SIZES = ("backtracking", "bound")
Z_SOLVERS = ("fista", "newton")


@dataclass
class FullBatchRun:
    """The state of :meth:`DLADMM.fit`'s full-batch run besides the weights: the hidden activations
    ``acts`` (each layer's input after the first), the pre-activations ``zs``, the dual ``u``, the
    training costs the rho schedule reads, the last iteration done, its seconds, the step constants,
    and a fingerprint of the data it runs on."""

    acts: list[torch.Tensor]
    zs: list[torch.Tensor]
    u: torch.Tensor
    costs: list[float]
    iteration: int
    seconds: float
    constants: tuple
    fingerprint: tuple

    def state_dict(self) -> dict:
        return {"acts": list(self.acts), "zs": list(self.zs), "u": self.u, "costs": list(self.costs),
                "iteration": self.iteration, "seconds": self.seconds,
                "constants": [list(self.constants[0]), list(self.constants[1])],
                "fingerprint": list(self.fingerprint)}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> FullBatchRun:
        return cls(acts=[a.to(device) for a in state["acts"]], zs=[z.to(device) for z in state["zs"]],
                   u=state["u"].to(device), costs=[float(c) for c in state["costs"]],
                   iteration=int(state["iteration"]), seconds=float(state["seconds"]),
                   constants=(tuple(state["constants"][0]), tuple(state["constants"][1])),
                   fingerprint=tuple(state["fingerprint"]))


def _data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> tuple:
    """Shape and float64 sums of a full-batch data set: enough to tell another set (or order) apart."""
    position = torch.arange(1, x.shape[0] + 1, device=x.device, dtype=torch.float64)
    rows = x.sum(1, dtype=torch.float64)
    return (*x.shape, float(rows.sum()), float(position @ rows), float(position @ y.double()))


def _same_data(a: tuple, b: tuple) -> bool:
    """Fingerprints equal up to the summation order of another device."""
    return tuple(a[:2]) == tuple(b[:2]) and all(math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-9)
                                                for u, v in zip(a[2:], b[2:]))


def _describe(fingerprint: tuple) -> str:
    return f"{fingerprint[0]} samples x {fingerprint[1]} features, sum {fingerprint[2]:.6g}"


class BacktrackingError(RuntimeError):
    """A backtracking search doubled its step-size constant too often without meeting its bound."""


# ------------------------------------------------------------------------------------- the updates
def relu_z_update(m: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``argmin_z (z - m)^2 + (a - relu(z))^2`` per element, exactly: the minimizer on ``z <= 0`` is
    ``min(m, 0)``, on ``z >= 0`` it is ``max((m + a)/2, 0)``; the better of the two."""
    neg = m.clamp(max=0.0)
    pos = ((m + a) * 0.5).clamp(min=0.0)
    f_neg = (neg - m).square() + a.square()  # relu(neg) = 0
    f_pos = (pos - m).square() + (a - pos).square()
    return torch.where(f_neg > f_pos, pos, neg)


def bias_update(pre: torch.Tensor, b: torch.Tensor, target: torch.Tensor, prox: float = 0.0) -> torch.Tensor:
    """``argmin_b sum_i ||target_i - W inp_i - b||^2 (+ prox ||b - b_old||^2)``, given the layer's
    pre-activations ``pre = inp W^T + b``: with ``prox = 0`` the reference's exact update
    ``b - mean(pre - target)``; a proximal weight of ``prox`` samples shortens it by ``B / (B + prox)``."""
    batch = pre.shape[0]
    return b - (batch / (batch + prox)) * (pre - target).mean(0)


class _LayerProducts:
    """Each layer's pre-activations ``a W^T + b`` for the current ``(a, W, b)``, and the squared norm
    of its input, computed once for the iterations on one batch.

    An iteration reads a layer's pre-activations up to six times (its W, b and z updates in each
    sweep, the a update of the layer above); between two reads often only the bias has moved, which
    shifts them without a product (at the first layer, 784 inputs wide, the product is most of an
    update). The updates replace the tensors, never change them in place, so identity tells what
    moved. The shifted values equal the recomputed ones to rounding."""

    def __init__(self) -> None:
        self._pre: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._squares: dict[int, tuple[torch.Tensor, float]] = {}

    def seed(self, l: int, a: torch.Tensor, W: torch.Tensor, b: torch.Tensor, value: torch.Tensor) -> None:
        """``value`` is ``a W^T + b`` (the forward pass's, for the copies of the weights)."""
        self._pre[l] = (a, W, b, value)

    def pre(self, l: int, a: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        held = self._pre.get(l)
        if held is not None and held[0] is a and held[1] is W:
            value = held[3] if held[2] is b else held[3] + (b - held[2])
        else:
            value = F.linear(a, W, b)
        self._pre[l] = (a, W, b, value)
        return value

    def squares(self, l: int, inp: torch.Tensor, reduce: Callable | None) -> float:
        """``||inp||^2`` of layer ``l``'s input (the whole batch's when data-parallel)."""
        held = self._squares.get(l)
        if held is None or held[0] is not inp:
            squares = inp.square().sum().reshape(1)
            if reduce is not None:
                reduce([squares])
            held = self._squares[l] = (inp, float(squares))
        return held[1]


def rho_schedule(costs: list[float], rho: float, rho_max: float) -> float:
    """The reference's rule: when the training cost rose three iterations in a row (four costs, each
    above the one before), ``rho <- min(10 rho, rho_max)``; else rho unchanged."""
    if len(costs) >= 4 and costs[-1] > costs[-2] > costs[-3] > costs[-4]:
        return min(10 * rho, rho_max)
    return rho


def _prox_ce(z: torch.Tensor, Y: torch.Tensor, center: torch.Tensor, rho: float) -> torch.Tensor:
    return (torch.logsumexp(z, 1) - (z * Y).sum(1)).sum() + 0.5 * rho * (z - center).square().sum()


@torch.no_grad()
def fista_last_z(center: torch.Tensor, Y: torch.Tensor, z0: torch.Tensor, rho: float, *, eta: float = 4.0,
                 iterations: int = 500, tol: float = 1e-3, check_every: int = 1) -> tuple[torch.Tensor, int]:
    """``argmin_z CE_sum(z, Y) + rho/2 ||z - center||^2`` by the reference's FISTA.

    Prox-gradient step ``zeta = (rho c + (z - eta (softmax(z) - Y))/eta) / (rho + 1/eta)``, momentum
    ``lambda_k = (1 + sqrt(1 + 4 lambda^2))/2``, ``z = (1 - g) zeta + g zeta_old`` with
    ``g = (1 - lambda_{k-1})/lambda_k``; stops when the objective changed by less than ``tol``
    (absolute, on the summed objective, as the reference), checked every ``check_every`` steps.
    Returns ``(z, steps)``."""
    z, zeta, lam = z0.clone(), z0.clone(), 1.0
    f_prev = math.inf
    steps = 0
    for steps in range(1, iterations + 1):
        if (steps - 1) % check_every == 0:
            f = float(_prox_ce(z, Y, center, rho))
            if abs(f - f_prev) < tol:
                break
            f_prev = f
        lam_old, lam = lam, (1 + math.sqrt(1 + 4 * lam * lam)) / 2
        gamma = (1 - lam_old) / lam
        zeta_old = zeta
        zeta = (rho * center + (z - eta * (torch.softmax(z, 1) - Y)) / eta) / (rho + 1 / eta)
        z = (1 - gamma) * zeta + gamma * zeta_old
    return z, steps


def _linearized_step(x: torch.Tensor, grad: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor],
                     constant: float, backtracking: bool, max_backtracks: int,
                     what: str) -> tuple[torch.Tensor, float]:
    """``x - grad / c``; with backtracking, ``c`` doubles until ``f(x_new) <= f(x) + <grad, dx> +
    c/2 ||dx||^2``. Returns the new point and the constant used.

    ``f(x)`` is evaluated here, by the same arithmetic as ``f(x_new)``: a value of ``f(x)`` rounded
    differently (from pre-activations kept by the caller, say) and lower could never be met as
    ``c`` grows and ``x_new`` nears ``x``."""
    new = x - grad / constant
    if not backtracking:
        return new, constant
    f_x = f(x)
    if not bool(torch.isfinite(f_x)):  # a non-finite start: the step guard rolls back
        return new, constant
    for _ in range(max_backtracks):
        dx = new - x
        if bool(f(new) <= f_x + (grad * dx).sum() + 0.5 * constant * dx.square().sum()):
            return new, constant
        constant *= 2.0
        new = x - grad / constant
    raise BacktrackingError(
        f"dlADMM's backtracking for {what} doubled its constant {max_backtracks} times without meeting the "
        f"quadratic bound (now {constant:.3g}); the inputs or rho are badly scaled, or use step_size='bound'")


# ------------------------------------------------------------------------------------- the learner
class DLADMM(Learner):
    """dlADMM on a ReLU MLP (``[Flatten,] Linear, ReLU, ..., Linear``), full batch or streaming.

    The reference's settings are ``presets["reference"]`` (rho 1e-6, backtracking from 1, FISTA);
    the defaults stream with step sizes from bounds and Newton's last-layer solve.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from amstream import DLADMM
        >>> learner = DLADMM(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), device="cpu")
        >>> info = learner.learn(torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> info.diagnostics["admm/rho"]
        0.1
    """

    #: streaming with bound step sizes: the W and b steps' sums over samples are reduced, the z, a and
    #: dual updates are per sample (amstream.distributed)
    data_parallel = True

    defaults = {
        "rho": HParam(0.1, "penalty rho of every constraint (the reference starts at 1e-6)", range="(0, inf)"),
        "iterations": HParam(2, "dlADMM iterations (backward sweep, forward sweep, dual step) per batch", int,
                             "[1, inf)"),
        "step_size": HParam("bound", "theta and tau of the linearized W and a steps: backtracking (the reference's "
                            "doubling, persisted between calls here) or bound (new: from warm-started power "
                            "iterations, no trial evaluations)", str, choices=STEP_SIZES),
        "theta": HParam(1.0, "initial theta (W steps) of backtracking (the reference's 1)", range="(0, inf)",
                        cli=False),
        "tau": HParam(1.0, "initial tau (a steps) of backtracking (the reference's 1)", range="(0, inf)", cli=False),
        "persist_steps": HParam(True, "backtracking starts from the last accepted theta/tau (False: from the "
                                "initial ones at every call, as the reference)", bool, cli=False),
        "max_backtracks": HParam(60, "doublings before backtracking gives up with an error (the reference: no "
                                 "limit)", int, "[1, inf)", cli=False),
        "z_solver": HParam("newton", "last-layer z: fista (the reference's) or newton (new; exact)", str,
                           choices=Z_SOLVERS),
        "fista_iterations": HParam(500, "FISTA iterations at most (the reference's 500)", int, "[1, inf)", cli=False),
        "fista_tol": HParam(1e-3, "FISTA stops when the summed objective moved less than this (the reference's "
                            "1e-3, absolute)", range="(0, inf)", cli=False),
        "prox": HParam(16.0, "streaming damping (new): W and b steps with a proximal term toward the weights "
                       "before the step worth this many average samples, so a batch of one moves the weights about "
                       "1/(1 + prox) of the way to fitting it exactly (0: the reference's undamped steps; the "
                       "exact b-update then fits each batch's mean)", range="[0, inf)"),
        "rho_max": HParam(0.1, "fit(): the rho schedule's cap (the reference's 0.1)", range="(0, inf)", cli=False),
    }
    presets = {
        "reference": {"rho": 1e-6, "step_size": "backtracking", "persist_steps": False, "z_solver": "fista",
                      "prox": 0.0},
        "td": {"z_solver": "newton"},
    }
    conformance_cases = {
        "": {"one_sample": ({}, 0.3)},
        "backtracking": {"kwargs": {"step_size": "backtracking"}},
    }
    _counters = ("step_count", "current_rho", "step_constants")

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.layers = self._linear_layers()
        self.optimizer = ParameterGroups([{"name": name, "params": params, "lr": 0.0}
                                          for name, params in self._named_groups()])
        self.current_rho = float(self.rho)
        n = len(self.layers)
        # (theta of each layer's W step, tau of each hidden activation's a step), replaced, never mutated
        self.step_constants = (tuple([float(self.theta)] * n), tuple([float(self.tau)] * (n - 1)))
        # warm starts of the power iterations: one vector per layer input
        self._power = [torch.ones(layer.in_features, device=self.device) / math.sqrt(layer.in_features)
                       for layer in self.layers]
        self.fit_run: FullBatchRun | None = None  # the state of fit's full-batch run, kept for resume=True

    def _linear_layers(self) -> list[nn.Linear]:
        modules = list(self.model) if isinstance(self.model, nn.Sequential) else [self.model]
        if modules and isinstance(modules[0], nn.Flatten):
            modules = modules[1:]
        linears = modules[0::2]
        relus = modules[1::2]
        ok = (len(modules) % 2 == 1 and all(type(m) is nn.Linear and m.bias is not None for m in linears)
              and all(type(m) is nn.ReLU for m in relus))
        if not ok:
            described = ", ".join(type(m).__name__ for m in modules)
            raise UnsupportedModelError(
                f"dlADMM trains a ReLU MLP: [Flatten,] Linear, ReLU, Linear, ..., Linear (every Linear with a "
                f"bias); got {described}")
        return linears

    def _named_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        return [(f"layer{i}", list(layer.parameters())) for i, layer in enumerate(self.layers)]

    # ------------------------------------------------------------------------------- auxiliaries
    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    @torch.no_grad()
    def _forward_auxiliaries(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``acts`` (the input of every layer: ``x``, then each ``relu(z)``) and ``zs``."""
        acts, zs = [self._input(x)], []
        for i, layer in enumerate(self.layers):
            z = F.linear(acts[-1], layer.weight, layer.bias)
            zs.append(z)
            if i + 1 < len(self.layers):
                acts.append(torch.relu(z))
        return acts, zs

    def _forward_for_step(self, x: torch.Tensor):
        acts, zs = self._forward_auxiliaries(x)
        out = self.layers[-1](acts[-1])  # a graph to the last layer only: every layer fits its own variables
        return (acts, zs), out

    # ------------------------------------------------------------------------------- one iteration
    def _iterate(self, acts: list[torch.Tensor], zs: list[torch.Tensor], u: torch.Tensor,
                 Y: torch.Tensor | None, loss_fn: LossFn | None, rho: float,
                 weights: list[list[torch.Tensor]], constants: tuple,
                 products: _LayerProducts | None = None) -> tuple:
        """One dlADMM iteration in the reference's order, on the tensors in place of the lists.
        ``weights[l] = [W, b]``; ``products``: the layer products of the iterations on this batch so
        far (new if None). Returns the new dual and step constants."""
        products = _LayerProducts() if products is None else products
        n = len(self.layers)
        thetas, taus = list(constants[0]), list(constants[1])
        last = n - 1
        # data-parallel: the sums over samples of the W and b steps are reduced (the whole batch's)
        reduction = self._reduction()
        reduce, batch = reduction.get("reduce"), reduction.get("batch_size", acts[0].shape[0])
        pre = products.pre

        def update_W(l, dual):
            W, b = weights[l]
            inp, z = acts[l], zs[l]
            target = z + dual / rho if dual is not None else z
            residual = pre(l, inp, W, b) - target
            grad = rho * residual.T @ inp
            if reduce is not None:
                reduce([grad])

            def phi(W_new):
                return 0.5 * rho * (F.linear(inp, W_new, b) - target).square().sum()

            if self.step_size == "bound":
                thetas[l] = rho * self._gram_bound(l, inp)
            new, thetas[l] = _linearized_step(W, grad, phi, thetas[l], self.step_size == "backtracking",
                                              self.max_backtracks, f"W of layer {l}")
            if self.prox:  # the proximal term (lam/2)||W - W_old||^2 shortens the step from 1/theta to 1/(theta + lam)
                lam = rho * self.prox * products.squares(l, inp, reduce) / batch
                new = W + (new - W) * (thetas[l] / (thetas[l] + lam))
            weights[l][0] = new

        def update_b(l, dual):
            W, b = weights[l]
            target = zs[l] + dual / rho if dual is not None else zs[l]
            if reduce is None:
                weights[l][1] = self._compiled("the b update", bias_update)(pre(l, acts[l], W, b), b, target,
                                                                           self.prox)
                return
            residual = (pre(l, acts[l], W, b) - target).sum(0)  # bias_update over the whole batch
            reduce([residual])
            weights[l][1] = b - residual / (batch + self.prox)

        def update_a(k, dual):
            # acts[k] (k >= 1) is the output of hidden layer k-1 and the input of layer k
            W, b = weights[k]
            target = zs[k] + dual / rho if dual is not None else zs[k]
            relu_z = torch.relu(zs[k - 1])

            def f(a):
                return 0.5 * rho * ((F.linear(a, W, b) - target).square().sum() + (a - relu_z).square().sum())

            a = acts[k]
            r = pre(k, a, W, b) - target
            grad = rho * (r @ W + (a - relu_z))
            if self.step_size == "bound":
                taus[k - 1] = rho * (self._spectral_bound(W) + 1.0)
            acts[k], taus[k - 1] = _linearized_step(a, grad, f, taus[k - 1], self.step_size == "backtracking",
                                                    self.max_backtracks, f"the activation of layer {k - 1}")

        def update_z(l, dual):
            W, b = weights[l]
            m = pre(l, acts[l], W, b)
            if l < last:
                zs[l] = self._compiled("the z update", relu_z_update)(m, acts[l + 1])
                return
            center = m - dual / rho
            if Y is None:
                batch = center.shape[0]
                zs[l] = prox_lbfgs(lambda Z: batch * loss_fn(Z), center, rho, zs[l])
            elif self.z_solver == "newton":
                zs[l] = softmax_prox_newton(center, Y, rho, zs[l], iterations=50, tol=1e-5,
                                            kernels=newton_kernels(self))[0]
            else:
                zs[l] = fista_last_z(center, Y, zs[l], rho, iterations=self.fista_iterations, tol=self.fista_tol)[0]

        duals = [None] * last + [u]
        # backward sweep
        update_z(last, u)
        update_b(last, u)
        update_W(last, u)
        for l in range(last - 1, -1, -1):
            update_a(l + 1, duals[l + 1])
            update_z(l, None)
            update_b(l, None)
            update_W(l, None)
        # forward sweep
        for l in range(last):
            update_W(l, None)
            update_b(l, None)
            update_z(l, None)
            update_a(l + 1, duals[l + 1])
        update_W(last, u)
        update_b(last, u)
        update_z(last, u)
        W, b = weights[last]
        u = u + rho * (zs[last] - pre(last, acts[last], W, b))
        return u, (tuple(thetas), tuple(taus))



    def _gram_bound(self, l: int, inp: torch.Tensor, steps: int = 3) -> float:
        """``lambda_max(inp^T inp)`` by a warm-started power iteration (two products with ``inp`` per
        step, no Gram matrix): a lower estimate that converges from below; a linearized step of
        ``1/theta`` decreases a quadratic whenever theta exceeds half the true curvature."""
        v = self._power[l].to(inp.dtype)
        value = 0.0
        reduce = self._reduction().get("reduce")
        for _ in range(steps):
            w = inp.T @ (inp @ v)
            if reduce is not None:  # the whole batch's Gram matrix times v
                reduce([w])
            value = float(w.norm())
            v = w / max(value, 1e-30)
        if value > 0:
            self._power[l].copy_(v)  # in place: the step guard restores it with the rest
        return max(value, 1e-12)

    @staticmethod
    def _spectral_bound(W: torch.Tensor) -> float:
        """``||W||_2^2``, the largest eigenvalue of the smaller Gram matrix of ``W`` (a symmetric
        eigensolver: 250 us against an SVD's 400 us at 100 x 100 on one CPU thread)."""
        if not bool(torch.isfinite(W).all()):
            return math.nan  # the step guard rolls the step back
        gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
        return float(torch.linalg.eigvalsh(gram)[-1])

    def _augmented_lagrangian(self, acts, zs, u, Y, loss_fn, rho, weights) -> torch.Tensor:
        last = len(self.layers) - 1
        total = torch.zeros((), dtype=zs[0].dtype, device=zs[0].device)
        for l, (W, b) in enumerate(weights):
            r = zs[l] - F.linear(acts[l], W, b)
            if l == last:
                total = total + (r * u).sum() + 0.5 * rho * r.square().sum()
            else:
                total = total + 0.5 * rho * (r.square().sum() + (acts[l + 1] - torch.relu(zs[l])).square().sum())
        data = (torch.logsumexp(zs[last], 1) - (zs[last] * Y).sum(1)).sum() if Y is not None else \
            zs[last].shape[0] * loss_fn(zs[last])
        return total + data

    def _data_parallel_refusal(self) -> str | None:
        if self.step_size == "backtracking":
            return ("step_size='backtracking' evaluates the batch's objective inside its searches, which are not "
                    "reduced; step_size='bound' (the default) is data-parallel")
        if self.z_solver == "fista":
            return "z_solver='fista' stops on the summed objective of the batch; z_solver='newton' is data-parallel"
        return super()._data_parallel_refusal()

    # ------------------------------------------------------------------------------- streaming
    def _whole_step_refusal(self) -> str | None:
        return ("it tests convergence on the host between its compiled updates (the b and z updates, the output "
                "layer's Newton steps)")

    def _step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        pending = self._take_pending(x)
        acts, zs = pending if pending is not None else self._forward_auxiliaries(x)
        acts, zs = list(acts), list(zs)
        with torch.no_grad():
            loss = loss_fn(zs[-1]).detach()
        labels = self._cross_entropy_labels()
        Y = None if labels is None else F.one_hot(labels, zs[-1].shape[1]).to(zs[-1].dtype)
        weights = [[layer.weight.detach().clone(), layer.bias.detach().clone()] for layer in self.layers]
        u = torch.zeros_like(zs[-1])
        rho, constants = self.current_rho, self.step_constants
        products = _LayerProducts()
        for l, (W, b) in enumerate(weights):  # the forward pass's products, of the weights these copy
            products.seed(l, acts[l], W, b, zs[l])
        with torch.no_grad():
            for _ in range(self.iterations):
                u, constants = self._iterate(acts, zs, u, Y, None if Y is not None else loss_fn, rho, weights,
                                             constants, products)
            self._write(weights)
            residual = (zs[-1] - F.linear(acts[-1], *weights[-1])).norm()
            objective = self._augmented_lagrangian(acts, zs, u, Y, loss_fn, rho, weights)
        if self.persist_steps or self.step_size == "bound":
            self.step_constants = constants
        self._optimizer_step()
        return StepInfo(loss=loss, batch_size=x.shape[0], lrs={name: 0.0 for name, _ in self._named_groups()},
                        diagnostics={"admm/rho": rho, "admm/primal_residual": residual, "admm/objective": objective,
                                     "dladmm/theta": constants[0], "dladmm/tau": constants[1]})

    @torch.no_grad()
    def _write(self, weights: list[list[torch.Tensor]]) -> None:
        for layer, (W, b) in zip(self.layers, weights):
            layer.weight.copy_(W)
            layer.bias.copy_(b)

    # ------------------------------------------------------------------------------- full batch
    def fit(self, x: torch.Tensor, y: torch.Tensor, *, iterations: int = 200, seconds: float | None = None,
            callback: Callable[[int, dict], None] | None = None, resume: bool = False) -> list[dict]:
        """The reference's full-batch run on ``(x, y)``: auxiliaries for every sample (``z_L`` started at
        +1 for the label and -1 elsewhere, as the reference), dlADMM iterations up to iteration
        ``iterations`` (or ``seconds`` of wall time in this call), the rho schedule on the training
        cost. ``callback(iteration, record)`` after each iteration (its time not counted). Returns the
        records of this call: iteration, seconds (since the run began), rho, training cost, primal
        residual.

        The run's state (auxiliaries, dual, costs, step constants, iteration) stays on the learner as
        :attr:`fit_run` and travels in its ``state_dict``, so a checkpoint written from ``callback``
        resumes the run exactly: ``fit(x, y, iterations=200, resume=True)`` on a learner loaded from
        it continues from the checkpoint's iteration (new: the reference cannot stop). Set
        ``fit_run = None`` to free the auxiliaries (four n x width matrices).

        Raises:
            ValueError: ``resume=True`` without a run, or with other data than the run's.
            FloatingPointError: non-finite weights; the model keeps the iteration before's and the run
                is dropped.
        """
        self.sync_parameters()
        x, y = self._check(x, y, training=True)
        self.inputs.commit()
        fingerprint = _data_fingerprint(self._input(x), y)
        if resume:
            run = self.fit_run
            if run is None:
                raise ValueError("fit(resume=True): this learner has no full-batch run to resume (load the "
                                 "checkpoint written during the run first)")
            if not _same_data(run.fingerprint, fingerprint):
                raise ValueError(f"fit(resume=True): the data differ from the run's ({_describe(fingerprint)} "
                                 f"against {_describe(run.fingerprint)})")
        else:
            acts, zs = self._forward_auxiliaries(x)
            zs = list(zs)
            zs[-1] = 2 * F.one_hot(y, zs[-1].shape[1]).to(zs[-1].dtype) - 1
            run = FullBatchRun(acts=list(acts[1:]), zs=zs, u=torch.zeros_like(zs[-1]), costs=[], iteration=0,
                               seconds=0.0, constants=self.step_constants, fingerprint=fingerprint)
            self.fit_run = run
        acts = [self._input(x), *run.acts]  # the lists are the run's: _iterate replaces their entries
        Y = F.one_hot(y, run.zs[-1].shape[1]).to(run.zs[-1].dtype)
        weights = [[layer.weight.detach().clone(), layer.bias.detach().clone()] for layer in self.layers]
        rho, constants, costs = self.current_rho, run.constants, run.costs
        records, clock, offset = [], RunClock(seconds), run.seconds
        with torch.no_grad():
            for it in range(run.iteration + 1, iterations + 1):
                # (each iteration's products start afresh: a run resumed at any iteration repeats it exactly)
                run.u, constants = self._iterate(acts, run.zs, run.u, Y, None, rho, weights, constants)
                run.acts[:] = acts[1:]
                if not (self.persist_steps or self.step_size == "bound"):
                    constants = self.step_constants  # the reference restarts every search from its theta, tau
                if not all(bool(torch.isfinite(W).all()) for pair in weights for W in pair):
                    self.fit_run = None
                    raise FloatingPointError(f"dlADMM fit: non-finite weights at iteration {it}; the model keeps "
                                             "the weights of the iteration before and the run is dropped")
                self._write(weights)
                self.step_count += 1
                out = self.model(x)
                cost = float(F.cross_entropy(out, y))
                costs.append(cost)
                record = {"iteration": it, "seconds": offset + clock.elapsed(), "rho": rho,
                          "training_cost": cost,
                          "primal_residual": float((run.zs[-1] - F.linear(acts[-1], *weights[-1])).norm())}
                records.append(record)
                new_rho = rho_schedule(costs, rho, self.rho_max)
                if new_rho != rho:
                    rho = new_rho
                    if min(layer.out_features for layer in self.layers[:-1]) >= 100:
                        thetas, taus = self.step_constants
                        self.step_constants = (tuple(10 * t for t in thetas), tuple(10 * t for t in taus))
                        constants = (tuple(10 * t for t in constants[0]), tuple(10 * t for t in constants[1]))
                self.current_rho = rho
                run.iteration, run.seconds, run.constants = it, record["seconds"], constants
                if self.persist_steps or self.step_size == "bound":
                    self.step_constants = constants
                clock.call(callback, it, record)
                if clock.spent:
                    break
        return records

    # ------------------------------------------------------------------------------- state
    def _extra_tensors(self) -> list[torch.Tensor]:
        return list(self._power)

    def _extra_state(self) -> dict:
        state: dict = {"power": list(self._power)}
        if self.fit_run is not None:
            state["fit_run"] = self.fit_run.state_dict()
        return state

    def _load_extra_state(self, state: dict) -> None:
        for v, new in zip(self._power, state["power"]):
            v.copy_(new)
        run = state.get("fit_run")
        self.fit_run = None if run is None else FullBatchRun.from_state(run, self.device)

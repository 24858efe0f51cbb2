"""The update rules of online alternating minimization as small pure functions.

Reference: A. Choromanska et al., "Beyond Backprop: Online Alternating Minimization with Auxiliary
Variables", ICML 2019 (arXiv:1806.09077).

Objective over codes ``c_1..c_L`` and weights, for one batch:

    L(f_out(c_L), y) + mu * sum_l ||c_l - f_l(c_{l-1})||^2

The co-activation memories and solves of AM-mem are in :mod:`amstream.memory`.
"""
from __future__ import annotations

from typing import NamedTuple
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .memory import symmetric_update_

__all__ = [
    "proximity_anchor",
    "code_objective",
    "nesterov_step_",
    "update_codes",
    "spectral_norm_bound",
    "hidden_code_step_cap",
    "step_cap_may_bind",
    "gram_pays",
    "code_gram",
]

PROX_MODES = ("paper", "official")
REDUCTIONS = ("mean", "sum")


def _sq(a: torch.Tensor, b: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.mse_loss(a, b, reduction=reduction)


def proximity_anchor(c: torch.Tensor, mode: str) -> torch.Tensor:
    """The forward code ``c0`` that the proximity term ``||c - c0||^2`` pulls towards.

    ``"paper"``: a detached copy, so the term has the gradient ``2 (c - c0) / n`` the paper intends.
    ``"official"``: a graph-connected clone, as in the reference code (``codes_initial =
    codes.clone()`` after ``requires_grad_``). Autograd then differentiates through both arguments
    and the two contributions cancel: the term has exactly zero gradient (bug A1). Kept to compare
    with the original implementation's numbers.
    """
    if mode == "paper":
        return c.detach().clone()
    if mode == "official":
        return c.clone()
    raise ValueError(f"prox must be one of {PROX_MODES}, got {mode!r}")


def code_objective(
    c: torch.Tensor,
    anchor: torch.Tensor,
    downstream: torch.Tensor,
    *,
    mu: float,
    lambda_c: float = 0.0,
    is_last: bool,
    reduction: str = "mean",
) -> torch.Tensor:
    """Loss minimized over one code ``c`` (reference ``compute_codes_loss``).

    ``reduction="mean"`` (the reference code):
      last code ``(1/mu) task_loss + MSE(c, c0) [+ (lambda_c/mu) mean|c|]``; hidden code
      ``MSE(f_{l+1}(c), c_{l+1}) + MSE(c, c0) [+ (lambda_c/mu) mean|c|]`` (mu cancels: both terms
      carry it). ``downstream`` is the task loss or that MSE (already reduced by the caller).
    ``reduction="sum"`` (the objective summed over the batch's samples, divided by mu):
      last code ``(B/mu) task_loss + ||c - c0||^2 [+ (lambda_c/mu) |c|_1]`` for a batch-mean task
      loss; hidden code ``||f_{l+1}(c) - c_{l+1}||^2 + ||c - c0||^2 [+ ...]``. Each element's
      gradient is then independent of the batch size and the layer widths, whereas with "mean"
      a hidden code's steps are about 1/(B d) of the last code's (reference bug note A10).
    """
    if is_last:
        loss = downstream * (c.shape[0] / mu if reduction == "sum" else 1.0 / mu)
    else:
        loss = downstream
    loss = loss + _sq(c, anchor, reduction)
    if lambda_c:
        loss = loss + (lambda_c / mu) * (c.abs().sum() if reduction == "sum" else c.abs().mean())
    return loss


@torch.no_grad()
def nesterov_step_(c: torch.Tensor, buf: torch.Tensor | None, grad: torch.Tensor,
                   lr: float | torch.Tensor, momentum: float) -> torch.Tensor:
    """In-place Nesterov-momentum SGD step, identical to ``torch.optim.SGD(nesterov=True)``.

    The buffer starts as the first gradient (torch's rule) and is returned for the next step.
    ``lr`` may be a 0-dim tensor (a step size computed on the device, without a host sync).
    """
    return _nesterov_step(c, buf, grad, lr, momentum)


def _nesterov_step(c, buf, grad, lr, momentum):  # nesterov_step_ in the caller's no-grad mode
    if momentum == 0.0:
        direction = grad
    else:
        if buf is None:
            buf = grad.clone()
        else:
            buf.mul_(momentum).add_(grad)
        direction = grad.add(buf, alpha=momentum)
    if isinstance(lr, torch.Tensor):
        c.addcmul_(direction, lr, value=-1.0)
    else:
        c.sub_(direction, alpha=lr)
    return grad if momentum == 0.0 else buf


# ------------------------------------------------------------- closed-form fast path for MLPs
#: activations whose derivative is known in closed form, as ``backward(g, c, act) = g * act'(c)`` by
#: torch's own backward kernels (one kernel each); straight-through ones have derivative 1
def _relu_backward(g: torch.Tensor, c: torch.Tensor, act: nn.Module) -> torch.Tensor:
    return torch.ops.aten.threshold_backward(g, c, 0.0)


def _leaky_backward(g: torch.Tensor, c: torch.Tensor, act: nn.Module) -> torch.Tensor:
    return torch.ops.aten.leaky_relu_backward(g, c, act.negative_slope, False)


def _tanh_backward(g: torch.Tensor, c: torch.Tensor, act: nn.Module) -> torch.Tensor:
    return torch.ops.aten.tanh_backward(g, torch.tanh(c))


def _sigmoid_backward(g: torch.Tensor, c: torch.Tensor, act: nn.Module) -> torch.Tensor:
    return torch.ops.aten.sigmoid_backward(g, torch.sigmoid(c))


#: sup |act'(c)|, for the curvature bound of :func:`hidden_code_step_cap`
_ACTIVATION_SLOPE_BOUNDS: dict[type, Callable[[nn.Module], float]] = {
    nn.ReLU: lambda act: 1.0,
    nn.LeakyReLU: lambda act: max(1.0, abs(act.negative_slope)),
    nn.Tanh: lambda act: 1.0,
    nn.Sigmoid: lambda act: 0.25,
}

_ACTIVATION_BACKWARDS: dict[type, Callable] = {
    nn.ReLU: _relu_backward,
    nn.LeakyReLU: _leaky_backward,
    nn.Tanh: _tanh_backward,
    nn.Sigmoid: _sigmoid_backward,
}


_ACTIVATION_FUNCTIONS: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {
    nn.ReLU: torch.relu,
    nn.Tanh: torch.tanh,
    nn.Sigmoid: torch.sigmoid,
}


class LinearBlockView(NamedTuple):
    """A block ``linear(act(flatten(c)))``, or ``batchnorm(linear(act(flatten(c))))`` with ``bn``,
    whose gradients have a closed form."""

    flatten: bool
    act: nn.Module | None
    act_backward: Callable[[torch.Tensor, torch.Tensor, nn.Module], torch.Tensor] | None  # None: derivative 1
    linear: nn.Linear
    #: a BatchNorm1d after the Linear layer, applied with the batch's statistics (training mode,
    #: running statistics untouched: as inside ``frozen_batchnorm_stats``)
    bn: nn.Module | None = None

    def inputs(self, c: torch.Tensor) -> torch.Tensor:
        """The Linear layer's input ``act(flatten(c))``."""
        a = c.flatten(1) if self.flatten else c
        act = self.act
        if act is None:
            return a
        # the activation's function without the module call (a third of a one-sample code step's
        # Python time), unless the module has hooks that must see the call
        function = _ACTIVATION_FUNCTIONS.get(type(act))
        if function is None or act._forward_hooks or act._forward_pre_hooks:
            return act(a)
        return function(a)


def linear_view(block, batchnorm: bool = False) -> LinearBlockView | None:
    """``LinearBlockView`` of a block made of at most a Flatten, one known activation and one Linear
    (with ``batchnorm``: also Linear then an affine BatchNorm1d); None for anything else (Conv,
    Dropout, custom modules), which autograd handles."""
    from .blocks import Sign, Step, StraightThrough  # local: blocks imports nothing from here

    pre, lin, post = list(block.pre), list(block.lin), list(block.post)
    bn = None
    if batchnorm and len(lin) == 2 and type(lin[1]) is nn.BatchNorm1d and lin[1].affine:
        lin, bn = lin[:1], lin[1]
    if post or len(lin) != 1 or type(lin[0]) is not nn.Linear:
        return None
    pre = [m for m in pre if not isinstance(m, nn.Identity)]
    flattens = [m for m in pre if isinstance(m, nn.Flatten)]
    if len(flattens) > 1 or any(f.start_dim != 1 or f.end_dim != -1 for f in flattens):
        return None
    acts = [m for m in pre if not isinstance(m, nn.Flatten)]
    if len(acts) > 1:
        return None
    if not acts:
        return LinearBlockView(bool(flattens), None, None, lin[0], bn)
    act = acts[0]
    if isinstance(act, (Sign, Step, StraightThrough)):
        return LinearBlockView(bool(flattens), act, None, lin[0], bn)
    grad = _ACTIVATION_BACKWARDS.get(type(act))
    return LinearBlockView(bool(flattens), act, grad, lin[0], bn) if grad is not None else None


def batch_norm_train(bn: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``bn(z)`` with the batch's own statistics, without updating the running ones."""
    return F.batch_norm(z, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)


def batch_norm_backward(bn: nn.Module, z: torch.Tensor, g_y: torch.Tensor) -> tuple:
    """Gradients ``(g_z, g_weight, g_bias)`` of a loss with gradient ``g_y`` w.r.t.
    ``batch_norm_train(bn, z)`` (Ioffe and Szegedy, ICML 2015, Sec. 3): with ``x = (z - mean) / s``,
    ``s = sqrt(var + eps)`` (the biased batch variance), ``g_z = (gamma / s) (g_y - mean(g_y) -
    x mean(g_y x))``, ``g_gamma = sum(g_y x)``, ``g_beta = sum(g_y)``."""
    mean = z.mean(0)
    inv_std = torch.rsqrt(z.var(0, unbiased=False) + bn.eps)
    x_hat = (z - mean) * inv_std
    g_beta = g_y.sum(0)
    g_gamma = (g_y * x_hat).sum(0)
    n = z.shape[0]
    g_z = (g_y - g_beta / n - x_hat * (g_gamma / n)) * (bn.weight * inv_std)
    return g_z, g_gamma, g_beta


def through_linear_block(view: LinearBlockView, c: torch.Tensor, g_out: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. ``c`` of a loss whose gradient w.r.t. ``linear(act(c))`` is ``g_out``."""
    return _through_activation(view, c, g_out @ view.linear.weight)


def _through_activation(view: LinearBlockView, c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. ``c`` from the gradient ``g`` w.r.t. the Linear layer's input ``act(c)``."""
    if view.act_backward is not None:
        g = view.act_backward(g, c.flatten(1) if view.flatten else c, view.act)
    return g.view_as(c) if view.flatten else g


def gram_pays(view: LinearBlockView, batch: int, steps: int) -> bool:
    """Whether a hidden code's ``steps`` gradient steps through ``view`` cost fewer multiply-adds
    by its weight's Gram matrix (:func:`_code_grad_fast`'s ``gram``).

    Directly, each step is a product through ``W`` (``m x n``) and one back (the first step's
    forward product is the forward code's): ``(2 steps - 1) B m n``. By the Gram matrix
    ``G = W^T W``, once ``n^2 m + B m n`` (``G`` and ``(b - t) W``), then ``B n^2`` a step. The Gram
    form wins for full batches (784-100-100-10 at batch 200: 13M against 18M; 4096-wide layers at
    batch 2048: 275G against 309G, or 241G with the Gram matrix's symmetry), the direct one for small
    batches and wide inputs."""
    if view.bn is not None:
        return False
    m, n = view.linear.weight.shape
    return n * n * m + batch * m * n + steps * batch * n * n < (2 * steps - 1) * batch * m * n


def _gram(a: torch.Tensor) -> torch.Tensor:
    """``a^T a``, its upper triangle only from 256 columns (half the multiply-adds; symmetric row panels).
    Traced, one product: the panels would be the whole product and a copy there."""
    if torch.compiler.is_compiling():
        return a.T @ a
    n = a.shape[1]
    return symmetric_update_(a.new_empty(n, n), a, beta=0.0, alpha=1.0)


def code_gram(view: LinearBlockView, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W^T W, (b - t) W)`` of a hidden code's next block: its objective's gradient w.r.t. the
    block's input ``a`` is ``2 (a W^T + b - t) W = 2 (a G + P)``, the residual's product folded
    into ``G`` (Choromanska et al.'s code loss, new here; in float32 the fold loses about the
    digits by which ``||a W^T||`` exceeds the residual's norm, harmless for a gradient step)."""
    weight = view.linear.weight.detach()
    shift = -target if view.linear.bias is None else view.linear.bias.detach() - target
    return _gram(weight), shift @ weight


def _code_grad_fast(c, anchor, view_next, target, loss_fn, *, mu, lambda_c, prox, reduction,
                    known_output=None, gram=None) -> torch.Tensor:
    """Closed-form gradient of :func:`code_objective` for Linear blocks (same value as autograd).
    Called in no-grad mode (the caller's: one context for all the code steps). ``known_output``: the
    next block's output at ``c`` when the caller has it (a hidden code's forward code, at the first
    step), which saves the block's product; it is not modified. ``gram``: :func:`code_gram` of a
    hidden code's next block, by which the step costs one product instead of two."""
    per_element = reduction == "sum"
    if gram is not None:  # a hidden code's step by its next weight's Gram matrix (gram_pays)
        scale = 2.0 if per_element else 2.0 / target.numel()
        g_in = torch.addmm(gram[1], view_next.inputs(c), gram[0], beta=scale, alpha=scale)
        grad = _through_activation(view_next, c, g_in)
        return _code_grad_terms(grad, c, anchor, mu=mu, lambda_c=lambda_c, prox=prox, per_element=per_element)
    if known_output is not None:  # never through a BatchNorm (the caller's rule)
        pred, residual = known_output, known_output - target
    else:
        z = pred = F.linear(view_next.inputs(c), view_next.linear.weight, view_next.linear.bias)
        if view_next.bn is not None:
            pred = batch_norm_train(view_next.bn, z)
        residual = pred.sub_(target) if target is not None else None
    if target is None:  # last code: the task loss may be anything (closed form or autograd on the output)
        g_out = task_loss_gradient(pred, loss_fn).mul_((c.shape[0] if per_element else 1.0) / mu)
    else:
        g_out = residual.mul_(2.0 if per_element else 2.0 / pred.numel())
    if view_next.bn is not None:
        g_out = batch_norm_backward(view_next.bn, z, g_out)[0]
    grad = through_linear_block(view_next, c, g_out)
    return _code_grad_terms(grad, c, anchor, mu=mu, lambda_c=lambda_c, prox=prox, per_element=per_element)


def _code_grad_terms(grad, c, anchor, *, mu, lambda_c, prox, per_element) -> torch.Tensor:
    """The proximity and L1 terms of a code's gradient added to its downstream term ``grad``."""
    scale = 1.0 if per_element else 1.0 / c.numel()
    if prox == "paper":
        grad.add_(c - anchor, alpha=2.0 * scale)
    if lambda_c:  # mu may be a 0-dim tensor (a captured step), which alpha= cannot take (nor is it
        # safe with sign: torch 2.14's compiler drops the alpha of add_(sign(c), alpha=...))
        grad.add_(torch.sign(c).mul_(lambda_c * scale / mu))
    return grad


class CriterionLoss:
    """``criterion(out, target)`` as a loss of the output alone, with the gradient in closed form
    where the criterion has one (:func:`task_loss_gradient` uses it instead of autograd).

    The closed forms, each the exact gradient of torch's own loss:

    - ``nn.CrossEntropyLoss()`` (mean reduction, no class weights, no label smoothing) on class
      indices, one per sample ``(B,)`` or per position ``(B, T)`` with outputs ``(B, C[, T])``:
      ``(softmax(out, dim=1) - onehot(target)) / number of labels``;
    - ``nn.MSELoss()`` (mean) with a target of the output's shape: ``2 (out - target) / out.numel()``.

    Any other criterion, or these with other settings, differentiates by autograd. The code steps
    of alternating minimization need this gradient several times a step (five code steps and the
    output fit): on a one-sample stream the autograd calls were a third of an AM-Adam step.
    """

    __slots__ = ("criterion", "target", "kind", "_onehot")

    def __init__(self, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], target: torch.Tensor) -> None:
        self.criterion, self.target = criterion, target
        self.kind = _closed_form_kind(criterion, target)
        self._onehot: torch.Tensor | None = None  # onehot(target) / n, made at the first gradient

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        return self.criterion(out, self.target)

    def gradient(self, out: torch.Tensor) -> torch.Tensor | None:
        """``d criterion(out, target) / d out`` in closed form, or None (then use autograd)."""
        y = self.target
        if self.kind == "cross-entropy" and out.dim() == y.dim() + 1 and out.shape[0] == y.shape[0]:
            n = y.numel()
            onehot = self._onehot
            if onehot is None or onehot.shape != out.shape or onehot.dtype != out.dtype:
                onehot = torch.zeros_like(out, memory_format=torch.contiguous_format)
                # scatter 1 then divide: torch.compile's CPU kernels pass a scattered scalar as a
                # float32 constant, which would round 1/n to 7 digits in a float64 model
                self._onehot = onehot.scatter_(1, y.unsqueeze(1), 1.0).div_(n)
            return _softmax_over_classes(out.detach()).div_(n).sub_(onehot)
        if self.kind == "mse" and out.shape == y.shape:
            return (out.detach() - y).mul_(2.0 / out.numel())
        return None


def _softmax_over_classes(out: torch.Tensor) -> torch.Tensor:
    """``softmax(out, dim=1)``. For a CPU batch ``(B, C)`` torch's kernel along the contiguous last
    dimension is slow when C is small (38 us for 200 x 10, against 6 us along the first dimension
    of the transposed view, on one thread here), so the transposed view is used: the same values."""
    if out.dim() == 2 and out.device.type == "cpu":
        return torch.softmax(out.t(), dim=0).t()
    return torch.softmax(out, dim=1)


def _closed_form_kind(criterion: object, target: torch.Tensor) -> str | None:
    if type(criterion) is nn.CrossEntropyLoss:
        if (criterion.weight is None and criterion.label_smoothing == 0.0 and criterion.reduction == "mean"
                and not target.is_floating_point() and target.dim() >= 1):
            return "cross-entropy"
    elif type(criterion) is nn.MSELoss:
        if criterion.reduction == "mean" and target.is_floating_point():
            return "mse"
    return None


def task_loss_gradient(out: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``d loss / d out``: in closed form for a :class:`CriterionLoss` that has one, else by autograd
    over the loss alone (the loss may be any function of the output)."""
    gradient = getattr(loss_fn, "gradient", None)
    if gradient is not None:
        grad = gradient(out)
        if grad is not None:
            return grad
    with torch.enable_grad():
        out = out.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(out), out)
    return grad


@torch.no_grad()
def linear_weight_grads(view: LinearBlockView, a: torch.Tensor, g_out: torch.Tensor,
                        lambda_w: float = 0.0) -> list[torch.Tensor]:
    """The gradients ``[dW, db]`` (``[dW]`` without a bias) of a Linear layer for a loss with
    gradient ``g_out`` w.r.t. ``linear(a)``: ``dW = g_out^T a (+ lambda_w sign(W) / |W|)``,
    ``db = sum_rows g_out``."""
    weight = view.linear.weight
    grad_w = g_out.T @ a
    if lambda_w:  # not add_(sign(W), alpha=...): torch 2.14's compiler drops that alpha (takes it as 1)
        grad_w.add_(torch.sign(weight).mul_(lambda_w / weight.numel()))
    return [grad_w] if view.linear.bias is None else [grad_w, g_out.sum(0)]


def linear_weight_grads_(view: LinearBlockView, a: torch.Tensor, g_out: torch.Tensor, lambda_w: float = 0.0) -> None:
    """:func:`linear_weight_grads` set as the ``.grad`` of the layer's weight and bias."""
    for p, grad in zip((view.linear.weight, view.linear.bias), linear_weight_grads(view, a, g_out, lambda_w)):
        p.grad = grad


@torch.no_grad()
def spectral_norm_bound(weight: torch.Tensor, power: int = 16, gram: torch.Tensor | None = None) -> torch.Tensor:
    """An upper bound on the largest singular value of ``weight`` (a 0-dim tensor, no host sync).

    With the Gram matrix ``G = W W^T`` (or ``W^T W``, whichever is smaller) scaled by its trace,
    ``trace(G^k)^(1/k) >= lambda_max(G)`` and the bound is at most ``n^(1/k)`` too large (1.33x
    for n = 100, k = 16; far less when the spectrum decays, as trained weights' spectra do). It
    costs ``log2(k)`` products of symmetric matrices, each computed as its upper triangle from 256
    columns; power iteration would underestimate instead. ``gram``:
    ``W^T W`` where the caller has made it (:func:`code_gram`), used unless ``W W^T`` is smaller (the
    two have the same nonzero eigenvalues).
    """
    w = weight.flatten(1)
    if gram is None or w.shape[0] < w.shape[1]:  # a given W^T W is used where it is the smaller one
        gram = _gram(w.T if w.shape[0] <= w.shape[1] else w)
    scale = torch.diagonal(gram).sum().clamp_min(torch.finfo(gram.dtype).tiny)
    g = gram / scale
    k = 1
    while 2 * k < power:  # g = G^k / trace(G)^k
        g = _gram(g)  # g^T g = g^2: g is symmetric
        k *= 2
    # trace(G^(2k)) = ||G^k||_F^2, since G^k is symmetric
    return (torch.linalg.vector_norm(g).square().pow(1.0 / (2 * k)) * scale).sqrt()


#: multiply-adds of :func:`spectral_norm_bound` (``n^2 m + 3 n^3`` for an ``m x n`` weight, n the smaller
#: side) from which :func:`step_cap_may_bind` tries the Frobenius norm: on a CPU from a 64 x 64
#: weight (reading the norm on the host is free there), on a GPU from 1024 x 1024 (the read waits
#: for the queued kernels; the bound's products at that size take longer than the wait)
_SCREEN_FROM_MACS = {"cpu": 2**20, "cuda": 2**32}


def hidden_code_step_cap(view_next: LinearBlockView, code: torch.Tensor, reduction: str,
                         gram: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """The largest stable step size for a hidden code whose next block is ``view_next``.

    The hidden code objective ``||f_{l+1}(c) - c_{l+1}||^2 + ||c - c0||^2`` (:func:`code_objective`)
    has curvature at most ``L = 2 s^2 ||W_{l+1}||_2^2 + 2`` per sample for ``reduction="sum"``, with
    ``s = sup|act'|`` (each term divided by its element count for ``"mean"``). A gradient step
    larger than about ``1/L`` overshoots, and with momentum it diverges geometrically: when the
    next layer's weights grow (as AM-mem's do over a long non-stationary stream), a fixed code step
    size eventually crosses that line and the codes, then the weights fitted to them, blow up.
    Returns ``1/L`` as a 0-dim tensor, or None when the activation's slope has no known bound.
    ``gram``: :func:`code_gram` of the same block where the code steps made it: its ``W^T W`` is
    reused by the bound (one product fewer) when it is the smaller of the two Gram matrices.
    """
    slope = _activation_slope(view_next)
    if slope is None:
        return None
    weight = view_next.linear.weight.detach()  # a bound, not part of any graph
    sigma = spectral_norm_bound(weight, gram=gram[0] if gram is not None else None)
    return _curvature_cap(sigma, slope, code.shape[0], code[0].numel(), view_next, reduction)


def step_cap_may_bind(view_next: LinearBlockView, batch: int, reduction: str, lr: float) -> bool:
    """False when :func:`hidden_code_step_cap` is sure to be at least ``lr`` (the cap cannot bind),
    told without its bound (new here).

    ``||W||_F >= ||W||_2`` gives a cap below the exact one: if even that is at least ``lr``, ``lr``
    stands. The Frobenius norm costs one pass over ``W``, against the ``log2(16) + 1`` matrix
    products of :func:`spectral_norm_bound` (``4 n^3`` multiply-adds for a square ``n x n``
    weight: at 4096 x 4096, more than a backprop step of batch 2048), and it rules out AM-Adam's
    mean-reduced cap, which is far above its step sizes. It reads the norm on the host, so it is
    tried only where the bound's products cost more than that (:data:`_SCREEN_FROM_MACS`), and not
    while compiling; everywhere else the answer is True (the cap is computed).
    """
    weight = view_next.linear.weight
    slope = _activation_slope(view_next)
    if slope is None or not _screening_pays(weight):  # (before any tensor call: a captured step's path)
        return True
    norm = float(torch.linalg.vector_norm(weight.detach()))  # the cap in host arithmetic: no more kernels
    return _curvature_cap(norm, slope, batch, weight.shape[1], view_next, reduction) < lr


def _activation_slope(view: LinearBlockView) -> float | None:
    """``sup |act'|`` of the block's activation (1 for none or straight-through); None if unknown."""
    if view.act is None or view.act_backward is None:  # identity or straight-through
        return 1.0
    bound = _ACTIVATION_SLOPE_BOUNDS.get(type(view.act))
    return None if bound is None else bound(view.act)


def _curvature_cap(sigma: torch.Tensor | float, slope: float, batch: int, width: int, view_next: LinearBlockView,
                   reduction: str) -> torch.Tensor | float:
    """``1/L`` of :func:`hidden_code_step_cap` for a bound ``sigma`` on the next layer's spectral norm
    (``batch`` codes of ``width`` elements each), of ``sigma``'s type."""
    if reduction == "sum":
        curvature = 2.0 * (slope * sigma) ** 2 + 2.0
    else:
        curvature = 2.0 * (slope * sigma) ** 2 / (batch * view_next.linear.out_features) + 2.0 / (batch * width)
    return 1.0 / curvature


def _screening_pays(weight: torch.Tensor) -> bool:
    threshold = _SCREEN_FROM_MACS.get(weight.device.type)
    if threshold is None or torch.compiler.is_compiling():
        return False
    n, m = sorted(weight.flatten(1).shape)
    return n * n * m + 3 * n ** 3 >= threshold


def update_codes(
    codes: Sequence[torch.Tensor],
    blocks: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    output_block: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    mu: float,
    steps: int,
    lrs: Sequence[float],
    momentum: float = 0.9,
    prox: str = "paper",
    lambda_c: float = 0.0,
    fast: bool = True,
    reduction: str = "mean",
    cap_steps: bool | Sequence[bool] = False,
    batchnorm: bool = False,
) -> list[torch.Tensor]:
    """Top-down code update (Choromanska et al., Alg. 1): last code first, then each lower code.

    Args:
        codes: forward codes ``[c_1, ..., c_L]`` (detached).
        blocks: hidden blocks ``[f_1, ..., f_L]``; ``blocks[l]`` maps ``c_l`` to ``c_{l+1}``.
        output_block: ``f_out`` mapping ``c_L`` to the network output.
        loss_fn: task loss of the network output.
        steps: Nesterov-momentum steps per code; ``lrs``: step size per code.
        reduction: ``"mean"`` (reference) or ``"sum"``; see :func:`code_objective`.
        fast: use closed-form gradients where the next block is ``Linear(activation(c))``
            (same values as autograd, several times fewer kernel launches); other blocks (Conv,
            BatchNorm, custom activations) always use autograd.
        cap_steps: cap each hidden code's step size at ``1/L`` of its objective
            (:func:`hidden_code_step_cap`) where the next block is ``Linear(activation(c))``; the
            last code's task loss can be anything, so its step is never capped. True skips the
            caps that cannot bind (:func:`step_cap_may_bind`, for float step sizes); one bool
            per code caps exactly those flagged (the caller's screen, as a compiled step needs).
        batchnorm: with ``fast``, closed-form gradients through a next block that ends in a
            BatchNorm1d too (batch statistics; the same values as autograd inside
            ``frozen_batchnorm_stats``); its steps are not capped, as autograd's are not.

    Returns:
        The updated codes (new tensors; ``codes`` is not modified).
    """
    n = len(codes)
    new_codes: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
    for i in reversed(range(n)):
        target = None if i == n - 1 else new_codes[i + 1]
        lr = lrs[i]
        view = linear_view(output_block if target is None else blocks[i + 1], batchnorm) if fast else None
        gram = None
        if view is not None and target is not None and gram_pays(view, codes[i].shape[0], steps):
            with torch.no_grad():
                gram = code_gram(view, target)
        if (cap_steps if isinstance(cap_steps, bool) else cap_steps[i]) and target is not None:
            next_view = linear_view(blocks[i + 1])
            if next_view is None:
                cap = None
            elif isinstance(cap_steps, bool):  # screened here (eager, a step size known on the host)
                may_bind = not isinstance(lr, float) or step_cap_may_bind(next_view, codes[i].shape[0], reduction, lr)
                cap = hidden_code_step_cap(next_view, codes[i], reduction, gram) if may_bind else None
            else:  # flagged by the caller's screen
                cap = hidden_code_step_cap(next_view, codes[i], reduction, gram)
            if cap is not None:
                lr = torch.clamp(cap, max=lr)
        if view is not None:
            c = codes[i].detach().clone()
            anchor = codes[i].detach()
            buf = None
            # The first step's gradient is taken at the forward code, where the next block's output
            # is the next forward code: its product is not done again. Not through a BatchNorm,
            # whose forward pass normalized with other statistics.
            known = codes[i + 1] if target is not None and view.bn is None else None
            with torch.no_grad():
                for _ in range(steps):
                    grad = _code_grad_fast(c, anchor, view, target, loss_fn, mu=mu, lambda_c=lambda_c, prox=prox,
                                           reduction=reduction, known_output=known, gram=gram)
                    buf = _nesterov_step(c, buf, grad, lr, momentum)
                    known = None
            new_codes[i] = c
            continue
        c = codes[i].detach().clone().requires_grad_(True)
        anchor = proximity_anchor(c, prox)
        buf = None
        for _ in range(steps):
            with torch.enable_grad():
                if target is None:
                    downstream = loss_fn(output_block(c))
                else:
                    downstream = _sq(blocks[i + 1](c), target, reduction)
                loss = code_objective(c, anchor, downstream, mu=mu, lambda_c=lambda_c,
                                      is_last=target is None, reduction=reduction)
                (grad,) = torch.autograd.grad(loss, c)
            buf = nesterov_step_(c, buf, grad, lr, momentum)
        new_codes[i] = c.detach()
    return new_codes

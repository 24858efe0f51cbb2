"""Streaming low-rank weight updates: SBE (rank 1) and SBPCA (rank k).

Hoskins, Daniels, Huang, Madhavan, Adam, Zhitenev, McClelland, Stiles, "Streaming Batch
Eigenupdates for Hardware Neuromorphic Networks", Frontiers in Neuroscience 13:793, 2019 (SBE);
Huang, Hoskins, Daniels, Stiles, Adam, "Memory-efficient training with streaming dimensionality
reduction", arXiv 2020 / "Low-rank gradient descent for memory-efficient training of deep in-memory
arrays", ACM JETC 2023 (SBPCA).

The batch gradient of a Linear (or, unfolded, a Conv) layer is a sum of outer products,
``G = sum_r delta_r x_r^T`` over the batch's samples r (a Conv layer: over samples and positions),
with ``x_r`` the layer's input (plus a 1 for the bias) and ``delta_r`` the loss gradient at its
output. Hardware that can only write outer products, or a data-parallel run that must send little,
replaces ``G`` by a rank-k estimate ``Delta diag(sigma) X^T`` built while the samples stream past,
and writes ``W <- W - lr Delta diag(sigma) X^T``. Parameters of other layers (BatchNorm, recurrent
layers) take plain gradient steps, and so does a penalty's gradient (EWC): neither is a sum of
per-sample outer products.

Two estimators per method (``mode``):
- ``"stream"``, as the papers describe it: SBE's per-sample recursion for the top singular triple,
  SBPCA's per-sub-batch recursion with QR re-orthonormalization, both warm-started from the
  previous batch's estimate (which counts as one sample, or one sub-batch). Their divisions are
  guarded: a norm or a singular value near zero or negative is replaced by the scale-free column
  norm of the new term, and SBPCA's last, smaller sub-batch is weighted by its size instead of being
  dropped (both new here; the third-party SBPCA code divides by sigma and drops the remainder).
- ``"power"``, new here: one warm-started block power iteration on ``G`` (two matrix products and a
  QR), PowerSGD-style; the fast mode.
- ``"svd"``: the exact top-k singular triples of ``G``, the papers' reference point.

``StepInfo.diagnostics["lowrank/explained_variance"]`` gives, per layer, the fraction of the batch
gradient's energy inside the estimated subspaces, ``||Delta^T G X||^2 / ||G||^2``.
"""
from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..hparams import HParam
from .base import Learner, LossFn, Penalty, StepInfo
from .penalty import add_penalty_grads_
from .state import gradients_or_zeros

__all__ = ["SBE", "SBPCA"]

MODES = ("stream", "power", "svd")


def _rows(layer: nn.Module, inp: torch.Tensor, out_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, delta)``: one row per sample (and position) of the layer's input, with a 1 appended for
    the bias, and of the gradient at its output; ``delta^T x`` is the batch gradient ``[dW | db]``."""
    if isinstance(layer, nn.Linear):
        x, d = inp.reshape(-1, layer.in_features), out_grad.reshape(-1, layer.out_features)
    else:  # Conv1d / Conv2d (groups 1, zero padding): patches as rows
        conv2d = isinstance(layer, nn.Conv2d)
        if not conv2d:
            inp = inp.unsqueeze(2)
        kernel, dilation, padding, stride = (
            (layer.kernel_size, layer.dilation, layer.padding, layer.stride) if conv2d else
            ((1, *layer.kernel_size), (1, *layer.dilation), (0, *layer.padding), (1, *layer.stride)))
        patches = F.unfold(inp, kernel, dilation=dilation, padding=padding, stride=stride)
        x = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        d = out_grad.reshape(out_grad.shape[0], out_grad.shape[1], -1).transpose(1, 2).reshape(-1, out_grad.shape[1])
    if layer.bias is not None:
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    return x, d


def _low_rank_layer(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return module.weight.requires_grad
    if type(module) in (nn.Conv1d, nn.Conv2d):
        return module.weight.requires_grad and module.groups == 1 and module.padding_mode == "zeros" \
            and not isinstance(module.padding, str)
    return False


def _orthonormal(q: torch.Tensor) -> torch.Tensor:
    """The Q of a QR decomposition with a non-negative diagonal of R (a unique, sign-stable basis)."""
    q, r = torch.linalg.qr(q)
    signs = torch.sign(torch.diagonal(r))
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


def _safe(divisor: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``divisor`` where it is clearly positive, else ``fallback`` (a column norm): never ~0."""
    tiny = torch.finfo(divisor.dtype).tiny
    floor = 1e-6 * divisor.abs().max().clamp_min(tiny)
    return torch.where(divisor > floor, divisor, fallback.clamp_min(tiny))


class _LowRankLearner(Learner):
    """Shared machinery: capture each layer's input and output gradient, estimate, write."""

    #: modes svd and power: the batch gradient is reduced before its estimate (amstream.distributed)
    data_parallel = True

    rank: int

    defaults = {
        "lr": HParam(0.1, "learning rate of the writes W <- W - lr Delta diag(sigma) X^T (and of the plain "
                     "steps of the other parameters)", range="(0, inf)", learning_rate=True),
        "mode": HParam("stream", "stream: the paper's streaming recursion over the batch's samples, warm-started "
                       "from the previous batch; power: one warm-started block power iteration on the batch "
                       "gradient (new here, fast); svd: the exact top-k singular triples of the batch gradient "
                       "(the papers' reference point)", str, choices=MODES),
        "momentum": HParam(0.0, "momentum of the writes (0: plain writes, as on the papers' hardware)",
                           range="[0, 1)"),
    }

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self._layers = [m for m in self.model.modules() if _low_rank_layer(m)]
        if not self._layers:
            raise ValueError(f"{type(self).__name__} needs at least one trainable nn.Linear, nn.Conv1d or nn.Conv2d "
                             "(groups 1, zero padding) in the model")
        groups = [{"params": params, "name": name} for name, params in self._named_groups()]
        self.optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        # the estimate of every layer: output-side vectors, singular values, input-side vectors
        self._estimates: list[list[torch.Tensor]] = []
        for layer in self._layers:
            n_out, n_in = layer.weight.shape[0], layer.weight[0].numel() + (layer.bias is not None)
            kw = {"dtype": layer.weight.dtype, "device": self.device}
            rank = min(self.rank, n_out, n_in)
            # sigma starts at 0, not 1 as in the third-party SBPCA code: a first write of lr * n * 1 would
            # be orders of magnitude too large; the guarded division copes with the 0
            self._estimates.append([_orthonormal(torch.randn(n_out, rank, **kw)), torch.zeros(rank, **kw),
                                    _orthonormal(torch.randn(n_in, rank, **kw))])

    def _forward_captured(self, x: torch.Tensor):
        """The forward pass, recording every call of each low-rank layer: ``(input, output)``. The
        hooks exist only during this pass, so the model never holds a reference to the learner."""
        captured: dict[nn.Module, list] = {layer: [] for layer in self._layers}

        def record(module, inputs, output):
            captured[module].append((inputs[0].detach(), output))

        handles = [layer.register_forward_hook(record) for layer in self._layers]
        try:
            return captured, self.model(x)
        finally:
            for handle in handles:
                handle.remove()

    def _forward_for_step(self, x: torch.Tensor):
        captured, out = self._forward_captured(x)
        return (captured, out), out

    def _whole_step_refusal(self) -> str | None:
        return ("its step reads each layer's rows through forward hooks and autograd (predict's forward pass is "
                "compiled, the step runs eagerly)")

    def _step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        pending = self._take_pending(x)
        captured, out = pending if pending is not None else self._forward_captured(x)
        loss = loss_fn(out)
        low = {id(p) for layer in self._layers for p in layer.parameters()}
        others = [p for p in self._params if p.requires_grad and id(p) not in low]
        calls = [(layer, estimate, inp, output) for layer, estimate in zip(self._layers, self._estimates)
                 for inp, output in captured[layer]]
        grads = gradients_or_zeros(loss, [c[3] for c in calls] + others, allow_unused=True,
                                   retain_graph=penalty is not None and not callable(penalty))
        explained = []
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for layer, estimate in zip(self._layers, self._estimates):
                # every call of the layer contributes its rows (a layer used twice sums both)
                rows = [_rows(layer, inp, g if g is not None else torch.zeros_like(output))
                        for (lay, _, inp, output), g in zip(calls, grads) if lay is layer]
                if not rows:
                    continue  # not used by this forward pass: no gradient, no write
                rows_x, rows_d = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
                full = rows_d.T @ rows_x  # the batch gradient [dW | db], for the power step and the diagnostic
                if self._parallel is not None:  # the whole batch's: the shards' mean-loss gradients by share
                    full.mul_(self._parallel.share)
                    self._parallel.sum_([full])
                u, sigma, v = self._estimate(estimate, rows_x, rows_d, full)  # updates the estimate in place
                self._write_grads(layer, u, sigma, v, scale=rows_x.shape[0] if self.mode == "stream" else 1.0)
                energy = full.square().sum().clamp_min(torch.finfo(full.dtype).tiny)
                explained.append((u.T @ full @ _orthonormal(v)).square().sum() / energy)
            for p, g in zip(others, grads[len(calls):]):
                p.grad = g
        add_penalty_grads_(penalty, self._params)
        self._optimizer_step()
        return StepInfo(loss=loss.detach(), batch_size=x.shape[0],
                        lrs={g["name"]: g["lr"] for g in self.optimizer.param_groups},
                        diagnostics={"lowrank/explained_variance": tuple(explained),
                                     "lowrank/sigma": tuple(e[1][0] for e in self._estimates)})

    @staticmethod
    def _write_grads(layer: nn.Module, u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, scale: float) -> None:
        """The layer's ``.grad`` = the rank-k estimate ``scale * U diag(sigma) V^T``, split into W and b."""
        estimate = (u * (sigma * scale)) @ v.T
        n_w = layer.weight[0].numel()
        layer.weight.grad = estimate[:, :n_w].reshape(layer.weight.shape).contiguous()
        if layer.bias is not None:
            layer.bias.grad = estimate[:, n_w].contiguous()

    def _estimate(self, estimate, rows_x, rows_d, full):
        """The write's ``(U, sigma, V)``; the layer's ``estimate`` (its state) is updated in place."""
        if self.mode == "stream":
            return self._stream(estimate, rows_x, rows_d)
        if self.mode == "power":
            u, sigma, v = self._power(estimate, full)
        elif not bool(torch.isfinite(full).all()):
            # LAPACK's SVD fails on non-finite entries: NaN triples let the step guard roll back
            u, sigma, v = (torch.full_like(t, math.nan) for t in estimate)
        else:
            u, sigma, vh = torch.linalg.svd(full, full_matrices=False)
            k = estimate[1].shape[0]
            u, sigma, v = u[:, :k], sigma[:k], vh[:k].T
        for t, new in zip(estimate, (u, sigma, v)):
            t.copy_(new)
        return u, sigma, v

    @staticmethod
    def _power(estimate, full: torch.Tensor):
        """One block power iteration on the batch gradient, warm-started from the last right vectors:
        ``U = orth(G V)``, ``V' = G^T U``, ``sigma = ||V'||`` per column, ``V = V' / sigma``."""
        u = _orthonormal(full @ estimate[2])
        v = full.T @ u
        sigma = torch.linalg.vector_norm(v, dim=0)
        v = v / sigma.clamp_min(torch.finfo(sigma.dtype).tiny)
        return u, sigma, v

    @abc.abstractmethod
    def _stream(self, estimate, rows_x, rows_d):
        """The paper's streaming recursion over the batch's rows (SBE: per sample; SBPCA: per
        sub-batch), warm-started from ``estimate``; returns ``(u, sigma, v)``."""

    def _data_parallel_refusal(self) -> str | None:
        if self.mode == "stream":
            return ("with mode='stream' its recursion runs over the batch's samples one after another, so the "
                    "shards' estimates do not add up to the batch's; modes 'svd' and 'power' estimate the "
                    "whole batch's gradient, reduced first")
        return super()._data_parallel_refusal()

    # ------------------------------------------------------------------------------ checkpointing
    def _extra_tensors(self) -> list[torch.Tensor]:
        return [t for e in self._estimates for t in e]

    def _extra_state(self) -> dict:
        return {"estimates": [list(e) for e in self._estimates]}

    def _load_extra_state(self, state: dict) -> None:
        for mine, saved in zip(self._estimates, state["estimates"]):
            for t, s in zip(mine, saved):
                t.copy_(s)


class SBE(_LowRankLearner):
    """SBE: a rank-1 write per layer and batch, the streaming batch eigenupdate (Hoskins et al., 2019).

    For each sample j = 1..n of the batch, with the previous batch's estimate as the 0-th:
    ``X <- (j X + x_j (delta_j . D)/|D|) / (j+1)``, ``D <- (j D + delta_j (x_j . X)/|X|) / (j+1)``,
    ``s <- (j s + (x_j . X^)(delta_j . D^)) / (j+1)`` (hats: unit vectors); the write is
    ``-lr n s D^ X^^T``, n the number of rows (the estimate is of the mean outer product).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from amstream import SBE
        >>> learner = SBE(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), device="cpu")
        >>> info = learner.learn(torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> len(info.diagnostics["lowrank/explained_variance"])
        2
    """

    rank = 1
    defaults = dict(_LowRankLearner.defaults)
    # rank-1 writes learn slowly at batch 32 (the SBE paper: many more epochs than mini-batch GD): the
    # floors are for two passes over the digits and 400 single samples, chance being 0.1 (measured by
    # the conformance tests: 0.44 and 0.44; MNIST figures in BENCHMARKS.md, section 9). lr 0.2 gave 0.44
    # on one machine and 0.28 on an AMD EPYC (its float rounding differs); lr 0.1 gave 0.45 there.
    conformance_cases = {
        "": {"kwargs": {"lr": 0.1, "momentum": 0.9}, "accuracy": 0.3,
             "one_sample": ({"momentum": 0.0, "lr": 0.05}, 0.3)},
    }

    def _stream(self, estimate, rows_x, rows_d):
        # The running vectors keep their scale (about the singular value): the warm start then weighs
        # as one sample of this batch, not as a unit vector that would swamp gradients of ~1e-3.
        d, s2, x = estimate[0][:, 0], estimate[1][0], estimate[2][:, 0]
        tiny = torch.finfo(x.dtype).tiny
        # Each running mean as lerp(old, new term, 1/(j+1)), and each norm taken once (|D| serves the
        # next sample's X update): 16 small operations per sample instead of 28, which is what a
        # sample costs at these sizes.
        d_norm = torch.linalg.vector_norm(d).clamp_min(tiny)
        x_norm = torch.linalg.vector_norm(x).clamp_min(tiny)
        for j, (xj, dj) in enumerate(zip(rows_x, rows_d), start=1):
            new = 1.0 / (j + 1)
            x = torch.lerp(x, xj * ((dj @ d) / d_norm), new)
            x_norm = torch.linalg.vector_norm(x).clamp_min(tiny)
            x_along = (xj @ x) / x_norm  # x_j . X^
            d = torch.lerp(d, dj * x_along, new)
            d_norm = torch.linalg.vector_norm(d).clamp_min(tiny)
            s2 = torch.lerp(s2, x_along * ((dj @ d) / d_norm), new)
        # sign flips of X and D come in pairs; s2 itself may turn negative, and is written as it is
        estimate[0][:, 0], estimate[1][0], estimate[2][:, 0] = d, s2, x
        return (d / d_norm)[:, None], s2.reshape(1), (x / x_norm)[:, None]


class SBPCA(_LowRankLearner):
    """SBPCA: a rank-k write per layer and batch from streaming batch PCA (Huang et al., 2020).

    The batch streams as sub-batches ``(X_i, D_i)`` of ``sub_batch`` rows, the previous batch's
    estimate counting as one: with ``w`` the share of the rows seen before,
    ``X <- orth(w X + X_i^T D_i Delta / (n sigma))``, ``Delta <- orth(w Delta + D_i^T X_i X / (n sigma))``,
    ``sigma <- w sigma + colsum((D_i Delta) * (X_i X)) / n`` (n the rows so far); the write is
    ``-lr n Delta diag(sigma) X^T``.
    """

    defaults = {
        **_LowRankLearner.defaults,
        "rank": HParam(4, "rank k of each layer's write", int, "[1, inf)"),
        "sub_batch": HParam(32, "rows per sub-batch of the stream recursion (the third-party code's 32)", int,
                            "[1, inf)"),
    }
    conformance_cases = {  # measured: 0.42, 0.75, 0.85 after two passes; 0.47, 0.37, 0.59 after 400 samples
        "": {"kwargs": {"lr": 0.05, "momentum": 0.9}, "accuracy": 0.3,
             "one_sample": ({"momentum": 0.0, "lr": 0.05}, 0.3)},
        "power": {"kwargs": {"mode": "power", "lr": 0.05, "momentum": 0.9},
                  "one_sample": ({"momentum": 0.0, "lr": 0.05}, 0.25)},
        "svd": {"kwargs": {"mode": "svd", "lr": 0.05, "momentum": 0.9},
                "one_sample": ({"momentum": 0.0, "lr": 0.05}, 0.25)},
        "cnn": {"model": "cnn", "kwargs": {"mode": "power", "lr": 0.1, "momentum": 0.9},
                "one_sample": ({"momentum": 0.0, "lr": 0.05}, 0.3)},
    }

    def _stream(self, estimate, rows_x, rows_d):
        delta, sigma, x = (t.clone() for t in estimate)
        seen = float(min(self.sub_batch, rows_x.shape[0]))  # the warm start weighs as one sub-batch
        for start in range(0, rows_x.shape[0], self.sub_batch):
            xi, di = rows_x[start:start + self.sub_batch], rows_d[start:start + self.sub_batch]
            total = seen + xi.shape[0]
            keep = seen / total
            term = xi.T @ (di @ delta) / total
            x = _orthonormal(keep * x + term / _safe(sigma, torch.linalg.vector_norm(term, dim=0)))
            term = di.T @ (xi @ x) / total
            delta = _orthonormal(keep * delta + term / _safe(sigma, torch.linalg.vector_norm(term, dim=0)))
            sigma = keep * sigma + ((di @ delta) * (xi @ x)).sum(0) / total
            seen = total
        for t, new in zip(estimate, (delta, sigma, x)):
            t.copy_(new)
        return delta, sigma, x

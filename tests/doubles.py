"""Test doubles: a learner with no torch optimizer, which solves its output layer exactly.

``RidgeHead`` stands for the exact solvers to come (ADMM's least-squares steps, AM-mem's memories):
it shows that the strategy, the agent and the scripts need nothing but the learner API. Everything
before the last Linear layer is a fixed feature map; each step moves the outputs one gradient step
of the task loss, ``T = out - eta * B * dL/dout``, and solves the head exactly for them with a
proximal term, ``W = argmin ||[h, 1] W^T - T||^2 + ridge ||W - W_old||^2``. A penalty of the
parameters (EWC) is then applied as one gradient step on the head.
"""
from __future__ import annotations

import torch
from torch import nn

from amstream.learners import LossFn, Penalty
from amstream.hparams import HParam
from amstream.learners import Learner, ParameterGroups, StepInfo
from amstream.learners.penalty import penalty_value


class RidgeHead(Learner):
    """Exact proximal least squares on the last Linear layer of an ``nn.Sequential``."""

    defaults = {
        "eta": HParam(1.0, "step of the output targets along the loss gradient", range="(0, inf)"),
        "ridge": HParam(1.0, "weight of the proximal term of the solve", range="(0, inf)"),
        "penalty_lr": HParam(0.01, "step size of the penalty's gradient step on the head", range="[0, inf)"),
    }
    conformance_cases = {"": {"one_sample": ({}, 0.2)}}

    def __init__(self, model: nn.Module, **kwargs) -> None:
        if not (isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear)):
            raise ValueError("RidgeHead needs an nn.Sequential that ends in nn.Linear")
        for p in model[:-1].parameters():
            p.requires_grad_(False)  # a fixed feature map
        super().__init__(model, **kwargs)
        self.optimizer = ParameterGroups([{"params": list(model[-1].parameters()), "name": "head"}])

    def _named_groups(self):
        return [("head", list(self.model[-1].parameters()))]

    def _forward_for_step(self, x: torch.Tensor):
        with torch.no_grad():
            features = self.model[:-1](x)
        out = self.model[-1](features)
        return features, out

    def _step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        head: nn.Linear = self.model[-1]
        features = self._take_pending(x)
        if features is None:
            with torch.no_grad():
                features = self.model[:-1](x)
        out = head(features.detach()).detach().requires_grad_(True)
        loss = loss_fn(out)
        (grad,) = torch.autograd.grad(loss, out)
        with torch.no_grad():
            targets = out - self.eta * x.shape[0] * grad
            h = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)
            w_old = torch.cat([head.weight, head.bias[:, None]], dim=1)
            eye = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
            w = torch.linalg.solve(h.T @ h + self.ridge * eye, h.T @ targets + self.ridge * w_old.T).T
            head.weight.copy_(w[:, :-1])
            head.bias.copy_(w[:, -1])
        if penalty is not None:
            with torch.enable_grad():
                grads = torch.autograd.grad(penalty_value(penalty), [head.weight, head.bias], allow_unused=True)
            with torch.no_grad():
                for p, g in zip((head.weight, head.bias), grads):
                    if g is not None:
                        p.sub_(self.penalty_lr * g)
        self.optimizer.step()  # a no-op that keeps learning-rate schedulers' bookkeeping in order
        return StepInfo(loss=loss.detach(), batch_size=x.shape[0], lrs={"head": 0.0},
                        diagnostics={"ridge/target_shift": (targets - out).norm().detach()})


def ridge_mlp(n_in: int = 64, n_out: int = 10, width: int = 256) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, n_out))

"""Online alternating minimization for an unrolled Elman network: a code per time step (new).

Choromanska et al. (ICML 2019) train feed-forward networks by alternating minimization over
auxiliary codes; their paper has no recurrent version. Here the unrolled Elman network
``a_t = U x_t + W tanh(a_{t-1}) + b``, ``o_t = V tanh(a_t) + c`` gets one code per time step, the
pre-activation ``a_t`` (the paper's codes are the outputs of the linear layers), and per batch:

1. codes from the forward pass, then ``code_steps`` gradient steps of size ``code_lr`` on

       J(a) = sum_rows task_loss(V tanh(a_t) + c) + mu sum_t ||a_t - U x_t - W tanh(a_{t-1}) - b||^2

   (summed over samples and steps: a code's step does not depend on the batch size). Every term
   couples at most two neighbouring steps, so the gradient is local: no backprop through time;
2. the shared weights fitted to the sum of their local losses at the codes, with Adam: the output
   layer ``(V, c)`` to the task loss of ``tanh(a_t)``, the recurrent layer ``(U, W, b)`` to the mean
   of ``||a_t - U x_t - W tanh(a_{t-1}) - b||^2`` over samples and steps (one backward pass of their
   sum gives each group exactly its own gradient: the codes are fixed).

A stateful model's carried state is the fixed ``s_0``; the next window starts from this window's
forward pass, as in truncated backprop through time.
"""
from __future__ import annotations

import torch
from torch import nn

from ..hparams import HParam
from ..models import ElmanRNN, require_elman
from .base import Learner, LossFn, Penalty, StepInfo
from .penalty import penalty_value

__all__ = ["AMRNN"]


class AMRNN(Learner):
    """AM-Adam over an unrolled :class:`amstream.models.ElmanRNN` (registered ``am-rnn``; new, see the
    module docstring). Diagnostics: ``am/local_loss`` (recurrent, output), ``am/code_displacement``."""

    #: the code objective is summed over samples (a shard's codes move as the batch's would) and the
    #: weights' local losses are means: gradients combined by share (amstream.distributed)
    data_parallel = True

    defaults = {
        "mu": HParam(1.0, "weight of the recurrence's consistency terms in the code objective", range="(0, inf)"),
        "code_steps": HParam(5, "gradient steps on the codes per batch", int, "[0, inf)"),
        "code_lr": HParam(0.03, "step size of the code steps (per sample: the objective is summed; 0.1 learned "
                          "the digits faster but diverged on the text)", range="(0, inf)"),
        "lr": HParam(3e-3, "Adam learning rate of the recurrent layer (U, W, b)", range="(0, inf)",
                     learning_rate=True),
        "lr_out": HParam(3e-3, "Adam learning rate of the output layer (V, c)", range="(0, inf)",
                         learning_rate=True),
        "output_fit": HParam("codes", "the states the output layer is fitted at: codes (tanh of the updated "
                             "codes, as AM) or forward (the forward pass's, which predictions use)", str,
                             choices=("codes", "forward")),
    }
    conformance_cases = {
        "": {"model": "elman", "kwargs": {"lr": 1e-2, "lr_out": 3e-2, "code_lr": 0.1},
             "one_sample": ({"lr": 3e-3, "lr_out": 1e-2}, 0.2)},
    }

    def __init__(self, model: nn.Module, **kwargs) -> None:
        require_elman(model, "AMRNN")
        super().__init__(model, **kwargs)
        groups = [{"params": params, "name": name, "lr": self.lr_out if name == "output" else self.lr}
                  for name, params in self._named_groups()]
        self.optimizer = torch.optim.Adam(groups, lr=self.lr)

    def _whole_step_refusal(self) -> str | None:
        return ("no whole-step graph is written for its unrolled codes yet (predict's forward pass is compiled, "
                "the step runs eagerly)")

    def _step(self, x: torch.Tensor, loss_fn: LossFn, penalty: Penalty = None) -> StepInfo:
        net: ElmanRNN = self.model
        with torch.no_grad():
            inputs = net.input_products(x)  # U x_t + b, fixed during the code steps
            h0 = net.initial_state(x.shape[0], (x.shape[0], net.hidden), inputs)
            A0, S0 = net.unroll(x, h0)
            net.remember(S0[-1])
            loss = loss_fn(net.arrange(net.output(S0)))
        rows = S0.shape[1] * (S0.shape[0] if net.many_to_many else 1)
        W = net.recurrent.weight.detach()
        V, c = net.output.weight.detach(), net.output.bias.detach()

        def mismatch(A: torch.Tensor, W: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
            S_prev = torch.cat((h0.unsqueeze(0), torch.tanh(A[:-1])))
            return A - inputs - S_prev @ W.t()

        A = A0.clone()
        with torch.enable_grad():
            for _ in range(self.code_steps):
                A.requires_grad_(True)
                objective = (rows * loss_fn(net.arrange(torch.tanh(A) @ V.t() + c))
                             + self.mu * mismatch(A, W, inputs).square().sum())
                (grad,) = torch.autograd.grad(objective, A)
                A = (A - self.code_lr * grad).detach()
        # the weights: each layer's local loss at the codes, one Adam step
        self.optimizer.zero_grad(set_to_none=True)
        states = torch.tanh(A) if self.output_fit == "codes" else S0
        output_loss = loss_fn(net.arrange(net.output(states)))
        recurrent_loss = mismatch(A, net.recurrent.weight, net.input_products(x)).square().sum(-1).mean()
        total = output_loss + recurrent_loss
        if penalty is not None:
            total = total + penalty_value(penalty)
        total.backward()
        self._optimizer_step()
        return StepInfo(loss=loss.detach(), batch_size=x.shape[0],
                        lrs={g["name"]: g["lr"] for g in self.optimizer.param_groups},
                        diagnostics={"am/local_loss": (recurrent_loss.detach(), output_loss.detach()),
                                     "am/code_displacement": (A - A0).norm()})

"""Sequence models: an explicit Elman network and torch's recurrent layers, one interface.

Every model here maps a batch of sequences to class scores in torch's layout for
``nn.CrossEntropyLoss``:

- inputs: features ``(batch, time, features)`` (float), or token ids ``(batch, time)`` (long)
  when the model has a ``vocab_size`` (a token is read as its one-hot vector);
- outputs: ``(batch, classes)`` from the last time step (``many_to_many=False``: classify a
  sequence), or ``(batch, classes, time)`` for every step (``many_to_many=True``: predict the next
  token), so that ``nn.CrossEntropyLoss()(output, labels)`` takes labels ``(batch, time)``.

With ``stateful=True`` the final hidden state of a training pass is kept (detached) and starts the
next batch of the same size: consecutive windows of one long stream then form one sequence, cut into
truncated backprop-through-time chunks. The kept state is part of the model's ``state_dict`` (a
checkpoint resumes mid-stream) and is reset by :meth:`SequenceModel.reset_state` or by a batch of
another size. Evaluation passes read it but do not change it.

:class:`ElmanRNN` is the network of ADMMiRNN (Tang et al., ECML-PKDD 2020) and of the char-RNN
baselines: ``a_t = U x_t + W s_{t-1} + b``, ``s_t = tanh(a_t)``, ``o_t = V s_t + c``, with the
three weight matrices as separate layers (``input``, ``recurrent``, ``output``) so that a learner
can fit each one. :class:`RecurrentNet` wraps ``nn.RNN``/``nn.GRU``/``nn.LSTM`` with the same
interface, for the optimizer-style learners and the backprop baseline.
"""
from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import UnsupportedModelError

__all__ = ["SequenceModel", "ElmanRNN", "RecurrentNet", "require_elman"]


class SequenceModel(nn.Module, abc.ABC):
    """What the learners read from a sequence model: its vocabulary, its output layout, its state.

    Attributes:
        vocab_size: number of token ids the model reads, or None for float features.
        many_to_many: outputs at every time step ``(batch, classes, time)`` rather than the last.
        stateful: the hidden state carries over from one training batch to the next.
    """

    is_recurrent = True  # validation: samples of shape (time, ...) may have any number of steps

    def __init__(self, n_inputs: int, hidden: int, n_outputs: int, *, vocab_size: int | None = None,
                 many_to_many: bool = False, stateful: bool = False) -> None:
        super().__init__()
        for name, value in (("hidden", hidden), ("n_outputs", n_outputs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if vocab_size is not None:
            if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
                raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
            if n_inputs not in (None, vocab_size):
                raise ValueError(f"a token model reads one-hot vectors of its vocabulary: n_inputs must be "
                                 f"None or vocab_size ({vocab_size}), got {n_inputs}")
            n_inputs = vocab_size
        elif isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 1:
            raise ValueError(f"n_inputs must be a positive integer (or give vocab_size), got {n_inputs!r}")
        self.n_inputs, self.hidden, self.n_outputs = n_inputs, hidden, n_outputs
        self.vocab_size, self.many_to_many, self.stateful = vocab_size, bool(many_to_many), bool(stateful)
        # Not persistent: its shape follows the batch, so it travels as extra state (below).
        self.register_buffer("state", torch.zeros(0), persistent=False)

    # ------------------------------------------------------------------------------- inputs
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Time-major float inputs ``(time, batch, n_inputs)`` (token ids become one-hot vectors)."""
        x = x.transpose(0, 1)
        if self.vocab_size is not None:
            return F.one_hot(x, self.vocab_size).to(self.state.dtype)  # the state follows model.to(dtype)
        return x

    # ------------------------------------------------------------------------------- the state
    def reset_state(self) -> None:
        """Forget the carried hidden state (the next batch starts from zeros)."""
        with torch.no_grad():
            self.state.resize_(0)

    def initial_state(self, batch: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The carried state when it fits a batch of ``batch`` sequences, else zeros."""
        if self.stateful and self.state.dim() > 1 and tuple(self.state.shape) == shape:
            return self.state.detach().clone()
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    @torch.no_grad()
    def remember(self, final_state: torch.Tensor) -> None:
        """Keep the final state of a training pass (no-op unless stateful or in eval mode).

        Resized in place: a learner's snapshot of the model's buffers still holds this tensor."""
        if self.stateful and self.training:
            if self.state.shape != final_state.shape:
                self.state.resize_(final_state.shape)
            self.state.copy_(final_state.detach())

    def get_extra_state(self) -> dict:
        return {"state": self.state.detach().clone()}

    def set_extra_state(self, extra: dict) -> None:
        saved = extra["state"]
        with torch.no_grad():
            self.state.resize_(saved.shape)
            self.state.copy_(saved)

    # ------------------------------------------------------------------------------ the pass
    @abc.abstractmethod
    def run(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs, final state)`` from ``h0`` (default: the carried state or zeros); changes nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, final = self.run(x)
        self.remember(final)
        return out

    # ------------------------------------------------------------------------------ outputs
    def arrange(self, outputs: torch.Tensor) -> torch.Tensor:
        """Time-major outputs ``(time, batch, classes)`` in the model's layout (see the module)."""
        return outputs.permute(1, 2, 0) if self.many_to_many else outputs[-1]

    def extra_repr(self) -> str:
        kind = f"vocab_size={self.vocab_size}" if self.vocab_size else f"n_inputs={self.n_inputs}"
        return (f"{kind}, hidden={self.hidden}, n_outputs={self.n_outputs}, many_to_many={self.many_to_many}, "
                f"stateful={self.stateful}")


class ElmanRNN(SequenceModel):
    """An Elman network with tanh units: ``s_t = tanh(U x_t + W s_{t-1} + b)``, ``o_t = V s_t + c``.

    ``input`` holds ``U`` and ``b``, ``recurrent`` holds ``W``, ``output`` holds ``V`` and ``c``
    (``nn.Linear`` layers, each one parameter group of a learner). Weights start as torch's
    ``nn.RNN`` (uniform in ``+-1/sqrt(hidden)``) times ``init_scale``.

    Example:
        >>> import torch
        >>> from amstream.models import ElmanRNN
        >>> net = ElmanRNN(None, 16, 5, vocab_size=5, many_to_many=True)
        >>> net(torch.randint(0, 5, (2, 7))).shape   # (batch, classes, time)
        torch.Size([2, 5, 7])
    """

    def __init__(self, n_inputs: int | None, hidden: int, n_outputs: int, *, vocab_size: int | None = None,
                 many_to_many: bool = False, stateful: bool = False, init_scale: float = 1.0) -> None:
        super().__init__(n_inputs, hidden, n_outputs, vocab_size=vocab_size, many_to_many=many_to_many,
                         stateful=stateful)
        if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale >= 0):
            raise ValueError(f"init_scale must be a finite number >= 0, got {init_scale!r}")
        self.input = nn.Linear(self.n_inputs, hidden)
        self.recurrent = nn.Linear(hidden, hidden, bias=False)
        self.output = nn.Linear(hidden, n_outputs)
        bound = init_scale / math.sqrt(hidden)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-bound, bound)

    def input_products(self, x: torch.Tensor) -> torch.Tensor:
        """``U x_t + b`` for every step, time-major ``(time, batch, hidden)``: one GEMM (a gather of
        ``U``'s columns for token ids)."""
        if self.vocab_size is not None:
            return F.embedding(x.transpose(0, 1), self.input.weight.t()) + self.input.bias
        return self.input(x.transpose(0, 1))

    def unroll(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activations ``a`` and states ``s``, both time-major ``(time, batch, hidden)``."""
        inputs = self.input_products(x)
        h = self.initial_state(x.shape[0], (x.shape[0], self.hidden), inputs) if h0 is None else h0
        pre, states = [], []
        W = self.recurrent.weight
        for t in range(inputs.shape[0]):  # the recurrence itself: the only loop over time
            a = torch.addmm(inputs[t], h, W.t())
            h = torch.tanh(a)
            pre.append(a)
            states.append(h)
        return torch.stack(pre), torch.stack(states)

    def run(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        _, states = self.unroll(x, h0)
        return self.arrange(self.output(states)), states[-1]


class RecurrentNet(SequenceModel):
    """``nn.RNN``/``nn.GRU``/``nn.LSTM`` (``kind``) and a Linear read-out, with the interface of
    :class:`SequenceModel`: the backprop-through-time baseline and the model of optimizer-style
    learners (Frank-Wolfe).

    Example:
        >>> import torch
        >>> from amstream.models import RecurrentNet
        >>> RecurrentNet("gru", 28, 32, 10)(torch.randn(4, 28, 28)).shape
        torch.Size([4, 10])
    """

    KINDS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

    def __init__(self, kind: str, n_inputs: int | None, hidden: int, n_outputs: int, *, num_layers: int = 1,
                 vocab_size: int | None = None, many_to_many: bool = False, stateful: bool = False) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {sorted(self.KINDS)}, got {kind!r}")
        super().__init__(n_inputs, hidden, n_outputs, vocab_size=vocab_size, many_to_many=many_to_many,
                         stateful=stateful)
        self.kind, self.num_layers = kind, int(num_layers)
        self.rnn = self.KINDS[kind](self.n_inputs, hidden, num_layers=self.num_layers)
        self.head = nn.Linear(hidden, n_outputs)

    def state_shape(self, batch: int) -> tuple[int, ...]:
        shape = (self.num_layers, batch, self.hidden)
        return (2, *shape) if self.kind == "lstm" else shape  # an LSTM's (h, c) kept stacked

    def run(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        state = self.initial_state(feats.shape[1], self.state_shape(feats.shape[1]), feats) if h0 is None else h0
        if self.kind == "lstm":
            outputs, (h, c) = self.rnn(feats, (state[0].contiguous(), state[1].contiguous()))
            final = torch.stack((h, c))
        else:
            outputs, final = self.rnn(feats, state)
        return self.arrange(self.head(outputs)), final

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, " + super().extra_repr()


def require_elman(model: nn.Module, method: str) -> None:
    """Raise :class:`~amstream.blocks.UnsupportedModelError` unless ``model`` is an :class:`ElmanRNN`
    (the learners that solve its three weight matrices separately need it)."""
    if not isinstance(model, ElmanRNN):
        raise UnsupportedModelError(
            f"{method} trains an amstream.models.ElmanRNN (explicit input, recurrent and output weights), "
            f"got {type(model).__name__}")

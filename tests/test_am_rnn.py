"""AM over the unrolled Elman network (am-rnn): codes per time step, local weight fits."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from amstream import AMRNN, UnsupportedModelError
from amstream.models import ElmanRNN


def make(**kw):
    torch.manual_seed(0)
    return AMRNN(ElmanRNN(3, 8, 4, many_to_many=True), device="cpu", **kw)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 6, 3, generator=g), torch.randint(0, 4, (5, 6), generator=g)


def test_without_code_steps_the_output_layer_moves_as_backprop_would_move_it():
    """At the forward codes every recurrence term is met, so the recurrent layer's local loss is zero
    (to rounding), and the output layer takes the Adam step of its backprop gradient."""
    learner = make(code_steps=0, lr_out=0.01)
    x, y = data()
    net = learner.model
    reference = ElmanRNN(3, 8, 4, many_to_many=True)
    reference.load_state_dict(net.state_dict())
    adam = torch.optim.Adam(reference.output.parameters(), lr=0.01)
    nn.functional.cross_entropy(reference(x), y).backward()
    adam.step()
    info = learner.learn(x, y)
    recurrent_loss, _ = info.diagnostics["am/local_loss"]
    assert float(recurrent_loss) < 1e-12  # rounding only (Adam still turns that into steps of size lr)
    torch.testing.assert_close(net.output.weight, reference.output.weight)
    torch.testing.assert_close(net.output.bias, reference.output.bias)


def test_code_steps_lower_the_code_objective_and_move_the_recurrent_layer():
    x, y = data()
    learner = make(code_steps=3, code_lr=0.05)
    w = learner.model.recurrent.weight.detach().clone()
    info = learner.learn(x, y)
    recurrent_loss, output_loss = info.diagnostics["am/local_loss"]
    assert float(info.diagnostics["am/code_displacement"]) > 0
    assert float(output_loss) < float(info.loss)  # the codes moved toward a lower task loss
    assert float(recurrent_loss) > 0 and not torch.equal(learner.model.recurrent.weight, w)


def test_learns_a_sequence_task():
    """Name the token read two steps ago (a task that needs the recurrence)."""
    torch.manual_seed(0)
    net = ElmanRNN(None, 32, 5, vocab_size=5, many_to_many=True)
    learner = AMRNN(net, device="cpu", lr=1e-2, lr_out=1e-2, code_lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        x = torch.randint(0, 5, (16, 12), generator=g)
        y = torch.roll(x, 2, dims=1)
        learner.learn(x, y)
    x = torch.randint(0, 5, (200, 12), generator=g)
    accuracy = float((learner.predict(x).argmax(1)[:, 2:] == x[:, :-2]).float().mean())
    assert accuracy > 0.6, accuracy  # chance 0.2


def test_only_an_elman_network_is_accepted():
    with pytest.raises(UnsupportedModelError, match="ElmanRNN"):
        AMRNN(nn.Sequential(nn.Linear(4, 3)), device="cpu")

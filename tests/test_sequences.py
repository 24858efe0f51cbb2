"""Sequence models, sequence data and sequence inputs through every surface (issue 14)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amstream
from amstream import Backprop, InputError
from amstream.models import ElmanRNN, RecurrentNet
from amstream.optim import FrankWolfe
from amstream.sequences import (ADDING_TRIVIAL_MSE, adding_problem, load_row_mnist, load_text, n_windows,
                                text_windows)
from state_utils import assert_same_state


# ------------------------------------------------------------------------------------ models
def test_elman_forward_is_the_recurrence_by_hand():
    torch.manual_seed(0)
    net = ElmanRNN(3, 5, 4, many_to_many=True)
    x = torch.randn(2, 6, 3)
    U, b, W = net.input.weight, net.input.bias, net.recurrent.weight
    h, outs = torch.zeros(2, 5), []
    for t in range(6):
        h = torch.tanh(x[:, t] @ U.T + b + h @ W.T)
        outs.append(net.output(h))
    expected = torch.stack(outs, dim=2)  # (batch, classes, time)
    torch.testing.assert_close(net(x), expected)
    net.many_to_many = False
    torch.testing.assert_close(net(x), outs[-1])


def test_token_ids_are_one_hot_inputs():
    torch.manual_seed(0)
    tokens = ElmanRNN(None, 8, 5, vocab_size=5)
    dense = ElmanRNN(5, 8, 5)
    dense.load_state_dict(tokens.state_dict())
    ids = torch.randint(0, 5, (3, 7))
    torch.testing.assert_close(tokens(ids), dense(F.one_hot(ids, 5).float()))
    gru = RecurrentNet("gru", None, 8, 5, vocab_size=5)
    assert gru(ids).shape == (3, 5)


@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
def test_stateful_model_carries_its_state_across_windows(kind):
    """Two windows of a stateful model equal one pass over their concatenation; evaluation passes
    read the state without changing it; a batch of another size starts from zeros."""
    torch.manual_seed(0)
    make = (lambda s: ElmanRNN(4, 6, 3, many_to_many=True, stateful=s)) if kind == "elman" else \
        (lambda s: RecurrentNet(kind, 4, 6, 3, many_to_many=True, stateful=s))
    net = make(True)
    whole = make(False)
    whole.load_state_dict(net.state_dict())
    x = torch.randn(2, 10, 4)
    first, second = net(x[:, :4]), net(x[:, 4:])
    torch.testing.assert_close(torch.cat((first, second), dim=2), whole(x))
    saved = net.state.clone()
    net.eval()
    net(x[:, :3])
    assert torch.equal(net.state, saved)
    net.train()
    torch.testing.assert_close(net(x[:1]), whole(x[:1]))  # batch of 1: fresh zeros
    net.reset_state()
    assert net.state.numel() == 0


def test_model_arguments_are_checked():
    with pytest.raises(ValueError, match="hidden"):
        ElmanRNN(3, 0, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        ElmanRNN(None, 4, 2, vocab_size=1)
    with pytest.raises(ValueError, match="n_inputs"):
        ElmanRNN(7, 4, 2, vocab_size=5)
    with pytest.raises(ValueError, match="kind"):
        RecurrentNet("transformer", 3, 4, 2)


# ------------------------------------------------------------------------------------ data
def test_text_corpus_splits_and_windows(data_root):
    corpus = load_text("all", data_root)
    train, test = load_text("train", data_root), load_text("test", data_root)
    assert (len(corpus), corpus.vocab_size) == (118_564, 61)
    assert len(train) == int(0.9 * len(corpus)) and len(train) + len(test) == len(corpus)
    assert train.vocab == test.vocab == corpus.vocab
    assert abs(corpus.unigram_entropy() - 2.96) < 0.005  # the figure the data README states
    windows = list(text_windows(train, 25, batch_size=4))
    assert len(windows) == n_windows(train, 25, 4)
    per_stream = (len(train) - 1) // 4
    x0, y0 = windows[0]
    assert x0.shape == (4, 25) and torch.equal(y0[:, :-1], x0[:, 1:])
    assert train.decode(x0[1, :5]) == train.decode(train.ids[per_stream:per_stream + 5])
    x1, _ = windows[1]
    assert torch.equal(x1[0], train.ids[25:50])  # consecutive windows continue each stream
    assert torch.equal(list(text_windows(train, 25, 4, start=1))[0][0], x1)
    assert train.decode(train.encode("Gregor")) == "Gregor"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        train.encode("Gregor\u00e9")
    with pytest.raises(ValueError, match="split"):
        load_text("validation", data_root)


def test_row_mnist_and_its_permutation(data_root):
    rows = load_row_mnist("test", data_root)
    perm = load_row_mnist("test", data_root, permuted=True, seed=3)
    assert rows.x.shape == perm.x.shape == (10_000, 28, 28)
    assert torch.equal(rows.y, perm.y)
    # the same pixels, moved: each image's sorted values agree, the rows do not
    assert torch.equal(rows.x[0].flatten().sort().values, perm.x[0].flatten().sort().values)
    assert not torch.equal(rows.x[0], perm.x[0])
    assert torch.equal(perm.x, load_row_mnist("test", data_root, permuted=True, seed=3).x)


def test_adding_problem_definition():
    ds = adding_problem(4000, 50, seed=1)
    assert ds.x.shape == (4000, 50, 2) and ds.y.shape == (4000, 1)
    markers = ds.x[..., 1]
    assert torch.equal(markers.sum(1), torch.full((4000,), 2.0))
    assert (markers[:, :25].sum(1) == 1).all() and (markers[:, 25:].sum(1) == 1).all()
    torch.testing.assert_close((ds.x[..., 0] * markers).sum(1, keepdim=True), ds.y)
    mse = float((ds.y - 1.0).square().mean())
    assert abs(mse - ADDING_TRIVIAL_MSE) < 0.01
    assert torch.equal(adding_problem(10, 50, seed=1).x, adding_problem(10, 50, seed=1).x)


# ----------------------------------------------------------------------------- the surfaces
def token_learner(**kw):
    torch.manual_seed(0)
    return Backprop(ElmanRNN(None, 16, 6, vocab_size=6, many_to_many=True, **kw), lr=1e-2, device="cpu")


def test_token_inputs_are_validated():
    learner = token_learner()
    x, y = torch.randint(0, 6, (3, 7)), torch.randint(0, 6, (3, 7))
    learner.learn(x, y)
    before = {k: v.clone() for k, v in learner.model.state_dict().items() if isinstance(v, torch.Tensor)}
    for bad_x, bad_y, message in [
        (torch.randint(0, 7, (3, 7)) + 6, y, "token id out of range"),
        (torch.randn(3, 7), y, "reads token ids"),
        (torch.randint(0, 6, (3, 7, 1)), y, "reads token ids"),
        (x, torch.randint(0, 6, (3, 6)), r"shape \(3, 7\)"),
        (x, torch.randint(0, 9, (3, 7)) + 6, "class label out of range"),
    ]:
        with pytest.raises(InputError, match=message):
            learner.learn(bad_x, bad_y)
    after = learner.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    learner.learn(torch.randint(0, 6, (3, 11)), torch.randint(0, 6, (3, 11)))  # another length is fine
    assert learner.input_shape == (None,)


def test_learn_one_and_prequential_over_token_sequences():
    learner = token_learner()
    learner.learn_one([1, 2, 3, 4], [2, 3, 4, 5])
    assert learner.predict_one([1, 2, 3]) == learner.predict(torch.tensor([[1, 2, 3]]))[0].argmax(0).tolist()
    probs = learner.predict_proba_one([1, 2])
    assert len(probs) == 2 and abs(sum(probs[0].values()) - 1) < 1e-5
    g = torch.Generator().manual_seed(0)
    samples = [(torch.randint(0, 6, (5,), generator=g), torch.randint(0, 6, (5,), generator=g)) for _ in range(12)]
    result = amstream.prequential(samples, learner, batch_size=4, every=4)
    assert result.n_seen == 12 and result.n_predictions == 60  # one prediction per step
    assert 0 <= result.n_correct <= 60 and result.accuracy == result.n_correct / 60


def test_sequence_classifier_prequential_counts_samples():
    torch.manual_seed(0)
    learner = Backprop(ElmanRNN(3, 8, 4), device="cpu")
    samples = [(torch.randn(5, 3), i % 4) for i in range(8)]
    result = amstream.prequential(samples, learner, batch_size=2)
    assert result.n_seen == 8 and result.n_predictions is None and result.accuracy == result.n_correct / 8


@pytest.mark.parametrize("learner,model", [("backprop", "elman"), ("backprop", "gru"), ("admm-rnn", "elman"),
                                           ("frank-wolfe", "gru")])
def test_stateful_stream_resumes_exactly_with_its_hidden_state(learner, model, tmp_path, data_root):
    """A char-level stream of consecutive windows, checkpointed mid-stream: the resumed learner,
    hidden state included, continues exactly as the one that never stopped."""
    train = load_text("train", data_root)

    def make(seed=0):
        torch.manual_seed(seed)
        net = ElmanRNN(None, 16, 61, vocab_size=61, many_to_many=True, stateful=True) if model == "elman" else \
            RecurrentNet("gru", None, 16, 61, vocab_size=61, many_to_many=True, stateful=True)
        return amstream.LEARNERS[learner](net, lr=3e-3, device="cpu")

    windows = list(text_windows(train, 10, batch_size=3))[:8]
    straight = make()
    for x, y in windows:
        straight.learn(x, y)
    first = make()
    for x, y in windows[:4]:
        first.learn(x, y)
    amstream.save_checkpoint(tmp_path / "ck.pt", first)
    resumed = make(seed=5)
    amstream.load_checkpoint(tmp_path / "ck.pt", resumed)
    assert torch.equal(resumed.model.state, first.model.state) and resumed.model.state.shape[-2] == 3
    for x, y in windows[4:]:
        resumed.learn(x, y)
    assert_same_state(straight.state_dict(), resumed.state_dict())


def test_rolled_back_step_restores_the_carried_state():
    learner = token_learner(stateful=True)
    learner.learn(torch.randint(0, 6, (2, 5)), torch.randint(0, 6, (2, 5)))
    state = learner.model.state.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        info = learner.step(torch.randint(0, 6, (2, 5)), lambda out: out.sum() * float("nan"))
    assert info.rolled_back and torch.equal(learner.model.state, state)
    learner2 = token_learner(stateful=True)  # a first step that changes the state's shape, undone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert learner2.step(torch.randint(0, 6, (2, 5)), lambda out: out.sum() * float("nan")).rolled_back
    assert learner2.model.state.numel() == 0


# ---------------------------------------------------------------------------- Frank-Wolfe
def quadratic_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    A, b = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    return lambda w: (A @ w[0] - b).square().sum() + w[1].square().sum() * 0.3


def fw_run(steps, **kw):
    loss = quadratic_problem()
    torch.manual_seed(1)
    params = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = FrankWolfe(params, **kw)
    trace = []
    for _ in range(steps):
        opt.zero_grad()
        loss(params).backward()
        opt.step()
        trace.append([p.detach().clone() for p in params])
    return params, opt, trace


def test_frank_wolfe_with_one_inner_step_is_adam_on_normalized_gradients():
    params, _, _ = fw_run(20, lr=0.05, inner_steps=1)
    loss = quadratic_problem()
    torch.manual_seed(1)
    ref = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    adam = torch.optim.Adam(ref, lr=0.05)
    for _ in range(20):
        adam.zero_grad()
        loss(ref).backward()
        for p in ref:
            p.grad /= p.grad.norm()
        adam.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_frank_wolfe_iterates_stay_in_the_ball_and_are_convex_combinations():
    """Inner iterates ``w_k = (1-1/k) w_{k-1} + (1/k)(w0 - lr g^_k)`` stay within lr of w0 (per
    tensor); the Adam step comes after T inner steps."""
    lr, T = 0.1, 5
    loss = quadratic_problem()
    torch.manual_seed(1)
    params = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = FrankWolfe(params, lr=lr, inner_steps=T)
    w0 = [p.detach().clone() for p in params]
    prev = [p.detach().clone() for p in params]
    for k in range(1, T):
        opt.zero_grad()
        loss(params).backward()
        vertex = [o - lr * p.grad / p.grad.norm() for o, p in zip(w0, params)]
        opt.step()
        for p, o, v, w in zip(params, w0, vertex, prev):
            assert float((p.detach() - o).norm()) <= lr * (1 + 1e-6)
            torch.testing.assert_close(p.detach(), (1 - 1 / k) * w + v / k)
        prev = [p.detach().clone() for p in params]
    opt.zero_grad()
    loss(params).backward()
    opt.step()  # the T-th step: back at w0, then one Adam step of size about lr per element
    for p, o in zip(params, w0):
        assert 0 < float((p.detach() - o).abs().max()) <= lr * (1 + 1e-6)
    assert float(opt.state[params[0]]["step"]) == T


def test_faithful_flag_reproduces_the_cumulative_add():
    lr, T = 0.1, 4
    _, _, true_trace = fw_run(T - 1, lr=lr, inner_steps=T)
    _, _, faithful_trace = fw_run(T - 1, lr=lr, inner_steps=T, faithful=True)
    torch.testing.assert_close(true_trace[0], faithful_trace[0])  # k = 1: the same
    assert not torch.allclose(true_trace[2][0], faithful_trace[2][0])
    # the reference by hand: buf_k = (1-1/k) buf_{k-1} - (lr/k) g^_k;  p += buf_k
    loss = quadratic_problem()
    torch.manual_seed(1)
    params = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    buf = [torch.zeros_like(p) for p in params]
    for k in range(1, T):
        for p in params:
            p.grad = None
        loss(params).backward()
        with torch.no_grad():
            for p, bb in zip(params, buf):
                bb.mul_(1 - 1 / k).add_(p.grad / p.grad.norm(), alpha=-lr / k)
                p.add_(bb)
        torch.testing.assert_close([p.detach() for p in params], faithful_trace[k - 1])


def test_frank_wolfe_zero_gradient_is_no_move():
    p = torch.ones(3, requires_grad=True)
    opt = FrankWolfe([p], lr=0.1, inner_steps=2)
    for _ in range(2):
        p.grad = torch.zeros(3)
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


def test_frank_wolfe_same_batch_closure_runs_every_inner_step():
    loss = quadratic_problem()
    torch.manual_seed(1)
    params = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    a = [p.detach().clone().requires_grad_() for p in params]
    calls = []

    def closure():
        calls.append(1)
        for p in params:
            p.grad = None
        value = loss(params)
        value.backward()
        return value

    FrankWolfe(params, lr=0.05, inner_steps=3).step(closure)
    assert len(calls) == 3
    _, _, trace = fw_run(3, lr=0.05, inner_steps=3)  # the same gradients as three calls on one loss
    torch.testing.assert_close([p.detach() for p in params], trace[-1])
    assert not torch.equal(params[0].detach(), a[0].detach())


def test_frank_wolfe_learner_same_batch_keeps_the_carried_state_once_per_batch():
    torch.manual_seed(0)
    net = ElmanRNN(None, 8, 6, vocab_size=6, many_to_many=True, stateful=True)
    learner = amstream.FrankWolfeLearner(net, lr=1e-2, inner_steps=3, same_batch=True, device="cpu")
    x, y = torch.randint(0, 6, (2, 5)), torch.randint(0, 6, (2, 5))
    with torch.no_grad():
        _, states = net.unroll(x)  # from zeros with the weights before the step
    learner.learn(x, y)
    torch.testing.assert_close(net.state, states[-1])


def test_frank_wolfe_is_usable_as_a_backprop_optimizer():
    torch.manual_seed(0)
    learner = Backprop(nn.Linear(4, 3), optimizer=FrankWolfe, lr=1e-2, optimizer_kwargs={"inner_steps": 2},
                       device="cpu")
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    w = learner.model.weight.detach().clone()
    learner.learn(x, y)
    assert not torch.equal(learner.model.weight, w)  # an inner step moved the weights
    learner.learn(x, y)
    assert float(learner.optimizer.state[learner.model.weight]["step"]) == 2

"""LocoProp's oracles (Amid, Anil, Warmuth, AISTATS 2022) and TensorFlow 1's RMSProp.

The contract every learner shares (resume, bad input, rollback...) is checked for LocoProp-M and -S
by the generated conformance suite; these are the method's own facts.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import amstream
from amstream import Backprop, LocoProp, LocoPropS
from amstream.data import load_digits
from amstream.optim import TFRMSprop
from learner_cases import batches


@pytest.fixture(scope="module")
def digits():
    return load_digits("train")


def net(activation=nn.Tanh, widths=(64, 24, 16, 10)) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU, nn.Sigmoid])
def test_m_with_one_plain_sgd_local_step_is_a_backprop_sgd_step_of_rate_gamma_lr(activation, digits):
    """grad_W = X^T (f(a) - (f(a) - gamma g)) = gamma X^T g: LocoProp-M with T = 1 and SGD is backprop
    SGD at rate gamma * lr, whatever the transfer functions (here with a softmax output transfer)."""
    x, y = batches(digits, n=1)[0]
    model = net(activation)
    gamma, lr = 10.0, 0.003
    loco = LocoProp(copy.deepcopy(model), local_steps=1, local_optimizer="sgd", lr=lr, gamma=gamma, device="cpu")
    bp = Backprop(copy.deepcopy(model), optimizer="sgd", lr=gamma * lr, device="cpu")
    for _ in range(3):
        loco.learn(x.double(), y)
        bp.learn(x.double(), y)
    for p, q in zip(loco.model.parameters(), bp.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_s_equals_m_for_identity_activations(digits):
    """With no nonlinearity (and an identity output transfer), the M and S targets and local losses
    coincide: the two variants take the same steps, local optimizer and all."""
    x, y = batches(digits, n=1)[0]
    model = net(nn.Identity)
    m = LocoProp(copy.deepcopy(model), output_transfer="identity", device="cpu")
    s = LocoPropS(copy.deepcopy(model), device="cpu")
    for batch_x, batch_y in batches(digits, n=4):
        m.learn(batch_x.double(), batch_y)
        s.learn(batch_x.double(), batch_y)
    for p, q in zip(m.model.parameters(), s.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert m.variant == "M" and s.variant == "S" and amstream.LEARNERS["locoprop-s"] is LocoPropS


def test_m_and_s_differ_with_a_nonlinearity(digits):
    x, y = batches(digits, n=1)[0]
    m, s = LocoProp(net(), device="cpu"), LocoPropS(net(), device="cpu")
    m.learn(x.double(), y)
    s.learn(x.double(), y)
    assert not torch.allclose(m.model[1].weight, s.model[1].weight)


def test_local_steps_move_every_layer_towards_its_target(digits):
    learner = LocoProp(net(), device="cpu")
    x, y = batches(digits, n=1)[0]
    info = learner.learn(x.double(), y)
    residuals = torch.stack(info.diagnostics["locoprop/residual"])
    assert residuals.shape == (3,) and bool((residuals < 1).all()), residuals


def test_the_local_learning_rate_decays_within_a_batch_and_a_schedulers_rate_is_kept(digits):
    """Each local step k runs at lr * max(1 - k/T, 0.25); after the step the group holds the rate a
    scheduler set, so the decay never compounds across batches."""
    x, y = batches(digits, n=1)[0]
    learner = LocoProp(net(), local_steps=8, local_optimizer="sgd", lr=0.01, device="cpu")
    seen = []
    learner.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    learner.learn(x.double(), y)
    assert seen == pytest.approx([0.01 * max(1 - k / 8, 0.25) for k in range(8)])
    assert learner.optimizer.param_groups[0]["lr"] == 0.01
    scheduler = torch.optim.lr_scheduler.StepLR(learner.optimizer, step_size=1, gamma=0.5)
    scheduler.step()
    seen.clear()
    learner.learn(x.double(), y)
    assert seen[0] == pytest.approx(0.005) and learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


def test_the_proximal_term_keeps_the_weights_near_the_batch_start(digits):
    x, y = batches(digits, n=1)[0]
    moves = {}
    for prox in (0.0, 50.0):
        learner = LocoProp(net(), prox=prox, local_optimizer="sgd", lr=0.01, device="cpu")
        start = learner.model[1].weight.detach().clone()
        learner.learn(x.double(), y)
        moves[prox] = float((learner.model[1].weight.detach() - start).norm())
    assert moves[50.0] < 0.5 * moves[0.0]


def test_m_refuses_a_transfer_function_without_a_matching_loss():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    with pytest.raises(amstream.UnsupportedModelError, match="GELU"):
        LocoProp(model, device="cpu")
    LocoPropS(model, device="cpu").learn(torch.randn(4, 4), torch.randint(0, 2, (4,)))  # S needs no transfer


def test_the_reference_settings_train_an_autoencoder_with_a_summed_pixel_loss(digits):
    """presets["reference"]: the official notebook's settings (TF1 RMSProp, momentum 0.999, lr 1e-5,
    T = 10, gamma 10) on a small tanh autoencoder with sigmoid cross-entropy summed over pixels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8), nn.Linear(8, 32), nn.Tanh(),
                          nn.Linear(32, 64))
    learner = LocoProp(model, device="cpu", **LocoProp.presets["reference"])
    assert isinstance(learner.optimizer, TFRMSprop)

    def reconstruction(out, x):
        return nn.functional.binary_cross_entropy_with_logits(out, x.flatten(1), reduction="sum") / x.shape[0]

    losses = []
    for epoch in range(3):
        for bx, _ in batches(digits, size=100, seed=epoch):
            losses.append(float(learner.step(bx, lambda out, bx=bx: reconstruction(out, bx)).loss))
    assert learner._output_transfer() == "sigmoid"  # the reference's: the sigmoid inside the pixel loss
    assert LocoProp(net(), criterion=nn.BCEWithLogitsLoss(), device="cpu")._output_transfer() == "sigmoid"
    assert losses[-1] < 0.8 * losses[0], (losses[0], losses[-1])


# ----------------------------------------------------------------------- TensorFlow 1's RMSProp
def test_tf_rmsprop_matches_a_hand_computed_step():
    """ms starts at 1; ms = decay ms + (1 - decay) g^2; mom = momentum mom + lr g / sqrt(ms + eps);
    w -= mom. Two steps with a learning rate that changes between them."""
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    opt = TFRMSprop([w], lr=0.1, decay=0.9, momentum=0.5, eps=1e-5)
    expected, ms, mom = w.detach().clone(), torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for lr, g in ((0.1, torch.tensor([0.3, -1.0, 2.0])), (0.05, torch.tensor([-0.2, 0.4, 1.5]))):
        opt.param_groups[0]["lr"] = lr
        w.grad = g.double()
        opt.step()
        ms = 0.9 * ms + 0.1 * g.double() ** 2
        mom = 0.5 * mom + lr * g.double() / torch.sqrt(ms + 1e-5)
        expected -= mom
    torch.testing.assert_close(w.detach(), expected, rtol=1e-14, atol=1e-15)


def test_tf_rmsprop_differs_from_pytorchs_rmsprop():
    """The differences of section 3.2: the mean square's start, epsilon's place, lr's place."""
    results = []
    for cls, kw in ((TFRMSprop, {"decay": 0.9}), (torch.optim.RMSprop, {"alpha": 0.9})):
        w = torch.tensor([1.0, -2.0], requires_grad=True)
        opt = cls([w], lr=0.01, momentum=0.9, eps=1e-5, **kw)
        w.grad = torch.tensor([0.5, 0.5])
        opt.step()
        results.append(w.detach().clone())
    assert not torch.allclose(results[0], results[1])
    with pytest.raises(ValueError, match="invalid decay"):
        TFRMSprop([torch.zeros(1, requires_grad=True)], decay=1.5)

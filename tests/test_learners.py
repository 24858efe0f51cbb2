"""Conformance suite: every learner obeys the same contract (DESIGN.md, "Tests").

Each check runs over every learner configuration in ``CASES``: resume equivalence, determinism,
learning on real data, graph-free prediction, bad input leaving the state unchanged, rollback of
non-finite steps, batch size one, CPU/GPU agreement.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amstream
from state_utils import assert_same_state, snapshot

from amstream import AMAdam, AMMem, Backprop, InputError, NonFiniteStepError
from amstream.data import load_digits


def mlp(batchnorm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, 32)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(32))
    layers += [nn.ReLU(), nn.Linear(32, 32)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(32))
    layers += [nn.ReLU(), nn.Linear(32, 10)]
    return nn.Sequential(*layers)


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


# name -> (factory(model) -> learner, model factory, has BatchNorm). The reference defaults were
# tuned for batches of 200; these small-batch settings come from sweeps on the digits data.
CASES = {
    "am-adam": (lambda m, **kw: AMAdam(m, **kw), mlp, False),
    "am-adam-official": (lambda m, **kw: AMAdam(m, prox="official", **kw), mlp, False),
    "am-adam-bn": (lambda m, **kw: AMAdam(m, **kw), lambda: mlp(batchnorm=True), True),
    "am-adam-cnn": (lambda m, **kw: AMAdam(m, **kw), small_cnn, False),
    "am-mem": (lambda m, **kw: AMMem(m, **kw), mlp, False),
    "am-mem-solve": (lambda m, **kw: AMMem(m, solver="solve", memory="mean", **kw), mlp, False),
    "backprop-adam": (lambda m, **kw: Backprop(m, **{"lr": 3e-3, **kw}), mlp, False),
    "backprop-sgd": (lambda m, **kw: Backprop(m, optimizer="sgd", optimizer_kwargs={"momentum": 0.9},
                                             **{"lr": 0.05, **kw}), mlp, False),
}

# A stream of single samples (batch size 1): settings from a sweep on the digits data, and a floor
# below the held-out accuracy measured after 400 samples (in the comment; chance is 0.1).
SINGLE_SAMPLE = {
    "am-adam": ({"lr": 3e-3, "lr_out": 3e-3, "code_lr": 0.1, "mu": 0.03}, 0.60),  # 0.719
    "am-adam-official": ({"lr": 3e-3, "lr_out": 3e-3, "code_lr": 0.1, "mu": 0.03}, 0.60),
    "am-adam-cnn": ({"lr": 3e-3, "lr_out": 3e-3, "mu": 0.3}, 0.20),  # 0.287: convolutions learn slower
    "am-mem": ({}, 0.60),  # 0.769
    "am-mem-solve": ({}, 0.60),  # 0.749
    "backprop-adam": ({}, 0.55),  # 0.702
    "backprop-sgd": ({"lr": 0.01}, 0.30),  # 0.426
}


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def make(name: str, seed: int = 0, device: str = "cpu", **kw):
    factory, model_factory, _ = CASES[name]
    torch.manual_seed(seed)
    return factory(model_factory(), device=device, **kw)


def batches(data, size: int = 32, n: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)
    out = [(data.x[order[i:i + size]], data.y[order[i:i + size]]) for i in range(0, len(data) - size + 1, size)]
    return out[:n] if n else out




@pytest.mark.parametrize("name", CASES)
def test_resume_from_checkpoint_is_exact(name, digits, tmp_path):
    train, _ = digits
    data = batches(train, n=8)
    straight = make(name)
    for x, y in data:
        straight.learn(x, y)

    first = make(name)
    for x, y in data[:4]:
        first.learn(x, y)
    amstream.save_checkpoint(tmp_path / "ck.pt", first)
    resumed = make(name, seed=123)  # different initial weights: everything must come from the file
    amstream.load_checkpoint(tmp_path / "ck.pt", resumed)
    for x, y in data[4:]:
        resumed.learn(x, y)
    assert_same_state(straight.state_dict(), resumed.state_dict())


@pytest.mark.parametrize("name", CASES)
def test_same_seed_same_trajectory(name, digits):
    train, _ = digits
    runs = []
    for _ in range(2):
        learner = make(name, seed=7)
        losses = [learner.learn(x, y).loss for x, y in batches(train, n=5)]
        runs.append((torch.stack(losses), snapshot(learner)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert_same_state(runs[0][1], runs[1][1])


@pytest.mark.parametrize("name", CASES)
def test_learns_real_data(name, digits):
    """Two passes over the digits training split: held-out accuracy well above chance (10%)."""
    train, test = digits
    learner = make(name)
    losses = []
    for epoch in range(2):
        for x, y in batches(train, seed=epoch):
            losses.append(float(learner.learn(x, y).loss))
    accuracy = (learner.predict(test.x).argmax(1) == test.y).float().mean().item()
    print(f"{name}: held-out {accuracy:.3f}, loss {sum(losses[:10]):.2f} -> {sum(losses[-10:]):.2f}")
    assert accuracy > 0.55, f"{name}: held-out accuracy {accuracy:.3f}"
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10])


@pytest.mark.parametrize("name", CASES)
def test_predict_builds_no_graph_and_keeps_mode(name, digits):
    train, _ = digits
    learner = make(name)
    learner.learn(*batches(train, n=1)[0])
    before = snapshot(learner)
    out = learner.predict(train.x[:5])
    assert out.shape == (5, 10)
    grads = [None if p.grad is None else p.grad.clone() for p in learner.model.parameters()]
    out = learner.predict(train.x[:5])
    assert out.grad_fn is None and not out.requires_grad
    assert learner.model.training
    for g, p in zip(grads, learner.model.parameters()):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    assert_same_state(before, learner.state_dict())  # predicting never changes BatchNorm statistics


BAD_INPUTS = {
    "wrong shape": (lambda x, y: (x[:, :, :4, :4], y), r"expected inputs of shape \(batch, 1, 8, 8\)"),
    "no batch dimension": (lambda x, y: (x[0], y[:1]), r"expected inputs of shape \(batch, 1, 8, 8\)"),
    "other sample shape": (lambda x, y: (x.flatten(1), y), r"expected inputs of shape \(batch, 1, 8, 8\)"),
    "integer dtype": (lambda x, y: ((x * 16).to(torch.int64), y), "floating point"),
    "nan": (lambda x, y: (x.clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan"))), y), "NaN or Inf"),
    "inf": (lambda x, y: (torch.where(x > 0.5, float("inf"), x), y), "NaN or Inf"),
    "label too large": (lambda x, y: (x, torch.full_like(y, 10)), "out of range"),
    "negative label": (lambda x, y: (x, torch.full_like(y, -1)), "out of range"),
    "float labels": (lambda x, y: (x, y.float()), "integer"),
    "too few labels": (lambda x, y: (x, y[:-1]), "rows"),
    "empty batch": (lambda x, y: (x[:0], y[:0]), "empty batch"),
    "not a tensor": (lambda x, y: (x.numpy(), y), "torch.Tensor"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_rejected_and_state_unchanged(name, bad, digits):
    train, _ = digits
    learner = make(name)
    x, y = batches(train, n=2)[0]
    learner.learn(x, y)
    before = snapshot(learner)
    corrupt, message = BAD_INPUTS[bad]
    bx, by = corrupt(x, y)
    with pytest.raises(ValueError, match=message):
        learner.learn(bx, by)
    assert_same_state(before, learner.state_dict())


@pytest.mark.parametrize("name", CASES)
def test_first_batch_that_does_not_fit_the_model_is_rejected(name, digits):
    train, _ = digits
    learner = make(name)
    before = snapshot(learner)
    with pytest.raises(InputError, match="do not fit the model"):
        learner.learn(train.x[:8, :, :4, :4], train.y[:8])
    assert_same_state(before, learner.state_dict())
    assert learner.input_shape is None
    learner.learn(train.x[:8], train.y[:8])  # the right shape is still accepted afterwards
    assert learner.input_shape == (1, 8, 8)


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[2]])
def test_batch_of_one_with_batchnorm_is_rejected(name, digits):
    train, _ = digits
    learner = make(name)
    before = snapshot(learner)
    with pytest.raises(InputError, match="BatchNorm"):
        learner.learn(train.x[:1], train.y[:1])
    with pytest.raises(InputError, match="BatchNorm"):
        learner.learn_one(train.x[0], int(train.y[0]))
    assert_same_state(before, learner.state_dict())
    assert learner.predict(train.x[:1]).shape == (1, 10)  # prediction of one sample is fine


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if not case[2]])
def test_batch_size_one_stream(name, digits):
    train, test = digits
    settings, floor = SINGLE_SAMPLE[name]
    learner = make(name, on_nonfinite="raise", **settings)
    for i in range(400):
        learner.learn_one(train.x[i], int(train.y[i]))
    assert learner.step_count == 400
    accuracy = (learner.predict(test.x).argmax(1) == test.y).float().mean().item()
    assert accuracy > floor, f"{name}: accuracy {accuracy:.3f} after 400 single samples"


@pytest.mark.parametrize("name", CASES)
def test_nonfinite_step_is_rolled_back(name, digits):
    train, _ = digits
    x, y = batches(train, n=1)[0]
    learner = make(name, on_nonfinite="raise")
    learner.learn(x, y)
    before = snapshot(learner)
    exploding = lambda out: F.cross_entropy(out * float("inf"), y)  # noqa: E731
    with pytest.raises(NonFiniteStepError):
        learner.step(x, exploding)
    assert_same_state(before, learner.state_dict())

    warn_learner = make(name)
    warn_learner.learn(x, y)
    before = snapshot(warn_learner)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = warn_learner.step(x, exploding)
    assert info.rolled_back
    assert any("rolled back" in str(w.message) for w in caught)
    assert_same_state(before, warn_learner.state_dict())
    assert not warn_learner.learn(x, y).rolled_back  # the learner goes on normally


@pytest.mark.parametrize("name", CASES)
def test_step_takes_a_custom_loss(name, digits):
    """A per-call loss (here a masked regression on one output per sample, as DQN does)."""
    train, _ = digits
    # The reference mu = 0.003 weighs the task loss 333x against the code penalty: right for
    # cross-entropy on logits, far too strong for a regression target (measured: the loss grows).
    learner = make(name, **({"mu": 0.3} if name.startswith("am-adam") else {}))
    x, _ = batches(train, n=1)[0]
    actions = torch.randint(0, 10, (len(x),))
    targets = torch.randn(len(x))

    def td_loss(out):
        return F.smooth_l1_loss(out.gather(1, actions[:, None]).squeeze(1), targets)

    first = td_loss(learner.predict(x))
    for _ in range(60):
        learner.step(x, td_loss)
    assert td_loss(learner.predict(x)) < 0.7 * first


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_cpu_and_gpu_agree(name, digits):
    # float64 on both devices, so that the comparison checks the algorithm rather than float32
    # summation order.
    train, _ = digits
    factory, model_factory, _ = CASES[name]
    learners = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        learners[device] = factory(model_factory().double(), device=device)
    cpu, gpu = learners["cpu"], learners["cuda"]
    for x, y in batches(train, n=5):
        cpu.learn(x.double(), y)
        gpu.learn(x.double(), y)
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    # A Linear bias right before BatchNorm has no effect on the output and a zero true gradient:
    # Adam turns its rounding noise into full-size steps of either sign, on each device its own.
    no_effect = {f"{i}.bias" for i, (m, nxt) in enumerate(zip(cpu.model, list(cpu.model)[1:]))
                 if isinstance(m, nn.Linear) and isinstance(nxt, nn.BatchNorm1d)}
    for (name_, p), q in zip(cpu.model.named_parameters(), gpu.model.parameters()):
        if name_ not in no_effect:
            torch.testing.assert_close(p, q.cpu(), rtol=1e-7, atol=1e-9, msg=name_)
    x = train.x[:64].double()
    torch.testing.assert_close(cpu.predict(x), gpu.predict(x).cpu(), rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------ method specifics
def test_fast_path_equals_autograd_path(digits):
    train, _ = digits
    for cls, kw in [(AMAdam, {}), (AMAdam, {"lambda_w": 1e-3, "weight_steps": 2, "lambda_c": 1e-3}), (AMMem, {}),
                    (AMAdam, {"output_fit": "forward"}), (AMMem, {"output_fit": "forward"})]:
        torch.manual_seed(0)
        fast_model = mlp().double()
        slow_model = copy.deepcopy(fast_model)
        fast = cls(fast_model, device="cpu", fast=True, **kw)
        slow = cls(slow_model, device="cpu", fast=False, **kw)
        assert fast._views is not None and slow._views is None
        for x, y in batches(train, n=6):
            fast.learn(x.double(), y)
            slow.learn(x.double(), y)
        for p, q in zip(fast_model.parameters(), slow_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cls", [AMAdam, AMMem])
def test_output_fit_forward_steps_the_output_layer_on_its_backprop_gradient(cls, digits):
    # output_fit="forward": the output layer takes the Adam step of the task loss at the forward
    # codes (backprop's gradient for that layer); the hidden layers fit the same codes as with
    # the paper's rule, so they end equal.
    train, _ = digits
    x, y = batches(train, n=1)[0]
    x = x.double()
    torch.manual_seed(0)
    model = mlp().double()
    reference = copy.deepcopy(model)
    learners = {fit: cls(copy.deepcopy(model), device="cpu", output_fit=fit) for fit in ("codes", "forward")}
    for learner in learners.values():
        learner.learn(x, y)
    codes_model, forward_model = learners["codes"].model, learners["forward"].model
    for (name, p), q in zip(codes_model.named_parameters(), forward_model.parameters()):
        if not name.startswith("5."):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    out_layer = reference[5]
    F.cross_entropy(reference(x), y).backward()
    adam = torch.optim.Adam(out_layer.parameters(), lr=learners["forward"].lr_out)
    adam.step()
    torch.testing.assert_close(forward_model[5].weight, out_layer.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(forward_model[5].bias, out_layer.bias, rtol=1e-10, atol=1e-12)
    assert not torch.equal(codes_model[5].weight, forward_model[5].weight)
    with pytest.raises(ValueError, match="invalid output_fit"):
        cls(mlp(), device="cpu", output_fit="backprop")


def test_prox_flag_changes_the_trajectory(digits):
    train, _ = digits
    results = {}
    for prox in ("paper", "official"):
        learner = make("am-adam", prox=prox, code_steps=10)
        info = None
        for x, y in batches(train, n=3):
            info = learner.learn(x, y)
        results[prox] = torch.stack(info.diagnostics["am/code_displacement"])
    # The paper's proximity term pulls codes back towards their forward values.
    assert (results["paper"] < results["official"]).all()


def test_batchnorm_running_stats_follow_the_forward_pass_only(digits):
    train, _ = digits
    x, y = batches(train, n=1)[0]
    for bn_stats, expect_equal in (("forward", True), ("all", False)):
        learner = make("am-adam-bn", bn_stats=bn_stats)
        reference = copy.deepcopy(learner.model)
        with torch.no_grad():
            reference(x)  # one plain forward pass in train mode
        learner.learn(x, y)
        bn, bn_ref = learner.model[2], reference[2]
        assert torch.equal(bn.running_mean, bn_ref.running_mean) is expect_equal
        # "forward": one update (the plain pass); "all": also one per code and weight step.
        assert (int(bn.num_batches_tracked) == 1) is expect_equal


def test_mu_ramp_and_learning_rate_halving(digits):
    train, _ = digits
    learner = make("am-adam", mu=0.01, d_mu=0.01, mu_max=0.03, lr_halve_every=2, lr=0.004, lr_out=0.002)
    mus, lrs = [], []
    for x, y in batches(train, n=5):
        info = learner.learn(x, y)
        mus.append(info.diagnostics["am/mu"])
        lrs.append(tuple(info.lrs.values()))
    assert mus == pytest.approx([0.01, 0.02, 0.03, 0.03, 0.03])
    assert lrs[0] == pytest.approx((0.004, 0.004, 0.002))
    assert lrs[2] == pytest.approx((0.002, 0.002, 0.001))
    assert lrs[4] == pytest.approx((0.001, 0.001, 0.0005))
    # The schedule lives in the learner's state: a restored learner continues it.
    clone = make("am-adam", mu=0.01, d_mu=0.01, mu_max=0.03, lr_halve_every=2, lr=0.004, lr_out=0.002)
    clone.load_state_dict(learner.state_dict())
    assert clone.current_mu == pytest.approx(0.03)


@pytest.mark.parametrize("model", [lambda: mlp(batchnorm=True), small_cnn])
def test_am_mem_refuses_models_it_cannot_solve(model):
    with pytest.raises(amstream.UnsupportedModelError, match="AM-mem needs"):
        AMMem(model(), device="cpu")


@pytest.mark.parametrize(
    "kwargs", [{"mu": 0}, {"mu": -1.0}, {"code_lr": 0}, {"lr": -0.1}, {"code_steps": -1},
               {"prox": "both"}, {"bn_stats": "never"}, {"on_nonfinite": "ignore"}, {"code_lr": [0.1]}],
)
def test_invalid_hyperparameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        AMAdam(mlp(), device="cpu", **kwargs)


def test_am_mem_memory_modes_give_the_same_solution(digits):
    """Sums and running means are the same system up to scale; the exact solve sees no difference."""
    train, _ = digits
    weights = []
    for memory in ("sum", "mean"):
        learner = make("am-mem", solver="solve", memory=memory, memory_dtype=torch.float64)
        for x, y in batches(train, n=4):
            learner.learn(x, y)
        weights.append(learner.model[1].weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-3, atol=1e-4)


def test_auto_device_follows_cuda_availability(monkeypatch):
    from amstream.utils import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="invalid device"):
        resolve_device("gpu0")


@pytest.mark.parametrize("damping", [0.0, 1.0])
def test_am_mem_damped_solve_satisfies_its_system(damping, digits):
    """With solver="solve", the first hidden layer's new weights solve W (A + lam I) = B + lam W_old,
    lam = damping * mean(diag A) (up to the solve's small relative ridge)."""
    train, _ = digits
    learner = make("am-mem", solver="solve", damping=damping, ridge=1e-9, memory="sum",
                   memory_dtype=torch.float64)
    batches_ = batches(train, n=3)
    for x, y in batches_[:2]:
        learner.learn(x, y)
    layer = learner.model[1]
    w_old = torch.cat([layer.weight, layer.bias[:, None]], 1).detach().double()
    state_before = snapshot(learner)
    learner.learn(*batches_[2])
    w_new = torch.cat([layer.weight, layer.bias[:, None]], 1).detach().double()
    A, Bm = learner._memories[0]
    lam = damping * A.diagonal().mean()
    lhs = w_new @ (A + lam * torch.eye(A.shape[0], dtype=A.dtype))
    rhs = Bm + lam * w_old
    assert float((lhs - rhs).abs().max() / rhs.abs().max()) < 1e-3
    if damping:  # from the same state, the proximal term keeps the weights closer to where they were
        undamped = make("am-mem", solver="solve", damping=0.0, ridge=1e-9, memory="sum", memory_dtype=torch.float64)
        undamped.load_state_dict(state_before)
        undamped.learn(*batches_[2])
        w_undamped = torch.cat([undamped.model[1].weight, undamped.model[1].bias[:, None]], 1).detach().double()
        assert (w_new - w_old).norm() < (w_undamped - w_old).norm()


def test_am_mem_diagonal_damping_solves_its_system_and_ignores_input_scale(digits):
    """damping_scale="diagonal" solves W (A + diag(lam)) = B + W_old diag(lam), lam_j = damping * A_jj.
    Unlike the "mean" scale, it is invariant to rescaling one input: multiply pixel j by s and the
    learned first-layer column j comes out divided by s, every other weight unchanged."""
    train, _ = digits
    batches_ = batches(train, n=3)

    def run(scale_pixel: float, damping_scale: str):
        torch.manual_seed(0)
        learner = make("am-mem", solver="solve", damping=1.0, damping_scale=damping_scale, ridge=0.0,
                       memory="sum", memory_dtype=torch.float64)
        with torch.no_grad():
            learner.model[1].weight[:, 20] /= scale_pixel  # the same function of the rescaled input
        w_old = None
        for x, y in batches_:
            x = x.clone()
            x.view(x.shape[0], -1)[:, 20] *= scale_pixel
            w_old = torch.cat([learner.model[1].weight, learner.model[1].bias[:, None]], 1).detach().double()
            learner.learn(x, y)
        return learner, w_old

    learner, w_old = run(1.0, "diagonal")
    w_new = torch.cat([learner.model[1].weight, learner.model[1].bias[:, None]], 1).detach().double()
    A, Bm = learner._memories[0]
    lam = A.diagonal()
    lhs = w_new @ (A + torch.diag(lam))
    rhs = Bm + w_old * lam
    assert float((lhs - rhs).abs().max() / rhs.abs().max()) < 1e-3

    def column_ratio(damping_scale: str) -> torch.Tensor:
        plain, _ = run(1.0, damping_scale)
        scaled, _ = run(1e-3, damping_scale)
        return (scaled.model[1].weight[:, 20] * 1e-3 / plain.model[1].weight[:, 20]).detach()

    torch.testing.assert_close(column_ratio("diagonal"), torch.ones(learner.model[1].out_features), rtol=1e-3, atol=1e-3)
    assert float((column_ratio("mean") - 1).abs().max()) > 0.1  # the mean scale holds a small input back


def test_am_mem_rejects_an_unknown_damping_scale():
    with pytest.raises(ValueError, match="damping_scale"):
        make("am-mem", damping_scale="per-input")


PENALTY_CASES = ["am-adam", "am-adam-bn", "am-adam-cnn", "am-mem", "backprop-adam"]


@pytest.mark.parametrize("form", ["callable", "tensor"])
@pytest.mark.parametrize("name", PENALTY_CASES)
def test_penalty_gradient_reaches_each_trained_layer_exactly(name, form, digits):
    """A penalty of the parameters (here an L2 pull towards reference weights, like EWC's) adds its
    gradient to each layer's own update: after one Adam step from the same state, the first moments
    differ by exactly (1 - beta1) * d penalty / d p. AM-mem's hidden layers are memory solves and
    do not take it; they come out identical."""
    train, _ = digits
    x, y = batches(train, n=1)[0]
    plain, penalized = make(name), make(name)
    torch.manual_seed(1)
    reference = [p.detach() + 0.05 * torch.randn_like(p) for p in penalized.model.parameters()]
    initial = [p.detach().clone() for p in penalized.model.parameters()]
    strength = 0.5

    def penalty():
        return strength * sum(((p - r) ** 2).sum() for p, r in zip(penalized.model.parameters(), reference))

    plain.learn(x, y)
    penalized.learn(x, y, penalty=penalty if form == "callable" else penalty())
    adam_params = {id(p) for g in penalized.optimizer.param_groups if not g.get("solved") for p in g["params"]}
    beta1 = penalized.optimizer.param_groups[0]["betas"][0]
    checked = 0
    for p_plain, p_pen, start, ref in zip(plain.model.parameters(), penalized.model.parameters(), initial, reference):
        if id(p_pen) not in adam_params:  # AM-mem's memory-solved hidden layers
            torch.testing.assert_close(p_pen, p_plain, rtol=0, atol=0)
            assert p_pen not in penalized.optimizer.state  # in a group (lr 0), never stepped
            continue
        moment_difference = penalized.optimizer.state[p_pen]["exp_avg"] - plain.optimizer.state[p_plain]["exp_avg"]
        torch.testing.assert_close(moment_difference, (1 - beta1) * 2 * strength * (start - ref), rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked >= 1


def test_penalty_must_be_a_scalar(digits):
    train, _ = digits
    x, y = batches(train, n=1)[0]
    learner = make("am-adam")
    learner.learn(x, y)
    before = snapshot(learner)
    with pytest.raises(ValueError, match="penalty must be a scalar"):
        learner.learn(x, y, penalty=lambda: torch.ones(3, requires_grad=True))
    assert_same_state(before, learner.state_dict())


# ------------------------------------------------------------------------------ growing models
class GrowingHead(nn.Module):
    """An output head that adds units for new classes by replacing its Linear layer (the way
    Avalanche's IncrementalClassifier does), keeping the old units' weights."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.classifier = nn.Linear(in_features, out_features)

    @torch.no_grad()
    def grow(self, out_features: int) -> None:
        old = self.classifier
        self.classifier = nn.Linear(old.in_features, out_features).to(old.weight.device)
        self.classifier.weight[: old.out_features] = old.weight
        self.classifier.bias[: old.out_features] = old.bias

    def forward(self, x):
        return self.classifier(x)


@pytest.mark.parametrize("name", ["am-adam", "am-mem", "backprop-adam"])
def test_a_growing_output_head_keeps_training(name, digits):
    train, test = digits
    factory = CASES[name][0]
    torch.manual_seed(0)
    head = GrowingHead(32, 2)
    learner = factory(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), head), device="cpu")
    first = train.subset(torch.nonzero(train.y < 2).squeeze(1))
    for x, y in batches(first, n=10):
        learner.learn(x, y)
    x, y = batches(train, n=1)[0]
    with pytest.raises(InputError, match="label"):
        learner.learn(x, y)  # labels 2..9 do not fit two outputs
    old_weight = head.classifier.weight
    head.grow(10)
    for x, y in batches(train, n=60):
        learner.learn(x, y)
    assert learner.n_outputs == 10
    group = next(g for g in learner.optimizer.param_groups if g["name"] == "block1")
    assert any(p is head.classifier.weight for p in group["params"])
    assert old_weight not in learner.optimizer.state  # the replaced parameter left with its state
    accuracy = (learner.predict(test.x).argmax(1) == test.y).float().mean()
    assert accuracy > 0.6  # all ten classes learned after the growth (chance: 0.1)

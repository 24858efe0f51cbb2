"""Method-specific behaviour of the learners (the contract every learner shares is checked by the
generated conformance suite, ``test_conformance.py``): the AM fast path, output fit, proximity
flag, BatchNorm statistics, schedules, AM-mem's solves, penalties, growing output heads, and models
that only some learners accept.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amstream
from learner_cases import GRUClassifier, as_rows, batches, conformance_cases, mlp, small_cnn
from state_utils import assert_same_state, snapshot

from amstream import AMAdam, AMMem, Backprop, InputError
from amstream.data import load_digits

CASES = conformance_cases()


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def make(name: str, seed: int = 0, device: str = "cpu", **kw):
    return CASES[name].make(seed=seed, device=device, **kw)


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
    torch.manual_seed(0)
    head = GrowingHead(32, 2)
    learner = CASES[name].cls(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), head), device="cpu",
                              **CASES[name].kwargs)
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


# ------------------------------------------------------------------------ any module for backprop
class TwoBranchCNN(nn.Module):
    """Not a Sequential: two convolution branches whose features are concatenated."""

    def __init__(self):
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.right = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(2 * 4 * 4 * 4, 10)

    def forward(self, x):
        return self.head(torch.cat([self.left(x).flatten(1), self.right(x).flatten(1)], dim=1))


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 24, batch_first=True)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("model, adapt, groups", [
    (lambda: nn.Linear(64, 10), lambda x: x.flatten(1), ["model"]),
    (TwoBranchCNN, lambda x: x, ["left", "right", "head"]),
    (GRUClassifier, as_rows, ["gru", "head"]),
    (LSTMClassifier, as_rows, ["lstm", "head"]),
])
def test_backprop_trains_any_module(model, adapt, groups, digits):
    """A bare Linear, a CNN that is not a Sequential, GRU and LSTM sequence classifiers: one named
    parameter group per top-level layer, and held-out accuracy far above chance after three passes."""
    train, test = digits
    torch.manual_seed(0)
    learner = Backprop(model(), lr=3e-3, device="cpu")
    assert [g["name"] for g in learner.param_groups] == groups
    for epoch in range(3):
        for x, y in batches(train, seed=epoch):
            learner.learn(adapt(x), y)
    accuracy = (learner.predict(adapt(test.x)).argmax(1) == test.y).float().mean().item()
    assert accuracy > 0.6, accuracy


def test_a_recurrent_model_takes_sequences_of_any_length(digits):
    """The time dimension of a recurrent model's input may change from batch to batch (the feature
    dimension may not), in learn, predict and learn_one."""
    x = as_rows(digits[0].x[:32])
    y = digits[0].y[:32]
    torch.manual_seed(0)
    learner = Backprop(GRUClassifier(), device="cpu")
    learner.learn(x, y)
    assert learner.input_shape == (None, 8)
    learner.learn(x[:, :5], y)  # the first five rows only
    assert learner.predict(x[:4, :3]).shape == (4, 10)
    learner.learn_one(x[0, :6], int(y[0]))
    with pytest.raises(InputError, match=r"expected inputs of shape \(batch, T, 8\)"):
        learner.learn(x[..., :4], y)
    declared = Backprop(GRUClassifier(), device="cpu", input_shape=(None, 8))
    assert declared.input_shape == (None, 8)


def test_block_learners_refuse_a_recurrent_model_and_name_it():
    with pytest.raises(amstream.UnsupportedModelError, match="GRU"):
        AMAdam(nn.Sequential(nn.GRU(8, 16, batch_first=True), nn.Linear(16, 10)), device="cpu")
    with pytest.raises(amstream.UnsupportedModelError, match="nn.Sequential"):
        AMAdam(GRUClassifier(), device="cpu")


def test_a_sequence_batch_to_an_mlp_is_a_clear_error(digits):
    """(batch, time, features) into an MLP without Flatten: a block-wise learner says which Linear
    layer gets more than one vector per sample; backprop says the labels do not match the output."""
    x, y = torch.randn(4, 5, 7), torch.randint(0, 2, (4,))
    am = AMAdam(nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 2)), device="cpu")
    before = snapshot(am)
    with pytest.raises(InputError, match="Linear layer of block 0"):
        am.learn(x, y)
    assert_same_state(before, am.state_dict())
    bp = Backprop(nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 2)), device="cpu")
    with pytest.raises(InputError, match=r"class labels must have shape \(4, 2\)"):
        bp.learn(x, y)
    bp.learn(x.flatten(1)[:, :7], y)  # one vector per sample is fine


def test_backprop_with_an_optimizer_class_or_factory(digits):
    x, y = batches(digits[0], n=1)[0]
    by_class = Backprop(mlp(), optimizer=torch.optim.SGD, lr=0.1, optimizer_kwargs={"momentum": 0.5}, device="cpu")
    by_factory = Backprop(mlp(), optimizer=lambda groups: torch.optim.Adagrad(groups, lr=0.05), device="cpu")
    for learner, kind in ((by_class, torch.optim.SGD), (by_factory, torch.optim.Adagrad)):
        assert isinstance(learner.optimizer, kind)
        learner.learn(x, y)
    assert by_class.hparams()["optimizer"] == "SGD"
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        Backprop(mlp(), optimizer=lambda groups: None, device="cpu")
    with pytest.raises(ValueError, match="did you mean 'adam'"):
        Backprop(mlp(), optimizer="adm", device="cpu")


def test_backprop_uses_the_fused_adam_unless_the_user_chose_an_implementation():
    fused = amstream.Backprop(nn.Linear(3, 2), device="cpu")
    assert fused.optimizer.defaults["fused"] is True  # one kernel per parameter group (BENCHMARKS.md, section 12)
    chosen = amstream.Backprop(nn.Linear(3, 2), device="cpu", optimizer_kwargs={"foreach": True})
    assert chosen.optimizer.defaults["foreach"] is True and not chosen.optimizer.defaults["fused"]
    chosen.learn(torch.randn(4, 3), torch.randint(0, 2, (4,)))  # fused and foreach together would raise


# ------------------------------------------------------------------------------- eval_mode
def test_eval_mode_sets_every_module_and_restores_each_ones_own_mode():
    from amstream.utils import eval_mode

    shared = nn.Dropout(0.5)
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Sequential(shared, nn.BatchNorm1d(4)))
    model[2][1].eval()  # a module already in eval mode stays so
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model) as inside:
            assert inside is model
            assert not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == before == [True, True, True, True, False]


def test_eval_mode_calls_a_module_s_own_train():
    from amstream.utils import eval_mode

    calls = []

    class Tracked(nn.Linear):
        def train(self, mode: bool = True):
            calls.append(mode)
            return super().train(mode)

    model = nn.Sequential(nn.Linear(4, 4), Tracked(4, 4))
    with eval_mode(model):
        assert not model.training and not model[1].training
    assert calls == [False, True] and model.training and model[1].training

"""Conformance suite: every registered learner obeys the same contract (DESIGN.md, "Tests").

Generated from ``amstream.LEARNERS`` and each class's ``conformance_cases`` (``learner_cases.py``),
so a learner registered later is checked with no edit here: exact resume, same seed same
trajectory, learning on real data, graph-free prediction, bad input refused with the state
unchanged, rollback of non-finite steps, batch size one, a custom loss, independent copies of a
state loaded into the learner's own tensors, frozen layers held, buffered samples kept by
checkpoints, test-then-train's one check per sample, the strategy's forward pass reused by the step, the declared hyperparameters, whether
compile=True captures the step, CPU/GPU agreement.
"""
from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import amstream
from amstream import InputError, NonFiniteStepError
from amstream.data import load_digits
from learner_cases import batches, conformance_cases
from state_utils import addresses, assert_same_state, snapshot

CASES = conformance_cases()


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def data(case, digits_split, **kw):
    return [(case.inputs(x), y) for x, y in batches(digits_split, **kw)]


def test_every_registered_learner_has_a_case():
    assert {c.registry_name for c in CASES.values()} == set(amstream.LEARNERS)


@pytest.mark.parametrize("name", CASES)
def test_resume_from_checkpoint_is_exact(name, digits, tmp_path):
    case = CASES[name]
    steps = data(case, digits[0], n=8)
    straight = case.make()
    for x, y in steps:
        straight.learn(x, y)
    first = case.make()
    for x, y in steps[:4]:
        first.learn(x, y)
    amstream.save_checkpoint(tmp_path / "ck.pt", first)
    resumed = case.make(seed=123)  # different initial weights: everything must come from the file
    amstream.load_checkpoint(tmp_path / "ck.pt", resumed)
    for x, y in steps[4:]:
        resumed.learn(x, y)
    assert_same_state(straight.state_dict(), resumed.state_dict())


@pytest.mark.parametrize("name", CASES)
def test_same_seed_same_trajectory(name, digits):
    case = CASES[name]
    runs = []
    for _ in range(2):
        learner = case.make(seed=7)
        losses = [learner.learn(x, y).loss for x, y in data(case, digits[0], n=5)]
        runs.append((torch.stack(losses), snapshot(learner)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert_same_state(runs[0][1], runs[1][1])


@pytest.mark.parametrize("name", CASES)
def test_learns_real_data(name, digits):
    """Two passes over the digits training split: held-out accuracy well above chance (10%)."""
    case = CASES[name]
    train, test = digits
    learner = case.make()
    losses = []
    for epoch in range(2):
        for x, y in data(case, train, seed=epoch):
            losses.append(float(learner.learn(x, y).loss))
    accuracy = (learner.predict(case.inputs(test.x)).argmax(1) == test.y).float().mean().item()
    print(f"{name}: held-out {accuracy:.3f}, loss {sum(losses[:10]):.2f} -> {sum(losses[-10:]):.2f}")
    assert accuracy > case.accuracy, f"{name}: held-out accuracy {accuracy:.3f}"
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10])


@pytest.mark.parametrize("name", CASES)
def test_predict_builds_no_graph_and_keeps_mode(name, digits):
    case = CASES[name]
    learner = case.make()
    learner.learn(*data(case, digits[0], n=1)[0])
    before = snapshot(learner)
    x = case.inputs(digits[0].x[:5])
    out = learner.predict(x)
    assert out.shape == (5, 10)
    grads = [None if p.grad is None else p.grad.clone() for p in learner.model.parameters()]
    out = learner.predict(x)
    assert out.grad_fn is None and not out.requires_grad
    assert learner.model.training
    for g, p in zip(grads, learner.model.parameters()):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    assert_same_state(before, learner.state_dict())  # predicting never changes BatchNorm statistics


SHAPE = r"expected inputs of shape \(batch, "
BAD_INPUTS = {
    "wrong shape": (lambda x, y: (x[..., :4], y), SHAPE),
    "no batch dimension": (lambda x, y: (x[0], y[:1]), SHAPE),
    "other sample shape": (lambda x, y: (x.flatten(1), y), SHAPE),
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
    case = CASES[name]
    learner = case.make()
    x, y = data(case, digits[0], n=2)[0]
    learner.learn(x, y)
    before = snapshot(learner)
    corrupt, message = BAD_INPUTS[bad]
    bx, by = corrupt(x, y)
    with pytest.raises(ValueError, match=message):
        learner.learn(bx, by)
    assert_same_state(before, learner.state_dict())


@pytest.mark.parametrize("name", CASES)
def test_first_batch_that_does_not_fit_the_model_is_rejected(name, digits):
    case = CASES[name]
    learner = case.make()
    before = snapshot(learner)
    x, y = case.inputs(digits[0].x[:8]), digits[0].y[:8]
    with pytest.raises(InputError, match="do not fit the model"):
        learner.learn(x[..., :4], y)
    assert_same_state(before, learner.state_dict())
    assert learner.input_shape is None
    learner.learn(x, y)  # the right shape is still accepted afterwards
    assert learner.input_shape == case.sample_shape


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case.has_batchnorm])
def test_batch_of_one_with_batchnorm_is_rejected(name, digits):
    case = CASES[name]
    learner = case.make()
    x, y = case.inputs(digits[0].x[:2]), digits[0].y[:2]
    before = snapshot(learner)
    with pytest.raises(InputError, match="BatchNorm"):
        learner.learn(x[:1], y[:1])
    with pytest.raises(InputError, match="BatchNorm"):
        learner.learn_one(x[0], int(y[0]))
    assert_same_state(before, learner.state_dict())
    assert learner.predict(x[:1]).shape == (1, 10)  # prediction of one sample is fine


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if not case.has_batchnorm])
def test_batch_size_one_stream(name, digits):
    case = CASES[name]
    train, test = digits
    settings, floor = case.one_sample
    learner = case.make(on_nonfinite="raise", **settings)
    x = case.inputs(train.x[:400])
    for i in range(400):
        learner.learn_one(x[i], int(train.y[i]))
    assert learner.step_count == 400
    accuracy = (learner.predict(case.inputs(test.x)).argmax(1) == test.y).float().mean().item()
    assert accuracy > floor, f"{name}: accuracy {accuracy:.3f} after 400 single samples"


@pytest.mark.parametrize("name", CASES)
def test_nonfinite_step_is_rolled_back(name, digits):
    case = CASES[name]
    x, y = data(case, digits[0], n=1)[0]
    learner = case.make(on_nonfinite="raise")
    learner.learn(x, y)
    before = snapshot(learner)
    exploding = lambda out: F.cross_entropy(out * float("inf"), y)  # noqa: E731
    with pytest.raises(NonFiniteStepError):
        learner.step(x, exploding)
    assert_same_state(before, learner.state_dict())

    warn_learner = case.make()
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
    """A per-call loss (here a masked regression on one output per sample, as DQN does), with the
    class's TD preset (what the DQN agent uses)."""
    case = CASES[name]
    learner = case.make(**case.cls.presets.get("td", {}))
    x, _ = data(case, digits[0], n=1)[0]
    actions = torch.randint(0, 10, (len(x),))
    targets = torch.randn(len(x))

    def td_loss(out):
        return F.smooth_l1_loss(out.gather(1, actions[:, None]).squeeze(1), targets)

    first = td_loss(learner.predict(x))
    for _ in range(60):
        learner.step(x, td_loss)
    assert td_loss(learner.predict(x)) < 0.7 * first


@pytest.mark.parametrize("name", CASES)
def test_a_loss_that_is_not_one_number_is_refused(name, digits):
    """A per-sample loss (``reduction="none"``) is refused with an error that says to reduce it, and
    the learner is left as it was."""
    case = CASES[name]
    learner = case.make()
    steps = data(case, digits[0], n=2)
    learner.learn(*steps[0])
    before = snapshot(learner)
    x, y = steps[1]

    def per_sample(out):
        return F.cross_entropy(out.flatten(0, -2) if out.dim() > 2 else out, y.flatten(), reduction="none")

    with pytest.raises(InputError, match=r"one number.*\.mean\(\)"):
        learner.step(x, per_sample)
    assert_same_state(before, learner.state_dict())


@pytest.mark.parametrize("name", CASES)
def test_a_learner_loaded_from_a_live_state_is_independent(name, digits):
    """``b.load_state_dict(a.state_dict())`` copies, as ``nn.Module.load_state_dict`` does: after one
    more step of each, each is where it would be alone (no shared optimizer moments or memories)."""
    case = CASES[name]
    steps = data(case, digits[0], n=4)
    a = case.make()
    for x, y in steps[:2]:
        a.learn(x, y)
    b = case.make(seed=5)
    b.load_state_dict(a.state_dict())
    reference = case.make(seed=9)
    reference.load_state_dict(snapshot(a))
    a.learn(*steps[2])
    b.learn(*steps[3])
    reference.learn(*steps[3])
    assert_same_state(reference.state_dict(), b.state_dict())
    alone = case.make()
    for x, y in steps[:3]:
        alone.learn(x, y)
    assert_same_state(alone.state_dict(), a.state_dict())


@pytest.mark.parametrize("name", CASES)
def test_a_loaded_or_rolled_back_state_stays_in_the_learners_own_tensors(name, digits):
    """Loading a state copies its values into the tensors the learner already has (weights, optimizer
    states, AM-mem's memories), and so does a rollback: a CUDA graph, which holds the addresses of
    the tensors a captured step updates, replays after a resume instead of being recorded again."""
    case = CASES[name]
    steps = data(case, digits[0], n=4)
    a, b = case.make(), case.make(seed=5)
    for x, y in steps[:2]:
        a.learn(x, y)
        b.learn(x, y)
    before = addresses(b)
    b.load_state_dict(a.state_dict())
    x, y = steps[2]
    with pytest.raises(InputError):
        b.learn(torch.full_like(x, float("nan")), y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "rolled back"
        assert b.step(x, lambda out: F.cross_entropy(out * float("inf"), y)).rolled_back
    after = addresses(b)
    assert after.keys() == before.keys()
    moved = [k for k in before if after[k] != before[k]]
    assert not moved, f"loading a state replaced these tensors: {moved}"
    assert_same_state(snapshot(a), snapshot(b), ignore=("stream",))


@pytest.mark.parametrize("name", CASES)
def test_compile_says_whether_the_whole_step_is_one_graph(name):
    """With ``compile=True`` every learner either runs its whole step as one graph (no reason: the
    compiled tests check that it does) or has the sentence it says once, at its first step."""
    reason = CASES[name].make(compile=True)._whole_step_refusal()
    assert reason is None or (isinstance(reason, str) and len(reason.split()) >= 4), reason


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("form", ["float64", "strided", "requires_grad", "int32 labels", "uint8 labels"])
def test_a_batch_in_another_form_takes_the_same_step(name, form, digits):
    """A float64 batch (numpy's default) for a float32 model is converted, as river and scikit-learn
    take it, and so are class labels in a narrower integer type (numpy's int32, raw uint8 image
    labels); a strided view or a batch that requires grad is the same batch: the same step, the same
    predictions."""
    case = CASES[name]
    steps = data(case, digits[0], n=2)
    x, y = steps[1]
    other, other_y = {
        "float64": lambda: (x.double(), y), "strided": lambda: (torch.stack([x, x], dim=1)[:, 0], y),
        "requires_grad": lambda: (x.clone().requires_grad_(True), y),
        "int32 labels": lambda: (x, y.int()), "uint8 labels": lambda: (x, y.to(torch.uint8)),
    }[form]()
    given, plain = case.make(), case.make()
    for learner in (given, plain):
        learner.learn(*steps[0])
    given.learn(other, other_y)
    plain.learn(x, y)
    assert_same_state(snapshot(plain), snapshot(given))
    torch.testing.assert_close(given.predict(other), plain.predict(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_step_inside_a_no_grad_block_is_the_same_step(name, mode, digits):
    """Learning inside ``torch.no_grad()`` or ``torch.inference_mode()`` (an evaluation or an acting
    loop, with the batch made there) takes the very step taken outside it."""
    case = CASES[name]
    steps = data(case, digits[0], n=2)
    inside, outside = case.make(), case.make()
    for learner in (inside, outside):
        learner.learn(*steps[0])
    with getattr(torch, mode)():
        x, y = (t.clone() for t in steps[1])
        inside.learn(x, y)
    outside.learn(*steps[1])
    assert_same_state(snapshot(outside), snapshot(inside))


@pytest.mark.parametrize("name", CASES)
def test_a_frozen_layer_stays_as_it_is(name, digits):
    """``requires_grad_(False)`` freezes a layer, as in torch: after the first layer is frozen mid-stream,
    the learner goes on training the others and leaves it exactly as it was."""
    case = CASES[name]
    learner = case.make()
    steps = data(case, digits[0], n=5)
    for x, y in steps[:2]:
        learner.learn(x, y)
    first = next(m for m in learner.model.modules() if any(True for _ in m.parameters(recurse=False)))
    frozen = {n: p.detach().clone() for n, p in first.named_parameters(recurse=False)}
    others = [p.detach().clone() for p in learner.model.parameters() if all(p is not q for q in first.parameters())]
    first.requires_grad_(False)
    for x, y in steps[2:]:
        assert not learner.learn(x, y).rolled_back
    for n, p in first.named_parameters(recurse=False):
        assert torch.equal(p, frozen[n]), f"the frozen {type(first).__name__}.{n} changed"
    rest = [p for p in learner.model.parameters() if all(p is not q for q in first.parameters())]
    assert any(not torch.equal(p, q) for p, q in zip(rest, others)), "nothing else trained"


@pytest.mark.parametrize("name", CASES)
def test_buffered_samples_survive_a_checkpoint(name, digits, tmp_path):
    """learn_one with a micro-batch: the buffered samples, the micro-batch size and the dict
    feature order are part of the checkpoint, so a resumed stream learns exactly the same."""
    case = CASES[name]
    x, y = case.inputs(digits[0].x[:20]), digits[0].y[:20]
    if case.model == "mlp":  # dict features, as river's streams give them
        samples = [({f"f{j}": float(v) for j, v in enumerate(row.flatten())}, int(t)) for row, t in zip(x, y)]
    else:
        samples = [(row, int(t)) for row, t in zip(x, y)]

    def stream(learner, part):
        for sample, label in part:
            learner.learn_one(sample, label)

    straight = case.make()
    straight.set_micro_batch(8)
    stream(straight, samples)
    first = case.make()
    first.set_micro_batch(8)
    stream(first, samples[:13])  # one step taken, five samples buffered
    amstream.save_checkpoint(tmp_path / "ck.pt", first)
    resumed = case.make(seed=3)
    amstream.load_checkpoint(tmp_path / "ck.pt", resumed)
    assert resumed.micro_batch == 8 and resumed.step_count == 1
    stream(resumed, samples[13:])
    assert resumed.step_count == straight.step_count == 2
    assert_same_state(straight.state_dict(), resumed.state_dict())


@pytest.mark.parametrize("name", CASES)
def test_test_then_train_learns_what_the_batches_learn(name, digits, tmp_path):
    """predict_one then learn_one on each sample (learn_one takes predict_one's checked conversion of
    the same sample): the same weights as learning the stacked micro-batches; a sample changed
    between the two calls (a NaN) is refused with the state unchanged, and a checkpoint taken
    between them resumes exactly."""
    case = CASES[name]
    x, y = case.inputs(digits[0].x[:24]), digits[0].y[:24]
    if case.model == "mlp":
        samples = [({f"f{j}": float(v) for j, v in enumerate(row.flatten())}, int(t)) for row, t in zip(x, y)]
    else:
        samples = [(row.tolist(), int(t)) for row, t in zip(x, y)]
    learner = case.make()
    learner.set_micro_batch(8)
    for sample, label in samples[:19]:
        learner.predict_one(sample)
        learner.learn_one(sample, label)
    sample, label = samples[19]
    learner.predict_one(sample)
    before = snapshot(learner)
    bad = copy.deepcopy(sample)
    if isinstance(bad, dict):
        bad["f3"] = float("nan")
    else:
        bad[0] = [float("nan")] * len(bad[0]) if isinstance(bad[0], list) else float("nan")
    with pytest.raises(InputError):
        learner.learn_one(bad, label)
    assert_same_state(before, learner.state_dict())
    learner.predict_one(sample)
    amstream.save_checkpoint(tmp_path / "ck.pt", learner)  # between predict_one and learn_one
    resumed = case.make(seed=3)
    amstream.load_checkpoint(tmp_path / "ck.pt", resumed)
    for each in (learner, resumed):
        for sample, label in samples[19:]:
            each.learn_one(sample, label)
            each.predict_one(sample)
    assert learner.step_count == resumed.step_count == 3
    twin = case.make()
    flat = x.flatten(1) if case.model == "mlp" else x  # the dicts' samples are flat
    for start in range(0, 24, 8):
        twin.learn(flat[start:start + 8], y[start:start + 8])
    assert_same_state(twin.state_dict(), learner.state_dict(), ignore=("stream",))
    assert_same_state(learner.state_dict(), resumed.state_dict())


@pytest.mark.parametrize("name", CASES)
def test_forward_for_step_is_reused_by_the_step(name, digits):
    """The strategy's forward pass (forward_for_step) followed by the step lands exactly where the
    step alone does: the pass is reused, not run twice."""
    case = CASES[name]
    plain, ahead = case.make(), case.make()
    for x, y in data(case, digits[0], n=3):
        out = ahead.forward_for_step(x)
        assert out.shape == (x.shape[0], 10)
        ahead.step(x, lambda o, y=y: F.cross_entropy(o, y))
        plain.step(x, lambda o, y=y: F.cross_entropy(o, y))
    assert_same_state(plain.state_dict(), ahead.state_dict())


@pytest.mark.parametrize("name", CASES)
def test_hyperparameters_are_declared_once_and_round_trip(name):
    """``hparams()`` returns every declared hyperparameter, the signature lists them, and a learner
    built from another's ``hparams()`` has the same ones; an undeclared keyword is refused."""
    case = CASES[name]
    learner = case.make()
    values = learner.hparams()
    assert set(values) == set(case.cls.defaults)
    assert set(case.cls.defaults) <= set(inspect.signature(case.cls).parameters)
    rebuilt = case.make(**{k: v for k, v in values.items() if case.cls.defaults[k].type is not object})
    assert rebuilt.hparams() == values
    with pytest.raises(ValueError, match="unknown option"):
        case.make(not_a_hyperparameter=1)


@pytest.mark.parametrize("name", CASES)
def test_a_hyperparameter_assigned_after_construction_is_refused(name):
    """The learner was built from its hyperparameters (parameter groups, memories, buffers, graphs) and
    ``hparams()`` and the logs report them: assigning one later would change the report and, for many,
    nothing a step reads. Every one is refused; a learning rate with where the rate lives
    (``param_groups``), the others with how to build a new learner, and that recipe works. The
    learner is unchanged."""
    case = CASES[name]
    learner = case.make()
    before = learner.hparams()
    weights = [p.detach().clone() for p in learner.model.parameters()]
    for hyperparameter, declared in case.cls.defaults.items():
        if hyperparameter == "optimizer":  # Backprop's: the attribute is the optimizer it built
            continue
        with pytest.raises(AttributeError, match="param_groups" if declared.learning_rate else "build a new learner"):
            setattr(learner, hyperparameter, before[hyperparameter])
    assert learner.hparams() == before
    assert all(torch.equal(p, w) for p, w in zip(learner.model.parameters(), weights))
    rebuilt = case.make(**before)
    assert rebuilt.hparams() == before


def invalid_values(h) -> list:
    """Values that the declaration ``h`` refuses: outside its range, not among its choices."""
    from amstream.hparams import parse_interval

    values = []
    if h.choices is not None and h.accepts is None:
        values.append("not-a-choice")
    if h.range is not None:
        lo, hi, lo_in, hi_in = parse_interval(h.range)
        if lo != float("-inf"):
            values.append(lo - 1 if lo_in else lo)
        if hi != float("inf"):
            values.append(hi + 1 if hi_in else hi)
    if h.type is bool:
        values.append("yes")
    return [int(v) if h.type is int and isinstance(v, float) and v.is_integer() else v for v in values]


FIRST_CASE = list({c.registry_name: n for n, c in reversed(list(CASES.items()))}.values())  # one per learner


@pytest.mark.parametrize("name", FIRST_CASE)
def test_every_declared_range_is_enforced(name):
    """From the declarations alone: each hyperparameter's out-of-range values and unknown choices
    are refused with a ValueError naming it, before any state exists."""
    case = CASES[name]
    checked = 0
    for key, h in case.cls.defaults.items():
        for value in invalid_values(h):
            with pytest.raises(ValueError, match=f"invalid {key}"):
                case.make(**{key: value})
            checked += 1
    assert checked == sum(len(invalid_values(h)) for h in case.cls.defaults.values()) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_cpu_and_gpu_agree(name, digits):
    # float64 on both devices, so that the comparison checks the algorithm rather than float32
    # summation order.
    case = CASES[name]
    learners = {device: case.make(device=device, dtype=torch.float64) for device in ("cpu", "cuda")}
    cpu, gpu = learners["cpu"], learners["cuda"]
    for x, y in data(case, digits[0], n=5):
        cpu.learn(x.double(), y)
        gpu.learn(x.double(), y)
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    # A Linear bias right before BatchNorm has no effect on the output and a zero true gradient:
    # Adam turns its rounding noise into full-size steps of either sign, on each device its own.
    modules = list(cpu.model.modules())
    no_effect = {f"{name_}.bias" for name_, m in cpu.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and modules.index(m) + 1 < len(modules)
                 and isinstance(modules[modules.index(m) + 1], torch.nn.BatchNorm1d)}
    for (name_, p), q in zip(cpu.model.named_parameters(), gpu.model.parameters()):
        if name_ not in no_effect:
            torch.testing.assert_close(p, q.cpu(), rtol=1e-7, atol=1e-9, msg=name_)
    x = case.inputs(digits[0].x[:64]).double()
    torch.testing.assert_close(cpu.predict(x), gpu.predict(x).cpu(), rtol=1e-7, atol=1e-9)

"""The one-sample API (learn_one / predict_one / micro-batches) and prequential evaluation.

Everything runs on the 8x8 digits set shipped with scikit-learn (no data files needed).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from state_utils import assert_same_state, snapshot


def assert_same_weights(a: dict, b: dict) -> None:
    """The same learner state, except the stream's buffer and feature order (compared where it matters)."""
    assert_same_state(a, b, ignore=("stream",))

from amstream import (
    AMAdam,
    AMMem,
    Backprop,
    InputError,
    PrequentialResult,
    iter_prequential,
    load_checkpoint,
    prequential,
    save_checkpoint,
)
from amstream.data import iter_samples, load_digits

# Settings that learn from a stream of single samples (from a sweep on the digits data).
LEARNERS = {
    "am-adam": lambda m: AMAdam(m, device="cpu", lr=3e-3, lr_out=3e-3, code_lr=0.1, mu=0.03),
    "am-mem": lambda m: AMMem(m, device="cpu", mu=1.0, code_lr=0.1),
    "backprop": lambda m: Backprop(m, device="cpu", lr=3e-3),
}


def image_mlp() -> nn.Sequential:
    """For samples of shape (1, 8, 8)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def flat_mlp() -> nn.Sequential:
    """For samples of shape (64,)."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def make(name: str, model_factory=flat_mlp, seed: int = 0):
    torch.manual_seed(seed)
    return LEARNERS[name](model_factory())


@pytest.fixture(scope="module")
def train():
    return load_digits("train")


@pytest.fixture(scope="module")
def flat(train):
    """The first 32 training samples as (64,) float32 vectors, and their labels."""
    return train.x[:32].reshape(32, 64).clone(), train.y[:32].clone()




def states_differ(a: dict, b: dict) -> bool:
    try:
        assert_same_weights(a, b)
    except AssertionError:
        return True
    return False


FEATURES = [f"px_{i:02d}" for i in range(64)]


def as_dict(v: torch.Tensor, keys=FEATURES) -> dict:
    values = dict(zip(FEATURES, v.tolist()))
    return {k: values[k] for k in keys}


# ------------------------------------------------------------------------------- input forms
@pytest.mark.parametrize("name", LEARNERS)
def test_learn_one_input_forms_give_identical_learning(name, flat):
    X, y = flat
    n = 6
    forms = {
        "tensor": lambda v: v,
        "numpy": lambda v: v.numpy(),
        "list": lambda v: v.tolist(),
        "dict": as_dict,
    }
    states = {}
    for form, convert in forms.items():
        learner = make(name)
        for i in range(n):
            learner.learn_one(convert(X[i]), int(y[i]))
            assert learner.step_count == i + 1
        states[form] = snapshot(learner)
    untrained = snapshot(make(name))
    assert states_differ(states["tensor"], untrained)  # it did learn something
    for form in ("numpy", "list", "dict"):
        assert_same_weights(states["tensor"], states[form])


@pytest.mark.parametrize("name", ["am-adam", "backprop"])
def test_learn_one_label_forms_give_identical_learning(name, flat):
    X, y = flat
    forms = {
        "int": lambda t: int(t),
        "numpy-int64": lambda t: np.int64(t),
        "numpy-int32": lambda t: np.int32(t),
        "tensor-0d": lambda t: torch.tensor(int(t)),
    }
    states = {}
    for form, convert in forms.items():
        learner = make(name)
        for i in range(5):
            learner.learn_one(X[i], convert(y[i]))
        assert learner.step_count == 5
        states[form] = snapshot(learner)
    for form in forms:
        assert_same_weights(states["int"], states[form])


def test_learn_one_with_image_samples_equals_learn(train):
    """learn_one(x, y) on a (1, 8, 8) sample is learn(x[None], y[None])."""
    a, b = make("am-adam", image_mlp), make("am-adam", image_mlp)
    for i in range(4):
        a.learn_one(train.x[i], int(train.y[i]))
        b.learn(train.x[i:i + 1], train.y[i:i + 1])
    assert a.step_count == b.step_count == 4
    assert_same_weights(a.state_dict(), b.state_dict())


# ---------------------------------------------------------------------------------- dict input
def test_dict_key_order_is_fixed_by_the_first_dict(flat):
    X, y = flat
    shuffled = list(reversed(FEATURES))
    a, b = make("backprop"), make("backprop")
    a.learn_one(as_dict(X[0]), int(y[0]))
    b.learn_one(as_dict(X[0]), int(y[0]))
    # a: later dicts come in another key order; b: always in the first order
    for i in range(1, 5):
        a.learn_one(as_dict(X[i], shuffled), int(y[i]))
        b.learn_one(as_dict(X[i]), int(y[i]))
    assert_same_weights(a.state_dict(), b.state_dict())
    assert a.predict_proba_one(as_dict(X[9], shuffled)) == b.predict_proba_one(as_dict(X[9]))
    # and a dict learner equals a tensor learner fed in the first dict's order
    c = make("backprop")
    for i in range(5):
        c.learn_one(X[i], int(y[i]))
    assert_same_weights(a.state_dict(), c.state_dict())


@pytest.mark.parametrize("change", ["missing", "extra", "renamed"])
def test_dict_with_changed_keys_is_rejected_and_state_unchanged(change, flat):
    X, y = flat
    learner = make("am-adam")
    for i in range(3):
        learner.learn_one(as_dict(X[i]), int(y[i]))
    before = snapshot(learner)
    sample = as_dict(X[3])
    if change == "missing":
        del sample["px_05"]
        expected = "px_05"
    elif change == "extra":
        sample["bogus"] = 1.0
        expected = "bogus"
    else:
        sample["other"] = sample.pop("px_17")
        expected = "px_17"
    with pytest.raises(InputError, match=expected) as err:
        learner.learn_one(sample, int(y[3]))
    assert isinstance(err.value, ValueError)
    with pytest.raises(InputError, match=expected):
        learner.predict_one(sample)
    assert learner.step_count == 3
    assert_same_state(before, learner.state_dict())
    learner.learn_one(as_dict(X[3]), int(y[3]))  # a good dict still works afterwards
    assert learner.step_count == 4


# ------------------------------------------------------------------------------ bad input
def test_boolean_features_are_learned_as_zero_and_one(flat):
    X, y = flat
    as_bool, as_float = make("backprop"), make("backprop")
    mask = X[0].numpy() > 0
    as_bool.learn_one(mask, int(y[0]))
    as_float.learn_one(mask.astype(np.float32), int(y[0]))
    assert_same_weights(as_bool.state_dict(), as_float.state_dict())


@pytest.mark.parametrize("bad", [
    pytest.param(["a"] * 64, id="list-of-strings"),
    pytest.param(np.array(["a"] * 64, dtype=object), id="numpy-object-strings"),
    pytest.param(np.array([0.5] * 64, dtype=object), id="numpy-object-numbers"),
    pytest.param(np.array(["0.5"] * 64), id="numpy-unicode"),
    pytest.param("0.5", id="string"),
    pytest.param(None, id="none"),
    pytest.param([float("nan")] * 64, id="nan"),
])
def test_non_numeric_sample_is_rejected(bad, flat):
    X, y = flat
    learner = make("backprop")
    learner.learn_one(X[0], int(y[0]))
    before = snapshot(learner)
    with pytest.raises(InputError):
        learner.learn_one(bad, 1)
    assert learner.step_count == 1
    assert_same_state(before, learner.state_dict())


@pytest.mark.parametrize("bad", [
    pytest.param(["0.5"] * 64, id="list"),
    pytest.param({k: "0.5" for k in FEATURES}, id="dict"),
])
def test_numeric_strings_are_rejected(bad):
    """Strings are not numbers, even when numpy can parse them ("0.5" -> 0.5)."""
    learner = make("backprop")
    with pytest.raises(InputError):
        learner.learn_one(bad, 1)
    assert learner.step_count == 0


@pytest.mark.parametrize("label", [
    pytest.param(True, id="bool"),
    pytest.param(np.bool_(False), id="numpy-bool"),
    pytest.param(torch.tensor(True), id="tensor-bool"),
    pytest.param(1.0, id="float"),
    pytest.param(10, id="out-of-range"),
    pytest.param(-1, id="negative"),
    pytest.param("UP", id="class-name"),
    pytest.param(None, id="none"),
])
def test_bad_label_is_rejected(label, flat):
    X, _ = flat
    learner = make("backprop")
    before = snapshot(learner)
    with pytest.raises(InputError):
        learner.learn_one(X[0], label)
    assert learner.step_count == 0
    assert_same_state(before, learner.state_dict())


# ------------------------------------------------------------------------------ prediction
@pytest.mark.parametrize("name", LEARNERS)
def test_predict_one_and_proba_one(name, flat):
    X, y = flat
    learner = make(name)
    for i in range(8):
        learner.learn_one(X[i], int(y[i]))
    before = snapshot(learner)
    for i in range(8, 16):
        for form in (X[i], X[i].numpy(), X[i].tolist()):
            label = learner.predict_one(form)
            proba = learner.predict_proba_one(form)
            assert type(label) is int and 0 <= label < 10
            assert list(proba) == list(range(10))
            assert all(type(p) is float and 0.0 <= p <= 1.0 for p in proba.values())
            assert sum(proba.values()) == pytest.approx(1.0, abs=1e-5)
            assert max(proba, key=proba.get) == label
        assert label == int(learner.predict(X[i:i + 1]).argmax())
    assert learner.step_count == 8
    assert learner.model.training  # prediction leaves the training mode as it was
    assert_same_state(before, learner.state_dict())


def test_predict_one_on_a_fresh_learner_changes_nothing(flat):
    X, y = flat
    a, b = make("am-adam"), make("am-adam")
    a.predict_one(X[0])
    a.predict_proba_one(X[1])
    for i in range(3):
        a.learn_one(X[i], int(y[i]))
        b.learn_one(X[i], int(y[i]))
    assert_same_weights(a.state_dict(), b.state_dict())


# --------------------------------------------------------------------------- micro-batches
@pytest.mark.parametrize("name", LEARNERS)
def test_micro_batch_buffers_then_learns(name, flat):
    X, y = flat
    learner = make(name)
    learner.set_micro_batch(8)
    assert learner.micro_batch == 8
    untrained = snapshot(learner)
    for i in range(7):
        learner.learn_one(X[i], int(y[i]))
        assert learner.step_count == 0
    assert_same_weights(untrained, learner.state_dict())  # buffered only
    assert learner.state_dict()["stream"]["buffer_x"].shape[0] == 7
    learner.learn_one(X[7], int(y[7]))
    assert learner.step_count == 1
    for i in range(8, 11):
        learner.learn_one(X[i], int(y[i]))
    assert learner.step_count == 1
    learner.flush()  # a partial micro-batch of 3
    assert learner.step_count == 2
    learner.flush()  # nothing buffered: a no-op
    assert learner.step_count == 2

    twin = make(name)
    twin.learn(X[0:8], y[0:8])
    twin.learn(X[8:11], y[8:11])
    assert_same_weights(twin.state_dict(), learner.state_dict())


@pytest.mark.parametrize("name", LEARNERS)
def test_sixteen_buffered_samples_equal_two_batches(name, flat):
    X, y = flat
    buffered, twin = make(name), make(name)
    buffered.set_micro_batch(8)
    for i in range(16):
        buffered.learn_one(X[i].tolist(), np.int64(y[i]))
    twin.learn(X[0:8], y[0:8])
    twin.learn(X[8:16], y[8:16])
    assert buffered.step_count == twin.step_count == 2
    assert_same_weights(twin.state_dict(), buffered.state_dict())


def test_set_micro_batch_flushes_the_buffer(flat):
    X, y = flat
    learner, twin = make("am-adam"), make("am-adam")
    learner.set_micro_batch(8)
    for i in range(5):
        learner.learn_one(X[i], int(y[i]))
    learner.set_micro_batch(1)
    assert learner.step_count == 1
    twin.learn(X[0:5], y[0:5])
    assert_same_weights(twin.state_dict(), learner.state_dict())


def test_buffered_sample_of_another_shape_is_rejected(flat):
    X, y = flat
    learner = make("backprop")
    learner.set_micro_batch(4)
    learner.learn_one(X[0], int(y[0]))
    learner.learn_one(X[1], int(y[1]))
    with pytest.raises(InputError, match="shape"):
        learner.learn_one(X[2][:32], int(y[2]))
    learner.learn_one(X[2], int(y[2]))
    learner.learn_one(X[3], int(y[3]))  # the buffer kept its two samples: this fills it
    assert learner.step_count == 1
    twin = make("backprop")
    twin.learn(X[0:4], y[0:4])
    assert_same_weights(twin.state_dict(), learner.state_dict())


def test_rejected_sample_does_not_discard_the_buffer(flat):
    """A sample with NaN is rejected by the learn_one that receives it; the samples buffered
    before it stay buffered (InputError: the learner's state is unchanged)."""
    X, y = flat
    learner = make("backprop")
    learner.set_micro_batch(4)
    learner.learn_one(X[0], int(y[0]))
    bad = X[1].clone()
    bad[3] = float("nan")
    with pytest.raises(InputError):
        learner.learn_one(bad, int(y[1]))
    for i in (1, 2, 3):
        learner.learn_one(X[i], int(y[i]))
    assert learner.step_count == 1
    twin = make("backprop")
    twin.learn(X[0:4], y[0:4])
    assert_same_weights(twin.state_dict(), learner.state_dict())


# ------------------------------------------------------------- test-then-train's one conversion
def _test_then_train(learner, X, y, form=as_dict) -> list:
    """predict_one then learn_one on each sample, the same object to both; returns the predictions."""
    predictions = []
    for i in range(len(X)):
        sample = form(X[i])
        predictions.append(learner.predict_one(sample))
        learner.learn_one(sample, int(y[i]))
    return predictions


@pytest.mark.parametrize("name", LEARNERS)
@pytest.mark.parametrize("form", [as_dict, lambda v: v.tolist()], ids=["dict", "list"])
def test_test_then_train_reuses_the_checked_sample_and_learns_the_same(name, form, flat):
    """learn_one takes predict_one's conversion of the same dict (or list) of floats without
    converting or checking it again, and learns exactly what learn on the stacked samples learns."""
    X, y = flat
    learner = make(name)
    learner.set_micro_batch(8)
    recalled = []
    recall = learner._recall_sample
    learner._recall_sample = lambda x: _spy(recall, x, recalled)
    _test_then_train(learner, X[:32], y[:32], form)
    assert learner.step_count == 4
    assert recalled[8:] == [True] * 24  # from the first learned batch on (it fixes the input shape)
    twin = make(name)
    for start in range(0, 32, 8):
        twin.learn(X[start:start + 8], y[start:start + 8])
    assert_same_weights(twin.state_dict(), learner.state_dict())


def _spy(recall, x, recalled):
    converted, checked = recall(x)
    recalled.append(checked)
    return converted, checked


@pytest.mark.parametrize("change", [
    pytest.param(lambda d: d.__setitem__("px_03", float("nan")), id="nan"),
    pytest.param(lambda d: d.__setitem__("px_03", 1e39), id="float32-overflow"),
    pytest.param(lambda d: d.__setitem__("px_03", "0.5"), id="string"),
    pytest.param(lambda d: d.__setitem__("px_03", complex(0.5, 0.0)), id="complex"),
    pytest.param(lambda d: d.pop("px_03"), id="missing-key"),
])
def test_sample_changed_after_predict_one_is_checked_again(change, flat):
    """A dict changed between predict_one and learn_one is converted and checked anew: a bad value
    is refused by learn_one, and the samples buffered before it stay as they were."""
    X, y = flat
    learner = make("am-mem")
    learner.set_micro_batch(4)
    _test_then_train(learner, X[:5], y[:5])  # one step, then one buffered sample
    before = snapshot(learner)
    sample = as_dict(X[5])
    learner.predict_one(sample)
    change(sample)
    with pytest.raises(InputError):
        learner.learn_one(sample, int(y[5]))
    assert_same_state(before, learner.state_dict())
    _test_then_train(learner, X[5:8], y[5:8])
    twin = make("am-mem")
    twin.learn(X[0:4], y[0:4])
    twin.learn(X[4:8], y[4:8])
    assert_same_weights(twin.state_dict(), learner.state_dict())


def test_list_changed_in_place_after_predict_one_is_learned_as_it_is_now(flat):
    """The same list object with a value replaced: learn_one learns the new value."""
    X, y = flat
    learner, twin = make("backprop"), make("backprop")
    learner.set_micro_batch(2)
    twin.set_micro_batch(2)
    for i in range(4):
        sample = X[i].tolist()
        learner.predict_one(sample)
        sample[10] = 0.75
        learner.learn_one(sample, int(y[i]))
        twin.learn_one(sample, int(y[i]))
    assert_same_weights(twin.state_dict(), learner.state_dict())


@pytest.mark.parametrize("label", [10, -1, True, 2.0, "UP"])
def test_bad_label_after_predict_one_is_rejected(label, flat):
    """The label of a sample predict_one has checked is still checked (on the host when it is a
    Python int)."""
    X, y = flat
    learner = make("am-adam")
    learner.set_micro_batch(4)
    _test_then_train(learner, X[:4], y[:4])
    before = snapshot(learner)
    sample = as_dict(X[4])
    learner.predict_one(sample)
    with pytest.raises(InputError):
        learner.learn_one(sample, label)
    assert_same_state(before, learner.state_dict())


def test_regression_label_after_predict_one_is_checked(flat):
    """A regression target given as a Python float: NaN and float32 overflow are refused."""
    X, _ = flat
    torch.manual_seed(0)
    learner = Backprop(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 1), nn.Flatten(0)), device="cpu",
                       criterion=nn.MSELoss())
    learner.set_micro_batch(2)
    for i in range(2):
        learner.predict_one(as_dict(X[i]))
        learner.learn_one(as_dict(X[i]), 0.5)
    assert learner.step_count == 1
    before = snapshot(learner)
    for bad in (float("nan"), 1e39):
        sample = as_dict(X[2])
        learner.predict_one(sample)
        with pytest.raises(InputError, match="NaN or Inf"):
            learner.learn_one(sample, bad)
        assert_same_state(before, learner.state_dict())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e39])
def test_sample_of_floats_not_finite_in_float32_is_refused(value, flat):
    X, _ = flat
    learner = make("backprop")
    sample = X[0].tolist()
    sample[7] = value
    with pytest.raises(InputError, match="NaN or Inf"):
        learner.predict_one(sample)


def test_finite_in_float32():
    from amstream.validation import finite_in_float32

    assert finite_in_float32([0.0, -1.5, 3.4e38])
    assert not finite_in_float32([0.0, float("nan")])
    assert not finite_in_float32([float("-inf"), 1.0])
    assert not finite_in_float32([1e39])  # finite as a Python float, infinite as float32
    assert not finite_in_float32([1.7e308, 1.7e308])  # the sum overflows: "not sure"
    assert finite_in_float32([])


def test_huge_integer_label_is_refused(flat):
    X, _ = flat
    learner = make("backprop")
    with pytest.raises(InputError, match="64-bit"):
        learner.learn_one(X[0], 2**70)


@pytest.mark.parametrize("size", [0, -3])
def test_set_micro_batch_below_one_is_refused(size):
    learner = make("backprop")
    with pytest.raises(ValueError):
        learner.set_micro_batch(size)
    assert learner.micro_batch == 1


# ------------------------------------------------------------------------------ learn_many
@pytest.mark.parametrize("name", LEARNERS)
def test_learn_many_numpy_equals_learn_tensor(name, flat):
    X, y = flat
    a, b = make(name), make(name)
    for s in (slice(0, 10), slice(10, 32)):
        a.learn_many(X[s].numpy(), y[s].numpy())
        b.learn(X[s], y[s])
    c = make(name)
    c.learn_many(X[0:10].tolist(), y[0:10].tolist())
    c.learn_many(X[10:32].numpy().astype(np.float64), [int(v) for v in y[10:32]])
    d = make(name)  # dict samples, as learn_one takes them, and numpy's int32 labels
    for s in (slice(0, 10), slice(10, 32)):
        d.learn_many([{f"f{j}": float(v) for j, v in enumerate(row)} for row in X[s]], y[s].numpy().astype(np.int32))
    assert a.step_count == b.step_count == c.step_count == d.step_count == 2
    assert_same_weights(b.state_dict(), a.state_dict())
    assert_same_weights(b.state_dict(), c.state_dict())
    assert_same_weights(b.state_dict(), d.state_dict())


def test_learn_many_refuses_what_is_not_numbers(flat):
    X, y = flat
    learner = make("backprop")
    with pytest.raises(InputError, match="samples must be numbers"):
        learner.learn_many([["a"] * X.shape[1]] * 2, [0, 1])
    with pytest.raises(InputError, match="map class names to indices"):
        learner.learn_many(X[:2].numpy(), ["UP", "DOWN"])
    assert learner.step_count == 0


# ------------------------------------------------------------------------------ BatchNorm
@pytest.mark.parametrize("cls", [AMAdam, Backprop])
def test_batchnorm_needs_a_micro_batch(cls, train):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    learner = cls(model, device="cpu")
    before = snapshot(learner)
    with pytest.raises(InputError, match="BatchNorm"):
        learner.learn_one(train.x[0], int(train.y[0]))
    assert learner.step_count == 0
    assert_same_state(before, learner.state_dict())
    learner.set_micro_batch(4)
    for i in range(8):
        learner.learn_one(train.x[i], int(train.y[i]))
    assert learner.step_count == 2
    assert learner.model[2].num_batches_tracked.item() == 2
    assert 0 <= learner.predict_one(train.x[9]) < 10  # eval mode: one sample is fine


# ------------------------------------------------------------------------------ prequential
# Streams: batch 1 on the first 720 samples of the digits train split (keeps the file fast),
# batch 10 on the whole split (1,438 samples). Measured accuracies (seeds 0-3): batch 1: AM-Adam
# 0.67-0.71, AM-mem 0.76-0.80, backprop 0.70-0.75; batch 10: AM-Adam 0.63-0.69, AM-mem 0.58-0.65,
# backprop 0.64-0.66. Chance is 0.10.
STREAM_LENGTH = {1: 720, 10: 1438}
MIN_ACCURACY = {1: 0.5, 10: 0.45}


@pytest.mark.parametrize("batch_size", [1, 10])
@pytest.mark.parametrize("name", LEARNERS)
def test_prequential_on_digits(name, batch_size, train):
    data = train.subset(range(STREAM_LENGTH[batch_size]))
    learner = make(name, image_mlp)
    result = prequential(iter_samples(data), learner, batch_size=batch_size, every=100)
    assert result.n_seen == len(data) == STREAM_LENGTH[batch_size]
    assert learner.step_count == math.ceil(len(data) / batch_size)
    assert result.accuracy > MIN_ACCURACY[batch_size], result.accuracy
    points = [n for n, _ in result.curve]
    assert points == sorted(set(points))  # strictly increasing in n_seen
    assert points[0] == 100 and points[-1] == result.n_seen
    assert all(0.0 <= acc <= 1.0 for _, acc in result.curve)
    assert result.curve[-1][1] == pytest.approx(result.accuracy)
    # learning: the second half of the stream is predicted better than the first 200 samples
    n200, acc200 = result.curve[1]
    assert n200 == 200
    late = (result.n_correct - acc200 * n200) / (result.n_seen - n200)
    assert late > acc200
    assert all(math.isfinite(loss) for _, loss in result.losses)


def test_prequential_tests_before_it_trains(train):
    """A zero-initialised linear model predicts class 0 for every sample (argmax of a tie); after
    one large SGD step on a batch it gets most of that batch right. The first yield of
    iter_prequential must count the predictions made before the step."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    learner = Backprop(model, device="cpu", optimizer="sgd", lr=1.0)
    fresh = copy.deepcopy(learner)
    X, y = train.x[:10], train.y[:10]
    expected = int((fresh.predict(X).argmax(-1) == y).sum())
    assert expected == int((y == 0).sum())
    after = copy.deepcopy(learner)
    after.learn(X, y)
    trained_first = int((after.predict(X).argmax(-1) == y).sum())
    assert trained_first > expected  # the two orders are distinguishable here

    result, info = next(iter_prequential(iter_samples(train), learner, batch_size=10))
    assert result.n_seen == 10
    assert result.n_correct == expected
    assert learner.step_count == 1  # ... and the batch was then learned
    assert_same_weights(after.state_dict(), learner.state_dict())
    assert info.batch_size == 10


@pytest.mark.parametrize("name", LEARNERS)
def test_first_batch_is_scored_with_the_fresh_learner(name, train):
    learner = make(name, image_mlp)
    fresh = copy.deepcopy(learner)
    X, y = train.x[:10], train.y[:10]
    expected = int((fresh.predict(X).argmax(-1) == y).sum())
    result, _ = next(iter_prequential(iter_samples(train), learner, batch_size=10))
    assert (result.n_seen, result.n_correct) == (10, expected)
    fresh.learn(X, y)
    assert_same_weights(fresh.state_dict(), learner.state_dict())


def test_prequential_rejects_bad_batch_size(train):
    with pytest.raises(ValueError):
        next(iter_prequential(iter_samples(train), make("backprop", image_mlp), batch_size=0))


@pytest.mark.parametrize("name", LEARNERS)
def test_prequential_resumes_exactly_from_a_checkpoint(name, train, tmp_path):
    batch_size, every = 10, 100
    straight = make(name, image_mlp)
    full = None
    for full, _ in iter_prequential(iter_samples(train), straight, batch_size=batch_size, every=every):
        pass

    first = make(name, image_mlp)
    half = len(train) // 2 // batch_size * batch_size  # 710: not on a curve mark
    for result, _ in iter_prequential(iter_samples(train), first, batch_size=batch_size, every=every):
        if result.n_seen >= half:
            break
    assert result.n_seen == half
    save_checkpoint(tmp_path / "run" / "ck.pt", first, prequential=result.state_dict(), n_done=result.n_seen)
    del first, result

    resumed = make(name, image_mlp, seed=123)  # different initial weights: all must come from the file
    extra = load_checkpoint(tmp_path / "run" / "ck.pt", resumed)
    assert extra["n_done"] == half
    result = PrequentialResult.from_state_dict(extra["prequential"])
    assert result.n_seen == half
    for result, _ in iter_prequential(iter_samples(train, start=extra["n_done"]), resumed,
                                      batch_size=batch_size, every=every, result=result):
        pass

    assert result.n_seen == full.n_seen == len(train)
    assert result.n_correct == full.n_correct
    assert result.curve == full.curve
    assert result.losses == full.losses
    assert resumed.step_count == straight.step_count
    assert_same_weights(straight.state_dict(), resumed.state_dict())


def test_prequential_result_state_dict_round_trip():
    r = PrequentialResult(n_seen=30, n_correct=21, curve=[(10, 0.5), (20, 0.6)], losses=[(10, 2.1), (20, 1.7)])
    state = r.state_dict()
    state["curve"] = [list(p) for p in state["curve"]]  # e.g. after a JSON round trip
    back = PrequentialResult.from_state_dict(state)
    assert back == r
    assert back.accuracy == pytest.approx(0.7)
    assert math.isnan(PrequentialResult().accuracy)
    back.curve.append((30, 0.7))
    assert len(r.curve) == 2  # state_dict copies the lists


def test_float32_finite_sample_that_overflows_a_half_precision_model_is_refused():
    """The host check says "finite as float32"; a float16 model's inputs are checked after conversion
    (70,000 is beyond float16's 65,504), and so is a regression target."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Flatten(0)).to(torch.float16)
    learner = Backprop(model, device="cpu", criterion=nn.MSELoss())
    with pytest.raises(InputError, match="NaN or Inf"):
        learner.predict_one([7e4, 0.2, 0.3, 0.4])
    learner.set_micro_batch(2)
    for _ in range(2):
        learner.predict_one([0.1, 0.2, 0.3, 0.4])
        learner.learn_one([0.1, 0.2, 0.3, 0.4], 0.5)
    assert learner.step_count == 1
    sample = [0.1, 0.2, 0.3, 0.4]
    learner.predict_one(sample)
    with pytest.raises(InputError, match="NaN or Inf"):
        learner.learn_one(sample, 7e4)

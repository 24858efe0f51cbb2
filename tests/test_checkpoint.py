"""Checkpoints: exact round trips, RNG states, atomic writes, and refusals that change nothing."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from state_utils import assert_same_state, snapshot

from amstream import AMAdam, AMMem, Backprop, CheckpointError, load_checkpoint, save_checkpoint
from amstream.data import load_digits

LEARNERS = {
    "am-adam": lambda m: AMAdam(m, device="cpu", lr=3e-3, lr_out=3e-3, code_lr=0.1, mu=0.03),
    "am-mem": lambda m: AMMem(m, device="cpu", mu=1.0, code_lr=0.1),
    "backprop": lambda m: Backprop(m, device="cpu", lr=3e-3),
}
CLASS_NAMES = {"am-adam": "AMAdam", "am-mem": "AMMem", "backprop": "Backprop"}


def mlp(hidden: int = 32) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def make(name: str, seed: int = 0, hidden: int = 32):
    torch.manual_seed(seed)
    return LEARNERS[name](mlp(hidden))


@pytest.fixture(scope="module")
def digits():
    return load_digits("train")


def trained(name: str, digits, seed: int = 0, hidden: int = 32, n_batches: int = 3):
    learner = make(name, seed, hidden)
    for i in range(n_batches):
        learner.learn(digits.x[16 * i:16 * (i + 1)], digits.y[16 * i:16 * (i + 1)])
    return learner




# ------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", LEARNERS)
def test_round_trip_restores_state_and_extra(name, digits, tmp_path):
    source = trained(name, digits)
    extra = {
        "n_done": 48,
        "accuracy": 0.8125,
        "curve": [[16, 0.25], [32, 0.5]],
        "pairs": [(16, 2.5), (32, 1.25)],
        "nested": {"stream": {"position": 48, "order": "stream"}, "seeds": [0, 1, 2]},
        "counts": torch.arange(10),
        "weights": torch.linspace(0, 1, 5, dtype=torch.float64),
        "nothing": None,
        "flag": True,
    }
    path = save_checkpoint(tmp_path / "ck.pt", source, **extra)
    assert path == tmp_path / "ck.pt" and path.is_file()

    target = make(name, seed=123)
    assert not torch.equal(target.model[1].weight, source.model[1].weight)
    back = load_checkpoint(path, target)
    assert_same_state(source.state_dict(), target.state_dict())
    assert target.step_count == source.step_count == 3
    assert target.input_shape == source.input_shape == (1, 8, 8)

    assert back.keys() == extra.keys()
    for key in ("n_done", "accuracy", "curve", "pairs", "nested", "nothing", "flag"):
        assert back[key] == extra[key], key
        assert type(back[key]) is type(extra[key]), key
    assert torch.equal(back["counts"], extra["counts"])
    assert back["weights"].dtype == torch.float64 and torch.equal(back["weights"], extra["weights"])

    # the restored learner continues exactly like the source
    x, y = digits.x[48:64], digits.y[48:64]
    info_s, info_t = source.learn(x, y), target.learn(x, y)
    assert torch.equal(info_s.loss, info_t.loss)
    assert_same_state(source.state_dict(), target.state_dict())


def test_save_creates_missing_parent_folders(digits, tmp_path):
    learner = trained("backprop", digits, n_batches=1)
    path = tmp_path / "a" / "b" / "c" / "ck.pt"
    assert save_checkpoint(path, learner) == path
    assert path.is_file()
    target = make("backprop", seed=5)
    assert load_checkpoint(path, target) == {}
    assert_same_state(learner.state_dict(), target.state_dict())


def test_a_place_that_cannot_hold_the_file_is_a_checkpoint_error(digits, tmp_path):
    """A folder given as the path, or a file where a folder should be, is said plainly, and nothing
    is left behind."""
    learner = trained("backprop", digits, n_batches=1)
    with pytest.raises(CheckpointError, match="it is a directory; give the file's name"):
        save_checkpoint(tmp_path, learner)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*a_file/ck\.pt"):
        save_checkpoint(tmp_path / "a_file" / "ck.pt", learner)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_save_overwrites_an_existing_checkpoint(digits, tmp_path):
    learner = trained("am-adam", digits, n_batches=1)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, learner, n_done=16)
    learner.learn(digits.x[16:32], digits.y[16:32])
    save_checkpoint(path, learner, n_done=32)
    target = make("am-adam", seed=9)
    assert load_checkpoint(path, target) == {"n_done": 32}
    assert target.step_count == 2
    assert_same_state(learner.state_dict(), target.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


# ------------------------------------------------------------------------------------- RNG
def draw() -> tuple:
    return torch.rand(3), np.random.rand(3), random.random(), random.gauss(0.0, 1.0)


def test_load_restores_every_rng(digits, tmp_path):
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    random.gauss(0.0, 1.0)  # leaves a cached gauss_next in python's state
    learner = trained("backprop", digits, n_batches=1)
    save_checkpoint(tmp_path / "ck.pt", learner)
    expected = draw()
    for _ in range(3):
        draw()  # move every generator on
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)

    load_checkpoint(tmp_path / "ck.pt", make("backprop", seed=3))
    got = draw()
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_load_without_rng_restore_leaves_the_rngs(digits, tmp_path):
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    learner = trained("backprop", digits, n_batches=1)
    save_checkpoint(tmp_path / "ck.pt", learner)
    at_save = draw()
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    target = make("backprop", seed=3)
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    expected = draw()  # what the generators give from here if the load leaves them alone
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)

    load_checkpoint(tmp_path / "ck.pt", target, restore_rng=False)
    got = draw()
    assert_same_state(learner.state_dict(), target.state_dict())  # the learner was loaded
    assert torch.equal(got[0], expected[0]) and not torch.equal(got[0], at_save[0])
    assert np.array_equal(got[1], expected[1]) and not np.array_equal(got[1], at_save[1])
    assert got[2] == expected[2] != at_save[2]


# ------------------------------------------------------------------------------- atomicity
class _Crash(RuntimeError):
    pass


def test_a_crash_while_writing_leaves_the_old_checkpoint(digits, tmp_path, monkeypatch):
    learner = trained("am-adam", digits, n_batches=1)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, learner, n_done=16)
    old_bytes = path.read_bytes()
    old_state = snapshot(learner)

    learner.learn(digits.x[16:32], digits.y[16:32])
    real_save = torch.save
    calls = []

    def crashing_save(obj, f, *args, **kwargs):
        calls.append(f)
        f.write(b"PK\x03\x04 half a checkpoint")  # torn bytes, then the crash
        f.flush()
        raise _Crash("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(_Crash):
        save_checkpoint(path, learner, n_done=32)
    monkeypatch.setattr(torch, "save", real_save)

    assert calls, "torch.save was not called through the patched name"
    assert path.read_bytes() == old_bytes
    assert list(tmp_path.glob(".*.tmp")) == [] and list(tmp_path.glob("*.tmp")) == []
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    target = make("am-adam", seed=4)
    assert load_checkpoint(path, target) == {"n_done": 16}
    assert_same_state(old_state, target.state_dict())


def test_an_interrupt_while_writing_leaves_no_temporary_file(digits, tmp_path, monkeypatch):
    learner = trained("backprop", digits, n_batches=1)
    path = tmp_path / "ck.pt"

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, learner)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- errors
def test_missing_file_is_a_checkpoint_error(tmp_path):
    learner = make("backprop")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "nope.pt", learner)
    assert isinstance(err.value, ValueError)
    assert "nope.pt" in str(err.value)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path, learner)  # a folder is not a checkpoint either


@pytest.mark.parametrize("content, reason", [
    pytest.param(os.urandom(4096), r"\(4096 bytes\): \w+Error: \S", id="random-bytes"),
    pytest.param(b"", "the file is empty", id="empty"),
    pytest.param(b"not a checkpoint\n" * 20, r"\(340 bytes\): \w+Error: \S", id="text"),
])
def test_garbage_file_is_a_checkpoint_error_that_says_why(content, reason, digits, tmp_path):
    """Never "cannot read checkpoint X:" and nothing more: the message gives the reason."""
    learner = trained("backprop", digits, n_batches=1)
    before = snapshot(learner)
    path = tmp_path / "ck.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(path, learner)
    assert_same_state(before, learner.state_dict())


def test_truncated_checkpoint_is_a_checkpoint_error(digits, tmp_path):
    learner = trained("am-adam", digits, n_batches=1)
    path = save_checkpoint(tmp_path / "ck.pt", learner)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    target = make("am-adam", seed=2)
    before = snapshot(target)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, target)
    assert_same_state(before, target.state_dict())


@pytest.mark.parametrize("payload", [
    pytest.param([1, 2, 3], id="list"),
    pytest.param(torch.zeros(3), id="tensor"),
    pytest.param({"weights": torch.zeros(3)}, id="dict-without-learner"),
    pytest.param({"learner_class": "Backprop"}, id="class-but-no-state"),
])
def test_torch_file_that_is_not_a_checkpoint_is_a_checkpoint_error(payload, digits, tmp_path):
    """A readable torch file holding something else is refused with CheckpointError."""
    learner = trained("backprop", digits, n_batches=1)
    before = snapshot(learner)
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "other.pt", learner)
    assert_same_state(before, learner.state_dict())


def test_checkpoint_without_rng_states_is_refused_before_loading(digits, tmp_path):
    """A checkpoint missing a part (here the RNG states) is refused as a whole: CheckpointError,
    and the learner is not left loaded."""
    path = save_checkpoint(tmp_path / "ck.pt", trained("backprop", digits, n_batches=2))
    payload = torch.load(path, weights_only=True)
    del payload["rng"]
    torch.save(payload, path)
    target = trained("backprop", digits, seed=1, n_batches=1)
    before = snapshot(target)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, target)
    assert_same_state(before, target.state_dict())


@pytest.mark.parametrize("source_name, target_name", [
    ("am-adam", "backprop"), ("backprop", "am-adam"), ("am-adam", "am-mem"),
])
def test_checkpoint_of_another_learner_class_is_refused(source_name, target_name, digits, tmp_path):
    save_checkpoint(tmp_path / "ck.pt", trained(source_name, digits))
    target = trained(target_name, digits, seed=1, n_batches=2)
    before = snapshot(target)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "ck.pt", target)
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert CLASS_NAMES[source_name] in message
    assert CLASS_NAMES[target_name] in message
    assert target.step_count == 2
    assert_same_state(before, target.state_dict())


@pytest.mark.parametrize("name", LEARNERS)
def test_checkpoint_of_another_model_shape_is_refused(name, digits, tmp_path):
    save_checkpoint(tmp_path / "ck.pt", trained(name, digits, hidden=32))
    target = trained(name, digits, seed=1, hidden=16, n_batches=2)
    before = snapshot(target)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "ck.pt", target)
    assert isinstance(err.value, ValueError)
    # the message names the tensors that do not fit, with both shapes
    assert "1.weight: saved (32, 64), model (16, 64)" in str(err.value), str(err.value)
    assert target.step_count == 2
    assert_same_state(before, target.state_dict())
    # the learner still works after the refusal
    target.learn(digits.x[:16], digits.y[:16])
    assert target.step_count == 3


def test_checkpoint_with_other_output_width_is_refused_and_nothing_half_loaded(digits, tmp_path):
    """The first layer matches, the output layer does not: torch copies the matching tensors
    before it raises, so the load must be undone."""
    torch.manual_seed(0)
    source = Backprop(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)), device="cpu")
    source.learn(digits.x[:16], digits.y[:16] % 5)
    save_checkpoint(tmp_path / "ck.pt", source)
    target = trained("backprop", digits, seed=1, n_batches=2)
    before = snapshot(target)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "ck.pt", target)
    assert_same_state(before, target.state_dict())
    assert not torch.equal(target.model[1].weight, source.model[1].weight)


class Payload:
    """A plain picklable object: torch.load(weights_only=True) must refuse to build it."""

    def __init__(self) -> None:
        self.value = 42

    def __reduce__(self):
        return (Payload, ())


def test_load_unpickles_nothing_but_weights(digits, tmp_path):
    learner = trained("backprop", digits, n_batches=1)
    path = save_checkpoint(tmp_path / "ck.pt", learner)
    payload = torch.load(path, weights_only=True)
    payload["extra"]["evil"] = Payload()
    torch.save(payload, path)  # otherwise a valid checkpoint, plus one custom object

    target = make("backprop", seed=3)
    before = snapshot(target)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, target)
    assert_same_state(before, target.state_dict())

    torch.save(Payload(), tmp_path / "object.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "object.pt", target)

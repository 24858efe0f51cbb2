"""Run folders and loggers: TensorBoard event files read back with TensorBoard's own reader."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from amstream import AMAdam, Backprop
from amstream.data import load_digits
from amstream.logging import NullLogger, TensorBoardLogger, make_run_dir


def mlp(n_hidden: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, 32)]
    for _ in range(n_hidden - 1):
        layers += [nn.ReLU(), nn.Linear(32, 32)]
    layers += [nn.ReLU(), nn.Linear(32, 10)]
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def batch():
    data = load_digits("train")
    return data.x[:32], data.y[:32]


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def event_files(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("events.out.tfevents.*"))


def approx(value: float):
    return pytest.approx(value, rel=1e-6, abs=1e-6)


# ------------------------------------------------------------------------------- run folders
def test_make_run_dir_creates_unique_folders(tmp_path):
    root = tmp_path / "runs"  # does not exist yet
    first = make_run_dir(root, "digits-am-adam")
    second = make_run_dir(root, "digits-am-adam")
    third = make_run_dir(root, "digits-am-adam")
    for folder in (first, second, third):
        assert folder.is_dir()
        assert folder.parent == root
        assert folder.name.startswith("digits-am-adam")
        assert list(folder.iterdir()) == []
    assert len({first, second, third}) == 3
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in (first, second, third))


def test_make_run_dir_in_the_same_second(tmp_path, monkeypatch):
    """Pin the clock: every call sees the same timestamp and still gets its own folder."""
    frozen = time.localtime()
    monkeypatch.setattr(time, "localtime", lambda *args: frozen)
    folders = [make_run_dir(tmp_path, "run") for _ in range(4)]
    assert len(set(folders)) == 4
    assert all(f.is_dir() and f.name.startswith("run") for f in folders)
    stamp = time.strftime("%Y%m%d-%H%M%S", frozen)
    assert folders[0].name == f"run-{stamp}"


def test_make_run_dir_names_do_not_collide_across_names(tmp_path):
    a = make_run_dir(tmp_path, "mnist")
    b = make_run_dir(tmp_path, "mnist-bp")
    assert a != b and a.name.startswith("mnist") and b.name.startswith("mnist-bp")


# --------------------------------------------------------------------------- TensorBoard
def test_tensorboard_logger_writes_am_step_info(batch, tmp_path):
    x, y = batch
    torch.manual_seed(0)
    learner = AMAdam(mlp(n_hidden=2), device="cpu", lr=3e-3, lr_out=3e-3, code_lr=0.1, mu=0.03)
    learner.learn(x[:16], y[:16])
    info = learner.learn(x[16:], y[16:])
    local, displacement = info.diagnostics["am/local_loss"], info.diagnostics["am/code_displacement"]
    assert len(local) == 2 and len(displacement) == 2 and len(info.lrs) == 3
    names = [g["name"] for g in learner.optimizer.param_groups]
    assert list(info.lrs) == names

    log_dir = tmp_path / "run"
    logger = TensorBoardLogger(log_dir)
    logger.log_step(info, 5)
    logger.log_step(info, 6)
    logger.record("prequential/accuracy", 0.5, 7)
    logger.record("prequential/accuracy", torch.tensor(0.625), 8)
    logger.log_text("config", "AMAdam mu=0.03 code_lr=0.1")
    logger.close()

    assert len(event_files(log_dir)) == 1
    scalars = read_scalars(log_dir)
    expected = {
        "train/task_loss": float(info.loss),
        "am/mu": float(info.diagnostics["am/mu"]),
        "am/local_loss/0": float(local[0]),
        "am/local_loss/1": float(local[1]),
        "am/code_displacement/0": float(displacement[0]),
        "am/code_displacement/1": float(displacement[1]),
        **{f"lr/{name}": lr for name, lr in info.lrs.items()},
    }
    for tag, value in expected.items():
        assert [s for s, _ in scalars[tag]] == [5, 6], tag
        assert all(v == approx(value) for _, v in scalars[tag]), tag
    assert scalars["am/mu"][0][1] == approx(0.03)
    assert scalars["prequential/accuracy"] == [(7, 0.5), (8, 0.625)]
    assert set(scalars) == {*expected, "prequential/accuracy"}


def test_tensorboard_logger_writes_any_diagnostics_without_knowing_them(tmp_path):
    """A method's own records (an ADMM residual, a Frank-Wolfe gap, one value per layer) reach
    TensorBoard under their own tags: the logger has no table of keys."""
    from amstream import StepInfo

    info = StepInfo(loss=torch.tensor(0.5), batch_size=4, lrs={"head": 0.1},
                    diagnostics={"admm/primal_residual": torch.tensor(0.25), "admm/rho": 2.0,
                                 "lowrank/explained_variance": (torch.tensor(0.9), 0.8)})
    logger = TensorBoardLogger(tmp_path)
    logger.log_step(info, 11)
    logger.close()
    assert read_scalars(tmp_path) == {
        "train/task_loss": [(11, 0.5)], "lr/head": [(11, approx(0.1))], "admm/primal_residual": [(11, 0.25)],
        "admm/rho": [(11, 2.0)], "lowrank/explained_variance/0": [(11, approx(0.9))],
        "lowrank/explained_variance/1": [(11, approx(0.8))]}


def test_a_resumed_logger_continues_its_run_without_duplicate_steps(tmp_path):
    """purge_step: what the interrupted run wrote from that step on is dropped, so a resumed run
    that logs the same steps again leaves one value per step in the same folder."""
    first = TensorBoardLogger(tmp_path)
    for step in (100, 200, 300):
        first.record("prequential/accuracy", step / 1000, step)
    first.close()  # interrupted after step 300; the checkpoint was taken at step 200
    resumed = TensorBoardLogger(tmp_path, purge_step=201)
    for step in (300, 400):
        resumed.record("prequential/accuracy", step / 1000 + 0.5, step)
    resumed.close()
    assert read_scalars(tmp_path)["prequential/accuracy"] == [
        (100, approx(0.1)), (200, approx(0.2)), (300, approx(0.8)), (400, approx(0.9))]


def test_a_resumed_logger_sorts_after_the_interrupted_runs_files_made_in_the_same_second(tmp_path):
    """TensorBoard reads event files in name order, the second of creation first: a resumed run's
    file made in the same second as the interrupted run's last one (here named with a larger
    counter, as a process's tenth writer is) must still sort after it, or its purge would be read
    first and drop nothing. The resumed writer waits for the next second."""
    import os
    import socket
    import shutil

    first = TensorBoardLogger(tmp_path)
    for step in (100, 200, 300):
        first.record("prequential/accuracy", step / 1000, step)
    first.close()
    (written,) = tmp_path.glob("events.out.tfevents.*")
    # the same file, renamed as if made now by this process's 9th writer ("9" sorts after "10")
    late = tmp_path / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.9"
    shutil.move(written, late)
    resumed = TensorBoardLogger(tmp_path, purge_step=201)
    resumed.record("prequential/accuracy", 0.8, 300)
    resumed.close()
    files = sorted(f.name for f in tmp_path.glob("events.out.tfevents.*"))
    assert files[0] == late.name and len(files) == 2
    assert read_scalars(tmp_path)["prequential/accuracy"] == [(100, approx(0.1)), (200, approx(0.2)),
                                                              (300, approx(0.8))]


def test_tensorboard_logger_text_round_trips(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    logger.log_text("config", "dataset: digits")
    logger.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "config/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "dataset: digits" in text


def test_tensorboard_logger_backprop_step_has_no_am_tags(batch, tmp_path):
    x, y = batch
    torch.manual_seed(0)
    learner = Backprop(mlp(), device="cpu", lr=3e-3)
    info = learner.learn(x, y)
    logger = TensorBoardLogger(tmp_path)
    logger.log_step(info, 3)
    logger.close()
    scalars = read_scalars(tmp_path)
    assert scalars["train/task_loss"] == [(3, approx(float(info.loss)))]
    assert not [tag for tag in scalars if tag.startswith("am/")]
    assert scalars["lr/block0"] == [(3, approx(3e-3))]
    assert scalars["lr/block1"] == [(3, approx(3e-3))]
    assert set(scalars) == {"train/task_loss", "lr/block0", "lr/block1"}


def test_tensorboard_logger_into_a_run_dir(tmp_path):
    run_dir = make_run_dir(tmp_path, "digits-backprop")
    logger = TensorBoardLogger(run_dir)
    for step in range(1, 4):
        logger.record("prequential/accuracy", step / 4, step * 100)
    logger.close()
    assert read_scalars(run_dir) == {"prequential/accuracy": [(100, 0.25), (200, 0.5), (300, 0.75)]}


# ----------------------------------------------------------------------------------- null
def test_null_logger_accepts_everything_and_writes_nothing(batch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = batch
    torch.manual_seed(0)
    learner = AMAdam(mlp(), device="cpu")
    info = learner.learn(x, y)
    logger = NullLogger()
    assert logger.log_step(info, 1) is None
    assert logger.record("prequential/accuracy", 0.5, 7) is None
    assert logger.record("prequential/accuracy", torch.tensor(0.5), 8) is None
    assert logger.log_text("config", "text") is None
    assert logger.close() is None
    assert list(tmp_path.iterdir()) == []
    assert issubclass(TensorBoardLogger, NullLogger)  # the same interface

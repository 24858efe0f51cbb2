"""Loggers: learners return :class:`~amstream.learners.base.StepInfo`; loggers write it down.

``TensorBoardLogger`` writes one run folder per run (``<root>/<name>-<time>``) and imports
TensorBoard lazily, so ``import amstream`` stays fast. Tags are namespaced:

- ``train/task_loss``, ``am/mu``, ``lr/<group>``
- ``am/local_loss/<block>`` (per hidden layer), ``am/code_displacement/<code>``
- ``prequential/accuracy`` (written by the caller with :meth:`record`)
"""
from __future__ import annotations

import time
from pathlib import Path

__all__ = ["NullLogger", "TensorBoardLogger", "make_run_dir"]


def make_run_dir(root: str | Path = "runs", name: str = "run") -> Path:
    """A new, unique folder ``<root>/<name>-<YYYYmmdd-HHMMSS>[-k]`` for one run."""
    root = Path(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = root / f"{name}-{stamp}"
    k = 1
    while candidate.exists():
        candidate = root / f"{name}-{stamp}-{k}"
        k += 1
    candidate.mkdir(parents=True)
    return candidate


class NullLogger:
    """Accepts everything, writes nothing."""

    def record(self, key: str, value: float, step: int) -> None:
        pass

    def log_step(self, info, step: int, group_names=None) -> None:
        pass

    def log_text(self, key: str, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    """Scalar logging to TensorBoard event files in ``log_dir``."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: TensorBoard is slow to import

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir))

    def record(self, key: str, value: float, step: int) -> None:
        self.writer.add_scalar(key, float(value), step)

    def log_step(self, info, step: int, group_names=None) -> None:
        """Write a StepInfo (this is where its tensors are synced to the host)."""
        self.record("train/task_loss", info.loss, step)
        if info.mu:
            self.record("am/mu", info.mu, step)
        for i, value in enumerate(info.local_losses):
            self.record(f"am/local_loss/{i}", value, step)
        for i, value in enumerate(info.code_displacement):
            self.record(f"am/code_displacement/{i}", value, step)
        names = group_names or [f"group{i}" for i in range(len(info.lrs))]
        for name, lr in zip(names, info.lrs):
            self.record(f"lr/{name}", lr, step)

    def log_text(self, key: str, text: str) -> None:
        self.writer.add_text(key, text)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

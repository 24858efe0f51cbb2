"""Loggers: learners return :class:`~amstream.learners.base.StepInfo`; loggers write it down.

``TensorBoardLogger`` writes one run folder per run (``<root>/<name>-<time>``) and imports
TensorBoard lazily, so ``import amstream`` stays fast. A step writes:

- ``train/task_loss`` and ``lr/<group>`` (every learner);
- every entry of ``StepInfo.diagnostics`` under its own tag, a tuple as one tag per layer
  (``am/mu``, ``am/local_loss/<block>``, ``am/code_displacement/<code>`` for alternating
  minimization): the logger knows no method's keys;
- callers add their own with :meth:`record` (``prequential/accuracy``, ``test/accuracy``).

A resumed run continues its folder: ``TensorBoardLogger(run_dir, purge_step=n)`` drops what the
interrupted run had written from step ``n`` on, so the overlapping steps are not logged twice.
"""
from __future__ import annotations

import time
from pathlib import Path

__all__ = ["NullLogger", "TensorBoardLogger", "make_run_dir", "resumed_summary_writer"]


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


def resumed_summary_writer(log_dir: str | Path, purge_step: int):
    """A ``SummaryWriter`` that continues ``log_dir`` and drops what was written there from
    ``purge_step`` on.

    TensorBoard reads a folder's event files in name order, and a name begins with the second the
    file was made, then the host, the process id and a counter: a file made in the same second as
    the interrupted run's last one could sort before it, and its purge would then be read first and
    drop nothing (a quick resume, or one in the same process, lost the later curve points that
    way). So this waits, at most a second, until the clock has passed the newest file's second."""
    from torch.utils.tensorboard import SummaryWriter  # lazy: TensorBoard is slow to import

    newest = max((int(f.name.split(".")[3]) for f in Path(log_dir).glob("events.out.tfevents.*")
                  if f.name.split(".")[3].isdigit()), default=0)
    while time.time() < newest + 1:
        time.sleep(0.02)
    return SummaryWriter(str(log_dir), purge_step=purge_step)


class NullLogger:
    """Accepts everything, writes nothing."""

    def record(self, key: str, value: float, step: int) -> None:
        pass

    def log_step(self, info, step: int) -> None:
        pass

    def log_text(self, key: str, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    """Scalar logging to TensorBoard event files in ``log_dir``."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: TensorBoard is slow to import

        self.log_dir = Path(log_dir)
        self.writer = (SummaryWriter(str(self.log_dir)) if purge_step is None
                       else resumed_summary_writer(self.log_dir, purge_step))

    def record(self, key: str, value: float, step: int) -> None:
        self.writer.add_scalar(key, float(value), step)

    def log_step(self, info, step: int) -> None:
        """Write a StepInfo (this is where its tensors are synced to the host)."""
        self.record("train/task_loss", info.loss, step)
        for name, lr in info.lrs.items():
            self.record(f"lr/{name}", lr, step)
        for tag, value in info.diagnostics.items():
            if isinstance(value, (tuple, list)):
                for i, item in enumerate(value):
                    self.record(f"{tag}/{i}", item, step)
            else:
                self.record(tag, value, step)

    def log_text(self, key: str, text: str) -> None:
        self.writer.add_text(key, text)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

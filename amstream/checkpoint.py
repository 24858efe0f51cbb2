"""Atomic checkpoints of a learner and the position of its stream.

A checkpoint holds the learner's ``state_dict()`` (weights, every optimizer state, memories,
counters), every RNG state, and whatever the caller adds (stream position, metric counts). It is
written to a temporary file in the same folder, flushed to disk and renamed over the target, so a
crash at any moment leaves either the old checkpoint or the new one, never a torn file. Loading uses
``torch.load(weights_only=True)``: nothing but tensors and plain containers is unpickled.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .utils import rng_state, set_rng_state

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "atomic_save"]

FORMAT_VERSION = 2  # 2: learner counters in "counters", the stream buffer in "stream"


class CheckpointError(ValueError):
    """The checkpoint file is missing, unreadable or was made for a different learner."""


def _plain_rng_state() -> dict:
    # numpy's and python's RNG states contain tuples/arrays; convert so weights_only loading accepts them.
    state = rng_state()
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    state["numpy"] = [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss]
    version, internal, gauss_next = state["python"]
    state["python"] = [version, list(internal), gauss_next]
    return state


def _restore_rng_state(state: dict) -> None:
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    version, internal, gauss_next = state["python"]
    set_rng_state({
        **state,
        "numpy": (kind, keys.numpy(), pos, has_gauss, gauss),
        "python": (version, tuple(internal), gauss_next),
    })


def atomic_save(payload: object, path: str | os.PathLike) -> Path:
    """``torch.save(payload)`` to a temporary file beside ``path``, synced, then renamed over it."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: it is a directory; give the file's name, for "
                              f"example {path / 'checkpoint.pt'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # a read-only place, a file where a folder should be
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err} (in {path.parent})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint is an ordinary file
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | os.PathLike, learner, **extra) -> Path:
    """Write ``learner`` and ``extra`` (plain values and tensors) to ``path`` atomically."""
    payload = {
        "format_version": FORMAT_VERSION,
        "learner_class": type(learner).__name__,
        "learner": learner.state_dict(),
        "rng": _plain_rng_state(),
        "extra": extra,
    }
    return atomic_save(payload, path)


def _read(path: Path, device: torch.device) -> dict:
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes); it was not written "
                              "by amstream, or its writer was stopped before it began")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        reason = " ".join(str(err).split()) or type(err).__name__
        if len(reason) > 300:
            reason = reason[:300] + "..."
        raise CheckpointError(f"cannot read checkpoint {path} ({size} bytes): {type(err).__name__}: {reason}") from None


def load_checkpoint(path: str | os.PathLike, learner, *, restore_rng: bool = True) -> dict:
    """Load ``path`` into ``learner`` (and the RNGs); return the ``extra`` values saved with it.

    Raises:
        CheckpointError: a missing, empty or unreadable file, one of another learner class, or one
            whose weights do not fit the learner's model (the message names the tensors). The
            learner is then unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    payload = _read(path, learner.device)
    required = ("format_version", "learner_class", "learner", "rng", "extra")
    if not isinstance(payload, dict) or any(key not in payload for key in required):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not an amstream checkpoint (expected keys {required}, found {found})")
    if payload.get("learner_class") != type(learner).__name__:
        raise CheckpointError(
            f"checkpoint {path} was saved from {payload.get('learner_class')}, "
            f"not {type(learner).__name__}"
        )
    try:
        learner.load_state_dict(payload["learner"])  # all or nothing: a state that does not fit changes nothing
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path} does not fit this learner: {err}") from None
    if restore_rng:
        rng = payload["rng"]
        rng["torch"] = rng["torch"].cpu()
        if "cuda" in rng:
            rng["cuda"] = [s.cpu() for s in rng["cuda"]]
        _restore_rng_state(rng)
    return payload["extra"]

"""Device resolution, seeding and the clock of long runs, each done once and in one place."""
from __future__ import annotations

import random
import time

import numpy as np
import torch

__all__ = ["resolve_device", "set_seed", "rng_state", "set_rng_state", "RunClock", "eval_mode"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when it is available, else the CPU; anything else is passed to torch."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"invalid device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine")
    return resolved


class eval_mode:
    """``with eval_mode(model):`` runs the block with ``model.eval()``, each module's own mode
    restored after it.

    ``nn.Module.train`` walks the tree through ``nn.Module.__setattr__``: 32 us for eval and back on
    a 3-layer MLP, more than its forward pass on one sample. When no module overrides ``train``, the
    flags are set directly (4 us, as a class rather than a generator-based context manager); a
    module with its own ``train`` gets the full call.
    """

    __slots__ = ("model", "_modules", "_modes")

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> torch.nn.Module:
        modules = _submodules(self.model, [])
        if all(type(m).train is _MODULE_TRAIN for m in modules):
            self._modules, self._modes = modules, [m.training for m in modules]
            for m in modules:
                object.__setattr__(m, "training", False)
        else:
            self._modules, self._modes = None, self.model.training
            self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        if self._modules is None:
            self.model.train(self._modes)
            return
        for m, mode in zip(self._modules, self._modes):
            object.__setattr__(m, "training", mode)


_MODULE_TRAIN = torch.nn.Module.train


def _submodules(module: torch.nn.Module, out: list) -> list:
    """``module`` and everything below it (a module held twice is listed twice), without
    ``Module.modules()``'s names and memo: a third of its cost, paid at every one-sample prediction."""
    out.append(module)
    for child in module._modules.values():
        if child is not None:
            _submodules(child, out)
    return out


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG state a run depends on, as plain picklable objects (for checkpoints)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunClock:
    """Wall time of a long run (a full-batch ``fit``) without the time spent in its callbacks, such as
    evaluations on a validation set, and its time budget."""

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds, self.paused, self.start = seconds, 0.0, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def call(self, callback, *args) -> None:
        """``callback(*args)`` (if not None), its time not counted."""
        if callback is None:
            return
        t0 = time.perf_counter()
        callback(*args)
        self.paused += time.perf_counter() - t0

    @property
    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

"""Compiled fast paths: a learner's pure tensor functions run through ``torch.compile``.

A learner built with ``compile=True`` (or ``"auto"``: on CUDA only) routes its hot functions, those
that take tensors and weights and return new tensors without touching the learner's state, through
:class:`CompiledFunction`: the code updates of alternating minimization (a few dozen small kernels
per code step, fused by the compiler into a handful), the model's forward pass of backprop and of
every learner's ``predict``. Weights, optimizer states and checkpoints are those of the eager
learner: a compiled learner saves what an eager one saves and loads it back.

AM-Adam, AM-mem, LocoProp, backprop and Frank-Wolfe go further: from their second step (once the
optimizer has made its state) the whole step is one function compiled without graph breaks
(``fullgraph``), on CUDA one CUDA graph; it applies the optimizer's rule to the optimizer's own state
(:mod:`amstream.optim.adam_update`, :func:`amstream.optim.frank_wolfe.frank_wolfe_update_`) and takes
the step sizes as one tensor (:class:`StepScalars`), so that a schedule needs no recompilation. The
state it updates in place is marked static (:func:`mark_static`), as parameters are, so that a CUDA
graph updates it rather than being skipped.

Compilation happens at the first call of each function (tens of seconds on a CPU, where torch
generates and builds C++ kernels) and again for each new input shape. Where a function cannot be
compiled (no C++ compiler, an operation the compiler does not support, a model that changes its own
structure), the learner says so once in a warning naming the function and the reason, and runs that
function eagerly from then on: results are the same, only the speed differs. On CUDA the compiled
functions use the ``"reduce-overhead"`` mode, which replays them as CUDA graphs for static shapes.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["COMPILE_CHOICES", "CompiledFunction", "StepScalars", "mark_static", "resolve_compile"]

COMPILE_CHOICES = (False, True, "auto")


def resolve_compile(choice: object, device: torch.device) -> bool:
    """``compile=`` as a bool for ``device``: ``"auto"`` compiles on CUDA only (on a CPU the first
    step would wait tens of seconds for the compiler, which a stream of a few samples never repays)."""
    if choice == "auto":
        return device.type == "cuda"
    if isinstance(choice, bool):
        return choice
    raise ValueError(f"compile must be True, False or 'auto', got {choice!r}")


class CompiledFunction:
    """``fn`` compiled by ``torch.compile`` at its first call, or ``fn`` itself (with one warning)
    when it cannot be compiled.

    A failure of the compiled call is told apart from an error of ``fn`` itself by running ``fn``
    eagerly on the same arguments: if that fails too, its error is raised as the eager function would
    raise it; if it succeeds, the compiler was at fault, the warning names it, and every later call
    runs eagerly. The wrapped functions are pure (they return new tensors), so the retry changes
    nothing.
    """

    def __init__(self, fn: Callable, name: str, device: torch.device, fullgraph: bool = False) -> None:
        self.fn, self.name = fn, name
        mode = "reduce-overhead" if device.type == "cuda" else None
        # fullgraph: a graph break is a failure (the warning below, then eager calls) rather than
        # pieces compiled between eager Python
        self._compiled: Callable | None = torch.compile(fn, mode=mode, fullgraph=fullgraph)
        self.failure: str | None = None  # why it runs eagerly, once it does
        # torch stops compiling a function after recompile_limit variants (input shapes, dtypes)
        # without an error: the cache is watched so that this is said (plain functions only)
        self._code = getattr(fn, "__code__", None) if _cache_entries() is not None else None
        self.saturated = False

    @property
    def active(self) -> bool:
        """Whether calls still go through the compiled function."""
        return self._compiled is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            return self.fn(*args, **kwargs)
        try:
            result = self._compiled(*args, **kwargs)
            if self._code is not None and not self.saturated:
                self._check_saturation()
            return result
        except Exception as err:  # noqa: BLE001 - decided below by the eager run
            result = self.fn(*args, **kwargs)  # raises the function's own error, if it is one
            self._compiled = None
            self.failure = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            warnings.warn(f"compile=True: {self.name} could not be compiled and runs eagerly from now on "
                          f"(same results, eager speed). Reason: {self.failure}", RuntimeWarning, stacklevel=2)
            return result

    def _check_saturation(self) -> None:
        limit = torch._dynamo.config.recompile_limit
        if len(_cache_entries()(self._code)) >= limit:
            self.saturated = True
            warnings.warn(f"compile=True: {self.name} has been compiled for {limit} input variants (shapes, "
                          "dtypes), torch's recompile_limit: inputs unlike those run eagerly from now on (same "
                          "results, eager speed); keep batch shapes fixed or raise "
                          "torch._dynamo.config.recompile_limit", RuntimeWarning, stacklevel=3)


class StepScalars:
    """The scalars a compiled step reads (step sizes, penalty weights) as one tensor on the
    parameters' device, made again only when a value changes: the graph takes them as an input,
    so a schedule that changes them needs no recompilation, and a CUDA graph, which would replay
    the values it was captured with, no capture again."""

    def __init__(self) -> None:
        self._values: tuple[float, ...] | None = None
        self._tensor: torch.Tensor | None = None

    def get(self, values: list[float], like: torch.Tensor) -> torch.Tensor:
        """``values`` as a 1-D tensor of ``like``'s dtype and device (the same tensor as last time
        when nothing changed)."""
        values = tuple(float(v) for v in values)
        t = self._tensor
        if t is None or values != self._values or t.device != like.device or t.dtype != like.dtype:
            self._tensor, self._values = torch.tensor(values, dtype=like.dtype, device=like.device), values
        return self._tensor


def mark_static(tensors) -> None:
    """Tell torch.compile that these tensors (nested lists of them: optimizer states) keep their
    memory from call to call, as parameters do: a CUDA graph then updates them in place instead of
    being skipped for mutating its inputs."""
    if isinstance(tensors, torch.Tensor):
        if getattr(tensors, "_dynamo_static_input_type", None) is None:
            torch._dynamo.mark_static_address(tensors)
        return
    for item in tensors:
        mark_static(item)


@functools.cache
def _cache_entries() -> Callable | None:
    """Dynamo's debugging hook that lists a code object's compiled variants (private: without it the
    saturation goes unreported). Imported at the first compiled function, not with amstream: it
    loads the whole compiler (about 2 s), which a script that never compiles should not wait for."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # pragma: no cover - another torch
        return None
    return _debug_get_cache_entry_list

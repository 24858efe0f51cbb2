"""Avalanche integration: ``AMStrategy`` and benchmarks built from amstream's local data readers.

Names are re-exported lazily: importing Avalanche takes about 8 s, and ``scenarios.benchmarks``
only imports it when a benchmark is built.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AMStrategy": "strategy",
    "UNSUPPORTED_PLUGINS": "strategy",
    "BENCHMARKS": "benchmarks",
    "make_benchmark": "benchmarks",
    "online": "benchmarks",
    "split_digits": "benchmarks",
    "split_mnist": "benchmarks",
    "split_fashion_mnist": "benchmarks",
    "permuted_mnist": "benchmarks",
    "rotated_mnist": "benchmarks",
    "elec2_stream": "benchmarks",
    "strategy_state": "checkpoint",
    "load_strategy_state": "checkpoint",
    "StrategyStateError": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Checkpoints of a continual-learning run through :class:`~scenarios.strategy.AMStrategy`.

Avalanche 0.6.0's own ``save_checkpoint`` pickles the whole strategy with dill and fails on torch
2.14's optimizers; amstream's checkpoints load with ``torch.load(weights_only=True)``. So the
strategy's state is written here as plain values and tensors, beside the learner's own checkpoint
(:func:`amstream.save_checkpoint`):

- the strategy's clock (iterations and experiences so far, which TensorBoard's x axis and the
  plugins read);
- every plugin's state: its attributes, with the objects Avalanche keeps in them taken apart
  (replay buffers as the tensors of their samples, ``ParamData`` as its tensor, a model copy such as
  LwF's previous model or GDumb's initial one as its ``state_dict``, the storage policies' and LwF's
  helper objects attribute by attribute);
- the evaluator's state that spans experiences: the accuracy matrix so far and the forgetting and
  BWT metrics' first and last accuracies per experience.

:func:`strategy_state` and :func:`load_strategy_state` are meant for experience boundaries (after an
experience's training and evaluation), where no loader, batch or per-phase accumulator is live.
Objects are rebuilt only from classes of Avalanche's own packages.
"""
from __future__ import annotations

import copy
import importlib
from collections import defaultdict
from typing import Any

import torch
from avalanche.benchmarks.utils import AvalancheDataset, concat_datasets
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset
from avalanche.training.templates import BaseTemplate
from avalanche.training.utils import ParamData
from torch import nn

from .metrics import AccuracyMatrix

__all__ = ["StrategyStateError", "strategy_state", "load_strategy_state"]

_KIND = "__kind__"
# ParamData's initializers that its users in Avalanche 0.6.0 pass (by name, not pickled)
_INIT_FUNCTIONS = {"zeros": torch.zeros, "ones": torch.ones}
_DEFAULT_FACTORIES = {"dict": dict, "list": list, "set": set, "int": int, "float": float}


class StrategyStateError(ValueError):
    """A strategy's state that cannot be written as plain values, or a saved state that does not fit."""


def strategy_state(strategy) -> dict:
    """The strategy's clock, its plugins' and its evaluator's state (plain values and tensors)."""
    plugins = [p for p in strategy.plugins if p is not strategy.clock and p is not strategy.evaluator]
    return {
        "clock": _pack(vars(strategy.clock), strategy, "clock"),
        "plugins": [{"class": type(p).__name__, "state": _pack(_plugin_attributes(p), strategy, type(p).__name__)}
                    for p in plugins],
        "evaluator": _evaluator_state(strategy.evaluator),
    }


def load_strategy_state(strategy, state: dict) -> None:
    """Restore :func:`strategy_state`'s ``state`` into a strategy built with the same plugins (in
    the same order) and evaluator. Raises :class:`StrategyStateError` when they differ; nothing is
    changed then."""
    plugins = [p for p in strategy.plugins if p is not strategy.clock and p is not strategy.evaluator]
    saved = [entry["class"] for entry in state["plugins"]]
    if saved != [type(p).__name__ for p in plugins]:
        raise StrategyStateError(f"the checkpoint's strategy has the plugins {saved}, this one "
                                 f"{[type(p).__name__ for p in plugins]}")
    unpacked = [_unpack(entry["state"], strategy) for entry in state["plugins"]]
    clock = _unpack(state["clock"], strategy)
    _check_evaluator(strategy.evaluator, state["evaluator"])
    for plugin, attributes in zip(plugins, unpacked):
        vars(plugin).update(attributes)
    vars(strategy.clock).update(clock)
    _load_evaluator_state(strategy.evaluator, state["evaluator"])


# ----------------------------------------------------------------------------------- plugins
def _plugin_attributes(plugin) -> dict:
    # a plugin's reference to the running strategy (set by some during training) is not state
    return {k: v for k, v in vars(plugin).items() if not _is_strategy(v)}


def _is_strategy(value) -> bool:
    return isinstance(value, BaseTemplate)


def _pack(value: Any, strategy, where: str) -> Any:
    """``value`` as plain values and tensors (dicts tagged with :data:`_KIND` for everything else)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, torch.device):
        return {_KIND: "device", "value": str(value)}
    if isinstance(value, torch.Size):
        return {_KIND: "size", "value": list(value)}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return {_KIND: type(value).__name__,
                "items": [_pack(v, strategy, f"{where}[{i}]") for i, v in enumerate(items)]}
    if isinstance(value, dict):
        factory = None
        if isinstance(value, defaultdict):
            factory = next((name for name, f in _DEFAULT_FACTORIES.items() if value.default_factory is f), None)
            if factory is None:
                raise StrategyStateError(f"{where}: a defaultdict of {value.default_factory!r} cannot be saved")
        return {_KIND: "dict", "default": factory,
                "items": [[_pack(k, strategy, where), _pack(v, strategy, f"{where}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, ParamData):
        init = next((name for name, f in _INIT_FUNCTIONS.items() if value.init_function is f), None)
        if init is None:
            raise StrategyStateError(f"{where}: ParamData {value.name!r} with initializer {value.init_function!r}")
        return {_KIND: "param_data", "name": value.name, "init": init, "data": value.data,
                "device": str(value.device)}
    if isinstance(value, AvalancheDataset):
        return _pack_dataset(value)
    if isinstance(value, nn.Module):
        return {_KIND: "module", "state": {k: v.detach().clone() for k, v in value.state_dict().items()}}
    cls = type(value)
    if cls.__module__.split(".")[0] == "avalanche" and hasattr(value, "__dict__"):
        return {_KIND: "object", "class": f"{cls.__module__}:{cls.__qualname__}",
                "state": _pack({k: v for k, v in vars(value).items() if not _is_strategy(v)}, strategy,
                               f"{where}.{cls.__name__}")}
    raise StrategyStateError(f"{where}: a {cls.__module__}.{cls.__qualname__} cannot be saved as plain values")


def _unpack(value: Any, strategy) -> Any:
    if not isinstance(value, dict) or _KIND not in value:
        return value
    kind = value[_KIND]
    if kind == "device":
        return torch.device(value["value"])
    if kind == "size":
        return torch.Size(value["value"])
    if kind in ("list", "tuple", "set", "frozenset"):
        items = [_unpack(v, strategy) for v in value["items"]]
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[kind](items)
    if kind == "dict":
        items = {_unpack(k, strategy): _unpack(v, strategy) for k, v in value["items"]}
        return defaultdict(_DEFAULT_FACTORIES[value["default"]], items) if value["default"] else items
    if kind == "param_data":
        return ParamData(value["name"], init_function=_INIT_FUNCTIONS[value["init"]], init_tensor=value["data"],
                         device=value["device"])
    if kind == "dataset":
        return _unpack_dataset(value)
    if kind == "module":
        return _module_like(strategy.model, value["state"])
    if kind == "object":
        obj = _avalanche_class(value["class"]).__new__(_avalanche_class(value["class"]))
        vars(obj).update(_unpack(value["state"], strategy))
        return obj
    raise StrategyStateError(f"unknown saved kind {kind!r}")


def _avalanche_class(name: str) -> type:
    module, _, qualname = name.partition(":")
    if module.split(".")[0] != "avalanche":
        raise StrategyStateError(f"a saved object of class {name} is not one of Avalanche's")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _module_like(model: nn.Module, state: dict) -> nn.Module:
    """A copy of ``model`` holding ``state`` (a model copy a plugin kept; its output head may be
    smaller than today's model's when the head grows)."""
    module = copy.deepcopy(model)
    current = module.state_dict()
    for name, tensor in state.items():
        if name not in current:
            raise StrategyStateError(f"a saved model copy has {name!r}, which the model has not")
        owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        leaf = name.rpartition(".")[2]
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor.to(current[name].device), requires_grad=False)
        else:
            owner._buffers[leaf] = tensor.to(current[name].device)
        if isinstance(owner, nn.Linear) and leaf == "weight":
            owner.out_features, owner.in_features = tensor.shape
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _pack_dataset(dataset) -> dict:
    """A replay buffer's samples as tensors: inputs, targets, task labels (the buffer is a subset of
    the experiences' datasets; its samples are what training reads)."""
    if len(dataset) == 0:
        return {_KIND: "dataset", "x": None, "y": None, "t": None}
    samples = [dataset[i] for i in range(len(dataset))]
    x, y, t = zip(*((s[0], s[1], s[2] if len(s) > 2 else 0) for s in samples))
    return {_KIND: "dataset", "x": torch.stack([torch.as_tensor(v) for v in x]),
            "y": torch.as_tensor(y), "t": torch.as_tensor(t)}


def _unpack_dataset(value: dict):
    if value["x"] is None:
        return concat_datasets([])
    y, t = value["y"].tolist(), value["t"].tolist()
    return _make_taskaware_tensor_classification_dataset(value["x"], value["y"], task_labels=t, targets=y)


# --------------------------------------------------------------------------------- evaluator
def _cross_experience_metrics(evaluator) -> list:
    """The evaluator's metrics whose state spans experiences: forgetting and BWT keep each
    experience's first and last accuracy (everything else is reset at every phase)."""
    return [m for m in evaluator.metrics if hasattr(m, "forgetting")]


def _evaluator_state(evaluator) -> dict:
    matrix = next((m for m in evaluator.metrics if isinstance(m, AccuracyMatrix)), None)
    return {
        "accuracy_matrix": None if matrix is None else _pack(vars(matrix)["_rows"], None, "accuracy matrix"),
        "forgetting": [{"class": type(m).__name__, "initial": _pack(m.forgetting.initial, None, "forgetting"),
                        "last": _pack(m.forgetting.last, None, "forgetting"),
                        "train_exp_id": getattr(m, "train_exp_id", None)}
                       for m in _cross_experience_metrics(evaluator)],
    }


def _check_evaluator(evaluator, state: dict) -> None:
    classes = [type(m).__name__ for m in _cross_experience_metrics(evaluator)]
    saved = [entry["class"] for entry in state["forgetting"]]
    if saved != classes:
        raise StrategyStateError(f"the checkpoint's evaluator has the metrics {saved}, this one {classes}")


def _load_evaluator_state(evaluator, state: dict) -> None:
    if state["accuracy_matrix"] is not None:
        for m in evaluator.metrics:
            if isinstance(m, AccuracyMatrix):
                m._rows = _unpack(state["accuracy_matrix"], None)
    for m, entry in zip(_cross_experience_metrics(evaluator), state["forgetting"]):
        m.forgetting.initial = _unpack(entry["initial"], None)
        m.forgetting.last = _unpack(entry["last"], None)
        if entry["train_exp_id"] is not None:
            m.train_exp_id = entry["train_exp_id"]

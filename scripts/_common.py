"""Pieces shared by the scripts: the MLP, learners by name with user overrides, held-out accuracy.

The learner classes stay the single source of hyperparameter defaults: scripts pass only the values
the user set (``None`` means "the learner's own default"), and :func:`learner_default` reads a
default from the class signature when a help text wants to show it.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import math
from collections.abc import Iterable

import torch
from torch import nn

from amstream import LEARNERS
from amstream.data import Dataset

__all__ = [
    "LEARNER_NAMES", "HPARAM_OPTIONS", "build_mlp", "make_learner", "evaluate_accuracy",
    "HelpFormatter", "learner_default", "describe_defaults", "hparam_help", "add_hparam_arguments", "overrides_for",
    "parse_int_list", "parse_name_list",
]

LEARNER_NAMES: tuple[str, ...] = tuple(LEARNERS)
AM_LEARNERS = ("am-adam", "am-mem")

#: command-line hyperparameter -> (learners it applies to, constructor keyword of those learners)
HPARAM_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "mu": (AM_LEARNERS, "mu"),
    "code_steps": (AM_LEARNERS, "code_steps"),
    "code_lr": (AM_LEARNERS, "code_lr"),
    "lr": (("am-adam",), "lr"),
    "lr_out": (AM_LEARNERS, "lr_out"),
    "prox": (AM_LEARNERS, "prox"),
    "reduction": (AM_LEARNERS, "reduction"),
    "bn_stats": (AM_LEARNERS, "bn_stats"),
    "output_fit": (AM_LEARNERS, "output_fit"),
    "memory": (("am-mem",), "memory"),
    "forget": (("am-mem",), "forget"),
    "solver": (("am-mem",), "solver"),
    "damping": (("am-mem",), "damping"),
    "damping_scale": (("am-mem",), "damping_scale"),
    "bp_lr": (("backprop",), "lr"),
    "lr_halve_every": (LEARNER_NAMES, "lr_halve_every"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except ``None`` (whose help text says what it means)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


#: command-line hyperparameter -> (help text without its default, argparse type, choices)
HPARAM_HELP: dict[str, tuple[str, type, tuple | None]] = {
    "mu": ("AM penalty weight mu_0 (am-adam, am-mem)", float, None),
    "code_steps": ("code-update steps per batch (am-adam, am-mem)", int, None),
    "code_lr": ("code-update step size (am-adam, am-mem)", float, None),
    "lr": ("Adam learning rate of the hidden layers of am-adam", float, None),
    "lr_out": ("Adam learning rate of the output layer (am-adam, am-mem)", float, None),
    "bp_lr": ("learning rate of backprop", float, None),
    "prox": ("AM proximity term: paper (detached anchor) or official (the reference code's, zero "
             "gradient)", str, ("paper", "official")),
    "reduction": ("AM code-loss reduction: mean (the reference code: hidden codes move ~1/(batch*width) "
                  "as far as the last one) or sum (the objective summed over samples)", str, ("mean", "sum")),
    "bn_stats": ("AM BatchNorm running statistics: forward (from the plain forward pass only) or all "
                 "(also every code and weight step, as the reference code)", str, ("forward", "all")),
    "output_fit": ("AM output layer fitted at the updated last code (codes: the paper) or at the forward one "
                   "(forward: the task loss's own gradient for that layer)", str, ("codes", "forward")),
    "memory": ("AM-mem co-activation memory: sum, mean or forget (exponential forgetting by --forget)",
               str, ("sum", "mean", "forget")),
    "forget": ("AM-mem forgetting factor eta with --memory forget", float, None),
    "solver": ("AM-mem weight solve: sweep (one Gauss-Seidel sweep per batch, as the reference) or "
               "solve (Cholesky)", str, ("sweep", "solve")),
    "damping": ("AM-mem proximal damping of the weight solve, in units of the memory's diagonal", float, None),
    "damping_scale": ("AM-mem damping per input: mean (one weight, the mean of diag A: inputs of small scale "
                      "learn slowly) or diagonal (A_jj per input: scale-free)", str, ("mean", "diagonal")),
}


def hparam_help(option: str, defaults: dict[str, dict] | None = None) -> str:
    """The help text of a hyperparameter option, ending with the learners' defaults (their own, or
    those of ``defaults``, as in :func:`describe_defaults`)."""
    return f"{HPARAM_HELP[option][0]} (default: {describe_defaults(option, defaults)})"


def add_hparam_arguments(parser, options: Iterable[str], defaults: dict[str, dict] | None = None) -> None:
    """Add ``--mu``, ``--code-lr``, ... (default None: the learner's own value, or the caller's
    ``defaults`` for it) to an argparse parser."""
    for option in options:
        _, type_, choices = HPARAM_HELP[option]
        parser.add_argument("--" + option.replace("_", "-"), type=type_, choices=choices, default=None,
                            help=hparam_help(option, defaults).replace("%", "%%"))


def build_mlp(d_in: int | tuple, hidden: list[int], n_classes: int, batchnorm: bool = False) -> nn.Sequential:
    """``Flatten -> [Linear -> (BatchNorm1d) -> ReLU] per hidden width -> Linear(n_classes)``.

    ``d_in`` is the number of input features or a sample shape (its product is used).
    """
    if not isinstance(d_in, int):
        d_in = math.prod(int(d) for d in d_in)
    layers: list[nn.Module] = [nn.Flatten()]
    width = d_in
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def make_learner(name: str, model: nn.Module, device: str | torch.device = "auto", **overrides):
    """Build the learner ``name`` (a key of :data:`amstream.LEARNERS`) on ``model``.

    ``overrides`` are constructor keywords; ``None`` values are dropped so the class default holds.

    Raises:
        ValueError: unknown learner, an option the learner does not take, or an invalid value
            (the learner's own check), also when the model does not suit it (AM-mem and BatchNorm).
    """
    if name not in LEARNERS:
        raise ValueError(f"unknown learner {name!r}; choose from {', '.join(LEARNER_NAMES)}")
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    cls = LEARNERS[name]
    accepted = _accepted_keywords(cls)
    if accepted is not None and (unknown := sorted(set(kwargs) - accepted)):
        raise ValueError(f"learner {name!r} does not take option(s) {', '.join(unknown)}")
    return cls(model, device=device, **kwargs)


def overrides_for(name: str, options: dict) -> dict:
    """The constructor keywords for learner ``name`` among the user-set ``options``.

    ``options`` maps the names of :data:`HPARAM_OPTIONS` (e.g. ``vars(args)``) to values; ``None``
    values and options that do not apply to ``name`` are left out.
    """
    out = {}
    for option, (learners, keyword) in HPARAM_OPTIONS.items():
        value = options.get(option)
        if value is not None and name in learners:
            out[keyword] = value
    return out


@torch.no_grad()
def evaluate_accuracy(learner, dataset: Dataset, batch_size: int = 1000) -> float:
    """Accuracy of ``learner.predict`` on ``dataset``, in batches (the learner is not changed)."""
    n = len(dataset)
    if n == 0:
        return float("nan")
    correct = 0
    for start in range(0, n, batch_size):
        out = learner.predict(dataset.x[start:start + batch_size])
        correct += int((out.argmax(dim=-1).cpu() == dataset.y[start:start + batch_size]).sum())
    return correct / n


# ------------------------------------------------------------------------------------- defaults
def _init_signatures(cls) -> Iterable[inspect.Signature]:
    """``__init__`` signatures along the MRO, as far as each one forwards ``**kwargs``."""
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(vars(klass)["__init__"])
        yield sig
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return


def _accepted_keywords(cls) -> set[str] | None:
    names: set[str] = set()
    for sig in _init_signatures(cls):
        names |= {n for n, p in sig.parameters.items()
                  if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"}
        last = sig
    if any(p.kind is p.VAR_KEYWORD for p in last.parameters.values()):
        return None  # forwards to something we cannot see: let the class complain
    return names


@functools.cache
def _default_hparams(name: str) -> dict:
    """``hparams()`` of learner ``name`` built with no options on a tiny model (global RNG untouched).

    Reading an instance rather than the signature also sees values the constructor derives (such
    as the per-code list of ``code_lr``).
    """
    with torch.random.fork_rng(devices=[]):
        model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
        learner = LEARNERS[name](model, device="cpu")
    return dict(getattr(learner, "hparams", dict)())


def learner_default(name: str, keyword: str):
    """The default of constructor keyword ``keyword`` of learner ``name`` (None if unknown).

    Per-code lists (``code_lr``) are shown as one value when all entries are equal.
    """
    value = _default_hparams(name).get(keyword)
    if value is None:
        for sig in _init_signatures(LEARNERS[name]):
            param = sig.parameters.get(keyword)
            if param is not None and param.default is not inspect.Parameter.empty:
                return param.default
    if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
        return value[0]
    return value


def describe_defaults(option: str, defaults: dict[str, dict] | None = None) -> str:
    """``"am-adam 0.003, am-mem 0.003"``: the learners' own defaults behind a CLI option, or those
    of ``defaults`` (learner name -> constructor keywords) where it sets them."""
    learners, keyword = HPARAM_OPTIONS[option]
    defaults = defaults or {}
    return ", ".join(f"{name} {defaults.get(name, {}).get(keyword, learner_default(name, keyword))}"
                     for name in learners)


# -------------------------------------------------------------------------------------- parsing
def parse_int_list(text: str) -> list[int]:
    """``"100,100"`` -> ``[100, 100]``; ``""`` -> ``[]``. Raises ValueError on anything else."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"widths must be >= 1, got {text!r}")
    return values


def parse_name_list(text: str, known: Iterable[str], what: str = "name") -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` (duplicates dropped), each checked against ``known``."""
    known = tuple(known)
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise ValueError(f"no {what} given; choose from {', '.join(known)}")
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(known)}")
    return names

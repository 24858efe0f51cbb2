"""Pieces shared by the scripts: options derived from the learner registry, checked options, the MLP.

Every learner option of the scripts comes from :data:`amstream.LEARNERS` and each class's
``defaults`` (:mod:`amstream.hparams`): ``--mu`` exists because a registered learner declares
``mu``, its help text, type, range and per-learner defaults are that declaration's, and a learner
registered later gets its options with no edit here. ``--NAME VALUE`` sets ``NAME`` for every
chosen learner that declares it; ``--set LEARNER.NAME=VALUE`` sets it for one learner only.
Options left out keep each learner's own default (or the caller's, e.g. the DQN agent's TD
settings).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from amstream import LEARNERS
from amstream.data import DataFileMissing, Dataset
from amstream.models import ElmanRNN, RecurrentNet
from amstream.hparams import HParam

__all__ = [
    "Parser", "HelpFormatter", "avalanche_warnings", "add_option", "add_learner_arguments", "learner_kwargs", "learner_names",
    "learner_options", "make_learner", "parse_run", "clean_errors", "build_model", "as_sequences", "RECURRENT_MODELS", "build_mlp", "build_lenet5", "evaluate_accuracy", "parse_int_list", "parse_name_list", "CommaList",
]


def learner_names() -> tuple[str, ...]:
    """The registered learners, in registration order (read at call time: the registry may grow)."""
    return tuple(LEARNERS)


def learner_column_width(names: Iterable[str]) -> int:
    """Width of a results table's first column: the header ``learner`` or the longest name."""
    return max([len("learner"), *(len(name) for name in names)])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except ``None`` and ``False`` (whose help text says what they mean)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage dump), ending with a hint to ``--help``.
    Options are never abbreviated: with dozens of learner options a prefix silently picks one
    (``rl.py --steps 600`` ran 100,000 steps with ``--steps-per-task 600``, which only ``--tasks`` reads)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see --help)\n")


# --------------------------------------------------------------------------------- checked options
def _checker(flag: str, h: HParam) -> Callable[[str], object]:
    """An argparse ``type``: the text parsed and checked against ``h`` (type, range, choices)."""

    def parse(text: str):
        try:
            value = h.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        try:
            return h.check(flag, value)
        except ValueError as err:
            if h.choices is not None:  # the message lists the choices and the closest one
                raise argparse.ArgumentTypeError(str(err).replace(f"invalid {flag}: ", "")) from None
            raise argparse.ArgumentTypeError(f"must be {h.describe()}, got {text}") from None

    parse.__name__ = h.type.__name__ if h.type in (int, float, str) else "value"  # argparse's "invalid X value"
    return parse


def add_option(parser, flag: str, h: HParam, **kwargs) -> None:
    """Add ``flag`` with ``h``'s default, help, type and range check (``--batch-size 0`` is then a
    one-line error naming the allowed range, never a traceback)."""
    if h.type is bool:
        parser.add_argument(flag, action="store_true", help=h.help, **kwargs)
        return
    text = h.help
    if h.range is not None or h.per_layer:
        text += f" [{h.describe()}]"
    parser.add_argument(flag, type=_checker(flag, h), default=h.default, choices=h.choices,
                        help=text.replace("%", "%%"), **kwargs)


# ------------------------------------------------------------------------------ learner options
def learner_options(names: Iterable[str] | None = None) -> dict[str, list[tuple[str, HParam]]]:
    """Hyperparameter name -> ``[(learner, declaration), ...]`` over the command-line hyperparameters
    of the learners ``names`` (default: every registered learner)."""
    options: dict[str, list[tuple[str, HParam]]] = {}
    for name in names or learner_names():
        for key, h in LEARNERS[name].defaults.items():
            if h.cli:
                options.setdefault(key, []).append((name, h))
    return options


def _shared_declaration(owners: list[tuple[str, HParam]]) -> HParam:
    """One declaration for an option that several learners declare: the widest check that each of
    them still applies itself (a value is checked again by every learner that takes it)."""
    first = owners[0][1]
    if len(owners) == 1:
        return first
    choices = None
    if first.choices is not None:
        choices = tuple(dict.fromkeys(c for _, h in owners for c in (h.choices or ())))
    same_range = all(h.range == first.range for _, h in owners)
    return HParam(first.default, first.help, first.type, first.range if same_range else None, choices,
                  optional=any(h.optional for _, h in owners), per_layer=first.per_layer)


def _option_help(key: str, owners: list[tuple[str, HParam]], defaults_for: Callable[[str], dict] | None) -> str:
    by_help: dict[str, list[str]] = {}
    for name, h in owners:
        by_help.setdefault(h.help, []).append(name)
    text = next(iter(by_help)) if len(by_help) == 1 else "; ".join(
        f"{', '.join(names)}: {help_}" for help_, names in by_help.items())
    shared = _shared_declaration(owners)
    if shared.range is not None and shared.choices is None:
        text += f" [{shared.describe()}]"
    shown = []
    for name, h in owners:
        value = h.default
        if defaults_for is not None:
            value = defaults_for(name).get(key, value)
        if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
            value = value[0]
        shown.append(f"{name} {value}")
    return f"{text} (default: {', '.join(shown)})"


def add_learner_arguments(parser: argparse.ArgumentParser, names: Iterable[str] | None = None, *,
                          defaults_for: Callable[[str], dict] | None = None, exclude: Iterable[str] = (),
                          title: str | None = None) -> None:
    """One ``--NAME`` option per command-line hyperparameter of the registered learners, and ``--set``.

    Args:
        names: the learners whose hyperparameters are offered (default: all registered).
        defaults_for: ``learner -> {hyperparameter: value}`` shown as the defaults where the caller
            overrides the class's own (the DQN agent's TD settings).
        exclude: hyperparameters the script sets itself (no option).
    """
    names = tuple(names or learner_names())
    group = parser.add_argument_group(title or "learner hyperparameters (declared by each learner class; "
                                      "left out: each learner's own default)")
    exclude = set(exclude)
    taken = set(parser._option_string_actions)  # the script's own options keep their flags
    offered, shadowed = [], []
    for key, owners in learner_options(names).items():
        if key in exclude:
            continue
        flag = "--" + key.replace("_", "-")
        if flag in taken:
            shadowed.append(key)
            continue
        offered.append(key)
        shared = _shared_declaration(owners)
        group.add_argument(flag, dest=key, type=_checker(flag, shared), default=None, choices=shared.choices,
                           metavar=None if shared.choices else key.upper(),
                           help=_option_help(key, owners, defaults_for).replace("%", "%%"))
    parser.set_defaults(learner_options=tuple(offered))
    note = (f"; the learners' {', '.join(shadowed)} can only be set this way (the script has its own "
            f"{', '.join('--' + k.replace('_', '-') for k in shadowed)})") if shadowed else ""
    if "--compile" not in taken:
        group.add_argument("--compile", dest="learner_compile", default=None, choices=("auto", "true", "false"),
                           help="run the learners' pure tensor functions (the forward pass, the code updates) "
                                "through torch.compile: true, auto (on CUDA only) or false (default); the first "
                                "steps wait for the compiler (tens of seconds on a CPU), results are the same")
    group.add_argument("--set", dest="learner_set", action="append", default=[], metavar="LEARNER.NAME=VALUE",
                       type=_set_parser(names, exclude),
                       help=f"set a hyperparameter of one learner only, e.g. --set backprop.lr=0.003 (repeatable){note}")


def _set_parser(names: tuple[str, ...], exclude: set[str]) -> Callable[[str], tuple[str, str, object]]:
    def parse(text: str) -> tuple[str, str, object]:
        target, sep, value = text.partition("=")
        learner, dot, key = target.strip().partition(".")
        if not sep or not dot:
            raise argparse.ArgumentTypeError(f"expected LEARNER.NAME=VALUE, got {text!r}")
        if learner not in names:
            raise argparse.ArgumentTypeError(f"unknown learner {learner!r} in {text!r}; choose from {', '.join(names)}")
        declared = LEARNERS[learner].defaults
        if key not in declared or not declared[key].cli or key in exclude:
            options = [k for k, h in declared.items() if h.cli and k not in exclude]
            raise argparse.ArgumentTypeError(f"{learner} has no option {key!r}; it has {', '.join(options)}")
        return learner, key, _checker(f"{learner}.{key}", declared[key])(value.strip())

    parse.__name__ = "--set"
    return parse


def learner_kwargs(name: str, args: argparse.Namespace) -> dict:
    """The constructor keywords for learner ``name`` from the parsed options: every ``--NAME`` it
    declares that was given, then its ``--set`` entries."""
    values = vars(args)
    offered = set(values.get("learner_options", ()))  # not the script's own options of the same name
    kwargs = {key: values[key] for key in LEARNERS[name].defaults
              if key in offered and values.get(key) is not None}
    for learner, key, value in values.get("learner_set", []):
        if learner == name:
            kwargs[key] = value
    choice = values.get("learner_compile")
    if choice is not None:
        kwargs["compile"] = {"true": True, "false": False}.get(choice, choice)
    return kwargs


@contextlib.contextmanager
def clean_errors(parser: argparse.ArgumentParser):
    """Bad settings, data or checkpoints end with a one-line message and exit code 2."""
    try:
        yield
    except (ValueError, FileNotFoundError, ImportError) as err:
        hint = " (or pass --data-dir)" if isinstance(err, DataFileMissing) else ""
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(err).split())}{hint}\n")


def parse_run(text: str, special: Callable[[str, str, str], dict | None] | None = None) -> tuple[str, dict]:
    """A run specification ``"LEARNER[:NAME=VALUE,...]"`` -> ``(learner name, keyword arguments)``.

    ``preset=P`` takes the class's ``presets[P]`` first (later items override it); every other
    item must be a declared hyperparameter, parsed and range-checked by its declaration.
    ``special(name, key, value)`` may claim an item first by returning the keywords it stands for.
    A bad specification raises a ``ValueError`` that names the problem.
    """
    name, _, settings = text.partition(":")
    if name not in LEARNERS:
        raise ValueError(f"unknown learner {name!r} in run {text!r}; choose from {', '.join(LEARNERS)}")
    cls, kwargs = LEARNERS[name], {}
    for item in filter(None, settings.split(",")):
        key, _, value = (part.strip() for part in item.partition("="))
        claimed = special(name, key, value) if special is not None else None
        if claimed is not None:
            kwargs.update(claimed)
        elif key == "preset":
            if value not in cls.presets:
                raise ValueError(f"{name} has no preset {value!r}; it has {', '.join(cls.presets) or 'none'}")
            kwargs = {**cls.presets[value], **kwargs}
        elif key in cls.defaults:
            kwargs[key] = cls.defaults[key].check(key, cls.defaults[key].parse(value))
        else:
            raise ValueError(f"{name} has no hyperparameter {key!r} (in run {text!r})")
    return name, kwargs


def make_learner(name: str, model: nn.Module, device: str | torch.device = "auto", **kwargs):
    """Build the registered learner ``name`` on ``model``.

    Raises:
        ValueError: unknown learner, an option the learner does not take, an invalid value, or a
            model the learner cannot train (``UnsupportedModelError``, e.g. AM-mem and BatchNorm).
    """
    if name not in LEARNERS:
        raise ValueError(f"unknown learner {name!r}; choose from {', '.join(learner_names())}")
    return LEARNERS[name](model, device=device, **kwargs)


@contextlib.contextmanager
def avalanche_warnings(quiet: bool):
    """Show each of Avalanche's warnings once (with ``quiet``: none, nor any DeprecationWarning).

    Avalanche 0.6's ``@deprecated`` calls ``warnings.simplefilter("once", DeprecationWarning)`` at
    every call, which overrides any filter set here, so ReplayPlugin's deprecated
    ``storage_policy.update`` printed its warning at every experience (146 times for one online
    Split-digits run). Filtering where the warning is shown is the one place that holds.
    """
    seen: set[tuple] = set()
    show = warnings.showwarning

    def filtered(message, category, filename, lineno, file=None, line=None):
        key = (category, str(message))
        from_avalanche = "avalanche" in str(filename) or "avalanche" in str(message).lower()
        if (quiet and (from_avalanche or issubclass(category, DeprecationWarning))) or (from_avalanche and key in seen):
            return
        seen.add(key)
        show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = filtered
        yield


# ------------------------------------------------------------------------------------ models, data
MODELS = ("mlp", "lenet5", "elman", "gru")
#: models that read each sample as a sequence (see :func:`as_sequences`)
RECURRENT_MODELS = ("elman", "gru")


def as_sequences(x: torch.Tensor) -> torch.Tensor:
    """Samples as sequences for a recurrent model: an image ``(N, 1, H, W)`` is read one row per time
    step ``(N, H, W)`` (row-sequential MNIST), a feature vector ``(N, F)`` as one step ``(N, 1, F)``."""
    if x.dim() == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() == 2:
        return x.unsqueeze(1)
    raise ValueError(f"cannot read samples of shape {tuple(x.shape[1:])} as sequences")


def build_model(name: str, sample_shape: tuple, hidden: list[int], n_classes: int,
                batchnorm: bool = False) -> nn.Module:
    """``"mlp"``: :func:`build_mlp`; ``"lenet5"``: :func:`build_lenet5` (28x28 images only);
    ``"elman"``/``"gru"``: :class:`amstream.models.ElmanRNN` / a GRU :class:`~amstream.models.RecurrentNet`
    of ``hidden[0]`` units over sequences ``(time, features)`` (:func:`as_sequences`)."""
    if name == "mlp":
        return build_mlp(sample_shape, hidden, n_classes, batchnorm)
    if name in RECURRENT_MODELS:
        if len(sample_shape) != 2:
            raise ValueError(f"{name} reads sequences (time, features), got samples of shape {sample_shape}")
        width = hidden[0] if hidden else 128
        if name == "elman":
            return ElmanRNN(sample_shape[1], width, n_classes)
        return RecurrentNet("gru", sample_shape[1], width, n_classes)
    if tuple(sample_shape) != (1, 28, 28):
        raise ValueError(f"lenet5 needs 28x28 grey images (mnist, fashion-mnist), got samples of shape {sample_shape}")
    return build_lenet5(n_classes)


def build_lenet5(n_classes: int = 10) -> nn.Sequential:
    """LeNet-5 for 28x28 images (LeCun et al., 1998), with ReLU and max pooling: conv 6@5x5 (padding 2),
    pool, conv 16@5x5, pool, then 400-120-84-n_classes."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, n_classes))


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


class CommaList(argparse.Action):
    """A comma-separated list option that may also be repeated: ``--learner a,b --learner c`` means
    ``a,b,c`` (a repeated option would otherwise replace the earlier value without a word)."""

    class Given(str):
        """A value the command line gave (the default is a plain ``str``): a repeat adds to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        previous = getattr(namespace, self.dest, None)
        joined = f"{previous},{values}" if isinstance(previous, CommaList.Given) else values
        setattr(namespace, self.dest, CommaList.Given(joined))


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


# ------------------------------------------------------------------------------ checkpoints
def checkpoint_path(path: str, learner: str) -> Path:
    p = Path(path)
    return p.with_name(f"{p.stem}-{learner}{p.suffix}")


def add_checkpoint_options(parser: argparse.ArgumentParser, written: str, resumed: str):
    """The ``checkpoints`` group shared by the scripts that stop and resume: ``--checkpoint``,
    ``--resume``, ``--allow-fresh`` (checked by :func:`check_checkpoint_options`). Returns the group
    for the script's own options."""
    c = parser.add_argument_group("checkpoints")
    c.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint file; one per learner, named PATH with the learner inserted before the "
                   f"suffix (ck.pt -> ck-am-adam.pt); written atomically {written}")
    c.add_argument("--resume", action="store_true", help=f"continue from the --checkpoint files {resumed}, "
                   "TensorBoard folders included; a missing file is an error (see --allow-fresh)")
    c.add_argument("--allow-fresh", action="store_true", help="with --resume: a learner whose checkpoint file "
                   "does not exist starts from scratch instead of stopping the run")
    return c


def check_checkpoint_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.resume and not args.checkpoint:
        parser.error("--resume needs --checkpoint PATH")
    if args.allow_fresh and not args.resume:
        parser.error("--allow-fresh only applies with --resume")


def checkpoint_extra(path: Path) -> dict | None:
    """The ``extra`` values a script saved with its checkpoint (None if unreadable)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["extra"]
    except Exception:  # noqa: BLE001 - load_checkpoint reports unreadable files
        return None


def check_checkpoint_config(path: Path, config: dict, extra: dict | None = None) -> None:
    """A checkpoint made with other settings (its ``extra["config"]``; ``run_dir`` aside) cannot be
    continued by this run: ValueError naming the settings that differ. ``extra``: the checkpoint's
    values when the caller has read them already."""
    extra = checkpoint_extra(path) if extra is None else extra
    saved = None if extra is None else extra.get("config", {})
    if saved is not None and {k: v for k, v in saved.items() if k != "run_dir"} != config:
        diff = {k: v for k, v in saved.items() if k != "run_dir" and config.get(k) != v} or saved
        raise ValueError(f"checkpoint {path} was made with other settings {diff}; this run has "
                         f"{ {k: config.get(k) for k in diff} }")


def check_resumable(args, learners: list[str]) -> None:
    """With --resume, every learner's checkpoint must exist unless --allow-fresh: a mistyped path
    must not silently start the run over."""
    if not args.resume:
        return
    missing = [str(checkpoint_path(args.checkpoint, n)) for n in learners
               if not checkpoint_path(args.checkpoint, n).is_file()]
    if missing and not args.allow_fresh:
        raise ValueError(f"--resume: no checkpoint at {', '.join(missing)}; check --checkpoint (the learner's name "
                         "is inserted before the suffix), or add --allow-fresh to start those learners from scratch")

"""Hyperparameters declared once per learner class, in the manner of ``torch.optim``'s ``defaults``.

A learner class lists its hyperparameters in a ``defaults`` mapping of name -> :class:`HParam`:
the default value, its type, the allowed range or choices and a one-paragraph meaning. Everything
else is derived from that one declaration:

- the constructor accepts exactly these keywords, checks every value and stores it as an
  attribute (:func:`resolve`); ``hparams()`` reads them back;
- ``inspect.signature(cls)`` and ``help(cls)`` show them (:func:`signature`, :func:`docstring`);
- the scripts' ``--options``, their ``--help`` and the range checks of their values
  (``scripts/_common.py``), the DQN agent's learning-rate setting (``learning_rate=True``) and the
  generated conformance tests.

Ranges are written as intervals, ``"(0, inf)"``, ``"[0, 1]"``, ``"[1, inf)"``: a round bracket
excludes its end, a square one includes it.
"""
from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["HParam", "resolve", "override", "signature", "docstring", "parse_interval"]


def parse_interval(text: str) -> tuple[float, float, bool, bool]:
    """``"(0, 1]"`` -> ``(0.0, 1.0, False, True)``: the bounds and whether each is included."""
    text = text.strip()
    if len(text) < 5 or text[0] not in "([" or text[-1] not in ")]" or "," not in text:
        raise ValueError(f"invalid interval {text!r}; write e.g. '(0, inf)' or '[0, 1]'")
    lo, hi = (float(part) for part in text[1:-1].split(","))
    return lo, hi, text[0] == "[", text[-1] == "]"


@dataclass(frozen=True)
class HParam:
    """One hyperparameter of a learner: default, type, allowed values and meaning.

    Attributes:
        default: the value used when the keyword is not given.
        help: what it does (one paragraph; shown by ``help()`` and the scripts' ``--help``).
        type: ``float``, ``int``, ``str`` or ``bool``; ``object`` for values no script can type
            (a dtype, a tuple of Adam betas, a dict of optimizer options).
        range: allowed interval of a number, e.g. ``"(0, inf)"``.
        choices: allowed values of a string option.
        optional: ``None`` is allowed (its meaning is in ``help``).
        per_layer: a number or a sequence of numbers (one per layer or code), each in ``range``.
        cli: offered as a command-line option by the scripts.
        learning_rate: a step size of a gradient method; what the DQN agent's ``learning_rate``
            and ``scripts/rl.py --learning-rate`` set.
        accepts: a predicate for other values taken as they are (an optimizer class or factory
            besides the named choices).
    """

    default: Any
    help: str
    type: type = float
    range: str | None = None
    choices: tuple | None = None
    optional: bool = False
    per_layer: bool = False
    cli: bool = True
    learning_rate: bool = False
    accepts: Callable[[Any], bool] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.range is not None:
            parse_interval(self.range)

    # ----------------------------------------------------------------------------------- checking
    def check(self, name: str, value: Any) -> Any:
        """``value`` converted to the declared type, or a ``ValueError`` naming ``name`` and the rule."""
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"invalid {name}: None (expected {self.describe()})")
        if self.accepts is not None and not isinstance(value, str) and self.accepts(value):
            return value
        if self.per_layer and isinstance(value, Sequence) and not isinstance(value, str):
            if not value:
                raise ValueError(f"invalid {name}: an empty sequence (expected {self.describe()})")
            return [self._check_one(name, v, whole=value) for v in value]
        return self._check_one(name, value)

    def _check_one(self, name: str, value: Any, whole: Any = None) -> Any:
        shown = repr(value if whole is None else whole)
        if self.type is object:
            return value
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"invalid {name}: {shown} (expected True or False)")
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise ValueError(f"invalid {name}: {shown} (expected {self.describe()})")
            if self.choices is not None and value not in self.choices:
                close = difflib.get_close_matches(value, [str(c) for c in self.choices], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"invalid {name}: {shown} (expected one of {', '.join(map(repr, self.choices))}){hint}")
            return value
        # numbers: bools are not numbers here, and an int option takes no fractions
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _is_number(value):
            raise ValueError(f"invalid {name}: {shown} (expected {self.describe()})")
        if self.type is int:
            if float(value) != int(value):
                raise ValueError(f"invalid {name}: {shown} (expected {self.describe()})")
            value = int(value)
        else:
            value = float(value)
        if self.range is not None and not self.in_range(value):
            raise ValueError(f"invalid {name}: {shown} (expected {self.describe()})")
        return value

    def in_range(self, value: float) -> bool:
        lo, hi, lo_in, hi_in = parse_interval(self.range or "[-inf, inf]")
        return (value > lo or (lo_in and value == lo)) and (value < hi or (hi_in and value == hi))

    def describe(self) -> str:
        """``"float in (0, inf)"``, ``"one of 'mean', 'sum'"``, ``"int >= 1 or None"``..."""
        if self.choices is not None:
            text = "one of " + ", ".join(map(repr, self.choices))
        elif self.type in (int, float):
            text = f"{self.type.__name__}{_range_text(self.range)}"
            if self.per_layer:
                text += ", or one per layer"
        elif self.type is bool:
            text = "True or False"
        elif self.type is object:
            text = "see the description"
        else:
            text = self.type.__name__
        if self.accepts is not None:
            text += ", or see the description"
        return text + (" or None" if self.optional else "")

    # -------------------------------------------------------------------------------- the CLI
    def parse(self, text: str) -> Any:
        """A command-line string as a value of this parameter (``"none"`` for an optional one)."""
        if self.optional and text.strip().lower() == "none":
            return None
        if self.type is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {text!r}")
        if self.type is int:
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"expected an integer, got {text!r}") from None
        if self.type is float:
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"expected a number, got {text!r}") from None
        return text


def _is_number(value: float) -> bool:
    return not math.isnan(value)


def _range_text(range_: str | None) -> str:
    if range_ is None:
        return ""
    lo, hi, lo_in, hi_in = parse_interval(range_)
    if math.isinf(hi):
        return f" {'>=' if lo_in else '>'} {lo:g}"
    if math.isinf(lo):
        return f" {'<=' if hi_in else '<'} {hi:g}"
    return f" in {range_}"


def override(defaults: Mapping[str, HParam], **new_defaults: Any) -> dict[str, HParam]:
    """A copy of ``defaults`` with other default values (a subclass that tunes its parent's)."""
    unknown = sorted(set(new_defaults) - set(defaults))
    if unknown:
        raise KeyError(f"no such hyperparameters to override: {unknown}")
    return {name: replace(h, default=new_defaults[name]) if name in new_defaults else h
            for name, h in defaults.items()}


def resolve(owner: str, defaults: Mapping[str, HParam], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared hyperparameter's value: ``given`` where set, else its default; each checked.

    Raises:
        ValueError: an undeclared keyword (with the closest declared names) or an invalid value.
    """
    unknown = [k for k in given if k not in defaults]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(defaults), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{owner} got unknown option(s) {', '.join(hints)}; its hyperparameters are "
                         f"{', '.join(defaults)}")
    return {name: h.check(name, given.get(name, h.default)) for name, h in defaults.items()}


def signature(common: Sequence[inspect.Parameter], defaults: Mapping[str, HParam]) -> inspect.Signature:
    """The constructor signature: the ``common`` parameters, then one keyword per hyperparameter."""
    params = list(common) + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=h.default)
                             for name, h in defaults.items()]
    return inspect.Signature(params)


def docstring(defaults: Mapping[str, HParam]) -> str:
    """The generated "Hyperparameters" section of a learner's docstring."""
    lines = ["Hyperparameters (declared in ``defaults``; every one is a keyword of the constructor):", ""]
    for name, h in defaults.items():
        lines.append(f"    {name} ({h.describe()}; default {h.default!r}): {h.help}")
    return "\n".join(lines)

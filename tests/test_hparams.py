"""Hyperparameter declarations: checks, messages, signatures and docstrings derived from them."""
from __future__ import annotations

import inspect

import pytest
import torch

import amstream
from amstream.hparams import HParam, override, parse_interval, resolve


def test_intervals_include_or_exclude_their_ends():
    assert parse_interval("(0, inf)") == (0.0, float("inf"), False, False)
    assert parse_interval("[0, 1]") == (0.0, 1.0, True, True)
    h = HParam(0.5, "a fraction", range="(0, 1]")
    assert h.in_range(1.0) and not h.in_range(0.0) and h.in_range(1e-9)
    with pytest.raises(ValueError, match="invalid interval"):
        HParam(1.0, "bad", range="0..1")


@pytest.mark.parametrize("h, value, message", [
    (HParam(1.0, "rate", range="(0, inf)"), 0.0, r"invalid rate: 0.0 \(expected float > 0\)"),
    (HParam(1.0, "rate", range="(0, inf)"), float("nan"), "expected float > 0"),
    (HParam(1.0, "rate", range="(0, inf)"), "1", "expected float > 0"),
    (HParam(1.0, "rate", range="(0, inf)"), True, "expected float > 0"),
    (HParam(3, "steps", int, "[1, inf)"), 2.5, "expected int >= 1"),
    (HParam("a", "mode", str, choices=("mean", "sum")), "mena", "did you mean 'mean'"),
    (HParam(0.1, "lr", range="(0, inf)", per_layer=True), [0.1, -1.0], r"\[0.1, -1.0\]"),
    (HParam(True, "flag", bool), 1, "True or False"),
    (HParam(1.0, "rate", range="(0, inf)"), None, "invalid rate: None"),
])
def test_invalid_values_are_refused_with_the_rule(h, value, message):
    name = h.help
    with pytest.raises(ValueError, match=message):
        h.check(name, value)


def test_valid_values_are_normalized():
    assert HParam(3, "steps", int, "[1, inf)").check("steps", 4.0) == 4
    assert HParam(1.0, "rate", range="(0, inf)").check("rate", 2) == 2.0
    assert HParam(0.1, "lr", range="(0, inf)", per_layer=True).check("lr", (0.1, 0.2)) == [0.1, 0.2]
    assert HParam(None, "cap", range="(0, inf)", optional=True).check("cap", None) is None
    assert HParam("adam", "opt", str, choices=("adam",), accepts=callable).check("opt", torch.optim.SGD) is torch.optim.SGD


def test_command_line_text_is_parsed_by_type():
    assert HParam(1, "n", int).parse("12") == 12
    assert HParam(True, "flag", bool).parse("false") is False
    assert HParam(None, "cap", optional=True).parse("None") is None
    with pytest.raises(ValueError, match="expected an integer"):
        HParam(1, "n", int).parse("1.5")


def test_resolve_fills_defaults_and_names_unknown_keywords():
    defaults = {"mu": HParam(0.1, "mu", range="(0, inf)"), "steps": HParam(5, "steps", int, "[0, inf)")}
    assert resolve("L", defaults, {"steps": 2}) == {"mu": 0.1, "steps": 2}
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'mus' \(did you mean 'mu'\?\)"):
        resolve("L", defaults, {"mus": 1.0})
    tuned = override(defaults, mu=0.3)
    assert tuned["mu"].default == 0.3 and defaults["mu"].default == 0.1
    with pytest.raises(KeyError):
        override(defaults, nu=1.0)


@pytest.mark.parametrize("cls", list(amstream.LEARNERS.values()))
def test_signature_and_docstring_come_from_the_declaration(cls):
    params = inspect.signature(cls).parameters
    for name, h in cls.defaults.items():
        assert params[name].default == h.default or params[name].default is h.default
        assert f"    {name} (" in cls.__doc__
    assert "model" in params and "device" in params


def test_a_subclass_declares_its_own_defaults():
    assert amstream.AMMem.defaults["mu"].default == 0.3 and amstream.AMAdam.defaults["mu"].default == 0.003
    assert amstream.AMMem(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)),
                          device="cpu").mu == 0.3


def test_a_hyperparameter_may_not_shadow_the_learners_own_attributes():
    with pytest.raises(TypeError, match=r"reserved names \['device'\]"):
        type("Shadowing", (amstream.Backprop,), {"defaults": {**amstream.Backprop.defaults,
                                                               "device": HParam("cpu", "where", str)}})

"""Command options from one dataclass: flags, keywords and pipeline args with the same names."""

import argparse
from dataclasses import dataclass, field

import pytest

from engine.config.errors import ConfigError
from engine.options import (
    add_options,
    field_docs,
    options_from_dict,
    options_from_namespace,
    to_argv,
)
from engine.upcycle.commands import ScaleOutOptions, ScaleUpOptions, VocabOptions


@dataclass(frozen=True, kw_only=True, slots=True)
class Base:
    tp: int | None = None
    """Target tensor-parallel size."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Example(Base):
    num_experts: int
    """Experts."""
    noise: float = 0.0
    """Relative std."""
    method: str = field(default="a", metadata={"choices": ("a", "b")})
    """A or b."""
    pre_softmax: bool = False
    """Softmax first."""


def parse(argv):
    p = argparse.ArgumentParser()
    add_options(p, Example)
    return options_from_namespace(Example, p.parse_args(argv))


def test_flags_are_the_field_names_and_round_trip():
    opts = parse(["--num-experts", "8", "--noise", "0.5", "--method", "b", "--pre-softmax",
                  "--tp", "2"])
    assert opts == Example(num_experts=8, noise=0.5, method="b", pre_softmax=True, tp=2)
    assert parse(to_argv(opts)) == opts
    assert to_argv(Example(num_experts=4)) == ["--num-experts", "4"]  # defaults stay out
    with pytest.raises(SystemExit):
        parse(["--noise", "0.5"])  # num_experts is required


def test_docstrings_are_the_help_including_the_bases():
    assert field_docs(Example) == {"tp": "Target tensor-parallel size.", "num_experts": "Experts.",
                                   "noise": "Relative std.", "method": "A or b.",
                                   "pre_softmax": "Softmax first."}
    for options in (ScaleUpOptions, ScaleOutOptions, VocabOptions):  # every option documented
        names = set(options.__dataclass_fields__)
        assert names == set(field_docs(options)) and all(field_docs(options).values())


@pytest.mark.parametrize("data, message", [
    ({"num_experts": 4, "nosie": 0.1}, "x: unknown option 'nosie' (did you mean 'noise'?)"),
    ({"num_experts": "four"}, "x: num_experts: expected int, got 'four'"),
    ({"num_experts": True}, "x: num_experts: expected int, got True"),
    ({"num_experts": 4, "method": "c"}, "x: method: 'c' is not one of a, b"),
    ({}, "x: option 'num_experts' is required"),
])
def test_pipeline_args_are_checked_in_one_line(data, message):
    with pytest.raises(ConfigError) as err:
        options_from_dict(Example, data, "x")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_yaml_numbers_become_floats():
    opts = options_from_dict(Example, {"num_experts": 2, "noise": "1e-3", "tp": None}, "x")
    assert opts.noise == 1e-3 and opts.tp is None
    assert options_from_dict(Example, {"num_experts": 2, "noise": 1}, "x").noise == 1.0

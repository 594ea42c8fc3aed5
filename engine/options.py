"""Command options as a dataclass: one definition gives the command-line flags, the keyword
arguments of the Python function and the keys of a pipeline stage's `args`.

A field `hidden_size: int | None = None` with a docstring under it becomes the flag
`--hidden-size` (typed by the annotation, the docstring its help, `choices` from the field's
metadata), the keyword `hidden_size=` and the pipeline key `hidden_size:`. `options_from_dict`
checks a mapping against the fields (unknown keys named with the nearest one, values typed) with
one line per error. Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping

from engine.config.errors import ConfigError


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: the docstring written under it} of a dataclass and its dataclass bases, read
    from their source."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and \
                    isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and \
                    isinstance(nxt.value.value, str):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base(annotation) -> tuple[type, bool]:
    """(the type, whether None is allowed) of `X` or `X | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the options dataclass `cls`."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    own = cls.__dict__.get("__annotations__", {})
    ordered = sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)  # own first
    for f in ordered:
        kind, _ = _base(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kwargs: dict = {"help": docs.get(f.name, ""), "dest": f.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = f.name.upper() if "choices" not in f.metadata else None
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            if f.default not in (None, False) and kind is not bool:
                kwargs["help"] += f" (default: {f.default})"
        parser.add_argument(flag(f.name), **kwargs)


def options_from_namespace(cls: type, namespace: argparse.Namespace):
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


def _coerce(where: str, name: str, annotation, value):
    kind, optional = _base(annotation)
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    expected = kind.__name__ + (" or null" if optional else "")
    raise ConfigError(f"{where}: {name}: expected {expected}, got {value!r}")


def check_known(data: Mapping, names, where: str) -> None:
    """One-line ConfigError for the first key of `data` not in `names`, with the nearest."""
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), list(names), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown option '{key}'{hint}; options: "
                              f"{', '.join(names)}")


def options_from_dict(cls: type, data: Mapping, where: str):
    """`cls(**data)` with every key a field (else the nearest field named), every required field
    present and every value of its field's type; one-line ConfigError otherwise."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_known(data, list(fields), where)
    values = {}
    for name, f in fields.items():
        if name in data:
            value = _coerce(where, name, hints[name], data[name])
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{where}: {name}: {value!r} is not one of "
                                  f"{', '.join(map(str, choices))}")
            values[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: option '{name}' is required")
    return cls(**values)


def to_argv(options) -> list[str]:
    """The flags that give `options` back (non-default fields only)."""
    argv = []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if value == f.default and f.default is not dataclasses.MISSING:
            continue
        if isinstance(value, bool):
            argv.append(flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif value is not None:
            argv += [flag(f.name), str(value)]
    return argv

"""YAML recipes and dotted overrides into the typed `Recipe`, and back.

Owns reading/writing recipe files, `key=value` overrides, type coercion by the fields' annotations
and the unknown-key suggestions. Imports only the config package, `yaml`, the standard library and
engine.files (atomic writes).

Coercion is strict and by annotation: int fields take ints only (not bools, not 2.0); float fields
take ints, floats and numeric strings, because PyYAML follows YAML 1.1, where `3e-4` (no dot) is a
*string*; bool fields take true/false only; `X | None` takes null; `tuple[Entry, ...]` takes a list
of mappings; `data.valid` takes a mapping `name: path`. A section written as null is empty.
"""

import copy
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from engine.config.errors import ConfigError
from engine.config.recipe import Recipe

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _Context:
    """Where values came from: the source file, and the overrides that replaced some keys."""

    def __init__(self, source: str):
        self.source = source
        self.origins: dict[str, str] = {}  # dotted key -> the override text that set it

    def fail(self, key: str, message: str) -> ConfigError:
        """A one-line error for `key`: the source first, the override that set it last."""
        override = None
        for prefix, text in self.origins.items():
            if key == prefix or key.startswith((prefix + ".", prefix + "[")):
                override = text
        suffix = f"; set by override {override!r}" if override is not None else ""
        return ConfigError(f"{self.source}: {message}{suffix}")


# --- the schema: field types by dotted path ----------------------------------------------------

@functools.cache
def _hints(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _optional_inner(tp: typing.Any) -> typing.Any | None:
    """`X` for `X | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _entry_type(tp: typing.Any) -> type | None:
    """The dataclass `E` of a `tuple[E, ...]` annotation, else None."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _scalar_tuple(tp: typing.Any) -> type | None:
    """The scalar `X` of a `tuple[X, ...]` annotation (str, int, float), else None."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (str, int, float):
            return args[0]
    return None


def _schema_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted path of the schema, sections included; list entries appear as `key[].field`."""
    paths = []
    for name, tp in _hints(cls).items():
        path = f"{prefix}{name}"
        paths.append(path)
        tp = _optional_inner(tp) or tp
        if dataclasses.is_dataclass(tp):
            paths += _schema_paths(tp, path + ".")
        elif (entry := _entry_type(tp)) is not None:
            paths += _schema_paths(entry, path + "[].")
    return paths


def _last(path: str) -> str:
    return re.split(r"[.\[\]]+", path.strip("]"))[-1]


# Names other codebases use for our keys (megatron arguments, HF config.json): leaf -> our leaf.
_ALIASES = {
    "tensor_model_parallel_size": "tp", "tensor_parallel_size": "tp", "tensor_parallel": "tp",
    "pipeline_model_parallel_size": "pp", "pipeline_parallel_size": "pp", "pipeline_parallel": "pp",
    "virtual_pipeline_model_parallel_size": "vpp", "expert_model_parallel_size": "ep",
    "context_parallel_size": "cp", "data_parallel_size": "dp",
    "use_distributed_optimizer": "distributed_optimizer", "num_hidden_layers": "num_layers",
    "intermediate_size": "ffn_hidden_size", "num_key_value_heads": "num_query_groups",
    "head_dim": "kv_channels", "rope_theta": "rotary_base", "rope_scaling": "rotary_scaling",
    "rms_norm_eps": "layernorm_epsilon", "norm_epsilon": "layernorm_epsilon",
    "attention_bias": "add_qkv_bias", "tie_word_embeddings": "share_embeddings_and_output_weights",
    "initializer_range": "init_method_std", "train_iters": "steps", "iters": "steps",
    "iterations": "steps",
    "lr_warmup_iters": "warmup_steps", "lr_decay_iters": "decay_steps",
    "lr_decay_style": "style", "seq_len": "seq_length", "max_seq_len": "seq_length",
    "bf16": "precision", "fp16": "precision", "dtype": "precision",
}


def suggest_key(key: str) -> str | None:
    """The valid key closest to an unknown `key`. Its last component is matched against every
    key's last component: exactly within its own section, as a known alias, closely within its
    own section (`train.batch_size` finds `train.micro_batch_size`, not `eval.batch_size`),
    exactly anywhere (`train.lr` finds `optim.lr`), closely anywhere; and only then the whole
    dotted path."""
    paths = _schema_paths(Recipe)
    if "." in key:  # a nested key is not a misspelt top-level section
        paths = [p for p in paths if "." in p]
    leaf = _last(key)
    section = key.split(".")[0] + "."
    same_section = [p for p in paths if p.startswith(section)]

    def close(pool: list[str]) -> list[str]:
        return difflib.get_close_matches(leaf, sorted({_last(p) for p in pool}), n=1)

    near = ([leaf] if any(_last(p) == leaf for p in same_section) else []) or (
        [_ALIASES[leaf]] if leaf in _ALIASES else []) or close(same_section) or (
        [leaf] if any(_last(p) == leaf for p in paths) else []) or close(paths)
    if near:
        pool = [p for p in same_section if _last(p) == near[0]] or paths
        candidates = [p for p in pool if _last(p) == near[0]]
        return max(candidates, key=lambda p: difflib.SequenceMatcher(None, key, p).ratio())
    near = difflib.get_close_matches(key, paths, n=1)
    return near[0] if near else None


def _unknown(ctx: _Context, key: str, origin: str | None = None) -> ConfigError:
    hint = suggest_key(key)
    did_you_mean = f" (did you mean {hint!r}?)" if hint else ""
    return ctx.fail(origin or key, f"unknown config key {key!r}{did_you_mean}")


# --- building dataclasses from plain data --------------------------------------------------------

def _type_name(tp: typing.Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} or null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if _entry_type(tp) is not None:
        return "a list of mappings"
    if (scalar := _scalar_tuple(tp)) is not None:
        return f"a list of {scalar.__name__}"
    return getattr(tp, "__name__", str(tp))


def _wrong_type(ctx: _Context, key: str, tp: typing.Any, value: object) -> ConfigError:
    found = f"{value!r} ({type(value).__name__})"
    return ctx.fail(key, f"{key}: expected {_type_name(tp)}, got {found}")


def _coerce(ctx: _Context, key: str, tp: typing.Any, value: object, meta: Mapping,
            shown: typing.Any = None) -> object:
    """`value` as the annotation `tp` asks, or a ConfigError naming key, expectation and value;
    `shown` is the annotation the error names (`int | None` while `tp` is its `int`)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _coerce(ctx, key, inner, value, meta, shown=tp)
    shown = tp if shown is None else shown
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise _wrong_type(ctx, key, shown, value)
        return _build(ctx, tp, value, key)
    if meta.get("yaml") == "name_to_path":  # data.valid: {name: path} -> (ValidSet, ...)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ctx.fail(key, f"{key}: expected a mapping name: path, got {value!r} "
                                f"({type(value).__name__})")
        entry = _entry_type(tp)
        return tuple(entry(name=str(n), path=_coerce(ctx, f"{key}.{n}", str, p, {}))
                     for n, p in value.items())
    if (entry := _entry_type(tp) or _scalar_tuple(tp)) is not None:
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(ctx, key, shown, value)
        return tuple(_coerce(ctx, f"{key}[{i}]", entry, v, {}) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, float) and not math.isfinite(value):  # YAML .nan / .inf
            raise ctx.fail(key, f"{key}: expected a finite number, got {value}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 3e-4 as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")
    raise _wrong_type(ctx, key, shown, value)


def _build(ctx: _Context, cls: type, data: Mapping, prefix: str = "") -> object:
    """`cls(**data)` with every key known, every required key present and every value coerced;
    errors from the dataclass's own `__post_init__` get the source prefixed."""
    hints = _hints(cls)
    for name in data:
        if str(name) not in hints:
            raise _unknown(ctx, f"{prefix}.{name}" if prefix else str(name))
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(ctx, key, hints[f.name], data[f.name], f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ctx.fail(key, f"{key} is required")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        match = re.match(r"[A-Za-z_][\w.\[\]]*", str(e))
        raise ctx.fail(match.group(0) if match else prefix, str(e)) from None


# --- overrides -----------------------------------------------------------------------------------

def _parse_override(text: str) -> tuple[str, object]:
    """`a.b.c=value` -> ("a.b.c", value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem})") from None
    return key, value


def _apply_override(ctx: _Context, data: dict, text: str) -> None:
    """Set `a.b.c=value` in the nested dict `data`, the value parsed as YAML."""
    key, value = _parse_override(text)
    _set(ctx, data, key, value, text)


def _flatten(values: Mapping, cls: typing.Any = Recipe, prefix: str = "") -> list[tuple]:
    """{"train": {"steps": 5}, "optim.lr": 1e-3} -> [("train.steps", 5), ("optim.lr", 1e-3)]:
    a mapping given for a section sets its keys one by one instead of replacing the section."""
    out = []
    for raw, value in values.items():
        key = f"{prefix}{raw}"
        node: typing.Any = cls
        for part in str(raw).split("."):
            hint = _hints(node).get(part) if dataclasses.is_dataclass(node) else None
            node = (_optional_inner(hint) or hint) if hint is not None else None
        if isinstance(value, Mapping) and dataclasses.is_dataclass(node):
            out += _flatten(value, node, key + ".")
        else:
            out.append((key, value))
    return out


def _set(ctx: _Context, data: dict, key: str, value: object, text: str) -> None:
    ctx.origins[key] = text
    cls: typing.Any = Recipe
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        hints = _hints(cls)
        if part not in hints:
            raise _unknown(ctx, here, origin=key)
        if depth == len(parts) - 1:
            node[part] = value
            return
        cls = _optional_inner(hints[part]) or hints[part]
        if not dataclasses.is_dataclass(cls):
            raise ctx.fail(key, f"{here} is not a section: set it whole ({here}=...)")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            found = f"{child!r} ({type(child).__name__})"
            raise ctx.fail(key, f"{here}: expected a mapping, got {found}")
        node = child


# --- public API ----------------------------------------------------------------------------------

def read_recipe_yaml(path: Path) -> dict:
    """A recipe file as plain data, or one ConfigError line naming the file and the problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"{path}: cannot read recipe ({reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _from_dict(ctx: _Context, data: Mapping) -> Recipe:
    if not isinstance(data, Mapping):
        found = type(data).__name__
        raise ConfigError(f"{ctx.source}: expected a mapping of sections, got {found}")
    return _build(ctx, Recipe, data)


def _merge(base: dict, extra: Mapping) -> dict:
    """Recursive dict merge: sections merge key by key, any other value is replaced."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe(path: str | Path | Sequence[str | Path], overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe (or several, merged in order: later files win key by key, e.g. a base
    recipe plus the fragment `engine convert` writes), apply dotted `key=value` overrides in
    order, build the dataclasses."""
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    data: dict = {}
    for p in paths:
        data = _merge(data, read_recipe_yaml(p))
    ctx = _Context(" + ".join(str(p) for p in paths))
    for text in overrides:
        _apply_override(ctx, data, text)
    return _from_dict(ctx, data)


def apply_overrides(data: Mapping, overrides: Sequence[str] | Mapping,
                    source: str = "<overrides>") -> dict:
    """A copy of nested recipe data with overrides applied, keys checked against the schema:
    `key=value` strings (values parsed as YAML), or a mapping of dotted keys to values in which
    a mapping given for a section sets that section's keys one by one. Build it with
    `recipe_from_dict`."""
    data = copy.deepcopy(dict(data))
    ctx = _Context(source)
    if isinstance(overrides, Mapping):
        for key, value in _flatten(overrides):
            _set(ctx, data, key, value, f"{key}: {value!r}")
    else:
        for text in overrides:
            _apply_override(ctx, data, text)
    return data


def recipe_from_dict(d: Mapping, source: str = "<dict>") -> Recipe:
    """Build a Recipe from nested plain data (a parsed YAML file, a checkpoint's stored recipe)."""
    return _from_dict(_Context(source), d)


def _to_plain(value: object, meta: Mapping) -> object:
    if meta.get("yaml") == "name_to_path":
        return {v.name: v.path for v in value}
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name), f.metadata)
                for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(v, {}) for v in value]
    return value


def recipe_to_dict(recipe: Recipe) -> dict:
    """Every field as plain YAML-able data; `recipe_from_dict(recipe_to_dict(r)) == r`."""
    return _to_plain(recipe, {})


def recipe_to_yaml(recipe: Recipe) -> str:
    """The recipe as YAML text, every field written: the one serialization of a recipe (files,
    checkpoints, pipeline stages), read back by `recipe_from_dict(yaml.safe_load(text))`."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=False)


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the recipe as YAML to `path` atomically (engine.files.write_atomic)."""
    from engine.files import write_atomic

    write_atomic(path, recipe_to_yaml(recipe))

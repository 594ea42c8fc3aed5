"""Pipeline stage kind `sweep`: one train stage per value of one recipe key, at equal tokens.

```yaml
  - name: ratios
    kind: sweep
    source: pretrain                       # like a train stage: source, init, overrides, nproc
    overrides: {data.blend: [...], data.replay: {blend: [...], fraction: 0.25}}
    sweep: {key: data.replay.fraction, values: [0.125, 0.25, 1/3, 0.5, 2/3]}
```

Each value is a *member*: a train stage named `<sweep>/<leaf>-<value>` (e.g.
`ratios/fraction-0.125`) whose overrides are the sweep's plus `{key: value}`; it lives in
`<out>/<sweep>/<leaf>-<value>/` with its own recipe.yaml, checkpoints/ and tensorboard/, so
each member directory is a run for `engine analyze` (engine.analyze.runs). Locally the members
train one after another (a done member is skipped, an interrupted one resumes); `engine
pipeline submit` makes each member an independent Slurm job, all waiting only for the sweep's
source. A value written as a fraction (`1/3`) is that number.

A sweep compares its members at equal tokens, so the key may not be one that changes the tokens
(train.steps, the batch, the sequence length); and it is made for the critical-mixture-ratio
fit (Gu et al. 2024, engine.analyze.cmr: `engine analyze cmr <out>/<sweep>/*`), which needs
each validation curve from the loss before the stage (step 0, evaluated with
train.eval_interval_early) at >= MIN_EVALUATIONS points: a member recipe with fewer is refused.
A sweep cannot be another stage's source (it has no single output).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from fractions import Fraction

from engine.config.errors import ConfigError

MIN_EVALUATIONS = 50
"""Evaluated steps (step 0 included) each member must log: enough points for the CMR fit."""

TOKEN_KEYS = ("train.steps", "train.global_batch_size", "train.micro_batch_size",
              "data.seq_length")
"""Keys a sweep may not vary: they change the tokens a member trains on."""


def value_of(raw: object) -> object:
    """A sweep value as the recipe takes it: `a/b` strings become the number a/b."""
    if isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*/\s*\d+\s*", raw):
        try:
            return float(Fraction(raw.replace(" ", "")))
        except ZeroDivisionError:
            raise ConfigError(f"sweep value {raw!r}: division by zero") from None
    return raw


def member_label(key: str, raw: object) -> str:
    """The member's directory name: the key's last part and the value as written."""
    text = re.sub(r"[^A-Za-z0-9.+-]+", "_", str(raw)).strip("_") or "value"
    return f"{key.rsplit('.', 1)[-1]}-{text}"


def check_sweep(stage, where: str) -> None:
    """A sweep stage's own fields (the recipe-level checks come with members' recipes)."""
    spec = stage.sweep
    if stage.kind != "sweep":
        if spec:
            raise ConfigError(f"{where}.sweep: only a sweep stage has one (kind: sweep)")
        return
    if not isinstance(spec, Mapping) or set(spec) != {"key", "values"}:
        raise ConfigError(f"{where}.sweep: expected {{key: a.recipe.key, values: [...]}}, "
                          f"got {spec!r}")
    key, values = spec["key"], spec["values"]
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}.sweep.key: expected a dotted recipe key, got {key!r}")
    if key in TOKEN_KEYS:
        raise ConfigError(f"{where}.sweep.key: {key} changes the tokens each member trains on; "
                          f"a sweep compares at equal tokens (not one of {', '.join(TOKEN_KEYS)})")
    if not isinstance(values, list) or len(values) < 2:
        raise ConfigError(f"{where}.sweep.values: expected a list of at least two values, got "
                          f"{values!r}")
    labels = [member_label(key, v) for v in values]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}.sweep.values: expected distinct values, got {values!r}")
    if key in stage.overrides:
        raise ConfigError(f"{where}: {key} is both swept and in overrides")
    if stage.baseline_for is not None:
        raise ConfigError(f"{where}.baseline_for: a sweep is compared within itself "
                          "(engine analyze cmr), not as a baseline")


def members(stage) -> list:
    """The sweep's members as train stages (module docstring)."""
    key = stage.sweep["key"]
    return [dataclasses.replace(stage, name=f"{stage.name}/{member_label(key, raw)}",
                                kind="train", sweep={},
                                overrides={**stage.overrides, key: value_of(raw)})
            for raw in stage.sweep["values"]]


def member(pipe, name: str):
    """The stage or sweep member `name` (`<sweep>/<label>`) of `pipe`."""
    head, sep, _ = name.partition("/")
    if not sep:
        return pipe.stage(name)
    for m in members(pipe.stage(head)) if pipe.stage(head).kind == "sweep" else []:
        if m.name == name:
            return m
    raise ConfigError(f"pipeline {pipe.name}: no sweep member {name!r} (members: "
                      f"{', '.join(m.name for m in _all_members(pipe)) or 'none'})")


def _all_members(pipe) -> list:
    return [m for s in pipe.stages if s.kind == "sweep" for m in members(s)]


def evaluations(train) -> int:
    """How many steps a recipe's train section evaluates (engine.train.loop's rule: step 0
    with eval_interval_early, then every eval_interval_early steps up to eval_early_steps,
    every eval_interval, and the last step)."""
    steps, every = train.steps, train.eval_interval
    early, early_steps = train.eval_interval_early, train.eval_early_steps
    due = {steps} if (every or early) else set()
    if early:
        due |= set(range(0, min(early_steps, steps) + 1, early))
    if every:
        due |= set(range(every, steps + 1, every))
    return len(due)


def check_member_recipe(recipe, where: str) -> None:
    """A member's recipe evaluates from step 0 at >= MIN_EVALUATIONS steps (module docstring)."""
    t = recipe.train
    if not t.eval_interval_early or not recipe.data.valid:
        raise ConfigError(f"{where}: a sweep member needs validation sets (data.valid) and the "
                          "loss before the stage: set train.eval_interval_early and "
                          "train.eval_early_steps (step 0 is then evaluated)")
    n = evaluations(t)
    if n < MIN_EVALUATIONS:
        raise ConfigError(f"{where}: evaluates at {n} steps (train.steps={t.steps}, "
                          f"eval_interval={t.eval_interval}, eval_interval_early="
                          f"{t.eval_interval_early}, eval_early_steps={t.eval_early_steps}); "
                          f"the CMR fit needs >= {MIN_EVALUATIONS}: evaluate more often")

"""The pipeline file: an ordered list of stages, each training or transforming a model.

```yaml
name: efficientscale-tiny
out: runs/efficientscale-tiny        # one directory per stage under it
recipe: configs/tiny-cpu.yaml        # every train stage starts from this recipe ...
overrides: {parallel.tp: 1}          # ... with these dotted overrides
nproc: 1                             # processes per train stage (torchrun), unless the stage says
stages:
  - {name: pretrain, kind: train, overrides: {train.steps: 300},
     sbatch: [--nodes=2]}                                       # engine pipeline submit: 2 nodes
  - {name: grow, kind: scale_up, source: pretrain, args: {hidden_size: 256, num_layers: 4}}
  - {name: cpt, kind: train, source: grow}                      # weights of `grow`
  - {name: cpt_random, kind: train, source: grow, init: random, baseline_for: cpt}
  - {name: long, kind: train, source: cpt, keep_batch_tokens: true,   # 4x the sequence,
     overrides: {data.seq_length: 1024, model.rotary_base: 500000}}   # 1/4 the samples
```

A train stage with a `source` takes the source's model and tokenizer (its checkpoint's `model`
and `tokenizer` sections: a model's vocabulary is its tokenizer's, which a `vocab` stage changes)
and, unless `init: random`, its weights (`checkpoint.pretrained`); a train stage without one
starts from the recipe's checkpoint.pretrained (e.g. an imported model; null = random init).
`baseline_for: S` marks a stage as a comparison for stage S (same tokens); the report puts them
side by side. The `args` of the
other stages are their commands' options by field name (`engine upcycle scale-up --hidden-size`
is `hidden_size`, `engine upcycle vocab --tokenizer` is `tokenizer`; engine.upcycle.commands,
engine.convert.exporter/verify), checked on load.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.config.errors import ConfigError
from engine.options import check_known, options_from_dict
from engine.pipeline.sweep import check_sweep

KINDS = ("train", "scale_up", "scale_out", "vocab", "export", "sweep")
TRAINING = ("train", "sweep")
"""Kinds that train: a sweep is one train stage per value (engine.pipeline.sweep)."""
INITS = ("pretrained", "random")
_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Stage:
    name: str
    """Directory name of the stage's outputs under the pipeline's `out`; letters, digits, -, _."""
    kind: str
    """train | scale_up | scale_out | vocab | export | sweep."""
    source: str | None = None
    """The earlier stage whose model this stage starts from (required except for a first train)."""
    init: str = "pretrained"
    """train stages with a source: `pretrained` (its weights) or `random` (its shape only)."""
    overrides: Mapping = field(default_factory=dict)
    """train: dotted recipe overrides on top of the pipeline's, e.g. {train.steps: 200}."""
    args: Mapping = field(default_factory=dict)
    """scale_up / scale_out / vocab / export: the command's options by name, e.g.
    {hidden_size: 256}."""
    nproc: int | None = None
    """train: processes (torchrun --nproc-per-node); default the pipeline's `nproc`."""
    baseline_for: str | None = None
    """Report this train stage as a baseline of that stage (trained on the same tokens)."""
    keep_batch_tokens: bool = False
    """train: a sequence-length stage keeps the tokens per optimizer step of the pipeline's
    recipe: train.global_batch_size becomes its global_batch_size x seq_length divided by this
    stage's data.seq_length (e.g. 64 x 256 -> 16 x 1024, as Llama 3's long-context stages
    hold the batch in tokens). The stage must not set train.global_batch_size itself."""
    sweep: Mapping = field(default_factory=dict)
    """sweep: {key: a dotted recipe key, values: [...]}, one train stage per value
    (engine.pipeline.sweep)."""
    best_of: tuple = ()
    """train: earlier train stages; this stage repeats whichever ended with the lowest validation
    loss (engine.pipeline.select): its source, init and overrides, then this stage's overrides
    on top (e.g. {train.seed: 2} for another seed of the best learning rate)."""
    lr_from: tuple = ()
    """train: earlier train stages; this stage takes optim.lr of whichever ended with the lowest
    validation loss (e.g. a grown model trained at the LR tuned for its shape from scratch)."""
    sbatch: tuple = ()
    """`engine pipeline submit`: sbatch options of this stage's job, after the pipeline's
    --sbatch-arg (a later option wins), e.g. [--nodes=2] for a train stage on two nodes while
    a scale_up stage runs on one."""

    @property
    def waits_for(self) -> tuple[str, ...]:
        """The stages that must be done before this one runs: its source and the stages its
        best_of / lr_from choose from."""
        return (*([self.source] if self.source else []), *self.best_of, *self.lr_from)


@dataclass(frozen=True)
class Pipeline:
    name: str
    out: str
    """Root of the stage directories (relative paths are relative to the current directory)."""
    recipe: str
    """The base recipe of every train stage."""
    stages: tuple[Stage, ...]
    overrides: Mapping = field(default_factory=dict)
    """Dotted overrides for every train stage, before the stage's own."""
    nproc: int = 1
    shared: Mapping = field(default_factory=dict)
    """Free-form: YAML anchors that stages reuse (e.g. one set of CPT overrides); not read."""

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"pipeline {self.name}: no stage {name!r} "
                          f"(stages: {', '.join(s.name for s in self.stages)})")

    def stage_dir(self, name: str) -> Path:
        return Path(self.out) / name


def _unknown(where: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _build(cls: type, data: object, where: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown(where, str(key), list(fields))
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and \
                f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: '{name}' is required")
    return dict(data)


def _check_stage(stage: Stage, earlier: dict[str, Stage], where: str) -> None:
    if not isinstance(stage.name, str) or not _NAME.fullmatch(stage.name):
        raise ConfigError(f"{where}.name: {stage.name!r} must be letters, digits, '-' or '_'")
    if stage.name in earlier:
        raise ConfigError(f"{where}.name: stage {stage.name!r} is defined twice")
    if stage.kind not in KINDS:
        raise ConfigError(f"{where}.kind: {stage.kind!r} is not one of {', '.join(KINDS)}")
    if stage.init not in INITS:
        raise ConfigError(f"{where}.init: {stage.init!r} is not one of {', '.join(INITS)}")
    if stage.source is None and stage.kind not in TRAINING:
        raise ConfigError(f"{where}.source: a {stage.kind} stage needs the stage it starts from")
    if stage.source is not None and stage.source not in earlier:
        raise ConfigError(f"{where}.source: {stage.source!r} is not an earlier stage "
                          f"(earlier: {', '.join(earlier) or 'none'})")
    if stage.source is not None and earlier[stage.source].kind in ("export", "sweep"):
        raise ConfigError(f"{where}.source: {stage.source!r} is a {earlier[stage.source].kind}"
                          " stage (no single checkpoint to start from)")
    if stage.baseline_for is not None and stage.baseline_for not in earlier:
        raise ConfigError(f"{where}.baseline_for: {stage.baseline_for!r} is not an earlier stage")
    if stage.kind in TRAINING and stage.args:
        raise ConfigError(f"{where}.args: train stages take `overrides`, not `args`")
    if stage.kind not in TRAINING and (stage.overrides or stage.baseline_for or
                                       stage.keep_batch_tokens):
        raise ConfigError(f"{where}: `overrides`/`baseline_for`/`keep_batch_tokens` are for "
                          "train stages only")
    if not isinstance(stage.keep_batch_tokens, bool):
        raise ConfigError(f"{where}.keep_batch_tokens: expected true or false, got "
                          f"{stage.keep_batch_tokens!r}")
    for key in ("overrides", "args"):
        if not isinstance(getattr(stage, key), Mapping):
            raise ConfigError(f"{where}.{key}: expected a mapping of option: value")
    if stage.nproc is not None and (not isinstance(stage.nproc, int) or stage.nproc < 1):
        raise ConfigError(f"{where}.nproc: expected a positive integer, got {stage.nproc!r}")
    if not isinstance(stage.sbatch, list | tuple) or not all(
            isinstance(o, str) and o.startswith("-") for o in stage.sbatch):
        raise ConfigError(f"{where}.sbatch: expected a list of sbatch options such as "
                          f"[--nodes=2], got {stage.sbatch!r}")
    _check_selection(stage, earlier, where)
    check_sweep(stage, where)
    if stage.kind not in TRAINING:
        stage_options(stage, f"{where}.args")


def _check_selection(stage: Stage, earlier: dict[str, Stage], where: str) -> None:
    for key in ("best_of", "lr_from"):
        names = getattr(stage, key)
        if not names:
            continue
        if stage.kind != "train":
            raise ConfigError(f"{where}.{key}: for train stages only")
        if not isinstance(names, list | tuple) or len(names) < 2 or len(set(names)) < len(names):
            raise ConfigError(f"{where}.{key}: expected a list of at least two distinct earlier "
                              f"train stages, got {names!r}")
        for name in names:
            if name not in earlier or earlier[name].kind != "train":
                raise ConfigError(f"{where}.{key}: {name!r} is not an earlier train stage")
    if stage.best_of and (stage.source is not None or stage.init != "pretrained"):
        raise ConfigError(f"{where}: a best_of stage takes its source and init from the stage "
                          "it repeats; drop source/init")


def _options_classes() -> dict[str, tuple[type, ...]]:
    from engine.convert.exporter import ExportOptions
    from engine.convert.verify import VerifyOptions
    from engine.upcycle.commands import ScaleOutOptions, ScaleUpOptions, VocabOptions

    return {"scale_up": (ScaleUpOptions,), "scale_out": (ScaleOutOptions,),
            "vocab": (VocabOptions,), "export": (ExportOptions, VerifyOptions)}


def stage_options(stage: Stage, where: str):
    """A non-train stage's `args` as its command's options: ScaleUpOptions, ScaleOutOptions,
    VocabOptions, or
    (ExportOptions, VerifyOptions) for an export (its keys split between the two commands)."""
    classes = _options_classes()[stage.kind]
    if len(classes) == 1:
        return options_from_dict(classes[0], stage.args, where)
    names = [[f.name for f in dataclasses.fields(c)] for c in classes]
    check_known(stage.args, [n for group in names for n in group], where)
    return tuple(options_from_dict(c, {k: v for k, v in stage.args.items() if k in n}, where)
                 for c, n in zip(classes, names, strict=True))


def pipeline_from_dict(data: object, source: str) -> Pipeline:
    top = _build(Pipeline, data, source)
    raw_stages = top.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(f"{source}: 'stages' must be a non-empty list")
    stages: dict[str, Stage] = {}
    for i, raw in enumerate(raw_stages):
        where = f"{source}: stages[{i}]"
        stage = Stage(**_build(Stage, raw, where))
        _check_stage(stage, stages, where)
        stages[stage.name] = stage
    top["stages"] = tuple(stages.values())
    pipe = Pipeline(**top)
    if not isinstance(pipe.overrides, Mapping):
        raise ConfigError(f"{source}: overrides: expected a mapping of key: value")
    if not isinstance(pipe.nproc, int) or pipe.nproc < 1:
        raise ConfigError(f"{source}: nproc: expected a positive integer, got {pipe.nproc!r}")
    return pipe


def load_pipeline(path: str | Path) -> Pipeline:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read pipeline ({e.strerror or type(e).__name__})") \
            from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    return pipeline_from_dict(data, str(path))

"""What each stage runs and when it counts as done: commands built from the pipeline file and
the outputs of earlier stages. No process is started here (see run.py)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoint import find_checkpoint, read_train_state
from engine.config.errors import ConfigError
from engine.config.loader import apply_overrides, dump_recipe, read_recipe_yaml, recipe_from_dict
from engine.config.recipe import Recipe
from engine.options import to_argv
from engine.pipeline.config import Pipeline, Stage, stage_options
from engine.pipeline.select import resolved
from engine.pipeline.sweep import check_member_recipe, members

ENGINE = [sys.executable, "-m", "engine"]
UPCYCLE_COMMAND = {"scale_up": "scale-up", "scale_out": "scale-out", "vocab": "vocab"}


@dataclass(frozen=True)
class Plan:
    stage: Stage
    commands: tuple[tuple[str, ...], ...]
    """Run in order; a train stage's single command is `engine train --config <recipe>`."""
    recipe: Path | None = None
    """train: the stage's full recipe, written by `plan()`."""


def output(pipe: Pipeline, stage: Stage) -> Path:
    """Where the stage's result lives: a checkpoint save directory, or the HF directory."""
    d = pipe.stage_dir(stage.name)
    return d / {"train": "checkpoints", "scale_up": "model", "scale_out": "model",
                "vocab": "model", "export": "hf", "sweep": "."}[stage.kind]


def stage_recipe(pipe: Pipeline, stage: Stage) -> Recipe | None:
    """The recipe a train stage runs (None for other stages); it reads the source's checkpoint."""
    if stage.kind != "train":
        return None
    stage = resolved(pipe, stage)  # best_of / lr_from: what the earlier results chose
    base = Path(pipe.recipe)
    data = apply_overrides(read_recipe_yaml(base), pipe.overrides,
                           f"{base} + pipeline overrides")
    checkpoint = {"save": str(output(pipe, stage)), "load": None}
    if stage.source is not None:
        src_stage = pipe.stage(stage.source)
        src = find_checkpoint(output(pipe, src_stage))
        if src is None:
            raise ConfigError(f"stage {stage.name}: its source {stage.source} has no output "
                              f"yet ({output(pipe, src_stage)}); run that stage first")
        stored = read_recipe_yaml(src / "recipe.yaml")
        data["model"], data["tokenizer"] = stored["model"], stored.get("tokenizer", {})
        checkpoint["pretrained"] = str(output(pipe, src_stage)) \
            if stage.init == "pretrained" else None
    where = f"{pipe.name}: stage {stage.name}"
    before = data
    data = apply_overrides(data, stage.overrides, where)
    if stage.keep_batch_tokens:
        data = _keep_batch_tokens(before, data, stage, where)
    data.setdefault("checkpoint", {}).update(checkpoint)
    logging = data.setdefault("logging", {})
    logging["tensorboard_dir"] = str(pipe.stage_dir(stage.name) / "tensorboard")
    logging["stage"] = stage.name
    return recipe_from_dict(data, f"{pipe.name}: stage {stage.name}")


def batch_for_seq_length(global_batch_size: int, seq_length: int, new_seq_length: int,
                         where: str) -> int:
    """The global batch of `new_seq_length`-token samples holding as many tokens as
    `global_batch_size` samples of `seq_length` tokens; one line when none does."""
    tokens = global_batch_size * seq_length
    if tokens % new_seq_length:
        raise ConfigError(f"{where}: keep_batch_tokens: train.global_batch_size x data.seq_length"
                          f" = {global_batch_size} x {seq_length} = {tokens} tokens is not a "
                          f"multiple of the stage's data.seq_length={new_seq_length}")
    return tokens // new_seq_length


def _keep_batch_tokens(before: dict, after: dict, stage: Stage, where: str) -> dict:
    """`after` (the stage's recipe data) with the global batch scaled to keep `before`'s tokens
    per step (the pipeline's recipe with the stage's model, before the stage's overrides)."""
    from engine.config.recipe import DataConfig

    train = stage.overrides.get("train")
    if "train.global_batch_size" in stage.overrides or \
            (isinstance(train, dict) and "global_batch_size" in train):
        raise ConfigError(f"{where}: keep_batch_tokens and an override of "
                          "train.global_batch_size: set one of them")
    gbs = (before.get("train") or {}).get("global_batch_size")
    if gbs is None:
        raise ConfigError(f"{where}: keep_batch_tokens needs train.global_batch_size in the "
                          "pipeline's recipe (the tokens per step to keep)")
    default = DataConfig.__dataclass_fields__["seq_length"].default
    seq = (before.get("data") or {}).get("seq_length", default)
    new_seq = (after.get("data") or {}).get("seq_length", default)
    new = batch_for_seq_length(gbs, seq, new_seq, where)
    return apply_overrides(after, {"train.global_batch_size": new}, where)


def plan(pipe: Pipeline, stage: Stage) -> Plan:
    """The stage's commands (its sources must be done); writes a train stage's recipe."""
    if stage.kind == "sweep":  # a train command per member not done (engine.pipeline.sweep)
        todo = [m for m in members(stage) if not done(pipe, m)]
        for m in todo:
            check_member_recipe(stage_recipe(pipe, m), f"{pipe.name}: stage {m.name}")
        return Plan(stage, tuple(plan(pipe, m).commands[0] for m in todo))
    d = pipe.stage_dir(stage.name)
    if stage.kind == "train":
        recipe = stage_recipe(pipe, stage)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "recipe.yaml"
        dump_recipe(recipe, path)
        nproc = stage.nproc or pipe.nproc
        launch = ENGINE if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "-m", "engine"]
        return Plan(stage, ((*launch, "train", "--config", str(path)),), path)
    src = str(output(pipe, pipe.stage(stage.source)))
    options = stage_options(stage, where=f"{pipe.name}: stage {stage.name}")
    if stage.kind in UPCYCLE_COMMAND:
        return Plan(stage, ((*ENGINE, "upcycle", UPCYCLE_COMMAND[stage.kind], "--ckpt", src,
                             "--out", str(output(pipe, stage)), *to_argv(options)),))
    export, verify = options
    return Plan(stage, (
        (*ENGINE, "convert", "engine-to-hf", "--ckpt", src, "--out", str(output(pipe, stage)),
         *to_argv(export)),
        (*ENGINE, "convert", "verify", "--hf", str(output(pipe, stage)), "--ckpt", src,
         "--json", str(d / "verify.json"), *to_argv(verify)),
    ))


def verified(pipe: Pipeline, stage: Stage) -> bool:
    """An export stage's verify.json says its logits match (`ok: true`)."""
    path = pipe.stage_dir(stage.name) / "verify.json"
    try:
        return path.is_file() and json.loads(path.read_text()).get("ok") is True
    except ValueError:
        return False


def stale(pipe: Pipeline, stage: Stage) -> list[Path]:
    """What a stage that is not done left behind and must go before it runs again: an export's
    HF directory and verify.json (the export is done only once verified)."""
    if stage.kind != "export":
        return []
    paths = [output(pipe, stage), pipe.stage_dir(stage.name) / "verify.json"]
    return [p for p in paths if p.exists()]


def done(pipe: Pipeline, stage: Stage) -> bool:
    """Whether the stage's output is complete: a train stage's last checkpoint is at
    `train.steps`; an upcycle's checkpoint exists (written whole, then renamed); an export
    is verified; a sweep's members are all done."""
    if stage.kind == "sweep":
        return all(done(pipe, m) for m in members(stage))
    out = output(pipe, stage)
    if stage.kind == "train":
        ckpt = find_checkpoint(out)
        return ckpt is not None and \
            read_train_state(ckpt).step >= stage_recipe(pipe, stage).train.steps
    if stage.kind == "export":
        return verified(pipe, stage)
    return find_checkpoint(out) is not None

"""Pipeline stages chosen by a result: `best_of` (repeat the best of earlier train stages, e.g.
the best learning rate with another seed) and `lr_from` (take the best one's learning rate).

"Best" is the lowest final validation loss, averaged over the stage's validation sets (its last
evaluation, from its TensorBoard events), the rule a learning-rate sweep is judged by. A stage
is resolved when it is planned, so its candidates must be done first (`engine pipeline run` runs
them earlier in file order; `engine pipeline submit` makes its job wait for theirs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from engine.config.errors import ConfigError
from engine.pipeline.config import Pipeline, Stage


def final_valid_loss(pipe: Pipeline, name: str) -> float | None:
    """The mean over validation sets of a train stage's last evaluated loss; None when it has
    none (yet)."""
    from engine.analyze.runs import read_scalars

    tb = pipe.stage_dir(name) / "tensorboard"
    if not tb.is_dir():
        return None
    return mean_final_loss({tag: points for tag, points in read_scalars(tb).items()
                            if tag.startswith("valid/") and tag.endswith("/loss")
                            and tag.count("/") == 2})


def mean_final_loss(valid: dict) -> float | None:
    """The rule "best" is judged by: the mean over validation sets ({name: [(step, loss)]}) of
    each set's last loss; None without any."""
    finals = [points[-1][1] for points in valid.values() if points]
    return sum(finals) / len(finals) if finals else None


def winner(pipe: Pipeline, names, where: str) -> Stage:
    """The stage among `names` with the lowest final validation loss; one line naming any that
    has none yet."""
    losses = {}
    for name in names:
        loss = final_valid_loss(pipe, name)
        if loss is None:
            raise ConfigError(f"{where}: stage {name} has no validation loss yet (run it first; "
                              "it needs data.valid)")
        losses[name] = loss
    return pipe.stage(min(losses, key=losses.get))


def resolved(pipe: Pipeline, stage: Stage) -> Stage:
    """`stage` with best_of and lr_from replaced by what they chose (others unchanged)."""
    where = f"{pipe.name}: stage {stage.name}"
    if stage.best_of:
        best = resolved(pipe, winner(pipe, stage.best_of, f"{where}.best_of"))
        stage = dataclasses.replace(stage, source=best.source, init=best.init,
                                    overrides={**best.overrides, **stage.overrides}, best_of=())
    if stage.lr_from:
        best = winner(pipe, stage.lr_from, f"{where}.lr_from")
        stage = dataclasses.replace(stage, lr_from=(),
                                    overrides={**stage.overrides, "optim.lr": _lr(pipe, best)})
    return stage


def chosen(pipe: Pipeline, stage: Stage) -> str | None:
    """Which stage a best_of stage repeats (None when it is not one, or not decided yet)."""
    if not stage.best_of:
        return None
    try:
        return winner(pipe, stage.best_of, stage.name).name
    except ConfigError:
        return None


def _lr(pipe: Pipeline, stage: Stage) -> float:
    from engine.config.loader import load_recipe

    path = Path(pipe.stage_dir(stage.name)) / "recipe.yaml"
    return load_recipe(path).optim.lr

"""What one stage of a multi-stage (continual-pretraining) run carries across checkpoints.

A stage is one `engine train` run from step 0 to its end, resumed any number of times; a stage
started from `checkpoint.pretrained` is a new stage. Owns:
- the resume check of the LR schedule (`resumed_schedule`): changed arguments stop the run in
  one line unless `train.override_schedule` is true;
- the stage boundary line (`stage_start_text`); the history itself is the checkpoint's
  (engine.checkpoint.completed_stages), so token counts add up over a pipeline of stages;
- the on-demand wsd decay (`decay_file_appeared`): a collective, so every rank decays together;
- the token totals the loop logs (`TokenCounts`).
Counting tokens: samples x seq_length per source (engine.data.mixing), summed in TrainState.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoint import CheckpointError, TrainState
from engine.config.recipe import Recipe
from engine.train.schedule import schedule_args, schedule_changes

log = logging.getLogger(__name__)


def current_schedule(recipe: Recipe) -> dict:
    return schedule_args(recipe.train.schedule, lr=recipe.optim.lr, steps=recipe.train.steps)


def _show(value) -> str:
    return "null" if value is None else str(value)


def resumed_schedule(recipe: Recipe, ckpt: Path, saved: TrainState) -> dict:
    """The schedule arguments a run resuming `saved` uses: the recipe's, when they equal the
    checkpoint's or `train.override_schedule` is true; else a CheckpointError naming each change."""
    now = current_schedule(recipe)
    changes = schedule_changes(saved.schedule, now, step=saved.step,
                               decay_file_step=saved.decay_file_step)
    if not changes:
        return now
    listed = ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, old, new in changes)
    if not recipe.train.override_schedule:
        raise CheckpointError(
            f"{ckpt}: the LR schedule differs from the checkpoint's ({listed}); set "
            f"train.override_schedule=true to apply the new values from step {saved.step}")
    log.warning("train.override_schedule: LR schedule changed at step %d: %s", saved.step, listed)
    return now


def decay_file_appeared(path: str, device) -> bool:
    """Whether `path` exists on any rank (one all-reduce: every rank calls it at the same step)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(Path(path).exists())], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """Token totals at one step: this stage's per source, and all earlier stages' sum."""

    step: int
    interval: dict[str, int]
    """Tokens per source since the previous log step."""
    stage: dict[str, int]
    """Tokens per source in this stage so far."""
    earlier: int
    """Tokens of the earlier stages."""

    @property
    def total(self) -> int:
        return sum(self.stage.values())

    @property
    def total_all_stages(self) -> int:
        return self.earlier + self.total


def stage_start_text(state: TrainState, initialized_from: Path | None) -> str:
    """One line for the stage boundary: its name, the weights and what came before."""
    earlier = state.earlier_stages
    names = ", ".join(s["stage"] or "(unnamed)" for s in earlier) or "none"
    tokens = sum(s["tokens"] for s in earlier)
    source = f" from {initialized_from}" if initialized_from else ""
    return (f"stage {state.stage or '(unnamed)'} starts at step 0{source} | earlier stages: "
            f"{names} | earlier tokens {tokens:,}")

"""Where training stands and where the weights came from: `TrainState` (stored in every
checkpoint as its common state and as `train_state.json`) and the stage history a run started
from a checkpoint inherits. Plain JSON types only; no torch, no megatron."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.checkpoint.errors import CheckpointError


@dataclass(frozen=True, slots=True)
class TrainState:
    """Where training stands; stored in the checkpoint's common state and as train_state.json
    (plain JSON types only). Counts are of this stage: a run started from checkpoint.pretrained
    starts at zero and lists the stages before it in `earlier_stages`."""

    step: int
    """Optimizer steps done."""
    consumed_samples: int
    """Training samples consumed, the data position."""
    consumed_tokens: int
    """Loss tokens consumed."""
    schedule: dict
    """The LR schedule's arguments by recipe key (engine.train.schedule.schedule_args), checked
    on resume so that they never change silently."""
    source_tokens: dict = field(default_factory=dict)
    """Tokens read per training source name (samples x seq_length; data.blend and
    data.replay.blend names)."""
    decay_file_step: int | None = None
    """The step at which train.schedule.decay_file appeared and the wsd decay began; None = not."""
    stage: str | None = None
    """logging.stage of the run that saved this state."""
    earlier_stages: list = field(default_factory=list)
    """The stages before this one, oldest first, carried over checkpoint.pretrained: each
    {"stage", "steps", "tokens", "source_tokens"} and, when its lr_record was complete, "lr"
    (that record: S1, S2, first, peak and final learning rate)."""
    origin: dict | None = None
    """Where this lineage's weights first came from, carried over every pretrained start and
    upcycle: {"hf": directory, "architecture": ..., "torch_dtype": ...} for an HF import; None
    for a model trained from random initialization."""
    mixture: dict | None = None
    """The data mixture being read (engine.train.mixture): {"signature": blend, replay, global
    batch, seq_length; "start": the consumed_samples where it began; "offsets": samples read
    per source before it}; None for synthetic data and older checkpoints."""
    lr_record: dict = field(default_factory=dict)
    """The learning rates this stage's updates used, summed (engine.train.lr_record): {"steps",
    "s1", "s2", "m", "first", "final", "peak"}; complete only when its steps equal `step`."""
    rewinds: list = field(default_factory=list)
    """This stage's loss-spike rewinds (train.spike, engine.train.spike), oldest first: each
    {"spike_step", "loss", "median", "to_step", "skipped_batches"}; the skipped batches are also
    in the data position (`mixture`'s start), so every later resume skips them too."""


def read_train_state(ckpt: Path) -> TrainState:
    path = ckpt / "train_state.json"
    try:
        return TrainState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable train state ({e})") from None


def completed_stages(ckpt: Path) -> list[dict]:
    """The training stages the weights of `ckpt` went through, oldest first: its TrainState's
    earlier_stages, then its own stage when it trained (an imported or upcycled step-0 checkpoint
    adds none; pass its source's list as its earlier_stages to keep the history). A run started
    from `ckpt` as checkpoint.pretrained takes this as its earlier_stages."""
    if not (ckpt / "train_state.json").is_file():
        return []  # written by another tool
    state = read_train_state(ckpt)
    stages = list(state.earlier_stages)
    if state.step > 0:
        tokens = sum(state.source_tokens.values()) or state.consumed_tokens
        entry = {"stage": state.stage, "steps": state.step, "tokens": tokens,
                 "source_tokens": dict(state.source_tokens)}
        if state.lr_record.get("steps") == state.step:  # complete: every update's LR in it
            entry["lr"] = dict(state.lr_record)
        stages.append(entry)
    return stages


def origin_of(ckpt: Path) -> dict | None:
    """`TrainState.origin` of `ckpt` (None for checkpoints written by other tools)."""
    if not (ckpt / "train_state.json").is_file():
        return None
    return read_train_state(ckpt).origin

"""Checkpoints: megatron `dist_checkpointing` directories, the latest tracker, retention, resume
and weights-only initialization for continual pretraining."""

from engine.checkpoint.io import (
    CheckpointError,
    SavedLayout,
    TrainState,
    completed_stages,
    current_layout,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    read_saved_layout,
    read_train_state,
    save_checkpoint,
)

__all__ = [
    "CheckpointError",
    "SavedLayout",
    "TrainState",
    "completed_stages",
    "current_layout",
    "find_checkpoint",
    "load_checkpoint",
    "load_weights",
    "read_saved_layout",
    "read_train_state",
    "save_checkpoint",
]

"""Checkpoints: megatron `dist_checkpointing` directories (`io`: save, load, tracker, retention),
the train state and stage history (`state`), the saved layout and what may load where (`layout`),
RNG states (`rng`), and a whole model in one process (`unsharded`: the boundary of import,
export and upcycling)."""

from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.io import find_checkpoint, load_checkpoint, load_weights, save_checkpoint
from engine.checkpoint.layout import SavedLayout, current_layout, read_saved_layout
from engine.checkpoint.state import TrainState, completed_stages, origin_of, read_train_state

__all__ = [
    "CheckpointError",
    "SavedLayout",
    "TrainState",
    "completed_stages",
    "current_layout",
    "find_checkpoint",
    "load_checkpoint",
    "load_weights",
    "origin_of",
    "read_saved_layout",
    "read_train_state",
    "save_checkpoint",
]

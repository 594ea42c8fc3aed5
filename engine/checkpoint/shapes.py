"""Does a checkpoint hold this model? The model's tensors against the checkpoint's metadata
(global shapes, read without any weight), so a checkpoint of another model is one line naming
the first tensor that differs, before anything is loaded.

megatron-core's own refusal is a multi-line exception per rank from inside torch's distributed
checkpoint reader, far from the user's question ("is this the checkpoint I meant?"). Imports
megatron-core's dist_checkpointing only; no process group.
"""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint.errors import CheckpointError


def _tensors(entries):
    """(key, global shape) of every ShardedTensor in a sharded state dict, factories (SwiGLU fc1,
    experts) built into the tensors they save."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for entry in nested_values(entries) if isinstance(entries, dict | list) else [entries]:
        if isinstance(entry, ShardedTensorFactory):
            yield from _tensors(entry.build())
        elif isinstance(entry, ShardedTensor):
            yield entry.key, tuple(entry.global_shape)


def check_model_shapes(model_sharded: dict, ckpt: Path) -> None:
    """One line when a tensor of `model_sharded` (the model's sharded state dict) is missing
    from `ckpt` or has another global shape there."""
    from megatron.core import dist_checkpointing

    try:
        saved = dist_checkpointing.load_tensors_metadata(str(ckpt))
    except Exception:  # noqa: BLE001 - unreadable metadata: the load itself says why
        return
    for key, shape in _tensors(model_sharded):
        if key not in saved:
            raise CheckpointError(f"{ckpt}: no tensor '{key}' of shape {shape}; is it a "
                                  "checkpoint of another model?")
        stored = tuple(saved[key].global_shape)
        if stored != shape:
            raise CheckpointError(f"{ckpt}: '{key}' is {stored}; this model's is {shape} "
                                  "(a checkpoint of another model?)")

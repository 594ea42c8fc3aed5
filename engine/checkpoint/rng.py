"""RNG states in a checkpoint: one megatron ShardedObject per (pp, tp, dp x cp) coordinate, restored
only when the run has the layout it was saved at."""

from __future__ import annotations

import random

import torch


def rng_layout() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(shape, offset) of this rank's RNG object: (pp, tp, dp x cp) sizes and ranks (the
    context-parallel ranks of a data-parallel rank each have their own states)."""
    from megatron.core import parallel_state as ps

    shape = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(with_context_parallel=True),
    )
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(with_context_parallel=True),
    )
    return shape, offset


def rng_object(layout_shape, layout_offset, replica_id=0):
    """This rank's Python, torch and megatron-tracker RNG states (and CUDA's) as a ShardedObject."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", state, layout_shape, layout_offset, replica_id=replica_id)


def restore_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(rng["tracker"])

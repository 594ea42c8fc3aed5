"""How a checkpoint was written (`SavedLayout`, stored as dist_checkpointing content metadata)
and which optimizer states megatron-core can load at which layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint.errors import CheckpointError


@dataclass(frozen=True, slots=True)
class SavedLayout:
    """How a checkpoint was written; stored as dist_checkpointing content metadata."""

    tp: int
    pp: int
    dp: int
    distributed_optimizer: bool
    optim_sharding: str
    """megatron-core's `distrib_optim_sharding_type` of the optimizer state."""
    ep: int = 1
    padded_vocab_size: int | None = None
    """Rows of the embedding (engine.models.vocab): a model loading this checkpoint keeps them."""
    cp: int = 1
    """Context-parallel size (no weights are split over it; RNG states are per dp x cp rank)."""

    def optimizer_metadata(self) -> dict:
        # fully_reshardable gathers each parameter's state on DP rank 0: megatron's default path
        # moves the buffers with `.cuda()`, its memory-efficient path gathers over gloo (same
        # files either way), which is the one that exists without CUDA.
        # The sharding type only for the distributed optimizer: megatron prefixes a chained
        # (dense + expert) optimizer's keys whenever a non-reshardable type is named, which would
        # tie a regular optimizer's state to its expert-parallel layout.
        if not self.distributed_optimizer:
            return {"chained_optim_avoid_prefix": True}
        return {"distrib_optim_sharding_type": self.optim_sharding,
                "chained_optim_avoid_prefix": True,
                "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


def current_layout(*, distributed_optimizer: bool = False,
                   optim_sharding: str = "dp_reshardable",
                   padded_vocab_size: int | None = None) -> SavedLayout:
    """This process's layout from megatron's parallel state (initialized). The defaults are a
    checkpoint without optimizer state (an import, an upcycle)."""
    from megatron.core import parallel_state as ps

    return SavedLayout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        distributed_optimizer=distributed_optimizer,
        optim_sharding=optim_sharding,
        padded_vocab_size=padded_vocab_size,
    )


def read_saved_layout(ckpt: Path) -> SavedLayout | None:
    from megatron.core import dist_checkpointing

    try:
        meta = dist_checkpointing.load_content_metadata(str(ckpt)) or {}
    except Exception:  # noqa: BLE001 - checkpoints from other tools carry no metadata
        return None
    return SavedLayout(**meta["layout"]) if "layout" in meta else None


def check_optimizer_compatible(ckpt: Path, saved: SavedLayout | None, now: SavedLayout) -> None:
    """Refuse, in one line, optimizer state that megatron-core cannot reshard to this layout."""
    if saved is None:
        return
    hint = "set checkpoint.load_optim=false to resume the weights with a fresh optimizer"
    if (saved.ep > 1) != (now.ep > 1):
        # expert weights get their own optimizer only with expert parallelism: the saved
        # optimizer is one chained pair, the new one a single optimizer, or the reverse
        raise CheckpointError(f"{ckpt}: optimizer state saved at ep={saved.ep} cannot load at "
                              f"ep={now.ep} (megatron-core keeps expert parameters in a separate "
                              f"optimizer only when ep > 1); {hint}")
    if not (saved.distributed_optimizer or now.distributed_optimizer):
        return  # the regular optimizer's state is sharded like the model: any layout loads
    if saved.distributed_optimizer != now.distributed_optimizer:
        raise CheckpointError(
            f"{ckpt}: optimizer state saved with parallel.distributed_optimizer="
            f"{str(saved.distributed_optimizer).lower()}, resuming with "
            f"{str(now.distributed_optimizer).lower()}; {hint}"
        )
    if saved.optim_sharding == "dp_reshardable" and \
            (saved.tp, saved.pp, saved.ep) != (now.tp, now.pp, now.ep):
        raise CheckpointError(
            f"{ckpt}: distributed optimizer state saved as dp_reshardable at tp={saved.tp} "
            f"pp={saved.pp} ep={saved.ep} cannot load at tp={now.tp} pp={now.pp} ep={now.ep} "
            f"(only the data-parallel size may change); {hint}, or save with "
            "checkpoint.optim_sharding=fully_reshardable")

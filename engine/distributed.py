"""torch.distributed and megatron-core parallel state: set up once per process, torn down at exit.

Single process (no torchrun environment) runs as a world of one on an in-memory store, so every
code path — schedules, DDP, optimizer, dist_checkpointing — is the same as under torchrun.
CPU runs use gloo and the compat layer; GPU runs use NCCL.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch

from engine import compat
from engine.config.recipe import Recipe
from engine.config.validate import Layout, validate

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Runtime:
    """What this process is: its layout, ranks and device."""

    layout: Layout
    rank: int
    device: torch.device
    backend: str

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(recipe: Recipe, *, timeout_s: int = 600) -> Runtime:
    """Initialize torch.distributed and megatron-core parallel state for `recipe`.

    Validates the layout against the world size first, so a bad layout is one line, not a hang."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    layout = validate(recipe, world_size)
    backend = _backend(recipe.parallel.backend)
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        compat.apply()
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
            context_parallel_size=layout.cp,
            expert_model_parallel_size=layout.ep,
        )
    torch.manual_seed(recipe.train.seed)
    model_parallel_cuda_manual_seed(recipe.train.seed)
    log.info(
        "rank %d/%d on %s (%s): tp=%d pp=%d vpp=%s dp=%d ep=%d cp=%d",
        rank,
        world_size,
        device,
        backend,
        layout.tp,
        layout.pp,
        layout.vpp,
        layout.dp,
        layout.ep,
        layout.cp,
    )
    return Runtime(layout=layout, rank=rank, device=device, backend=backend)


def parallel_sizes() -> dict[str, int | None]:
    """The layout that is running, read back from megatron-core's parallel state (initialized):
    world size and the tp, pp, vpp, dp, ep and cp group sizes."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(),
            "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size()}


def destroy_parallel_state() -> None:
    """Tear down megatron-core's groups after a run; the default process group stays, so one
    process can run several layouts (re-creating it on the same torchrun store collides)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():  # megatron forgets its groups without destroying them: with gloo
        # each keeps its threads, thousands of them in a process that builds many models
        from torch.distributed import distributed_c10d as c10d

        default = c10d._get_default_group()
        for group in list(c10d._world.pg_map):
            if group is not default:
                dist.destroy_process_group(group)


def destroy_distributed() -> None:
    import torch.distributed as dist

    destroy_parallel_state()
    if dist.is_initialized():
        dist.destroy_process_group()

"""logging.drift: how far each layer's weights moved in the stage, and how fast.

At every evaluation (train.eval_interval, eval_interval_early, step 0 included) two figures per
transformer layer (global numbers, 0-based as in the checkpoint keys `decoder.layers.<i>`), for
the embedding, for the output side (output layer and final norm) and for all parameters:

- `drift/<part>/weight`: ‖W_t − W_0‖ / ‖W_0‖, W_0 the weights at the stage's start (step 0:
  after checkpoint.pretrained is loaded): how far each layer moved, beside the forgetting the
  validation losses show.
- `drift/<part>/update`: ‖W_t − W_{t−1}‖ / ‖W_t‖, the update-to-weight ratio of the last step
  (with train.mer, a Reptile step at t is part of it); none at step 0.

Norms are Frobenius norms over all of a part's parameters together, summed as squares in
float64. Correct under every layout: tensor-parallel shards (`tensor_model_parallel`) are summed
over the tensor-parallel group, replicated parameters (norms, row-parallel biases) counted once;
expert parameters summed over the expert groups; each pipeline rank (and each virtual chunk)
adds its own layers under their global numbers, then one all-reduce over the pipeline group
puts every part on every rank. Data-parallel replicas hold the same weights (the distributed
optimizer all-gathers them after each step): nothing to reduce there.

Cost (say so when turning it on): one copy of the model parameters this rank holds, in their
own dtype, for W_0, kept for the run and saved in checkpoints (prefix `drift_start.`, laid out
like the weights, so a resume, at any layout, measures against the same W_0); plus a transient
second copy during each step that is followed by an evaluation (for W_{t−1}). Time: two passes
over the parameters and up to four small all-reduces per evaluation.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PREFIX = "drift_start"
"""Key prefix of W_0's ShardedTensors in a checkpoint."""

SQUARES = ("diff", "start", "update", "now")
"""The summed squares per part: ‖W_t − W_0‖², ‖W_0‖², ‖W_t − W_{t−1}‖², ‖W_t‖²."""


def part_names(num_layers: int) -> list[str]:
    """Row names of the squares table: embedding, layer0..layer<L−1>, output."""
    return ["embedding", *(f"layer{i}" for i in range(num_layers)), "output"]


def drift_scalars(squares: torch.Tensor, num_layers: int, *, with_update: bool = True
                  ) -> dict[str, float]:
    """TensorBoard scalars from a [num_layers + 2, 4] table of summed squares (SQUARES order,
    rows as part_names): `drift/<part>/weight` and (`with_update`) `drift/<part>/update` for
    the parts that have parameters, and `drift/all/...` over all of them."""
    rows = list(zip(part_names(num_layers), squares.tolist(), strict=True))
    rows.append(("all", squares.sum(0).tolist()))
    out = {}
    for name, (diff, start, update, now) in rows:
        if start > 0.0:
            out[f"drift/{name}/weight"] = math.sqrt(diff / start)
        if with_update and now > 0.0:
            out[f"drift/{name}/update"] = math.sqrt(update / now)
    return out


def _squares(now: torch.Tensor, start: torch.Tensor, before: torch.Tensor | None
             ) -> torch.Tensor:
    """[4] one parameter's contribution to the SQUARES (float32 differences, float64 sums)."""
    w, w0 = now.detach().float(), start.float()
    zero = torch.zeros((), dtype=torch.float64, device=w.device)
    return torch.stack([
        torch.sum(torch.square(w - w0), dtype=torch.float64),
        torch.sum(torch.square(w0), dtype=torch.float64),
        zero if before is None else torch.sum(torch.square(w - before.float()),
                                              dtype=torch.float64),
        torch.sum(torch.square(w), dtype=torch.float64)])


def _part_rows(chunks, num_layers: int) -> list[tuple[torch.nn.Parameter, int]]:
    """(parameter, row) for every parameter of the chunks: a transformer layer's parameters
    are its global layer's row, the embedding's row 0, the rest (output layer, final norm)
    the last row."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    rows = {}
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, TransformerLayer):
                for p in module.parameters():
                    rows[id(p)] = module.layer_number  # 1-based global: rows 1..L
    out = []
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            row = rows.get(id(p), 0 if "embedding" in name.split(".") else num_layers + 1)
            out.append((p, row))
    return out


def _kind(p) -> str:
    """Which group the summed squares of `p` are reduced over (module docstring)."""
    sharded = bool(getattr(p, "tensor_model_parallel", False))
    if not getattr(p, "allreduce", True):  # an expert's parameter
        return "expert_sharded" if sharded else "expert"
    return "sharded" if sharded else "replicated"


def _reduce(tables: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum each kind over its group, add them, then sum over the pipeline group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    groups = {"sharded": ps.get_tensor_model_parallel_group(),
              "expert_sharded": ps.get_expert_tensor_and_model_parallel_group(),
              "expert": ps.get_expert_model_parallel_group(), "replicated": None}
    total = torch.zeros_like(tables["replicated"])
    for kind, table in tables.items():  # the same kinds, in the same order, on every rank
        group = groups[kind]
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(table, group=group)
        total += table
    pp = ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp) > 1:
        dist.all_reduce(total, group=pp)
    return total


class Drift:
    """W_0 and, around evaluated steps, W_{t−1} of one run (module docstring)."""

    def __init__(self, chunks, num_layers: int):
        self.chunks, self.num_layers = chunks, num_layers
        self.params = _part_rows(chunks, num_layers)
        self.start = [p.detach().clone() for p, _ in self.params]
        self.before: list[torch.Tensor] | None = None

    @property
    def start_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.start)

    def watch(self, due: bool) -> None:
        """Before a step: keep W_{t−1} when the step is followed by an evaluation."""
        self.before = [p.detach().clone() for p, _ in self.params] if due else None

    def measure(self) -> dict[str, float]:
        """The scalars at this step; every rank calls it (collectives)."""
        device = self.start[0].device if self.start else torch.device("cpu")
        shape = (self.num_layers + 2, len(SQUARES))
        tables = {k: torch.zeros(shape, dtype=torch.float64, device=device)
                  for k in ("sharded", "expert_sharded", "expert", "replicated")}
        with torch.no_grad():
            for i, (p, row) in enumerate(self.params):
                before = self.before[i] if self.before is not None else None
                tables[_kind(p)][row] += _squares(p, self.start[i], before)
        known = self.before is not None  # no update ratio at step 0 (nor right after a resume)
        self.before = None
        return drift_scalars(_reduce(tables).cpu(), self.num_layers, with_update=known)

    # --- checkpoints: W_0 laid out like the weights -------------------------------------------

    def sharded_state_dict(self, model_sharded: dict, *, loading: bool = False) -> dict:
        from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

        from engine.train.mer import sharded_items

        start = {id(p): (torch.empty_like(w) if loading else w)
                 for (p, _), w in zip(self.params, self.start, strict=True)}
        tensors = {path: make_sharded_optimizer_tensor(item, start[id(item.data)], PREFIX)
                   for path, item in sharded_items(model_sharded).items()
                   if id(item.data) in start}
        return {"drift": {"start": tensors, "num_layers": self.num_layers}}

    def load(self, loaded: dict, model_sharded: dict) -> None:
        from engine.train.mer import sharded_items

        items = sharded_items(model_sharded)
        got = {id(items[path].data): v for path, v in loaded["drift"]["start"].items()}
        with torch.no_grad():
            for (p, _), w in zip(self.params, self.start, strict=True):
                if id(p) in got:
                    w.copy_(got[id(p)])


def build_drift(enabled: bool, chunks, num_layers: int, *, step: int,
                resumed_from: Path | None):
    """The run's Drift (None unless logging.drift): W_0 from the checkpoint it resumes when that
    has it, else the current weights (from a resume without it: drift counts from `step`)."""
    if not enabled:
        return None
    drift = Drift(chunks, num_layers)
    if resumed_from is not None:
        from megatron.core import dist_checkpointing

        from engine.checkpoint.io import load_extra

        common = dist_checkpointing.load_common_state_dict(str(resumed_from)) or {}
        if "drift" in common:
            loaded, model = load_extra(resumed_from, chunks,
                                       lambda m: drift.sharded_state_dict(m, loading=True))
            drift.load(loaded, model)
        else:
            log.warning("logging.drift: %s has no stage-start weights; drift counts from step "
                        "%d", resumed_from, step)
    log.info("logging.drift: W_0 is one copy of this rank's %s parameter values (%.1f MiB), "
             "plus a transient copy during each step before an evaluation",
             f"{sum(w.numel() for w in drift.start):,}", drift.start_bytes / 2**20)
    return drift

"""train.mer: replay with a Reptile step every k updates (engine.config.mer cites the papers).

    every k optimizer steps:  θ ← θ_anchor + ε·(θ − θ_anchor);  θ_anchor ← θ

θ is what the optimizer updates: the fp32 *main* parameters inside megatron-core's optimizer, so
that the step is not undone by the next update (a bf16 model parameter changed alone would be
overwritten by the copy of its fp32 main parameter after the next step). Per optimizer kind
(megatron-core 0.16.1, optimizer/optimizer.py and distrib_optimizer.py; a ChainedOptimizer, as
for MoE expert parallelism, is its `chained_optimizers`, each handled as below):

- FP32Optimizer: the inner optimizer's params are the model parameters: changed in place.
- Float16OptimizerWithFloat16Params (bf16/fp16): `fp32_from_float16_groups` are the main
  copies of `float16_groups`, `fp32_from_fp32_groups` model parameters; after the step
  `_copy_main_params_to_model_params()` writes the model's bf16 copies, as after an update.
- DistributedOptimizer: this data-parallel rank's shards `shard_fp32_from_float16_groups` and
  `shard_fp32_groups` (views of the parameter buffer for fp32); `_copy_main_params_to_model_params`
  writes the shards into the DDP parameter buffer, and each model chunk's `start_param_sync()`
  all-gathers it, as `step_with_ready_grads` does (with overlap_param_gather the next forward's
  pre-hook gathers, also as after an update).

The anchor is one fp32 tensor per main tensor, so it is sharded exactly like the main
parameters (1/dp of them under the distributed optimizer). The step is `torch.lerp(anchor, θ,
ε)`, which computes θ − (θ − anchor)·(1 − ε) for ε ≥ 0.5 and anchor + ε·(θ − anchor) below:
ε = 1 gives θ and ε = 0 the anchor bit for bit, so ε = 1 trains exactly like no MER (tested),
through every copy and gather above.

Optimizer state: kept across Reptile steps, as the authors' GPT-NeoX code does. The Reptile step
moves the parameters only; Adam's moments still estimate the gradients of the data around them,
and resetting them every k steps would restart Adam's bias correction (large first updates)
each cycle; keeping them is also what makes ε = 1 identical to plain replay.

Checkpoints (`sharded_state_dict`): the anchor in *model-parameter layout*, one ShardedTensor
per parameter with the parameter's own key, global shape, offsets and replica id under the
prefix `mer_anchor.` (megatron's `make_sharded_optimizer_tensor`, which also handles the SwiGLU
factory), plus the step of the anchor (the phase is the step minus it), k and ε. Under the
distributed optimizer the shards are first all-gathered per DDP bucket over the data-parallel
group, exactly as megatron gathers parameters (a transient fp32 copy of this rank's TP/PP
slice while saving or loading). Why this scheme: it reshards like the weights, so a checkpoint
saved at any TP/PP/DP, with or without the distributed optimizer, resumes at any other, and it
is exact (copies and an all-gather, no arithmetic). Loading reads the whole tensors and keeps
this rank's shard.

Cost: one fp32 copy of the main parameters this rank updates (logged at start with the time of
one pass over them); a Reptile step is one lerp and one copy over them plus the model copy and,
under the distributed optimizer, one parameter all-gather, every k steps (its time is logged at
the first one).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config.mer import MerConfig
from engine.models.optimizer import is_distributed, main_pairs, megatron_optimizers

log = logging.getLogger(__name__)

PREFIX = "mer_anchor"
"""Key prefix of the anchor's ShardedTensors in a checkpoint."""


def reptile(anchor: torch.Tensor, theta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """anchor + ε·(θ − anchor), exact at ε = 0 (anchor) and ε = 1 (θ) (module docstring)."""
    return torch.lerp(anchor, theta, epsilon)


@dataclass
class Slot:
    """One main tensor the optimizer updates and its anchor."""

    param: torch.nn.Parameter
    """The model parameter it belongs to (its checkpoint key and layout)."""
    main: torch.Tensor
    """The fp32 main tensor: the parameter's shape, or a flat shard of it."""
    anchor: torch.Tensor
    """fp32, like `main`."""
    start: int | None
    """Under the distributed optimizer: `main`'s first element in param.view(-1); None: whole."""


class Mer:
    """The anchor and the Reptile step of one training run (module docstring)."""

    def __init__(self, config: MerConfig, optimizer, chunks, *, step: int):
        self.config, self.chunks = config, chunks
        self.optimizers = megatron_optimizers(optimizer)
        self.slots = [Slot(param, main, main.detach().clone(), first)
                      for opt in self.optimizers for param, main, first in main_pairs(opt)]
        start = time.perf_counter()
        self.reset(step)  # one copy pass, timed for the cost line
        self.pass_seconds = time.perf_counter() - start
        self.timed = False

    @property
    def anchor_bytes(self) -> int:
        return sum(s.anchor.numel() * s.anchor.element_size() for s in self.slots)

    def cost_text(self) -> str:
        k = self.config.interval
        return (f"train.mer: a Reptile step (epsilon {self.config.epsilon:g}) every {k} steps | "
                f"anchor: one fp32 copy of the {sum(s.anchor.numel() for s in self.slots):,} "
                f"parameter values this rank updates, {self.anchor_bytes / 2**20:.1f} MiB | "
                f"one pass over them {self.pass_seconds * 1e3:.1f} ms; a Reptile step is ~3 "
                f"passes (+ the model copy and, distributed optimizer, a parameter all-gather) "
                f"every {k} steps, ~{3 * self.pass_seconds * 1e3 / k:.3f} ms per training step")

    def reset(self, step: int) -> None:
        """The current parameters become the anchor, taken at `step`."""
        with torch.no_grad():
            for s in self.slots:
                s.anchor.copy_(s.main)
        self.anchor_step = step

    def after_step(self, step: int) -> bool:
        """Take the Reptile step when `step` is k steps past the anchor; returns whether."""
        if step - self.anchor_step < self.config.interval:
            return False
        start = time.perf_counter()
        self.apply()
        self.anchor_step = step
        if not self.timed:
            self.timed = True
            ms = (time.perf_counter() - start) * 1e3
            log.info("train.mer: Reptile step at step %d took %.1f ms (%.3f ms per step)", step,
                     ms, ms / self.config.interval)
        return True

    @torch.no_grad()
    def apply(self) -> None:
        """θ ← lerp(anchor, θ, ε) = the new anchor, on the main tensors, then onto the model."""
        for s in self.slots:  # in place: lerp_ is `reptile` (same kernel, same bits)
            s.anchor.lerp_(s.main, self.config.epsilon)
            s.main.copy_(s.anchor)
        gather = False
        for opt in self.optimizers:
            if hasattr(opt, "_copy_main_params_to_model_params"):  # not FP32Optimizer
                opt._copy_main_params_to_model_params()
            gather = gather or (is_distributed(opt) and
                                not opt.ddp_config.overlap_param_gather)
        if gather:  # once per chunk: it gathers every bucket group, experts' included
            for chunk in self.chunks:
                chunk.start_param_sync()

    # --- checkpoints ---------------------------------------------------------------------------

    def _params(self) -> list[torch.nn.Parameter]:
        """Every model parameter the optimizers update, on this rank or (distributed optimizer)
        on another data-parallel rank."""
        params = {id(s.param): s.param for s in self.slots}
        for opt in self.optimizers:
            if is_distributed(opt):
                params.update({id(p): p for b in opt.buffers for p in b.param_index_map})
        return list(params.values())

    def _whole_anchors(self) -> dict[int, torch.Tensor]:
        """id(model parameter) -> its whole anchor (the parameter's shape, fp32)."""
        whole = {id(s.param): s.anchor for s in self.slots if s.start is None}
        for opt in self.optimizers:
            if is_distributed(opt):
                whole.update(_gather_distributed(opt, self.slots))
        return whole

    def sharded_state_dict(self, model_sharded: dict, *, loading: bool = False) -> dict:
        """{"mer": the anchor as ShardedTensors mirroring the model's, its step, k, ε}; with
        `loading`, empty tensors to read into."""
        from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

        if loading:  # every parameter, whichever rank's shard: the replicas must all ask
            whole = {id(p): torch.empty(p.shape, dtype=torch.float32, device=p.device)
                     for p in self._params()}
        else:
            whole = self._whole_anchors()
        items = sharded_items(model_sharded)
        tensors = {path: make_sharded_optimizer_tensor(item, whole[id(item.data)], PREFIX)
                   for path, item in items.items() if id(item.data) in whole}
        missing = {id(s.param) for s in self.slots} - {id(i.data) for i in items.values()}
        assert not missing, f"train.mer: {len(missing)} optimizer parameters are not in the " \
                            "model's sharded state dict"
        return {"mer": {"anchor": tensors, "anchor_step": self.anchor_step,
                        "interval": self.config.interval, "epsilon": self.config.epsilon}}

    def load(self, loaded: dict, model_sharded: dict) -> None:
        """Take the anchor and its step from `loaded` (what `sharded_state_dict(loading=True)`
        declared, read back)."""
        items = sharded_items(model_sharded)
        tensors = {id(items[path].data): v for path, v in loaded["mer"]["anchor"].items()}
        with torch.no_grad():
            for s in self.slots:
                whole = tensors[id(s.param)]
                if s.start is None:
                    s.anchor.copy_(whole)
                else:
                    s.anchor.copy_(whole.reshape(-1)[s.start:s.start + s.anchor.numel()])
        self.anchor_step = int(loaded["mer"]["anchor_step"])


def sharded_items(model_sharded: dict, path: str = "") -> dict:
    """{"chunk<i>/<local name>": ShardedTensor or factory} of the model's sharded state dict
    (local names are unique on a rank; the ShardedTensors' keys are not: megatron stacks the
    layers of a chunk under one key with an offset)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for key, value in model_sharded.items():
        name = f"{path}/{key}" if path else str(key)
        if isinstance(value, dict):
            out.update(sharded_items(value, name))
        elif isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            out[name] = value
    return out


def _gather_distributed(opt, slots: list[Slot]) -> dict[int, torch.Tensor]:
    """The whole anchors of the parameters in `opt`'s DDP buffers: per bucket, this rank's
    shard laid out as in the buffer, all-gathered over the data-parallel group (megatron's
    parameter all-gather, on the fp32 anchor)."""
    import torch.distributed as dist

    mine = {id(s.param): s.anchor for s in slots if s.start is not None}
    group = opt.data_parallel_group
    size = dist.get_world_size(group)
    whole = {}
    for index, buffer in enumerate(opt.buffers):
        for bucket_maps in opt.gbuf_ranges[index].values():
            for b, bucket_map in enumerate(bucket_maps):
                bucket = buffer.buckets[b]
                shard = bucket.grad_data.numel() // size
                device = bucket.grad_data.device
                local = torch.zeros(shard, dtype=torch.float32, device=device)
                for param, ranges in bucket_map["param_map"].items():
                    r = ranges["gbuf_local"]
                    local[r.start:r.end] = mine[id(param)]
                full = torch.empty(shard * size, dtype=torch.float32, device=device)
                dist.all_gather_into_tensor(full, local, group=group)
                for param in bucket.params_list:
                    first, last = bucket.param_to_index[param]
                    whole[id(param)] = full[first:last].view(param.shape)
    return whole


def build_mer(config: MerConfig | None, optimizer, chunks, *, step: int,
              resumed_from: Path | None) -> Mer | None:
    """The run's Mer (None without train.mer): its anchor from the checkpoint it resumes when
    that has one, else the current parameters at `step`."""
    if config is None:
        return None
    mer = Mer(config, optimizer, chunks, step=step)
    if resumed_from is not None:
        _restore(mer, resumed_from, step)
    log.info("%s", mer.cost_text())
    return mer


def _restore(mer: Mer, ckpt: Path, step: int) -> None:
    from megatron.core import dist_checkpointing

    from engine.checkpoint.io import load_extra

    saved = (dist_checkpointing.load_common_state_dict(str(ckpt)) or {}).get("mer")
    if not saved:
        log.info("train.mer: %s has no anchor; the anchor is the weights at step %d", ckpt, step)
        return
    loaded, model_sharded = load_extra(
        ckpt, mer.chunks, lambda model: mer.sharded_state_dict(model, loading=True))
    mer.load(loaded, model_sharded)
    changed = [f"{k} {saved[k]} -> {getattr(mer.config, k)}" for k in ("interval", "epsilon")
               if saved.get(k) != getattr(mer.config, k)]
    log.info("train.mer: anchor of step %d restored from %s (phase %d of %d)%s",
             mer.anchor_step, ckpt, step - mer.anchor_step, mer.config.interval,
             f"; changed: {', '.join(changed)}" if changed else "")

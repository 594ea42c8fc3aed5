"""Random initialization that does not depend on the layout: a model made at TP=2, PP=2, PP x VPP
or EP=2 has the weights it has at TP=1, so "every layout trains the same model" holds from scratch.

megatron-core seeds its initialization per pipeline and expert rank and draws a stage's layers
(and a rank's experts) in sequence, so its random weights depend on the layout (measured on
configs/tiny-cpu.yaml: step-1 loss 8.38409 at TP=1 and TP=2, 8.37078 at PP=2, 8.35653 at
PP=2 x VPP=2). Here every parameter is drawn again once the chunks are built, from a generator of
its own keyed by (train.seed, its checkpoint key, its layer and expert index): the identity
megatron's `sharded_state_dict` gives each tensor at every layout. Each rank draws the whole
(tensor-parallel unsharded) tensor of each of its parameters with the distribution of
engine.models.weights' INIT_RULES and copies its own slice.

Cost, on top of megatron-core's own init (kept: it also marks the tensor-parallel weights that
gradient clipping counts once): one whole parameter in memory at a time (Llama-3-8B's largest,
the 128256 x 4096 embedding, 2.1 GB in fp32), and every rank draws tp x its share of values.
Values are drawn on the parameters' device: on CPU ~165 M values/s on one thread (measured here,
a 28672 x 4096 tensor in 0.7 s; configs/tiny-cpu.yaml's 5 M parameters take 0.03 s after
megatron's 0.05 s), so a TP=8 rank of an 8B model (8e9 values) would take ~50 s on CPU; on a
GPU, whose generator draws tens of G values/s, about a second (an estimate: not measured here).
The draw is the same on every rank with the same device: CPU and CUDA generators differ, and
CUDA's depends on the GPU's SM count (one job's GPUs agree). Imports megatron-core's
dist_checkpointing helpers; no process group, no file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

import torch

from engine.config.recipe import ModelConfig
from engine.models.weights import init_rule

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InitSpec:
    """The numbers of the init distributions (megatron-core 0.16.1's TransformerConfig rules)."""

    seed: int
    """train.seed: with the key, it decides every value."""
    std: float
    """init_method_std: "normal" and "vocab" tensors."""
    scaled_std: float
    """init_method_std / sqrt(2 num_layers): "scaled" tensors (output_layer_init_method)."""
    vocab_size: int
    """Rows of "vocab" tensors that are tokens; the padding rows after them are zero."""


def init_spec(model: ModelConfig, *, seed: int, vocab_size: int) -> InitSpec:
    return InitSpec(seed=seed, std=model.init_method_std,
                    scaled_std=model.init_method_std / math.sqrt(2.0 * model.num_layers),
                    vocab_size=vocab_size)


def key_seed(seed: int, key: str, index: tuple[int, ...]) -> int:
    """A 63-bit generator seed for tensor `key` at `index` (its layer and expert numbers when
    they are axes of the checkpoint tensor): the same in every process and Python run."""
    digest = hashlib.sha256(f"{seed}/{key}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def draw_full(key: str, index: tuple[int, ...], shape: tuple[int, ...], spec: InitSpec, *,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """The whole float32 tensor `key` at `index` of global `shape` (without the layer and expert
    axes): a function of (spec, key, index, shape) only. A "vocab" tensor's token rows do not
    depend on how many padding rows follow them."""
    kind = init_rule(key)
    if kind == "ones":
        return torch.ones(shape, device=device)
    full = torch.zeros(shape, device=device)
    if kind == "zeros":
        return full
    generator = torch.Generator(device=device)
    generator.manual_seed(key_seed(spec.seed, key, index))
    rows = min(shape[0], spec.vocab_size) if kind == "vocab" else shape[0]
    std = spec.scaled_std if kind == "scaled" else spec.std
    full[:rows].normal_(0.0, std, generator=generator)
    return full


class _Draws:
    """Slices of drawn tensors, the last whole tensor kept (SwiGLU's gate and up halves are two
    slices of one checkpoint tensor): one whole parameter in memory at a time."""

    def __init__(self, spec: InitSpec, device: torch.device):
        self.spec, self.device = spec, device
        self.last: tuple[tuple, torch.Tensor] | None = None
        self.values = 0

    def slice(self, sh) -> torch.Tensor:
        """This rank's part of ShardedTensor `sh`, as a tensor of its local shape."""
        if sh.flattened_range is not None:
            raise RuntimeError(f"random init: '{sh.key}' is a flattened shard; expected a "
                               "model parameter's ShardedTensor")
        prepended = sh.prepend_axis_num
        ident = (sh.key, tuple(sh.global_offset[:prepended]), tuple(sh.global_shape[prepended:]))
        if self.last is None or self.last[0] != ident:
            self.last = None  # free the previous tensor before drawing the next
            self.last = (ident, draw_full(*ident, self.spec, device=self.device))
            self.values += self.last[1].numel()
        return self.last[1][sh.global_slice()[prepended:]]

    def materialize(self, entry):
        """The local tensor a ShardedTensor or ShardedTensorFactory (SwiGLU fc1, experts)
        stands for: factories are built, filled and merged back by their own merge_fn."""
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        if isinstance(entry, ShardedTensor):
            return self.slice(entry)
        if isinstance(entry, ShardedTensorFactory):
            built = entry.build()
            return entry.merge_fn(dict_list_map_outplace(self.materialize, built))
        raise RuntimeError(f"random init: unexpected {type(entry).__name__} in a factory")


def initialize_weights(chunks: list[torch.nn.Module], spec: InitSpec) -> None:
    """Overwrite every parameter of `chunks` (this rank's model chunks, before DDP wraps them)
    with its slice of the layout-independent draw. Every parameter must be covered by one entry
    of its chunk's `sharded_state_dict()`: a parameter megatron would not checkpoint would keep
    megatron's layout-dependent values, so that is an error."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    start, values, tensors = time.perf_counter(), 0, 0
    for chunk in chunks:
        params = {id(p): name for name, p in chunk.named_parameters()}
        done: set[int] = set()
        device = next(chunk.parameters()).device
        draws = _Draws(spec, device)
        for entry in nested_values(chunk.sharded_state_dict()):
            if not isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
                continue  # extra state (ShardedObject), not a weight
            if id(entry.data) not in params or id(entry.data) in done:
                continue  # a buffer; or a tied weight already drawn
            local = draws.materialize(entry)
            if tuple(local.shape) != tuple(entry.data.shape):
                raise RuntimeError(f"random init: '{entry.key}' drew {tuple(local.shape)} for "
                                   f"'{params[id(entry.data)]}' of {tuple(entry.data.shape)}")
            with torch.no_grad():
                entry.data.copy_(local)
            done.add(id(entry.data))
        missing = sorted(name for i, name in params.items() if i not in done)
        if missing:
            raise RuntimeError(f"random init: no checkpoint key covers {missing[:3]}")
        values, tensors = values + draws.values, tensors + len(done)
    log.info("random init: %d tensors from seed %d, %.3g values drawn in %.1f s (layout-"
             "independent)", tensors, spec.seed, values, time.perf_counter() - start)

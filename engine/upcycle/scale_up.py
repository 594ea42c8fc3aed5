"""Scale-Up (AquilaMoE's EfficientScale, arXiv 2408.06567, stage 1): a pretrained dense decoder
grown wider and deeper into the initialization of a larger one.

`scale_up(state, src, dst, spec=...)` takes an unsharded TP=1 state dict (megatron GPTModel keys,
as `engine.checkpoint.unsharded.read_unsharded` gives it) and the two model shapes, and returns
the grown state dict and a `SourceMap` naming the source of every new hidden dimension, FFN
neuron, KV group, query head and layer. Width first (`width.py`: FPI, AKI, AKI-Pro or exact),
on the source layers, then depth (`depth.py`: stack, interpolate or identity blocks). Pure: no
files, no megatron, no process group; the random draws (fresh units, noise) come from one
generator seeded by `spec.seed`, so the result is a function of its arguments. The embedding
keeps its row count; the caller pads it for the target's tensor-parallel size
(`engine.models.weights.resize_vocab`).

Invariants, each with its test in tests/unit/upcycle/test_scale_up.py: FPI at integer ratios and
exact at any ratio leave the logits unchanged (fp64 reference forward); identity blocks leave
them bit-identical; the depth maps are the papers' own examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config.recipe import ModelConfig
from engine.models.weights import (
    EMBEDDING,
    FC1,
    FC2,
    FINAL_NORM,
    INPUT_NORM,
    MLP_NORM,
    OUTPUT,
    PROJ,
    QKV,
    QKV_BIAS,
    Shape,
    layer_key,
)
from engine.upcycle import UpcycleError
from engine.upcycle.depth import DEPTH_METHODS, ZEROED_IN_IDENTITY, LayerSource, depth_map
from engine.upcycle.width import (
    LAYER_TENSORS,
    WidthPlan,
    copy_axis,
    fresh_axis,
    grow_globals,
    grow_layer_copying,
    grow_layer_exact,
)

StateDict = dict[str, torch.Tensor]
WIDTH_METHODS = ("fpi", "aki", "aki-pro", "exact")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScaleUpSpec:
    """How to grow: the width and depth methods, symmetry-breaking noise and the seed."""

    width_method: str = "fpi"
    """fpi | aki | aki-pro | exact (see width.py)."""
    depth_method: str = "stack"
    """stack | interpolate | identity (see depth.py)."""
    noise: float = 0.0
    """Std of the noise added to the input side of added (copied) units, relative to the std of
    the tensor they are in (0.01 = 1%); fpi/aki/aki-pro (width.py)."""
    seed: int = 0
    """Seed of every random draw (the exact method's fresh units, the noise)."""

    def __post_init__(self):
        if self.width_method not in WIDTH_METHODS:
            raise UpcycleError(f"width method {self.width_method!r}: expected one of "
                               f"{'|'.join(WIDTH_METHODS)}")
        if self.depth_method not in DEPTH_METHODS:
            raise UpcycleError(f"depth method {self.depth_method!r}: expected one of "
                               f"{'|'.join(DEPTH_METHODS)}")
        if not self.noise >= 0.0:
            raise UpcycleError(f"noise: expected a relative std >= 0, got {self.noise}")
        if self.noise and self.width_method == "exact":
            raise UpcycleError("noise: the exact method copies no unit (its new units are "
                               "freshly initialized), so there is no symmetry to break; drop it")


@dataclass(frozen=True, slots=True)
class SourceMap:
    """Where every unit of the grown model comes from; None = a fresh unit (exact method)."""

    hidden: tuple[int | None, ...]
    """g(j) for each hidden dimension."""
    ffn: tuple[int | None, ...]
    """g(j) for each FFN neuron (gate and up rows together)."""
    query_groups: tuple[int | None, ...]
    """Source KV group of each KV group."""
    heads: tuple[int | None, ...]
    """Source query head (global index) of each query head."""
    new_units_from: tuple[int | None, ...]
    """Per source layer l, the source layer its added units were copied from: l (FPI), l+1 (AKI,
    the last layer itself), None (exact: fresh)."""
    layers: tuple[LayerSource, ...]
    """Per target layer: the source layer it copies, and whether it is an identity block."""

    def to_dict(self) -> dict:
        return {"hidden": list(self.hidden), "ffn": list(self.ffn),
                "query_groups": list(self.query_groups), "heads": list(self.heads),
                "new_units_from": list(self.new_units_from),
                "layers": [{"source": s.source, "identity": s.identity} for s in self.layers]}


def _head_dim(m: ModelConfig) -> int:
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def _groups(m: ModelConfig) -> int:
    return m.num_query_groups or m.num_attention_heads


def check_shapes(src: ModelConfig, dst: ModelConfig, spec: ScaleUpSpec) -> None:
    """One-line UpcycleError unless `dst` is a growth of `src` that `spec` can make."""
    sizes = {"hidden_size": lambda m: m.hidden_size,
             "ffn_hidden_size": lambda m: m.ffn_hidden_size,
             "num_layers": lambda m: m.num_layers,
             "num_attention_heads": lambda m: m.num_attention_heads,
             "num_query_groups": _groups}
    for key, size in sizes.items():
        old, new = size(src), size(dst)
        if new < old:
            raise UpcycleError(f"--{key.replace('_', '-')} {new}: Scale-Up only grows; the "
                               f"source has {key}={old}")
    if _head_dim(dst) != _head_dim(src):
        raise UpcycleError(f"head width {_head_dim(dst)} != the source's {_head_dim(src)}: heads "
                           "grow in number, not width (the softmax scale 1/sqrt(head_dim) would "
                           f"change); set kv_channels={_head_dim(src)}")
    old_per, new_per = src.num_attention_heads // _groups(src), \
        dst.num_attention_heads // _groups(dst)
    if new_per < old_per:
        raise UpcycleError(f"{dst.num_attention_heads} heads in {_groups(dst)} KV groups is "
                           f"{new_per} per group, fewer than the source's {old_per}: a KV group "
                           "cannot be shared by fewer heads than before")
    if spec.width_method == "aki-pro" and _groups(dst) != _groups(src):
        raise UpcycleError(f"--num-query-groups {_groups(dst)}: aki-pro keeps the source's "
                           f"{_groups(src)} KV groups and grows heads inside each (AquilaMoE); "
                           "use aki or fpi to add groups")
    for key in ("add_qkv_bias", "family"):
        if getattr(src, key) != getattr(dst, key):
            raise UpcycleError(f"model.{key}: {getattr(dst, key)!r} differs from the source's "
                               f"{getattr(src, key)!r}; Scale-Up changes sizes only")
    if dst.share_embeddings_and_output_weights and (
            not src.share_embeddings_and_output_weights or dst.hidden_size != src.hidden_size):
        raise UpcycleError("share_embeddings_and_output_weights: a grown hidden size needs "
                           "separate input and output embeddings (the embedding is copied, the "
                           "output layer split or scaled differently); untie them in the target")


def _check_state(state: StateDict, src: ModelConfig) -> None:
    h, f = src.hidden_size, src.ffn_hidden_size
    d, heads, groups = _head_dim(src), src.num_attention_heads, _groups(src)
    expected = {INPUT_NORM: (h,), MLP_NORM: (h,), QKV: ((heads + 2 * groups) * d, h),
                QKV_BIAS: ((heads + 2 * groups) * d,), PROJ: (h, heads * d),
                FC1: (2 * f, h), FC2: (h, f)}
    if not src.add_qkv_bias:
        del expected[QKV_BIAS]
    want = {layer_key(i, k): s for i in range(src.num_layers) for k, s in expected.items()}
    rows = state[EMBEDDING].shape[0] if EMBEDDING in state else 0
    want.update({EMBEDDING: (rows, h), FINAL_NORM: (h,)})
    if not src.share_embeddings_and_output_weights:
        want[OUTPUT] = (rows, h)
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise UpcycleError(f"the source weights do not match the source model: missing "
                           f"{missing[:3]}, unexpected {extra[:3]} (no Scale-Up rule for them)")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise UpcycleError(f"'{name}' is {tuple(state[name].shape)}; expected {shape} from "
                               "the source model")


def width_plan(src: ModelConfig, dst: ModelConfig, spec: ScaleUpSpec, rows: int) -> WidthPlan:
    axis = fresh_axis if spec.width_method == "exact" else copy_axis
    per = lambda m: m.num_attention_heads // _groups(m)
    return WidthPlan(
        method=spec.width_method,
        hidden=axis(src.hidden_size, dst.hidden_size),
        ffn=axis(src.ffn_hidden_size, dst.ffn_hidden_size),
        groups=axis(_groups(src), _groups(dst)),
        heads_per_group=axis(per(src), per(dst)),
        src=Shape(src, rows), dst=Shape(dst, rows),
        init_std=dst.init_method_std, noise=spec.noise)


def _layer(state: StateDict, i: int) -> StateDict:
    return {k: state[layer_key(i, k)] for k in LAYER_TENSORS if layer_key(i, k) in state}


def _grow_width(state: StateDict, src: ModelConfig, plan: WidthPlan,
                gen: torch.Generator) -> tuple[list[StateDict], StateDict]:
    layers = []
    for i in range(src.num_layers):
        cur = _layer(state, i)
        if plan.method == "exact":
            layers.append(grow_layer_exact(cur, plan, gen))
        else:
            nxt = _layer(state, min(i + 1, src.num_layers - 1)) if plan.method != "fpi" else cur
            layers.append(grow_layer_copying(cur, nxt, plan, gen))
    output = state.get(OUTPUT, state[EMBEDDING])  # tied: the embedding is the output layer
    embedding, final_norm, output = grow_globals(state[EMBEDDING], state[FINAL_NORM], output,
                                                 plan, gen)
    return layers, {EMBEDDING: embedding, FINAL_NORM: final_norm, OUTPUT: output}


def scale_up(state: StateDict, src: ModelConfig, dst: ModelConfig, *,
             spec: ScaleUpSpec) -> tuple[StateDict, SourceMap]:
    """Grow `state` (the model `src`) into the model `dst`: (grown state dict, source map).

    Width by `spec.width_method`, then depth by `spec.depth_method`; tensors keep their dtype
    (the arithmetic runs in at least fp32). A tied source grown in hidden size comes out untied
    (`dst` must say so; `check_shapes`)."""
    check_shapes(src, dst, spec)
    _check_state(state, src)
    dtype = state[EMBEDDING].dtype
    work = torch.promote_types(dtype, torch.float32)
    state = {k: v.to(work) for k, v in state.items()}
    plan = width_plan(src, dst, spec, state[EMBEDDING].shape[0])
    gen = torch.Generator().manual_seed(spec.seed)
    layers, grown = _grow_width(state, src, plan, gen)
    if dst.share_embeddings_and_output_weights:
        del grown[OUTPUT]
    sources = depth_map(src.num_layers, dst.num_layers, spec.depth_method)
    used = set()
    for target, source in enumerate(sources):
        tensors = layers[source.source]
        for name, t in tensors.items():
            if source.identity and name in ZEROED_IN_IDENTITY:
                t = torch.zeros_like(t)
            elif source.source in used:
                t = t.clone()  # a repeated layer trains on its own from here on
            grown[layer_key(target, name)] = t
        used.add(source.source)
    grown = {k: v.to(dtype).contiguous() for k, v in grown.items()}
    return grown, _source_map(plan, spec, src, sources)


def _source_map(plan: WidthPlan, spec: ScaleUpSpec, src: ModelConfig,
                sources: tuple[LayerSource, ...]) -> SourceMap:
    per = plan.heads_per_group
    heads = tuple(None if g is None or p is None else g * per.old + p
                  for g in plan.groups.source for p in per.source)
    last = src.num_layers - 1
    from_layer = {"fpi": lambda i: i, "aki": lambda i: min(i + 1, last),
                  "aki-pro": lambda i: min(i + 1, last), "exact": lambda i: None}
    return SourceMap(hidden=plan.hidden.source, ffn=plan.ffn.source,
                     query_groups=plan.groups.source, heads=heads,
                     new_units_from=tuple(map(from_layer[spec.width_method],
                                              range(src.num_layers))),
                     layers=sources)


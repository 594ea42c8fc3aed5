"""HF <-> megatron weight layouts: the map record and its transforms, in inverse pairs, and
megatron's state-dict names.

Targets are the keys of a megatron-core GPTModel's state dict at TP=1/PP=1 (local spec); its
`sharded_state_dict` turns them into layout-independent checkpoint keys, so these maps never see
tensor or pipeline parallelism. The names are spelled here once (the constants below); the tables
and the upcycling math use the constants. Each `to_engine` has a `to_hf` that undoes it exactly;
the tests check the round trip bit for bit. Pure: tensors and the model shape in, tensors out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config.recipe import ModelConfig
from engine.models.vocab import pad_vocab, repad_vocab, trim_vocab

# megatron GPTModel state-dict names (TP=1). Whole-model tensors:
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
"""Absent when the output layer is tied to the embedding."""
VOCAB_TENSORS = (EMBEDDING, OUTPUT)
"""The tensors with one row per (padded) vocabulary entry."""
LAYER = "decoder.layers.{i}"
# ... and within layer {i} (after `LAYER.`):
INPUT_NORM = "input_layernorm.weight"
QKV = "self_attention.linear_qkv.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"
PROJ = "self_attention.linear_proj.weight"
MLP_NORM = "pre_mlp_layernorm.weight"
FC1 = "mlp.linear_fc1.weight"
"""SwiGLU [gate; up]."""
FC2 = "mlp.linear_fc2.weight"
ROUTER = "mlp.router.weight"
EXPERT_FC1 = "mlp.experts.local_experts.{e}.linear_fc1.weight"
EXPERT_FC2 = "mlp.experts.local_experts.{e}.linear_fc2.weight"
SHARED_EXPERT = "mlp.shared_experts"


def layer_key(i: int, name: str, **slots) -> str:
    """The full name of tensor `name` of layer `i` (slots fill e.g. `{e}`)."""
    return f"{LAYER.format(i=i)}.{name.format(**slots) if slots else name}"


def resize_vocab(state: dict, vocab_size: int, padded_vocab_size: int) -> dict:
    """A state dict whose vocabulary tensors carry `padded_vocab_size` rows (same tokens)."""
    return {k: repad_vocab(v, vocab_size, padded_vocab_size) if k in VOCAB_TENSORS else v
            for k, v in state.items()}


@dataclass(frozen=True, slots=True)
class Shape:
    """What the transforms need to know: the model shape and the embedding's padded row count."""

    model: ModelConfig
    padded_vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.model.kv_channels or self.model.hidden_size // self.model.num_attention_heads

    @property
    def groups(self) -> int:
        return self.model.num_query_groups or self.model.num_attention_heads


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Shape) -> torch.Tensor:
    """[q; k; v] -> megatron's per-group interleave [q_g0.., k_g0, v_g0, q_g1.., k_g1, v_g1, ...].

    Weights ([rows, hidden]) and biases ([rows]) alike: megatron splits the fused rows into
    tensor-parallel chunks of whole query groups, so each group's q, k and v must be adjacent."""
    g, d = shape.groups, shape.head_dim
    rest = q.shape[1:]
    q = q.reshape(g, -1, d, *rest)  # [groups, heads_per_group, d, ...]
    k = k.reshape(g, 1, d, *rest)
    v = v.reshape(g, 1, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, ...]:
    g, d = shape.groups, shape.head_dim
    per_group = shape.model.num_attention_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, per_group + 2, d, *rest)
    q, k, v = grouped.split([per_group, 1, 1], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, shape: Shape) -> torch.Tensor:
    """SwiGLU: megatron's fc1 is [gate; up] (its TP checkpoint format splits each half itself)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, ...]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def _pad_vocab(weight: torch.Tensor, shape: Shape) -> torch.Tensor:
    """HF rows -> the padded rows (engine.models.vocab's rule; real tokens' logits do not depend
    on the padding rows, which get logit 0)."""
    return pad_vocab(weight, shape.padded_vocab_size)


def _trim_vocab(weight: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, ...]:
    return (trim_vocab(weight, shape.model.vocab_size),)


def _identity_to_engine(t: torch.Tensor, shape: Shape) -> torch.Tensor:
    return t


def _identity_to_hf(t: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, ...]:
    return (t,)


@dataclass(frozen=True, slots=True)
class WeightMap:
    """HF tensor names (templates with `{i}` for the layer) <-> one engine tensor."""

    hf: tuple[str, ...]
    engine: str
    to_engine: Callable[..., torch.Tensor] = _identity_to_engine
    """(*hf_tensors, shape) -> engine tensor."""
    to_hf: Callable[..., tuple[torch.Tensor, ...]] = _identity_to_hf
    """(engine_tensor, shape) -> hf tensors, in `hf` order."""
    when: str | None = None
    """Present only if this holds: "qkv_bias", "untied" (output layer not tied),
    "shared_expert", "shared_expert_gate"."""
    layers: str = "all"
    """Per-layer maps: on "all" layers, only "dense" (MLP) layers or only "moe" layers."""

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.engine

    def applies(self, model: ModelConfig) -> bool:
        moe = model.moe
        return {None: True, "qkv_bias": model.add_qkv_bias,
                "untied": not model.share_embeddings_and_output_weights,
                "shared_expert": moe is not None and moe.shared_expert_ffn_hidden_size is not None,
                "shared_expert_gate": moe is not None and moe.shared_expert_gate}[self.when]


def is_moe_layer(model: ModelConfig, layer: int) -> bool:
    """megatron's rule: layer i (0-based) is MoE when i % moe.layer_freq == 0."""
    return model.moe is not None and layer % model.moe.layer_freq == 0


def _layer(name: str) -> str:
    return f"{LAYER}.{name}"


def llama_weights() -> tuple[WeightMap, ...]:
    """The Llama layout (HF `LlamaForCausalLM` names), shared by every Llama-like family."""
    attn, mlp = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
    return (
        WeightMap(("model.embed_tokens.weight",), EMBEDDING, _pad_vocab, _trim_vocab),
        WeightMap(("model.layers.{i}.input_layernorm.weight",), _layer(INPUT_NORM)),
        WeightMap((f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
                  _layer(QKV), fuse_qkv, split_qkv),
        WeightMap((f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"),
                  _layer(QKV_BIAS), fuse_qkv, split_qkv, "qkv_bias"),
        WeightMap((f"{attn}.o_proj.weight",), _layer(PROJ)),
        WeightMap(("model.layers.{i}.post_attention_layernorm.weight",), _layer(MLP_NORM)),
        WeightMap((f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"), _layer(FC1),
                  fuse_gate_up, split_gate_up, layers="dense"),
        WeightMap((f"{mlp}.down_proj.weight",), _layer(FC2), layers="dense"),
        WeightMap(("model.norm.weight",), FINAL_NORM),
        WeightMap(("lm_head.weight",), OUTPUT, _pad_vocab, _trim_vocab, "untied"),
    )


LLAMA_DROPPED = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)
"""HF buffers some checkpoints carry that are not weights (recomputed from the config)."""


def _swiglu_maps(hf_prefix: str, fc1: str, fc2: str, names: tuple[str, str, str], **kw):
    """fc1 = [gate; up] and fc2 = down of one SwiGLU MLP (names: gate, up, down)."""
    gate, up, down = (f"{hf_prefix}.{n}.weight" for n in names)
    return (WeightMap((gate, up), _layer(fc1), fuse_gate_up, split_gate_up, **kw),
            WeightMap((down,), _layer(fc2), **kw))


def mixtral_weights() -> tuple[WeightMap, ...]:
    """Mixtral (Jiang et al. 2024): every layer's MLP is `block_sparse_moe` with experts w1 (gate),
    w3 (up), w2 (down) and a linear router `gate`."""
    moe = "model.layers.{i}.block_sparse_moe"
    return llama_weights() + (
        WeightMap((f"{moe}.gate.weight",), _layer(ROUTER), layers="moe"),
        *_swiglu_maps(f"{moe}.experts.{{e}}", EXPERT_FC1, EXPERT_FC2, ("w1", "w3", "w2"),
                      layers="moe"),
    )


def qwen2_moe_weights() -> tuple[WeightMap, ...]:
    """Qwen2-MoE: routed experts, an always-on shared expert scaled by sigmoid(shared_expert_gate)
    and a router `gate`, with HF's usual gate/up/down names."""
    moe = "model.layers.{i}.mlp"
    names = ("gate_proj", "up_proj", "down_proj")
    return llama_weights() + (
        WeightMap((f"{moe}.gate.weight",), _layer(ROUTER), layers="moe"),
        *_swiglu_maps(f"{moe}.experts.{{e}}", EXPERT_FC1, EXPERT_FC2, names, layers="moe"),
        *_swiglu_maps(f"{moe}.shared_expert", f"{SHARED_EXPERT}.linear_fc1.weight",
                      f"{SHARED_EXPERT}.linear_fc2.weight", names, layers="moe",
                      when="shared_expert"),
        WeightMap((f"{moe}.shared_expert_gate.weight",), _layer(f"{SHARED_EXPERT}.gate_weight"),
                  layers="moe", when="shared_expert_gate"),
    )


# Random initialization (engine.models.initialize), by the end of a tensor's checkpoint key (the
# `sharded_state_dict` key: norms appear there as TE's `layer_norm_weight`); first match wins.
# megatron-core 0.16.1's defaults (TransformerConfig.init_method, output_layer_init_method):
# "normal": N(0, init_method_std); "scaled": N(0, init_method_std / sqrt(2 num_layers)), the
# projections back into the residual stream (GPT-2's scaled residual init); "vocab": "normal" on
# the tokenizer's rows, zero padding rows (engine.models.vocab); "ones", "zeros".
INIT_RULES: tuple[tuple[str, str], ...] = (
    (EMBEDDING, "vocab"), (OUTPUT, "vocab"),
    ("layer_norm_weight", "ones"), ("layernorm.weight", "ones"),
    ("router.weight", "normal"), ("router.bias", "normal"),  # megatron's TopKRouter
    (".bias", "zeros"), ("layer_norm_bias", "zeros"),
    ("linear_proj.weight", "scaled"), ("linear_fc2.weight", "scaled"),
    ("linear_qkv.weight", "normal"), ("linear_fc1.weight", "normal"),
    ("shared_experts.gate_weight", "normal"), ("position_embeddings.weight", "normal"),
)


def init_rule(key: str) -> str:
    """How random init draws the tensor with checkpoint key `key` (INIT_RULES)."""
    for suffix, kind in INIT_RULES:
        if key.endswith(suffix):
            return kind
    raise KeyError(f"'{key}': no random-init rule (engine.models.weights INIT_RULES)")

"""A model family as data: the architecture constants that are not recipe keys, and its HF names.

A family says how a decoder is built (norm, MLP activation, positions, biases), which HF
`architectures` / `model_type` it reads and writes, and its weight table (`engine.models.weights`).
Shapes (layers, widths, heads) are recipe keys (`ModelConfig`). No per-family code paths.
"""

from dataclasses import dataclass

from engine.models.weights import WeightMap


@dataclass(frozen=True, kw_only=True, slots=True)
class HFMoEKeys:
    """Where an HF MoE config keeps its mixture-of-experts settings."""

    num_experts: str
    """e.g. num_local_experts (Mixtral), num_experts (Qwen2-MoE)."""
    expert_width: str
    """e.g. intermediate_size (Mixtral), moe_intermediate_size (Qwen2-MoE)."""
    renormalize: str | None = None
    """Key saying whether the top-k weights are renormalized (false: softmax over all experts,
    then top-k); None = always renormalized (top-k, then softmax)."""
    shared_expert_width: str | None = None
    """Key of the shared expert's width (Qwen2-MoE); None = no shared expert."""
    shared_expert_gate: bool = False
    """The shared expert is scaled by sigmoid(gate(x))."""
    sparse_step: str | None = None
    """Key of "every n-th layer is MoE" (Qwen2-MoE decoder_sparse_step)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Family:
    name: str
    """Registry key, the recipe's `model.family`."""
    hf_architectures: tuple[str, ...]
    """HF `config.json` `architectures` entries this family reads; the first is written."""
    hf_model_type: str
    """HF `config.json` `model_type` written on export."""
    weights: tuple[WeightMap, ...] = ()
    """HF <-> engine weight table."""
    dropped: tuple[str, ...] = ()
    """HF tensors that are not weights (buffers recomputed from the config)."""
    qkv_bias: bool | None = None
    """QKV bias fixed by the architecture (Qwen2: always); None = HF `attention_bias` decides."""
    hf_extra: tuple[tuple[str, object], ...] = ()
    """Constant HF config entries written on export."""
    hf_moe: HFMoEKeys | None = None
    """Mixture-of-experts families: their HF config keys; None = dense."""
    moe_family: str | None = None
    """Dense families: the family a mixture of experts upcycled from it (Scale-Out) belongs to,
    when HF has one that holds it exactly (Llama, Mistral -> Mixtral: the same attention, every
    MLP a top-k-then-softmax MoE); None = none (Qwen2-MoE always has a shared expert, which
    upcycling does not make): the MoE keeps the dense family's name and cannot be exported."""
    normalization: str = "RMSNorm"
    """megatron-core `TransformerConfig.normalization`."""
    gated_linear_unit: bool = True
    """SwiGLU: fc1 holds [gate; up], the activation is silu(gate) * up."""
    add_bias_linear: bool = False
    """Biases on the linear layers other than QKV (Llama has none)."""
    position_embedding_type: str = "rope"
    """megatron-core `GPTModel.position_embedding_type`."""

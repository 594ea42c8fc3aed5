"""A model family as data: the architecture constants that are not recipe keys, and its HF names.

A family says how a decoder is built (norm, MLP activation, positions, biases), which HF
`architectures` / `model_type` it reads and writes, and its weight table (`engine.models.weights`).
Shapes (layers, widths, heads) are recipe keys (`ModelConfig`). No per-family code paths.
"""

from dataclasses import dataclass

from engine.models.weights import WeightMap


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
    normalization: str = "RMSNorm"
    """megatron-core `TransformerConfig.normalization`."""
    gated_linear_unit: bool = True
    """SwiGLU: fc1 holds [gate; up], the activation is silu(gate) * up."""
    add_bias_linear: bool = False
    """Biases on the linear layers other than QKV (Llama has none)."""
    position_embedding_type: str = "rope"
    """megatron-core `GPTModel.position_embedding_type`."""

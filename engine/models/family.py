"""A model family as data: the architecture constants that are not recipe keys.

A family says how a decoder is built (norm, MLP activation, positions, biases) and which HF
`architectures` it maps to. Shapes (layers, widths, heads) are recipe keys (`ModelConfig`).
Conversion tables join this record in the HF interop work; no per-family code paths.
"""

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class Family:
    name: str
    """Registry key, the recipe's `model.family`."""
    hf_architectures: tuple[str, ...]
    """HF `config.json` `architectures` entries this family reads and writes."""
    normalization: str = "RMSNorm"
    """megatron-core `TransformerConfig.normalization`."""
    gated_linear_unit: bool = True
    """SwiGLU: fc1 holds [gate; up], the activation is silu(gate) * up."""
    add_bias_linear: bool = False
    """Biases on the linear layers other than QKV (Llama has none)."""
    position_embedding_type: str = "rope"
    """megatron-core `GPTModel.position_embedding_type`."""

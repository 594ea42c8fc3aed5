"""Parameter counts of a decoder from its recipe shape (pure arithmetic, no torch).

Used to check the real-shape recipes against published sizes and by the FLOP formulas.
"""

from dataclasses import dataclass

from engine.config.recipe import ModelConfig


@dataclass(frozen=True, slots=True)
class ParamCount:
    embedding: int
    """Input embedding (padded vocab x hidden)."""
    output: int
    """Output layer; 0 when tied to the embedding."""
    per_layer: int
    """One decoder layer: attention, MLP and its two norms."""
    per_layer_matmul: int
    """The part of per_layer that is matrix weights (no norms, no biases)."""
    final_norm: int
    num_layers: int

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.num_layers * self.per_layer + self.final_norm


def count_parameters(model: ModelConfig, vocab_size: int, *, gated: bool = True) -> ParamCount:
    """Exact parameter count of a Llama-family decoder with `vocab_size` (already padded) rows."""
    h = model.hidden_size
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    head_dim = model.kv_channels or h // heads
    qkv_out = (heads + 2 * groups) * head_dim
    attention = h * qkv_out + heads * head_dim * h
    mlp = (3 if gated else 2) * h * model.ffn_hidden_size
    biases = qkv_out if model.add_qkv_bias else 0
    embedding = vocab_size * h
    return ParamCount(
        embedding=embedding,
        output=0 if model.share_embeddings_and_output_weights else embedding,
        per_layer=attention + mlp + biases + 2 * h,
        per_layer_matmul=attention + mlp,
        final_norm=h,
        num_layers=model.num_layers,
    )

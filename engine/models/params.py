"""Parameter counts of a decoder from its recipe shape (pure arithmetic, no torch).

Used to check the real-shape recipes against published sizes and by the FLOP formulas. For a
mixture of experts, `total` counts every expert and `matmul_active` only the top-k experts a
token passes through (plus the router and any shared expert): the FLOPs a token costs.
"""

from dataclasses import dataclass

from engine.config.recipe import ModelConfig


@dataclass(frozen=True, slots=True)
class ParamCount:
    embedding: int
    """Input embedding (padded vocab x hidden)."""
    output: int
    """Output layer; 0 when tied to the embedding."""
    layers: int
    """All decoder layers: attention, MLPs (every expert), norms, biases."""
    matmul_active: int
    """Matrix weights a token multiplies with in the decoder layers (MoE: top-k experts)."""
    final_norm: int

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.layers + self.final_norm


def _mlp(model: ModelConfig, layer: int, gated: bool) -> tuple[int, int]:
    """(all parameters, active matmul parameters) of one layer's MLP."""
    h, per_neuron = model.hidden_size, (3 if gated else 2) * model.hidden_size
    moe = model.moe
    if moe is None or layer % moe.layer_freq:
        return per_neuron * model.ffn_hidden_size, per_neuron * model.ffn_hidden_size
    expert = per_neuron * (moe.ffn_hidden_size or model.ffn_hidden_size)
    shared = per_neuron * (moe.shared_expert_ffn_hidden_size or 0) + \
        (h if moe.shared_expert_gate else 0)
    router = h * moe.num_experts
    return moe.num_experts * expert + router + shared, moe.topk * expert + router + shared


def count_parameters(model: ModelConfig, padded_vocab_size: int, *,
                     gated: bool = True) -> ParamCount:
    """Exact parameter count of a Llama-family decoder with `padded_vocab_size` embedding
    rows (engine.models.vocab)."""
    h = model.hidden_size
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    head_dim = model.kv_channels or h // heads
    qkv_out = (heads + 2 * groups) * head_dim
    attention = h * qkv_out + heads * head_dim * h
    biases = qkv_out if model.add_qkv_bias else 0
    layers = active = 0
    for layer in range(model.num_layers):
        mlp_all, mlp_active = _mlp(model, layer, gated)
        layers += attention + biases + 2 * h + mlp_all
        active += attention + mlp_active
    embedding = padded_vocab_size * h
    return ParamCount(
        embedding=embedding,
        output=0 if model.share_embeddings_and_output_weights else embedding,
        layers=layers, matmul_active=active, final_norm=h,
    )

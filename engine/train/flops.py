"""Training FLOPs per token of a Llama-family decoder (pure arithmetic).

Two conventions, both per token for forward + backward (backward = 2x forward):
- `palm`: 6 * N_matmul + 6 * L * 2 * H_q * head_dim * T, where N_matmul counts every matrix
  weight including the output layer, and attention scores/values count the full T x T square
  (PaLM, Chowdhery et al. 2022, appendix B; torchtitan's `get_num_flop_per_token`).
- `megatron`: the same but causal attention counted at half (only the lower triangle is computed;
  Megatron-LM `num_floating_point_operations` since 2024).
MFU in the engine uses `palm`. A mixture of experts counts only the top-k experts (and the
router and any shared expert) each token goes through.
"""

from engine.config.recipe import ModelConfig
from engine.models.params import count_parameters


def flops_per_token(
    model: ModelConfig, padded_vocab_size: int, seq_length: int, *, convention: str = "palm"
) -> float:
    counts = count_parameters(model, padded_vocab_size)
    n_matmul = counts.matmul_active + counts.embedding  # the output layer's matmul counts
    head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    attention = 6 * model.num_layers * 2 * model.num_attention_heads * head_dim * seq_length
    if convention == "megatron":
        attention /= 2
    elif convention != "palm":
        raise ValueError(f"unknown FLOP convention {convention!r}; expected palm|megatron")
    return 6 * n_matmul + attention

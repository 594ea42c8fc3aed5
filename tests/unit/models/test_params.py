"""Parameter counts of the real-shape recipes, against published figures and transformers itself."""

import torch
import transformers  # a dev dependency: the oracle here, never optional

from engine.config.loader import load_recipe
from engine.models.params import count_parameters


def _hf_count(model, vocab_size: int) -> int:
    """The same shape built by transformers on the meta device (no memory), counted."""
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups or model.num_attention_heads,
        attention_bias=model.add_qkv_bias,
        tie_word_embeddings=model.share_embeddings_and_output_weights,
    )
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    # HF's attention_bias also adds a bias to o_proj; ours (Qwen2/Aquila-style) is QKV only.
    o_bias = model.num_layers * model.hidden_size if model.add_qkv_bias else 0
    return sum(p.numel() for p in hf.parameters()) - o_bias


def test_llama3_8b_matches_published_count():
    model = load_recipe("configs/llama3-8b.yaml").model
    counts = count_parameters(model, model.vocab_size)
    assert counts.total == 8_030_261_248  # meta-llama/Meta-Llama-3-8B: 8.03 B parameters
    assert counts.total == _hf_count(model, model.vocab_size)


def test_llama32_1b_matches_published_count():
    model = load_recipe("configs/llama3.2-1b.yaml").model
    counts = count_parameters(model, model.vocab_size)
    assert counts.total == 1_235_814_400  # meta-llama/Llama-3.2-1B (tied embeddings)
    assert counts.total == _hf_count(model, model.vocab_size)


def test_aquila_7b_matches_transformers_count():
    model = load_recipe("configs/aquila-7b.yaml").model
    counts = count_parameters(model, model.vocab_size)
    assert counts.total == _hf_count(model, model.vocab_size)
    assert 7.0e9 <= counts.total < 7.5e9  # published as a 7B model (100k vocab, untied)


def test_qkv_bias_and_tying_change_the_count():
    model = load_recipe("configs/llama3-8b.yaml").model
    base = count_parameters(model, 1000)
    from dataclasses import replace

    biased = count_parameters(replace(model, add_qkv_bias=True), 1000)
    heads, groups, head_dim = 32, 8, 128
    assert biased.total - base.total == model.num_layers * (heads + 2 * groups) * head_dim
    tied = count_parameters(replace(model, share_embeddings_and_output_weights=True), 1000)
    assert base.total - tied.total == 1000 * model.hidden_size


def test_moe_counts_every_expert_but_flops_only_the_active_ones():
    from dataclasses import replace

    from engine.config.recipe import MoEConfig
    from engine.train.flops import flops_per_token

    dense = load_recipe("configs/llama3-8b.yaml").model
    moe = replace(dense, moe=MoEConfig(num_experts=8, topk=2))
    d, m = count_parameters(dense, 1000), count_parameters(moe, 1000)
    mlp, router = 3 * 4096 * 14336, 4096 * 8
    assert m.total - d.total == dense.num_layers * (7 * mlp + router)
    assert m.matmul_active - d.matmul_active == dense.num_layers * (mlp + router)
    assert flops_per_token(moe, 1000, 128) - flops_per_token(dense, 1000, 128) == \
        6 * dense.num_layers * (mlp + router)

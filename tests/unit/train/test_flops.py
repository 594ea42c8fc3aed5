"""FLOP formulas against a hand computation for Llama-3-8B (arXiv 2407.21783 shape)."""

import pytest

from engine.config.loader import load_recipe
from engine.train.flops import flops_per_token


def test_llama3_8b_flops_per_token_by_hand():
    model = load_recipe("configs/llama3-8b.yaml").model
    h, layers, heads, groups, head_dim, ffn, vocab = 4096, 32, 32, 8, 128, 14336, 128256
    attn_weights = h * (heads + 2 * groups) * head_dim + heads * head_dim * h
    n_matmul = layers * (attn_weights + 3 * h * ffn) + vocab * h  # the output layer counts
    assert n_matmul == 7_504_658_432
    seq = 8192
    attention = 6 * layers * 2 * heads * head_dim * seq
    palm = flops_per_token(model, vocab, seq)
    assert palm == 6 * n_matmul + attention
    megatron = flops_per_token(model, vocab, seq, convention="megatron")
    assert palm - megatron == attention / 2


def test_unknown_convention_is_refused():
    model = load_recipe("configs/llama3-8b.yaml").model
    with pytest.raises(ValueError, match="palm|megatron"):
        flops_per_token(model, 128256, 128, convention="chinchilla")

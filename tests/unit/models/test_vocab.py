"""The vocabulary rule: one function decides the embedding rows, one pair pads and trims."""

import pytest
import torch

from engine.models.vocab import (
    VocabError,
    pad_vocab,
    padded_vocab_size,
    padding_free_divisor,
    repad_vocab,
    trim_vocab,
)
from engine.models.weights import EMBEDDING, OUTPUT, resize_vocab


@pytest.mark.parametrize("vocab, divisible_by, tp, padded", [
    (50257, 128, 1, 50304),    # GPT-2
    (128256, 128, 1, 128256),  # Llama 3: already a multiple of 128
    (128256, 128, 4, 128512),
    (100008, 128, 2, 100096),  # Aquila
    (32000, 1, 1, 32000),
    (1, 128, 8, 1024),
])
def test_padded_vocab_size_is_megatrons_padding(vocab, divisible_by, tp, padded):
    assert padded_vocab_size(vocab, divisible_by, tp) == padded


def test_a_model_keeps_the_rows_it_was_made_with():
    """Rows saved at tp=1 (49152 for SmolLM2, no padding) serve tp=3; rows that another tp
    cannot split, or that hold fewer rows than the tokenizer's tokens, are one line each."""
    assert padded_vocab_size(49152, 128, 3, saved=49152) == 49152
    assert padded_vocab_size(1001, 128, 1, saved=1024) == 1024  # not recomputed for tp=1
    with pytest.raises(VocabError, match="its embedding has 1001 rows, not divisible by "
                                         "parallel.tp=2"):
        padded_vocab_size(1001, 1, 2, saved=1001)
    with pytest.raises(VocabError, match="1024 rows but the tokenizer has 2000 tokens"):
        padded_vocab_size(2000, 128, 1, saved=1024)
    with pytest.raises(VocabError, match="padded_vocab_size: tp: expected >= 1, got 0"):
        padded_vocab_size(100, 128, 0)


@pytest.mark.parametrize("vocab, tp, divisor", [
    (49152, 1, 128), (49152, 3, 128), (1001, 1, 1), (1000, 2, 4), (32000, 8, 32),
    (1001, 2, 128)])  # odd at tp=2: nothing avoids padding, megatron's 128 it is
def test_the_import_divisor_avoids_padding_whenever_the_vocabulary_allows(vocab, tp, divisor):
    assert padding_free_divisor(vocab, tp) == divisor
    if vocab % tp == 0:
        assert padded_vocab_size(vocab, divisor, tp) == vocab


def test_pad_and_trim_are_inverse_and_padding_is_zero():
    w = torch.randn(10, 3)
    padded = pad_vocab(w, 16)
    assert padded.shape == (16, 3) and not padded[10:].any()
    assert torch.equal(trim_vocab(padded, 10), w)
    assert pad_vocab(w, 10) is w  # nothing to add: no copy
    assert torch.equal(repad_vocab(padded, 10, 12), pad_vocab(w, 12))
    with pytest.raises(VocabError, match="vocabulary of 10 rows exceeds the padded size 8"):
        pad_vocab(w, 8)
    with pytest.raises(VocabError, match="10 rows cannot hold a vocabulary of 11"):
        trim_vocab(w, 11)


def test_resize_vocab_touches_only_the_vocabulary_tensors():
    state = {EMBEDDING: torch.randn(16, 4), OUTPUT: torch.randn(16, 4),
             "decoder.final_layernorm.weight": torch.ones(4)}
    out = resize_vocab(state, 10, 24)
    assert out[EMBEDDING].shape == out[OUTPUT].shape == (24, 4)
    assert torch.equal(out[EMBEDDING][:10], state[EMBEDDING][:10]) and not out[OUTPUT][10:].any()
    assert out["decoder.final_layernorm.weight"] is state["decoder.final_layernorm.weight"]

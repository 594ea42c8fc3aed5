"""The vocabulary rule, in one place: how many rows the embedding and the output layer have, and
how rows are added or removed.

Two names, one meaning each, everywhere in the engine:
- `vocab_size`: the tokenizer's number of tokens (the recipe's `model.vocab_size`);
- `padded_vocab_size`: the rows of the embedding and output layer, `vocab_size` rounded up to a
  multiple of `make_vocab_size_divisible_by` x tp, so every tensor-parallel shard is equal
  (megatron/training/tokenizer/tokenizer.py `_vocab_size_with_padding`).
Padding rows are no tokens: zero when a model is made, never a label, cut off by every export and
every logit comparison.

A model's padded_vocab_size is decided once, when the model is made (random init, HF import,
upcycle) at that model's tp, and then travels with its checkpoints (`SavedLayout`): every later
reader keeps it (`padded_vocab_size(..., saved=rows)`), so a model trained at TP=2 and evaluated
at TP=1 has the same rows. Pure: integers in, integers out; tensors are handled through their
own methods (no torch import).
"""

from __future__ import annotations


class VocabError(ValueError):
    """A vocabulary that does not fit (rows vs tensor parallelism or the tokenizer)."""


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int, *,
                      saved: int | None = None) -> int:
    """Embedding rows for a tokenizer of `vocab_size` tokens at tensor-parallel size `tp`:
    `saved` (the rows of the checkpoint the model comes from) when given, else `vocab_size`
    rounded up to a multiple of divisible_by * tp."""
    for name, value in (("vocab_size", vocab_size), ("divisible_by", divisible_by), ("tp", tp)):
        if value < 1:
            raise VocabError(f"padded_vocab_size: {name}: expected >= 1, got {value}")
    if saved is not None:
        if saved % tp:
            raise VocabError(f"its embedding has {saved} rows, not divisible by parallel.tp={tp}")
        if vocab_size > saved:
            raise VocabError(f"its embedding has {saved} rows but the tokenizer has "
                             f"{vocab_size} tokens")
        return saved
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def padding_free_divisor(vocab_size: int, tp: int) -> int:
    """The largest power of two <= 128 with vocab_size divisible by it times tp (128 when there
    is none): an imported model then needs no padding rows whenever its vocabulary allows, so its
    softmax is exactly the published one."""
    for d in (128, 64, 32, 16, 8, 4, 2, 1):
        if vocab_size % (d * tp) == 0:
            return d
    return 128


def pad_vocab(weight, padded_vocab_size: int):
    """`weight` [rows, ...] with zero rows appended up to `padded_vocab_size`."""
    extra = padded_vocab_size - weight.shape[0]
    if extra < 0:
        raise VocabError(f"vocabulary of {weight.shape[0]} rows exceeds the padded size "
                         f"{padded_vocab_size}")
    if extra == 0:
        return weight
    out = weight.new_zeros((padded_vocab_size, *weight.shape[1:]))
    out[: weight.shape[0]] = weight
    return out


def trim_vocab(weight, vocab_size: int):
    """The first `vocab_size` rows of `weight`: the tokens, without the padding."""
    if weight.shape[0] < vocab_size:
        raise VocabError(f"{weight.shape[0]} rows cannot hold a vocabulary of {vocab_size}")
    return weight[:vocab_size].contiguous()


def repad_vocab(weight, vocab_size: int, padded_vocab_size: int):
    """`weight`'s token rows with the padding for another padded size (e.g. another tp)."""
    return pad_vocab(trim_vocab(weight, vocab_size), padded_vocab_size)

"""Data pipeline: tokenizers, preprocessing to megatron `.bin`/`.idx`, demo corpora, datasets.

Owns `DataError`, the one exception type of the package. This file imports nothing heavy
(no torch, no megatron-core), so `from engine.data import DataError` is cheap anywhere.
"""


class DataError(ValueError):
    """Bad data input (file, line, key, tokenizer, weight); the message is one line for the user."""

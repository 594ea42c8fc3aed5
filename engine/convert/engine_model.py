"""One unsharded engine model in this process (a world of one, TP=PP=1): what conversion reads
from and writes to. Checkpoints are layout-independent (megatron `dist_checkpointing`), so a model
written here loads at any TP/PP layout, and a checkpoint saved at any layout loads here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from engine.checkpoint import read_saved_layout
from engine.config.recipe import ParallelConfig, Recipe
from engine.models.build import build_model, model_vocab_size, transformer_config
from engine.train.distributed import destroy_parallel_state, init_distributed


def single_process(recipe: Recipe) -> Recipe:
    """`recipe` at TP=PP=1 on gloo, as conversion runs it."""
    return replace(recipe, parallel=ParallelConfig(backend="gloo"))


def checkpoint_vocab(ckpt: Path, recipe: Recipe) -> int:
    """The embedding rows of a saved model (its padding depends on the tp it was saved at)."""
    saved = read_saved_layout(ckpt)
    return saved.padded_vocab_size if saved and saved.padded_vocab_size else \
        model_vocab_size(recipe, None)


@contextlib.contextmanager
def engine_model(recipe: Recipe, *, vocab_size: int,
                 initialize: bool = False) -> Iterator[torch.nn.Module]:
    """Build the model of `recipe` with `vocab_size` embedding rows (no random init unless
    asked: conversion overwrites every weight)."""
    recipe = single_process(recipe)
    runtime = init_distributed(recipe)
    try:
        tc = transformer_config(recipe, runtime.layout, on_cpu=True,
                                extra={"perform_initialization": initialize})
        (model,) = build_model(recipe, tc, vocab_size=vocab_size, spec="local")
        yield model
    finally:
        destroy_parallel_state()


def parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())

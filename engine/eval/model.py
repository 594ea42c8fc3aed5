"""A checkpoint loaded for evaluation or generation at a TP/PP layout (under torchrun like
training): its recipe at that layout, the model chunks with the saved weights, the tokenizer it
was trained with, and a `Scorer` over them. Checked first, in one line each: the layout against
the model (training's own rules), the tokenizer against the model's vocabulary."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from engine.config.recipe import ParallelConfig, Recipe
from engine.eval.scoring import Scorer


@dataclass
class EvalModel:
    recipe: Recipe
    path: Path
    chunks: list
    tokenizer: object
    scorer: Scorer
    is_main: bool
    """Rank 0: the rank that writes files and prints."""


def eval_tokenizer(recipe: Recipe, where: str):
    """The recipe's tokenizer, checked against the model's vocabulary."""
    from engine.config.errors import ConfigError
    from engine.data.tokenizer import load_tokenizer

    tok = recipe.tokenizer
    if tok.type == "none" or not tok.path:
        raise ConfigError(f"{where}: the checkpoint's recipe names no tokenizer; evaluation needs "
                          "the one it was trained with (--tokenizer-type and --tokenizer)")
    tokenizer = load_tokenizer(tok.type, tok.path)
    if recipe.model.vocab_size is not None and tokenizer.vocab_size != recipe.model.vocab_size:
        raise ConfigError(f"{where}: tokenizer {tok.path} has {tokenizer.vocab_size} tokens but "
                          f"the model's vocabulary is model.vocab_size={recipe.model.vocab_size}")
    return tokenizer


def context_length(recipe: Recipe) -> int:
    """The longest input the model is evaluated on: model.max_position_embeddings, or the
    sequence length it was trained at when longer (a RoPE-scaled long-context stage)."""
    return max(recipe.model.max_position_embeddings, recipe.data.seq_length)


def load_for_eval(ckpt: str | os.PathLike, *, tp: int = 1, pp: int = 1, batch_size: int = 16,
                  tokenizer: tuple[str, str] | None = None,
                  max_length: int | None = None) -> EvalModel:
    """The checkpoint `ckpt` at tensor/pipeline size tp/pp (the world's other ranks are data
    parallel replicas); `tokenizer` = (type, path) overrides the recipe's; `max_length` the
    longest input (default `context_length`)."""
    from engine.checkpoint import load_weights
    from engine.checkpoint.unsharded import checkpoint_rows, read_recipe
    from engine.config.validate import validate
    from engine.distributed import init_distributed
    from engine.models.build import build_model, transformer_config
    from engine.models.spec import resolve_spec

    path, recipe = read_recipe(ckpt)
    if tokenizer is not None:
        recipe = replace(recipe, tokenizer=replace(recipe.tokenizer, type=tokenizer[0],
                                                   path=tokenizer[1]))
    sequence_parallel = recipe.model.moe is not None and tp > 1  # megatron's MoE + TP rule
    recipe = replace(recipe, parallel=ParallelConfig(tp=tp, pp=pp,
                                                     sequence_parallel=sequence_parallel))
    validate(recipe, tp * pp, source=str(path))  # the model against the layout first,
    validate(recipe, int(os.environ.get("WORLD_SIZE", "1")), source=str(path))  # then the world
    tok = eval_tokenizer(recipe, str(path))
    runtime = init_distributed(recipe)
    tc = transformer_config(recipe, runtime.layout, on_cpu=runtime.on_cpu,
                            gloo=runtime.backend == "gloo", perform_initialization=False)
    chunks = build_model(recipe, tc, padded_vocab_size=checkpoint_rows(path, recipe),
                         spec=resolve_spec(recipe.model.spec, fp8=False))
    if not runtime.on_cpu:
        chunks = [c.to(runtime.device) for c in chunks]
    load_weights(path, chunks)
    scorer = Scorer(chunks, vocab_size=recipe.model.vocab_size,
                    max_length=max_length or context_length(recipe), batch_size=batch_size,
                    pad_to=tp if sequence_parallel else 1)
    return EvalModel(recipe=recipe, path=path, chunks=chunks, tokenizer=tok, scorer=scorer,
                     is_main=runtime.is_main)

"""`engine convert engine-to-hf`: an engine checkpoint (any saved TP/PP layout) -> an HF directory
that `transformers.AutoModelForCausalLM.from_pretrained` loads: sharded safetensors + index,
config.json, the tokenizer files. Written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from engine.checkpoint import find_checkpoint, load_weights
from engine.config.loader import recipe_from_dict
from engine.convert import ConvertError
from engine.convert.engine_model import checkpoint_vocab, engine_model
from engine.convert.hf_io import ShardWriter, copy_tokenizer
from engine.convert.importer import DTYPES
from engine.convert.mapping import count_tensors, to_hf
from engine.models import get_family
from engine.models.hf_config import hf_config_from_model
from engine.models.weights import Shape
from engine.progress import Progress

log = logging.getLogger(__name__)
_HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_checkpoint_recipe(ckpt_arg: str | os.PathLike):
    """(checkpoint directory, its stored recipe) for a save directory or an iter_ directory."""
    ckpt = find_checkpoint(ckpt_arg)
    if ckpt is None:
        raise ConvertError(f"{ckpt_arg}: no checkpoint there")
    stored = ckpt / "recipe.yaml"
    if not stored.is_file():
        raise ConvertError(f"{stored}: missing; the checkpoint does not say what model it holds")
    recipe = recipe_from_dict(yaml.safe_load(stored.read_text()), source=str(stored))
    if recipe.model.vocab_size is None:  # the vocabulary came from the tokenizer: pin it
        from engine.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(recipe.tokenizer.type, recipe.tokenizer.path).vocab_size
        recipe = replace(recipe, model=replace(recipe.model, vocab_size=vocab))
    return ckpt, recipe


def engine_to_hf(ckpt_arg: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bf16",
                 max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    out = Path(out)
    if out.exists():
        raise ConvertError(f"{out}: already exists; choose a new output directory")
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    ckpt, recipe = load_checkpoint_recipe(ckpt_arg)
    family = get_family(recipe.model.family)
    config = hf_config_from_model(family, recipe.model, dtype=_HF_DTYPE_NAMES[dtype])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with engine_model(recipe, vocab_size=checkpoint_vocab(ckpt, recipe)) as model:
            load_weights(ckpt, [model])
            state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
            shape = Shape(recipe.model, state["embedding.word_embeddings.weight"].shape[0])
            writer = ShardWriter(tmp, max_shard_bytes)
            bar = Progress(f"writing {out.name}", count_tensors(family, shape, side="hf"),
                           "tensors", enabled=progress)
            for name, tensor in to_hf(family, shape, state.__getitem__):
                tensor = tensor.to(DTYPES[dtype])
                writer.add(name, tensor)
                bar.update(nbytes=tensor.numel() * tensor.element_size())
            total = writer.finish()
            bar.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if recipe.tokenizer.path:
            copy_tokenizer(Path(recipe.tokenizer.path), tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%s, %.2f GB)", out, family.name, total / 1e9)
    return out

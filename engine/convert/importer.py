"""`engine convert hf-to-engine`: an HF model directory -> an engine checkpoint + recipe fragment.

`read_hf` maps the HF tensors into an `UnshardedModel` through the family's table, tensor by
tensor; `hf_to_engine` writes it through the checkpoint boundary (engine.checkpoint.unsharded)
with the tokenizer and `recipe-fragment.yaml`, under a temporary name renamed when complete.
Memory: one copy of the weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import yaml

from engine.checkpoint.unsharded import (
    UnshardedModel,
    check_new_output,
    parameter_shapes,
    write_unsharded,
)
from engine.config.errors import ConfigError
from engine.config.loader import recipe_from_dict
from engine.config.recipe import Recipe, TokenizerConfig
from engine.config.validate import validate
from engine.convert import ConvertError
from engine.convert.hf_io import HFCheckpoint, copy_tokenizer
from engine.convert.mapping import count_tensors, to_engine
from engine.models.build import DTYPES
from engine.models.family import Family
from engine.models.hf_config import model_config_from_hf
from engine.models.vocab import padded_vocab_size, padding_free_divisor
from engine.models.weights import Shape
from engine.progress import Progress

log = logging.getLogger(__name__)

HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""HF `torch_dtype` names -> train.precision names."""


def declared_dtype(config: dict) -> str | None:
    """The HF config's `torch_dtype` (transformers 4) or `dtype` (5), e.g. "bfloat16"."""
    return config.get("torch_dtype") or config.get("dtype")


def _plain_recipe(model: dict, *, tp: int, pp: int, ep: int, dtype: str) -> dict:
    """The recipe sections of an imported model at the layout it will train at."""
    divisor = padding_free_divisor(model["vocab_size"], tp)
    model = {**model, "make_vocab_size_divisible_by": divisor}
    seq = min(model["max_position_embeddings"], 4096)
    parallel = {"tp": tp, "pp": pp, "ep": ep}
    if "moe" in model and tp > 1:
        parallel["sequence_parallel"] = True  # megatron-core's rule for MoE with TP
    return {"model": model, "parallel": parallel,
            "data": {"synthetic": True, "seq_length": seq}, "train": {"precision": dtype}}


def _import_recipe(hf: HFCheckpoint, *, tp: int, pp: int, ep: int,
                   dtype: str | None) -> tuple[Family, dict, Recipe]:
    """(family, plain recipe sections, Recipe), checked at the target layout with the one line
    training gives (`<hf dir>: parallel.tp=2 must divide model.num_attention_heads=9`)."""
    config = str(hf.path / "config.json")
    try:
        family, model = model_config_from_hf(hf.config, source=config)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    dtype = dtype or HF_DTYPES.get(declared_dtype(hf.config), "fp32")
    plain = _plain_recipe(model, tp=tp, pp=pp, ep=ep, dtype=dtype)
    recipe = recipe_from_dict(plain, source=config)
    validate(recipe, tp * pp * ep, source=str(hf.path))
    return family, plain, recipe


def _read(hf: HFCheckpoint, family: Family, recipe: Recipe, *, progress: bool) -> UnshardedModel:
    m = recipe.model
    rows = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, recipe.parallel.tp)
    shapes = parameter_shapes(recipe, rows)
    shape = Shape(m, rows)
    dtype = DTYPES[recipe.train.precision]
    bar = Progress(f"reading {hf.path.name}", count_tensors(family, shape, side="engine"),
                   "tensors", enabled=progress)
    state = {}
    for key, tensor in to_engine(family, shape, hf.get, hf.keys(), shapes):
        state[key] = tensor.to(dtype).contiguous()
        bar.update(nbytes=tensor.numel() * tensor.element_size())
    bar.close()
    missing = sorted(set(shapes) - set(state))
    if missing:  # a table that forgets a tensor would leave it uninitialized
        raise ConvertError(f"{family.name}: engine tensor '{missing[0]}' was not written "
                           f"({len(missing)} in all)")
    origin = {"hf": str(hf.path.resolve()), "architecture": hf.config["architectures"][0],
              "torch_dtype": declared_dtype(hf.config)}
    return UnshardedModel(recipe=recipe, state=state, origin=origin)


def read_hf(hf_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1, ep: int = 1,
            dtype: str | None = None, progress: bool = True) -> UnshardedModel:
    """The HF model in `hf_dir` as a whole engine model for a run at tp/pp/ep, in `dtype`
    (default: the HF config's torch_dtype, else fp32)."""
    hf = HFCheckpoint(hf_dir)
    family, _, recipe = _import_recipe(hf, tp=tp, pp=pp, ep=ep, dtype=dtype)
    return _read(hf, family, recipe, progress=progress)


def _tokenizer_section(hf_dir: Path, out: Path) -> dict | None:
    """The recipe's tokenizer for the files `copy_tokenizer` puts into out/tokenizer."""
    if (hf_dir / "tokenizer.json").is_file():
        return {"type": "hf", "path": str(out / "tokenizer")}
    if (hf_dir / "tokenizer.model").is_file():
        return {"type": "sentencepiece", "path": str(out / "tokenizer" / "tokenizer.model")}
    return None


def hf_to_engine(hf_dir: str | os.PathLike, out: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                 ep: int = 1, dtype: str | None = None, progress: bool = True) -> Path:
    """Convert; returns the output directory (a checkpoint root with a tracker)."""
    out = check_new_output(out)
    hf = HFCheckpoint(hf_dir)
    family, plain, recipe = _import_recipe(hf, tp=tp, pp=pp, ep=ep, dtype=dtype)
    tokenizer = _tokenizer_section(hf.path, out)
    if tokenizer is not None:
        recipe = replace(recipe, tokenizer=TokenizerConfig(**tokenizer))
    model = _read(hf, family, recipe, progress=progress)
    fragment = {"model": plain["model"], "parallel": plain["parallel"],
                "checkpoint": {"pretrained": str(out)},
                **({"tokenizer": tokenizer} if tokenizer else {})}

    def extras(tmp: Path) -> None:
        copy_tokenizer(hf.path, tmp / "tokenizer")
        (tmp / "recipe-fragment.yaml").write_text(
            f"# engine convert hf-to-engine {hf.path} -> {out}\n"
            f"# use: engine train --config <your recipe> --config {out}/recipe-fragment.yaml\n"
            + yaml.safe_dump(fragment, sort_keys=False))

    write_unsharded(out, model, extras=extras)
    log.info("wrote %s (%s, %d tensors)", out, family.name, len(model.state))
    return out

"""`engine convert hf-to-engine`: an HF model directory -> an engine checkpoint + recipe fragment.

The output is written under a temporary name and renamed when complete, so a failure leaves no
partial checkpoint. Memory: the engine model (one copy, no random init) plus one layer's tensors.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import yaml

from engine.checkpoint import TrainState, current_layout, save_checkpoint
from engine.config.errors import ConfigError
from engine.config.loader import recipe_from_dict
from engine.convert import ConvertError
from engine.convert.engine_model import engine_model, parameters
from engine.convert.hf_io import HFCheckpoint, copy_tokenizer
from engine.convert.mapping import count_tensors, to_engine
from engine.models.build import model_vocab_size
from engine.models.hf_config import model_config_from_hf
from engine.models.weights import Shape
from engine.progress import Progress

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def vocab_divisor(vocab_size: int, tp: int) -> int:
    """The largest power of two <= 128 with vocab_size divisible by it times tp: the embedding
    then needs no padding (exact softmax) whenever the published vocabulary allows it."""
    for d in (128, 64, 32, 16, 8, 4, 2, 1):
        if vocab_size % (d * tp) == 0:
            return d
    return 128


def _recipe(model: dict, *, tp: int, pp: int, ep: int = 1, dtype: str) -> dict:
    model = {**model, "make_vocab_size_divisible_by": vocab_divisor(model["vocab_size"], tp)}
    seq = min(model["max_position_embeddings"], 4096)
    parallel = {"tp": tp, "pp": pp, "ep": ep}
    if "moe" in model and tp > 1:
        parallel["sequence_parallel"] = True  # megatron-core's rule for MoE with TP
    return {"model": model, "parallel": parallel,
            "data": {"synthetic": True, "seq_length": seq}, "train": {"precision": dtype}}


def hf_to_engine(hf_dir: str | os.PathLike, out: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                 ep: int = 1, dtype: str | None = None, progress: bool = True) -> Path:
    """Convert; returns the output directory (a checkpoint root with a tracker)."""
    out = Path(out)
    if out.exists():
        raise ConvertError(f"{out}: already exists; choose a new output directory")
    hf = HFCheckpoint(hf_dir)
    try:
        family, model = model_config_from_hf(hf.config, source=str(hf.path / "config.json"))
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    dtype = dtype or _HF_DTYPES.get(hf.config.get("torch_dtype") or hf.config.get("dtype"), "fp32")
    plain = _recipe(model, tp=tp, pp=pp, ep=ep, dtype=dtype)
    recipe = recipe_from_dict(plain, source=str(hf.path / "config.json"))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        vocab = model_vocab_size(recipe, None)  # padded for the target tp
        with engine_model(recipe, vocab_size=vocab) as engine:
            params = parameters(engine)
            shape = Shape(recipe.model, params["embedding.word_embeddings.weight"].shape[0])
            bar = Progress(f"reading {hf.path.name}", count_tensors(family, shape, side="engine"),
                           "tensors", enabled=progress)
            written = set()
            with torch.no_grad():
                for key, tensor in to_engine(family, shape, hf.get, hf.keys(),
                                             {k: p.shape for k, p in params.items()}):
                    params[key].copy_(tensor.to(params[key].dtype))
                    written.add(key)
                    bar.update(nbytes=tensor.numel() * tensor.element_size())
            bar.close()
            missing = sorted(set(params) - written)
            if missing:  # a table that forgets a tensor would leave it at random init
                raise ConvertError(f"{family.name}: engine tensor '{missing[0]}' was not written "
                                   f"({len(missing)} in all)")
            fragment = _fragment(plain, hf, tmp, out)
            stored = {**plain, **{k: fragment[k] for k in ("tokenizer",) if k in fragment}}
            save_checkpoint(tmp, [engine], None, TrainState(0, 0, 0, {}),
                            layout=current_layout(distributed_optimizer=False,
                                                  optim_sharding="dp_reshardable",
                                                  padded_vocab_size=vocab),
                            recipe_yaml=yaml.safe_dump(stored, sort_keys=False))
        (tmp / "recipe-fragment.yaml").write_text(
            f"# engine convert hf-to-engine {hf.path} -> {out}\n"
            f"# use: engine train --config <your recipe> --config {out}/recipe-fragment.yaml\n"
            + yaml.safe_dump(fragment, sort_keys=False))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%s, %d tensors)", out, family.name, len(written))
    return out


def _fragment(plain: dict, hf: HFCheckpoint, tmp: Path, out: Path) -> dict:
    """The recipe sections a training run needs to start from this checkpoint."""
    fragment = {"model": plain["model"], "parallel": plain["parallel"],
                "checkpoint": {"pretrained": str(out)}}
    copied = copy_tokenizer(hf.path, tmp / "tokenizer")
    if "tokenizer.json" in copied:
        fragment["tokenizer"] = {"type": "hf", "path": str(out / "tokenizer")}
    elif "tokenizer.model" in copied:
        fragment["tokenizer"] = {"type": "sentencepiece",
                                 "path": str(out / "tokenizer" / "tokenizer.model")}
    return fragment

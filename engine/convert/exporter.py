"""`engine convert engine-to-hf`: an engine checkpoint (any saved TP/PP layout) -> an HF directory
that `transformers.AutoModelForCausalLM.from_pretrained` loads: sharded safetensors + index,
config.json, the tokenizer files. Written under a temporary name and renamed when complete.

The dtype of the written weights: `--dtype` when given, else the dtype the imported model declared
(its HF config's torch_dtype, carried in the checkpoint's origin), else the training precision.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.checkpoint.unsharded import UnshardedModel, check_new_output, read_unsharded
from engine.config.errors import ConfigError
from engine.convert import ConvertError
from engine.convert.hf_io import ShardWriter, copy_tokenizer
from engine.convert.importer import HF_DTYPES
from engine.convert.mapping import count_tensors, to_hf
from engine.files import new_directory
from engine.models import get_family
from engine.models.build import DTYPES
from engine.models.hf_config import hf_config_from_model
from engine.models.weights import Shape
from engine.progress import Progress

log = logging.getLogger(__name__)
_HF_NAMES = {ours: theirs for theirs, ours in HF_DTYPES.items()}


@dataclass(frozen=True, kw_only=True, slots=True)
class ExportOptions:
    """`engine convert engine-to-hf` options (also an export stage's `args`)."""

    dtype: str | None = field(default=None, metadata={"choices": tuple(DTYPES)})
    """Weights dtype: fp32, bf16 or fp16 (default: the imported model's torch_dtype, else the
    training precision)."""
    max_shard_size_gb: float = 5.0
    """Largest safetensors shard, in GiB."""


@dataclass(frozen=True, slots=True)
class Exported:
    path: Path
    dtype: str
    """fp32 | bf16 | fp16: what the weights were written in."""
    dtype_from: str
    """Why that dtype: --dtype, the imported model's torch_dtype, or the training precision."""
    bytes: int

    def line(self) -> str:
        return f"{self.path} | {self.dtype} ({self.dtype_from}) | {self.bytes / 1e9:.2f} GB"


def export_dtype(requested: str | None, model: UnshardedModel) -> tuple[str, str]:
    """(dtype, why) of the written weights (module docstring)."""
    if requested is not None:
        if requested not in DTYPES:
            raise ConvertError(f"--dtype {requested}: expected one of {', '.join(DTYPES)}")
        return requested, "--dtype"
    declared = (model.origin or {}).get("torch_dtype")
    if declared in HF_DTYPES:
        return HF_DTYPES[declared], f"the imported model's torch_dtype {declared}"
    return model.recipe.train.precision, "the training precision train.precision"


def engine_to_hf(ckpt_arg: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
                 max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Exported:
    out = check_new_output(out)
    model = read_unsharded(ckpt_arg)
    dtype, why = export_dtype(dtype, model)
    m = model.recipe.model
    family = get_family(m.family)
    try:
        config = hf_config_from_model(family, m, dtype=_HF_NAMES[dtype])
    except ConfigError as e:
        raise ConvertError(f"{model.path}: {e}") from None
    with new_directory(out) as tmp:
        shape = Shape(m, model.padded_vocab_size)
        writer = ShardWriter(tmp, max_shard_bytes)
        bar = Progress(f"writing {out.name}", count_tensors(family, shape, side="hf"),
                       "tensors", enabled=progress)
        for name, tensor in to_hf(family, shape, model.state.__getitem__):
            tensor = tensor.to(DTYPES[dtype])
            writer.add(name, tensor)
            bar.update(nbytes=tensor.numel() * tensor.element_size())
        total = writer.finish()
        bar.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if model.recipe.tokenizer.path:
            copy_tokenizer(Path(model.recipe.tokenizer.path), tmp)
    log.info("wrote %s (%s, %s: %s, %.2f GB)", out, family.name, dtype, why, total / 1e9)
    return Exported(out, dtype, why, total)

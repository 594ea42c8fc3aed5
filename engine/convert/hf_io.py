"""HF model directories: lazy safetensors reading (sharded or not) and sharded writing.

Reading opens each shard once and returns one tensor at a time (safetensors memory-maps); writing
accumulates tensors up to `max_shard_bytes`, then writes a shard, and finishes with the standard
`model.safetensors.index.json`. Pickled `pytorch_model.bin` checkpoints are refused: loading
them could run arbitrary code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from engine.convert import ConvertError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "generation_config.json", "chat_template.jinja")


class HFCheckpoint:
    """An HF model directory: config.json plus model.safetensors or an index and its shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        config = self.path / "config.json"
        if not config.is_file():
            raise ConvertError(f"{config}: not found; expected an HF model directory")
        try:
            self.config = json.loads(config.read_text())
        except ValueError as e:
            raise ConvertError(f"{config}: not valid JSON ({e})") from None
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {k: self.path / f for k, f in weight_map.items()}
        elif single.is_file():
            self._file_of = None
            self._single = single
        elif list(self.path.glob("pytorch_model*.bin")):
            raise ConvertError(f"{self.path}: only pickled pytorch_model*.bin weights; convert "
                               "them to safetensors first (loading pickles can run code)")
        else:
            raise ConvertError(f"{self.path}: no model.safetensors or "
                               "model.safetensors.index.json")
        for f in set(self._files().values()):
            if not f.is_file():
                raise ConvertError(f"{f}: shard listed in the index is missing")
        self._handles: dict[Path, object] = {}

    def _files(self) -> dict[str, Path]:
        if self._file_of is not None:
            return self._file_of
        from safetensors import safe_open

        try:
            with safe_open(self._single, framework="pt") as f:
                self._file_of = {k: self._single for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ConvertError(f"{self._single}: unreadable safetensors file ({e})") from None
        return self._file_of

    def keys(self) -> list[str]:
        return list(self._files())

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._files()[name]
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ConvertError(f"{path}: unreadable safetensors file ({e})") from None
        return self._handles[path].get_tensor(name)


class ShardWriter:
    """Write tensors into `model-0000i-of-0000n.safetensors` shards of at most max_shard_bytes."""

    def __init__(self, out: Path, max_shard_bytes: int = 5 * 2**30):
        self.out, self.max_bytes = out, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.shards = 0, []  # shards: list of (temp file, tensor names)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> int:
        """Name the shards and write the index; returns the total tensor bytes."""
        if self.pending or not self.shards:
            self._flush()
        n, weight_map, total = len(self.shards), {}, 0
        for i, (tmp, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.out / final)
            total += (self.out / final).stat().st_size
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return total


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files found in `src` (an HF directory, or a sentencepiece .model)."""
    if src.is_file():  # a sentencepiece model: HF's Llama tokenizer reads it as tokenizer.model
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst / "tokenizer.model")
        return ["tokenizer.model"]
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if copied:
        dst.mkdir(parents=True, exist_ok=True)
    for f in copied:
        shutil.copy(src / f, dst / f)
    return copied

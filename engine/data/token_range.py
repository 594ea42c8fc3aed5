"""Token ids against the model's vocabulary: refuse data tokenized with another tokenizer at start.

Owns `max_token_id(prefix)` (the largest id of a megatron `.bin`) and `check_token_range`. An id
at or above the vocabulary size would otherwise index past the embedding table mid-run (a device
assert on GPU, an IndexError on CPU, or silent training of padding rows when the id is below the
padded size), usually after a tokenizer change such as a vocabulary extension.

The maximum is cached in `<prefix>.maxid.json`, keyed by the `.bin`'s size and mtime: preprocess
writes it, and a missing or stale one is recomputed from the `.bin` (a numpy memmap read in
chunks, so memory stays flat) and rewritten when the directory is writable. The `.idx` header is
read here (9-byte magic, u64 version, u8 dtype code) rather than through megatron-core, whose
import costs seconds: this module imports only numpy and the engine's file helpers
(`check_token_range`, run at training start where megatron-core is loaded anyway, first checks
each pair with engine.data.datasets' `inspect_indexed_dataset`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy

from engine.data import DataError
from engine.files import write_atomic

logger = logging.getLogger(__name__)

INDEX_MAGIC = b"MMIDIDX\x00\x00"
"""First bytes of a megatron `.idx` (megatron.core.datasets.indexed_dataset._INDEX_HEADER)."""
DTYPE_CODES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64,
               6: numpy.float64, 7: numpy.float32, 8: numpy.uint16}
"""The on-disk dtype codes of megatron-core's `DType` enum (a test checks they agree)."""
CHUNK_TOKENS = 1 << 24
"""Tokens per memmap chunk: 32-64 MB read at a time."""


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.maxid.json")


def read_token_dtype(prefix: str | os.PathLike) -> type[numpy.number]:
    """The token dtype recorded in `<prefix>.idx`."""
    idx = Path(f"{prefix}.idx")
    try:
        with open(idx, "rb") as stream:
            header = stream.read(len(INDEX_MAGIC) + 9)
    except OSError as err:
        raise DataError(f"{idx}: cannot read the index ({err.strerror})") from None
    code = header[-1] if len(header) == len(INDEX_MAGIC) + 9 else None
    if not header.startswith(INDEX_MAGIC) or code not in DTYPE_CODES:
        raise DataError(f"{idx}: not a megatron IndexedDataset index (header {header[:18]!r})")
    return DTYPE_CODES[code]


def scan_max_id(bin_path: str | os.PathLike, dtype: type[numpy.number]) -> int:
    """The largest token id in a `.bin` of `dtype` tokens (-1 when empty), chunk by chunk."""
    bin_path = Path(bin_path)
    size, itemsize = bin_path.stat().st_size, numpy.dtype(dtype).itemsize
    if size % itemsize:
        raise DataError(f"{bin_path}: {size} bytes is not a whole number of {numpy.dtype(dtype)} "
                        f"tokens; the file is truncated or does not match its .idx")
    if size == 0:
        return -1
    tokens = numpy.memmap(bin_path, dtype=dtype, mode="r")
    best = -1
    for start in range(0, len(tokens), CHUNK_TOKENS):
        best = max(best, int(tokens[start:start + CHUNK_TOKENS].max()))
    del tokens  # closes the mapping
    return best


def _key(bin_path: Path) -> dict:
    stat = bin_path.stat()
    return {"bin_bytes": stat.st_size, "bin_mtime_ns": stat.st_mtime_ns}


def write_max_id(prefix: str | os.PathLike, max_id: int) -> None:
    """Record `max_id` for the current `<prefix>.bin` (preprocess calls this after publishing);
    a read-only directory only costs a rescan next time."""
    bin_path = Path(f"{prefix}.bin")
    record = {**_key(bin_path), "max_id": int(max_id)}
    try:
        write_atomic(sidecar_path(prefix), json.dumps(record) + "\n")
    except OSError as err:
        logger.info("%s: max token id not cached (%s)", sidecar_path(prefix), err.strerror)


def max_token_id(prefix: str | os.PathLike) -> int:
    """The largest token id of the dataset `<prefix>.bin/.idx` (-1 if it has no tokens): from
    `<prefix>.maxid.json` when it matches the `.bin`'s size and mtime, else scanned and cached."""
    bin_path = Path(f"{prefix}.bin")
    if not bin_path.is_file():
        raise DataError(f"{bin_path}: not found; expected a preprocessed dataset "
                        f"(PREFIX.bin and PREFIX.idx, from engine preprocess)")
    try:
        record = json.loads(sidecar_path(prefix).read_text(encoding="utf-8"))
        if {k: record.get(k) for k in ("bin_bytes", "bin_mtime_ns")} == _key(bin_path):
            return int(record["max_id"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # missing, unreadable or not ours: recompute
    logger.info("%s: scanning for the largest token id (%.2f GB)", bin_path,
                bin_path.stat().st_size / 1e9)
    max_id = scan_max_id(bin_path, read_token_dtype(prefix))
    write_max_id(prefix, max_id)
    return max_id


def check_token_range(prefixes, vocab_size: int) -> None:
    """Raise a one-line DataError when a dataset holds a token id >= `vocab_size` (the
    tokenizer's vocabulary, which the model's embedding rows must cover). Each pair's index is
    checked first, so a corrupt or empty dataset gets its own line and no cached maximum."""
    from engine.data.datasets import inspect_indexed_dataset  # imports megatron-core: only here

    for prefix in prefixes:
        if inspect_indexed_dataset(prefix).tokens == 0:
            continue  # no ids; building the datasets refuses it (too few tokens)
        max_id = max_token_id(prefix)
        if max_id >= vocab_size:
            raise DataError(f"{prefix}.bin: token id {max_id} >= model.vocab_size={vocab_size} "
                            f"(the data was tokenized with another tokenizer?)")

"""A checkpoint is complete or it is not used: its manifest, and what a start does with the
leftovers of a save that was interrupted.

`manifest.json` lists every file of a checkpoint directory with its size and CRC-32 (zlib's,
~1 GB/s per core; the ranks share the files). It is written after every file and before the
directory is renamed into place and the tracker names it (engine.checkpoint.io), so a checkpoint
with a manifest is whole as written. Reading verifies sizes and checksums: a truncated or
corrupted shard is one line naming the file. Checkpoints without a manifest (older ones, other
tools) are read as they are.

`newest_intact` walks a save directory's checkpoints from the newest: what
`checkpoint.fallback` resumes from when the latest one is damaged. `remove_partial` deletes the
`iter_*.partial` directories an interrupted save left behind. Pure file I/O: no torch, no
process group (the callers share the work between ranks).
"""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from pathlib import Path

from engine.checkpoint.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CHUNK = 1 << 22


def checkpoint_files(ckpt: Path) -> list[str]:
    """Every file of a checkpoint directory but the manifest, relative, sorted."""
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def crc32(path: Path) -> str:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def describe(ckpt: Path, files: list[str]) -> dict[str, dict]:
    """{file: {size, crc32}} of `files` (a share of checkpoint_files)."""
    return {f: {"size": (ckpt / f).stat().st_size, "crc32": crc32(ckpt / f)} for f in files}


def write_manifest(ckpt: Path, entries: dict[str, dict]) -> None:
    from engine.files import write_atomic

    missing = set(checkpoint_files(ckpt)) - set(entries)
    if missing:  # every rank's share came back: a file no share covered is a bug
        raise CheckpointError(f"{ckpt}: manifest misses {sorted(missing)[:3]}")
    write_atomic(ckpt / MANIFEST, json.dumps({"algorithm": "crc32", "files": dict(
        sorted(entries.items()))}, indent=0) + "\n")


def read_manifest(ckpt: Path) -> dict[str, dict] | None:
    path = ckpt / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None


def damage(ckpt: Path, files: list[str] | None = None, *, checksums: bool = True) -> str | None:
    """What is wrong with `ckpt` against its manifest (`files`: the share to check, default
    all; sizes always, contents when `checksums`), in one line; None when intact or without a
    manifest."""
    manifest = read_manifest(ckpt)
    if manifest is None:
        return None
    for name in sorted(manifest) if files is None else files:
        expected, path = manifest[name], ckpt / name
        if not path.is_file():
            return f"{path}: missing (listed in {MANIFEST})"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path}: {size} bytes, expected {expected['size']} (truncated?)"
        if checksums and crc32(path) != expected["crc32"]:
            return f"{path}: checksum {crc32(path)}, expected {expected['crc32']} (corrupted)"
    return None


def saved_steps(root: Path) -> list[Path]:
    """The complete-looking iter_ directories of a save directory, newest first."""
    found = [p for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit()
             and (p / "metadata.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def remove_partial(root: Path) -> list[Path]:
    """Delete the `iter_*.partial` directories of interrupted saves under `root`."""
    removed = []
    for partial in sorted(root.glob("iter_*.partial")):
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial)
        log.warning("removed %s: the leftover of an interrupted save (never loaded)", partial)
    return removed

"""Writing files and directories so that a failure leaves nothing behind: fill a temporary
sibling, rename it into place when complete. Standard library only."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same directory, flushed to disk
    and renamed over `path`: readers see the old file or the new one, never a part. The file
    gets the usual permissions (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def new_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; when the block ends it becomes `out` (which
    may exist only as an empty directory), when the block raises it is removed."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unwritable(path: str | os.PathLike) -> str | None:
    """Why nothing can be written at `path` (a directory to fill or to make), or None when it
    can: its nearest existing ancestor must be a directory this process may create entries in.
    `os.access` asks the kernel, so a read-only filesystem counts even for root, whom file modes
    do not stop."""
    path = Path(os.path.abspath(path))
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"not writable ({existing} is a file, not a directory)"
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        return (f"not writable ({existing}: "
                f"{'a read-only filesystem' if read_only else 'no write permission'})")
    return None

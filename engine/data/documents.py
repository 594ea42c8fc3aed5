"""Reading documents from input files: `.jsonl` (one JSON object a line), `.txt` (one a file).

Owns the input formats shared by `preprocess` and `train_sentencepiece`, and their errors: every
bad input is a `DataError` naming the file (and line) and what was expected. Imports neither torch
nor megatron-core.
"""

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from engine.data import DataError

SUFFIXES = (".jsonl", ".txt")
"""Input kinds by file suffix: `.jsonl` holds many documents, `.txt` is one document."""


def check_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Return the inputs as paths, or raise on the first missing file or unknown suffix.

    Called before any work so that a typo in the 40th input fails in a second, not after an hour.
    """
    checked = []
    for raw in paths:
        path = Path(raw)
        if path.suffix not in SUFFIXES:
            raise DataError(
                f"{path}: unknown input kind {path.suffix!r}; expected one of {SUFFIXES}"
            )
        if not path.is_file():
            raise DataError(f"{path}: input file not found")
        checked.append(path)
    if not checked:
        raise DataError("no input files given; expected at least one .jsonl or .txt file")
    return checked


def iter_documents(paths: Iterable[str | Path], json_key: str = "text") -> Iterator[str]:
    """Yield the text of every document of every input, in order (files in the order given)."""
    for path in check_inputs(paths):
        if path.suffix == ".jsonl":
            yield from _iter_jsonl(path, json_key)
        else:
            yield _read_text(path)


def _iter_jsonl(path: Path, json_key: str) -> Iterator[str]:
    # Binary lines decoded one at a time, so a bad byte is reported with its line number.
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline, a hand-edited file) carry no document
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not valid UTF-8 ({err.reason})") from None
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not a JSON object ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
                )
            if json_key not in record:
                keys = ", ".join(sorted(record)[:8])
                raise DataError(f"{path}:{number}: no key {json_key!r} (keys: {keys})")
            text = record[json_key]
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{number}: {json_key!r} is {type(text).__name__}; expected a string"
                )
            yield text


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 at byte {err.start} ({err.reason})") from None

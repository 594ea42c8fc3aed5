"""Preprocess: tokenize `.jsonl`/`.txt` documents into a megatron IndexedDataset `.bin/.idx`.

Owns the tokenize-and-write loop, its worker pool and its progress line; also records the
largest token id beside the pair (`<prefix>.maxid.json`, see token_range). The output format is
megatron-core's (`IndexedDatasetBuilder`), one sequence per document, so `GPTDataset` and
Megatron-LM tools read it as is. Does not import torch.distributed, models or training code.
"""

import contextlib
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from engine.data.documents import check_inputs, iter_documents
from engine.data.token_range import write_max_id
from engine.data.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

CHUNK_DOCUMENTS = 16
"""Documents per task sent to a worker: enough to amortize pickling on short jsonl records, few
enough to keep every worker busy on a corpus of a hundred long documents (Shakespeare's works)."""


@dataclass(frozen=True, slots=True)
class PreprocessStats:
    """What one preprocess run wrote."""

    documents: int
    """Documents written (each one sequence, ending in eod when append_eod)."""
    tokens: int
    """Tokens written, eod included."""
    seconds: float
    """Wall time of the whole run."""
    skipped: int = 0
    """Documents dropped because they tokenized to nothing (empty text)."""


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer: Tokenizer | tuple[str, str],
    *,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = True,
    progress: bool = True,
) -> PreprocessStats:
    """Tokenize every document of `inputs` (in order) into `<output_prefix>.bin/.idx`.

    `tokenizer` is a loaded Tokenizer or `(kind, path)` for `load_tokenizer`. `workers > 1`
    tokenizes in a process pool whose results come back in input order, so the output is
    byte-identical to `workers=1`. Both files are written under temporary names and renamed at
    the end: an interrupted run leaves the previous pair (or none), never a half-written one.
    """
    start = time.perf_counter()
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(*tokenizer)
    paths = check_inputs(inputs)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # uint16 below 65,500 ids, else int32: megatron's own rule, so its readers agree (an
    # extended vocabulary past 65,500 switches to int32 here, and ids above 65,535 survive).
    dtype = DType.optimal_dtype(tok.vocab_size)
    tmp_bin, tmp_idx = (Path(f"{prefix}.{ext}.tmp{os.getpid()}") for ext in ("bin", "idx"))
    documents = tokens = skipped = 0
    max_id = -1
    bar = Progress(str(prefix), enabled=progress)
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        # closing(): on any error the worker pool inside the generator is terminated right away.
        texts = iter_documents(paths, json_key)
        with contextlib.closing(_tokenize(texts, tok, workers)) as tokenized:
            for ids in tokenized:
                if not ids:
                    skipped += 1
                    continue
                if append_eod:
                    ids.append(tok.eod)
                builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
                max_id = max(max_id, max(ids))
                documents += 1
                tokens += len(ids)
                bar.update(documents, tokens)
        builder.finalize(str(tmp_idx))
        _publish(tmp_bin, tmp_idx, prefix)
        # Training checks ids against the model's vocabulary at start (token_range): cached here.
        write_max_id(prefix, max_id)
    finally:
        bar.close(documents, tokens)
        for tmp in (tmp_bin, tmp_idx):
            tmp.unlink(missing_ok=True)
    stats = PreprocessStats(documents, tokens, time.perf_counter() - start, skipped)
    logger.info(
        "preprocess %s: %d documents, %d tokens, %d empty skipped, %.1f s",
        prefix,
        documents,
        tokens,
        skipped,
        stats.seconds,
    )
    return stats


def _publish(tmp_bin: Path, tmp_idx: Path, prefix: Path) -> None:
    # Old .idx goes first and the new .idx comes last, so at every instant the prefix holds either
    # the old pair, a lone .bin (not a dataset: megatron needs both), or the new pair.
    Path(f"{prefix}.idx").unlink(missing_ok=True)
    os.replace(tmp_bin, f"{prefix}.bin")
    os.replace(tmp_idx, f"{prefix}.idx")


def _tokenize(texts: Iterable[str], tok: Tokenizer, workers: int) -> Iterator[list[int]]:
    """Token ids per text, in input order; a reading error surfaces at its position in order."""
    if workers <= 1:
        for text in texts:
            yield tok.encode(text)
        return
    # imap keeps order; a DataError raised by `texts` (read in the parent's feeder thread) is
    # re-raised here when its position comes up, after every earlier document was yielded.
    with multiprocessing.Pool(workers, _init_worker, (tok.kind, tok.path)) as pool:
        yield from pool.imap(_encode_in_worker, texts, chunksize=CHUNK_DOCUMENTS)


_WORKER_TOKENIZER: Tokenizer | None = None
"""A pool worker's tokenizer, loaded once by `_init_worker` (never set in the parent)."""


def _init_worker(kind: str, path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(kind, path)


def _encode_in_worker(text: str) -> list[int]:
    return _WORKER_TOKENIZER.encode(text)


class Progress:
    """One stderr line updated in place: documents, tokens, tokens/s (tqdm's when installed)."""

    def __init__(self, label: str, *, enabled: bool = True, interval: float = 0.5) -> None:
        self.label, self.enabled, self.interval = label, enabled, interval
        self.start = self.last = time.perf_counter()
        self.tokens = 0
        self.closed = not enabled
        self._tqdm = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._tqdm = tqdm(desc=label, unit="tokens", unit_scale=True, file=sys.stderr)

    def update(self, documents: int, tokens: int) -> None:
        if self.closed:
            return
        now = time.perf_counter()
        if now - self.last < self.interval:
            return
        self.last = now
        self._show(documents, tokens, now)

    def close(self, documents: int, tokens: int) -> None:
        if self.closed:
            return
        self.closed = True
        self._show(documents, tokens, time.perf_counter())
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            sys.stderr.write("\n")

    def _show(self, documents: int, tokens: int, now: float) -> None:
        if self._tqdm is not None:
            self._tqdm.set_postfix(documents=f"{documents:,}", refresh=False)
            self._tqdm.update(tokens - self.tokens)
        else:
            rate = tokens / max(now - self.start, 1e-9)
            sys.stderr.write(
                f"\r{self.label}: {documents:,} documents | {tokens:,} tokens"
                f" | {rate:,.0f} tokens/s"
            )
            sys.stderr.flush()
        self.tokens = tokens

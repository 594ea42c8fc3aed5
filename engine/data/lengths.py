"""Length-aware data for long-context stages, and the length histograms that show what a blend
achieves.

Fu et al. 2024 ("Data Engineering for Scaling Language Models to 128K Context", arXiv
2402.10171, §3) continue pretraining on the pretraining mix with long documents up-sampled *within
each source* ("per-source length upsampling"), which keeps the domain mix while raising the share
of long sequences. Here that is data plus blend weights, no new sampler:

- `split_by_length(prefix, min_tokens, long_prefix, short_prefix)` writes a dataset's documents of
  at least `min_tokens` tokens as one `.bin/.idx` pair and the rest as another (`engine data
  split-length`); a blend lists both parts with the weights it wants (the long part's weight
  above its token share up-samples it).
- `document_histogram(lengths)`: the share of a file's tokens by the length of the document they
  belong to (read from its `.idx`): what the data holds.
- `context_histogram(tokens, eod)`: the share of training tokens by the length of the piece of
  their document inside the sample (a packed sample cut at end-of-document tokens): the context
  a token can use under document masking, the longest same-document context without it. This
  is what the blend achieves at a sequence length (`engine data lengths`).

Buckets are (lo, hi] token ranges with power-of-two edges up to the sequence length, and one
for longer documents. Pure numpy except the split, which
reads and writes megatron IndexedDatasets; no torch.distributed, no training code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data import DataError


def bucket_edges(longest: int, first: int = 64) -> list[int]:
    """Power-of-two bucket edges first, 2*first, ... up to the first edge >= `longest`."""
    edges = [first]
    while edges[-1] < longest:
        edges.append(edges[-1] * 2)
    return edges


def bucket_labels(edges: list[int]) -> list[str]:
    """`<=64`, `65-128`, ..., `>last`: one label per bucket of `histogram`."""
    return [f"<={edges[0]}"] + [f"{lo + 1}-{hi}" for lo, hi in zip(edges, edges[1:])] + \
        [f">{edges[-1]}"]


def histogram(lengths: np.ndarray, weights: np.ndarray, edges: list[int]) -> list[float]:
    """Share of the total weight in each bucket: (0, e0], (e0, e1], ..., (e_last, inf)."""
    which = np.searchsorted(np.asarray(edges), np.asarray(lengths), side="left")
    sums = np.bincount(which, weights=weights, minlength=len(edges) + 1).astype(float)
    total = sums.sum()
    return (sums / total).tolist() if total else [0.0] * (len(edges) + 1)


def document_histogram(doc_lengths: np.ndarray, edges: list[int]) -> list[float]:
    """Token share by document length: a document of n tokens weighs n."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    return histogram(lengths, lengths, edges)


def sample_pieces(tokens: np.ndarray, eod: int) -> np.ndarray:
    """Lengths of the document pieces of one packed sample: an eod ends a piece (and belongs
    to it); the last piece runs to the sample's end."""
    ends = np.flatnonzero(np.asarray(tokens) == eod) + 1
    bounds = np.concatenate(([0], ends, [len(tokens)]))
    pieces = np.diff(bounds)
    return pieces[pieces > 0]


def context_histogram(samples, eod: int, edges: list[int]) -> list[float]:
    """Token share by the length of the document piece each token sits in, over `samples`
    (token arrays of packed training samples)."""
    pieces = np.concatenate([sample_pieces(s, eod) for s in samples]) if len(samples) else \
        np.zeros(0, dtype=np.int64)
    return histogram(pieces, pieces, edges)


def document_lengths(prefix: str) -> np.ndarray:
    """Tokens per document of a megatron IndexedDataset (a document may span sequences)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from engine.data.datasets import inspect_indexed_dataset

    inspect_indexed_dataset(prefix)  # one clear line for a missing or damaged pair
    index = IndexedDataset(prefix)
    starts = np.concatenate(([0], np.cumsum(index.sequence_lengths, dtype=np.int64)))
    return np.diff(starts[np.asarray(index.document_indices)])


@dataclass(frozen=True, slots=True)
class SplitStats:
    long_documents: int
    long_tokens: int
    short_documents: int
    short_tokens: int


def split_by_length(prefix: str, min_tokens: int, long_prefix: str,
                    short_prefix: str) -> SplitStats:
    """Write the documents of `prefix` with at least `min_tokens` tokens (end-of-document token
    included) to `long_prefix`, the others to `short_prefix`, each in the original order; both
    pairs appear only when complete (temporary names, then renamed)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from engine.data.datasets import inspect_indexed_dataset

    if min_tokens < 1:
        raise DataError(f"min_tokens={min_tokens}: expected at least 1")
    if len({str(Path(p)) for p in (prefix, long_prefix, short_prefix)}) < 3:
        raise DataError(f"{prefix}: the long and short outputs need their own prefixes")
    info = inspect_indexed_dataset(prefix)
    index = IndexedDataset(prefix)
    bounds = np.asarray(index.document_indices)
    outs = {}
    for name, out in (("long", long_prefix), ("short", short_prefix)):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = [Path(f"{out}.{ext}.tmp{os.getpid()}") for ext in ("bin", "idx")]
        outs[name] = (IndexedDatasetBuilder(str(tmp[0]), dtype=info.dtype), tmp, out)
    counts = {"long": [0, 0], "short": [0, 0]}
    try:
        for d in range(len(bounds) - 1):
            sequences = [index[i] for i in range(bounds[d], bounds[d + 1])]
            n = sum(len(s) for s in sequences)
            name = "long" if n >= min_tokens else "short"
            outs[name][0].add_document(np.concatenate(sequences), [len(s) for s in sequences])
            counts[name][0] += 1
            counts[name][1] += n
        for name, (builder, tmp, out) in outs.items():
            builder.finalize(str(tmp[1]))
            Path(f"{out}.idx").unlink(missing_ok=True)  # as engine preprocess publishes
            os.replace(tmp[0], f"{out}.bin")
            os.replace(tmp[1], f"{out}.idx")
    finally:
        for _, tmp, _ in outs.values():
            for path in tmp:
                path.unlink(missing_ok=True)
    return SplitStats(*counts["long"], *counts["short"])


def format_histogram(edges: list[int], columns: dict[str, list[float]]) -> str:
    """A table: one row per bucket, one column of percentages per histogram."""
    names = list(columns)
    width = max(len(label) for label in bucket_labels(edges))
    lines = [f"{'tokens':>{width}}  " + "  ".join(f"{n:>12}" for n in names)]
    for i, label in enumerate(bucket_labels(edges)):
        lines.append(f"{label:>{width}}  " + "  ".join(f"{100 * columns[n][i]:>11.1f}%"
                                                        for n in names))
    return "\n".join(lines)

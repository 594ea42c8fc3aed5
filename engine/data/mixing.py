"""The training samples of a run: the domain blend, replay mixed into every global batch, and the
named source of every sample.

Sample `i` of the mix is position `j = i mod G` of global batch `k = i div G` (G the global batch
size). Without replay it is sample `i` of the domain blend. With `r` replay samples per batch
(`ReplayConfig.samples_per_batch`), position j holds replay when floor((j+1) r / G) >
floor(j r / G): exactly r positions of every batch, evenly spread over microbatches and
data-parallel ranks (Bresenham's line). Batch k then takes domain samples
[k (G-r), (k+1) (G-r)) and replay samples [k r, (k+1) r) in order, so a position's sample
depends only on (i, G, r): never on TP/PP/DP, and a resumed run continues exactly.

Sources are numbered domain blend first, then replay blend, in recipe order; a blend says which
of its sources each sample comes from (engine.data.streams.Blend `source_ids`, megatron
`BlendedDataset` `dataset_index`), any other dataset is one source. Token accounting counts
samples per source without reading any tokens.
Imports numpy only (datasets are duck-typed), no torch.distributed, no training code.
"""

from __future__ import annotations

import numpy as np


def replay_positions(global_batch_size: int, replay_per_batch: int) -> np.ndarray:
    """Boolean mask of the positions of a global batch that hold replay samples."""
    j = np.arange(global_batch_size, dtype=np.int64)
    return (j + 1) * replay_per_batch // global_batch_size > j * replay_per_batch // \
        global_batch_size


def _source_ids(dataset, indices: np.ndarray) -> np.ndarray:
    """Which of a dataset's own sources each sample comes from (0 unless it is a blend)."""
    if hasattr(dataset, "source_ids"):  # engine.data.streams.Blend
        return np.asarray(dataset.source_ids(indices), dtype=np.int64)
    index = getattr(dataset, "dataset_index", None)  # megatron BlendedDataset
    if index is None:
        return np.zeros(len(indices), dtype=np.int64)
    return np.asarray(index[indices], dtype=np.int64)


class TrainingMix:
    """Map-style dataset over the domain blend, with `replay` mixed in when given.

    `num_domain_sources`/`num_replay_sources` are the entries of each blend; `names` are all of
    them in source order."""

    def __init__(self, domain, names: tuple[str, ...], *, num_domain_sources: int,
                 global_batch_size: int, replay=None, replay_per_batch: int = 0, start: int = 0):
        """`start`: the index of the mix's first sample (the consumed_samples at which this
        mixture began, engine.train.mixture); index i reads position i - start."""
        if (replay is None) != (replay_per_batch == 0):
            raise ValueError("replay and replay_per_batch > 0 go together")
        if not 0 <= replay_per_batch < global_batch_size:
            raise ValueError(f"replay_per_batch={replay_per_batch}: expected 0.."
                             f"{global_batch_size - 1} (global_batch_size={global_batch_size})")
        self.domain, self.replay, self.names = domain, replay, tuple(names)
        self.num_domain_sources = num_domain_sources
        self.global_batch_size, self.replay_per_batch = global_batch_size, replay_per_batch
        self.start = start

    def __len__(self) -> int:
        if self.replay is None:
            return len(self.domain)
        g, r = self.global_batch_size, self.replay_per_batch
        return min(len(self.domain) // (g - r), len(self.replay) // r) * g

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(is replay, index into the domain or the replay dataset) of each mix index."""
        indices = np.asarray(indices, dtype=np.int64) - self.start
        if indices.size and indices.min() < 0:
            raise IndexError(f"sample {indices.min() + self.start} is before this mixture's "
                             f"start {self.start}")
        if self.replay is None:
            return np.zeros(len(indices), dtype=bool), indices
        g, r = self.global_batch_size, self.replay_per_batch
        k, j = np.divmod(indices, g)
        replay_before = j * r // g  # replay positions of batch k before position j
        is_replay = replay_positions(g, r)[j]
        inner = np.where(is_replay, k * r + replay_before, k * (g - r) + j - replay_before)
        return is_replay, inner

    def __getitem__(self, i: int) -> dict:
        is_replay, inner = self._locate(np.array([i]))
        dataset = self.replay if is_replay[0] else self.domain
        return dataset[int(inner[0])]

    def source_ids(self, indices) -> np.ndarray:
        """The source number (an index into `names`) of each sample index."""
        is_replay, inner = self._locate(np.asarray(indices))
        ids = _source_ids(self.domain, inner[~is_replay])
        out = np.empty(len(inner), dtype=np.int64)
        out[~is_replay] = ids
        if self.replay is not None:
            out[is_replay] = self.num_domain_sources + _source_ids(self.replay, inner[is_replay])
        return out

    def source_samples(self, start: int, count: int) -> dict[str, int]:
        """Samples per source name among samples [start, start + count): every name, zeros too."""
        counts = np.bincount(self.source_ids(np.arange(start, start + count)),
                             minlength=len(self.names))
        return {name: int(c) for name, c in zip(self.names, counts, strict=True)}

"""Training samples that do not depend on how long the run is: endless per-source streams and a
resumable weighted blend of them.

A source (one entry of `data.blend` or of the replay blend) is read epoch after epoch. Epoch 0
is megatron `GPTDataset`'s own one-epoch order of the file (documents shuffled, packed into
samples of seq_length + 1 tokens, the samples shuffled; seeded by train.seed); epoch e > 0 holds
the same samples in another order, a permutation seeded by (seed, source, e): the packing of
documents into samples stays that of epoch 0. Sample k of a source is therefore fixed by the
file, seq_length and the seed alone — not by train.steps, the global batch, the blend's weights
or the layout — so extending a run keeps the exact order of the samples it has read (megatron
sizes a dataset's epochs, and with them its whole shuffle, by the number of samples asked for).

A blend interleaves its sources by weight with megatron's own rule
(`helpers.build_blending_indices`, as `BlendedDataset`: each next sample goes to the source
furthest below its share), a greedy rule whose first n choices do not depend on how many are
computed. `offsets` start each source further on: a mixture that changes when a run resumes
(`data.override_on_resume`) continues every source where the earlier mixture left it, so no
sample of a source is read twice before its epoch ends.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SEED_STRIDE = 1_000_003
"""Separates the (seed, source, epoch) triples of the epoch permutations (a prime > #epochs)."""


class EpochStream:
    """Source `index` of a blend: sample k of an endless sequence over a one-epoch dataset."""

    def __init__(self, dataset, *, seed: int, index: int):
        self.dataset, self.seed, self.index = dataset, seed, index
        self.epoch_samples = len(dataset)
        if self.epoch_samples == 0:
            raise ValueError("a source without samples")  # build checks this first
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray | None:
        """The permutation of the epoch-0 samples that epoch `epoch` reads (None: epoch 0)."""
        if epoch == 0:
            return None
        if epoch not in self._orders:
            if len(self._orders) > 2:  # a run reads at most two epochs of a source at a time
                self._orders.pop(min(self._orders))
            key = ((self.seed * SEED_STRIDE + self.index) * SEED_STRIDE + epoch) & 0xFFFFFFFF
            self._orders[epoch] = np.random.RandomState(key).permutation(self.epoch_samples)
        return self._orders[epoch]

    def position(self, k: int) -> int:
        """The index into the one-epoch dataset of the stream's sample k."""
        epoch, p = divmod(int(k), self.epoch_samples)
        order = self.order(epoch)
        return p if order is None else int(order[p])

    def __getitem__(self, k: int) -> dict:
        return self.dataset[self.position(k)]


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each of the first `size` samples, its index within that source), megatron's
    greedy blending rule; the first n entries are the same for every size >= n."""
    from megatron.core.datasets import helpers

    w = np.asarray(weights, dtype=np.float64)
    source = np.zeros(size, dtype=np.int16)
    within = np.zeros(size, dtype=np.int64)
    if len(w) == 1:
        return source, np.arange(size, dtype=np.int64)
    helpers.build_blending_indices(source, within, w / w.sum(), len(w), size, False)
    return source, within


class Blend:
    """Sample i of a weighted blend of `sources` (EpochStreams), each started `offsets[s]`
    samples in. The blending arrays grow (recomputed, same prefix) as far as the run reads."""

    def __init__(self, sources: Sequence[EpochStream], weights: Sequence[float], *,
                 offsets: Sequence[int] | None = None, size: int = 1024):
        self.sources, self.weights = list(sources), list(weights)
        self.offsets = list(offsets) if offsets is not None else [0] * len(self.sources)
        if not (len(self.sources) == len(self.weights) == len(self.offsets)) or not self.sources:
            raise ValueError("one weight and one offset per source, at least one source")
        self._source = self._within = np.zeros(0, dtype=np.int64)
        self._grow(size)

    def _grow(self, size: int) -> None:
        if size > len(self._source):
            self._source, self._within = blending_indices(self.weights,
                                                          max(size, 2 * len(self._source)))

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample index within the source's stream, offsets included) of each index."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size:
            self._grow(int(indices.max()) + 1)
        source = self._source[indices].astype(np.int64)
        return source, self._within[indices] + np.asarray(self.offsets, dtype=np.int64)[source]

    def source_ids(self, indices) -> np.ndarray:
        """Which source each sample comes from (engine.data.mixing's token accounting)."""
        return self.locate(indices)[0]

    def __getitem__(self, i: int) -> dict:
        source, k = self.locate(np.array([i]))
        return self.sources[int(source[0])][int(k[0])]

    def __len__(self) -> int:
        """Samples computed so far (the stream itself does not end)."""
        return len(self._source)

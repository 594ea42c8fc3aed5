"""Deterministic microbatches: which samples each data-parallel rank sees at each step.

Global batch `k` (counted from `consumed_samples`) is samples [c, c + G) of the dataset. Inside it,
microbatch `m` of data-parallel rank `r` is the `micro_batch_size` samples starting at
c + (m * dp + r) * micro_batch_size — megatron's `MegatronPretrainingSampler` order, so a resumed
run, or a run at another layout with the same global batch, sees exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.config.validate import Layout

KEYS = ("tokens", "labels", "loss_mask", "position_ids")
"""What a microbatch holds, [b, s] each; plus `attention_mask` [b, 1, s, s] (megatron's document
mask, True = masked) when the samples have one (data.reset_attention_mask)."""


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    keys = KEYS + (("attention_mask",) if "attention_mask" in samples[0] else ())
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}


@dataclass(frozen=True, slots=True)
class MicrobatchPlan:
    layout: Layout
    dp_rank: int

    def sample_indices(self, consumed_samples: int, microbatch: int) -> range:
        mbs, dp = self.layout.micro_batch_size, self.layout.dp
        start = consumed_samples + (microbatch * dp + self.dp_rank) * mbs
        return range(start, start + mbs)

    def microbatches(self, dataset, consumed_samples: int) -> list[dict[str, torch.Tensor]]:
        """This rank's microbatches of the global batch that starts at `consumed_samples`."""
        return [
            collate([dataset[i] for i in self.sample_indices(consumed_samples, m)])
            for m in range(self.layout.num_microbatches)
        ]


class SyntheticDataset:
    """Random tokens for benchmarks: sample i is a fixed function of (seed, i)."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int, num_samples: int):
        self.vocab_size, self.seq_length, self.seed, self.num_samples = (
            vocab_size,
            seq_length,
            seed,
            num_samples,
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, i))
        text = torch.from_numpy(rng.integers(0, self.vocab_size, self.seq_length + 1))
        return {
            "tokens": text[:-1],
            "labels": text[1:],
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
        }

"""Core attention of the local spec under context parallelism and document masking.

megatron-core 0.16.1's local `DotProductAttention` refuses context parallelism in its
constructor ("Context parallelism is only supported by TEDotProductAttention!") and, with a
sliding window, replaces any attention mask it is given by the window's
(`FusedScaleMaskSoftmax.forward_torch_softmax`), so document masks are lost.
`ContextParallelAttention` is a subclass that changes what those two need, swapped into the
local spec (one leaf) by `engine.models.spec.decoder_block_spec` when parallel.cp > 1 or
data.reset_attention_mask:

1. Keys and values are all-gathered over the context-parallel group with megatron's
   `gather_from_sequence_parallel_region` (forward all-gather, backward reduce-scatter: each
   rank gets the sum of every rank's gradient for its own keys and values) and put back in
   sequence order. Rank r holds chunks r and 2*cp-1-r of the 2*cp chunks of the sequence
   (megatron's load-balanced split, `megatron.core.utils.get_batch_on_this_cp_rank`), so the
   gathered order is chunks 0, 2cp-1, 1, 2cp-2, ...; `sequence_order` undoes it.
2. The mask is built here for this rank's queries against the whole sequence: causal by the
   queries' places in the sequence (`query_positions`), the sliding window if the model has one,
   and the batch's document mask (megatron's boolean [b, 1, s_q, s], True = masked, already cut
   to this rank's query rows by the batch split). megatron's own masked softmax then applies it.

Each query row is then the same row of scores as in one process, over the keys in the same
order, so CP reproduces CP=1 to rounding (tests/dist/test_context_parallel.py). On GPU the TE
spec uses Transformer Engine's attention, whose CP is megatron's (parallel.cp_comm_type).
Pure helpers take sizes and tensors; only the module touches the process group.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


def chunk_order(cp_size: int) -> list[int]:
    """The sequence chunks (of 2*cp) in the order an all-gather over ranks 0..cp-1 returns
    them: rank r contributes chunks r and 2*cp-1-r."""
    return [c for r in range(cp_size) for c in (r, 2 * cp_size - 1 - r)]


def sequence_order(seq_length: int, cp_size: int) -> torch.Tensor:
    """Indices into the all-gathered sequence that put its tokens back in sequence order."""
    chunk = seq_length // (2 * cp_size)
    where = {c: i for i, c in enumerate(chunk_order(cp_size))}  # chunk -> slot in the gather
    return torch.cat([torch.arange(where[c] * chunk, (where[c] + 1) * chunk)
                      for c in range(2 * cp_size)])


def query_positions(local_length: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Places in the whole sequence of the `local_length` queries rank `cp_rank` holds."""
    chunk = local_length // 2
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk),
                      torch.arange(second * chunk, (second + 1) * chunk)])


def blocked(queries: torch.Tensor, keys: int, window: tuple[int, int] | None = None
            ) -> torch.Tensor:
    """[s_q, keys] True where a query at sequence position `queries[i]` must not attend: later
    keys, and keys more than window[0] positions back (megatron's window is (left, right))."""
    k = torch.arange(keys)
    out = k[None, :] > queries[:, None]
    if window is not None and window[0] >= 0:
        out |= queries[:, None] - k[None, :] > window[0]
    return out


class ContextParallelAttention(DotProductAttention):
    """megatron's local DotProductAttention over keys and values gathered from the
    context-parallel group, with causal, window and document masks combined explicitly."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        # The parent's constructor asserts context_parallel_size == 1 and builds nothing that
        # depends on it: build it from a copy of the config that says 1, then keep the real one.
        local = copy.copy(config)
        local.context_parallel_size = 1
        super().__init__(local, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.config = config
        if pg_collection is not None and hasattr(pg_collection, "cp"):
            self.cp_group = pg_collection.cp
        else:
            from megatron.core import parallel_state as ps

            self.cp_group = ps.get_context_parallel_group()
        # the window goes into our mask; the parent's softmax would replace the mask by it
        self.window = self.scale_mask_softmax.window_size
        self.scale_mask_softmax.window_size = None

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """[s/cp, b, heads, d] of this rank -> [s, b, heads, d] in sequence order."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        cp = self.cp_group.size()
        gathered = gather_from_sequence_parallel_region(x, True, group=self.cp_group)
        order = sequence_order(gathered.shape[0], cp).to(x.device)
        return gathered.index_select(0, order)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        # query [s/cp, b, heads, d]; key, value [s/cp, b, groups, d]
        cp = self.cp_group.size() if self.cp_group is not None else 1
        if cp > 1:
            key, value = self._gather(key), self._gather(value)
            queries = query_positions(query.shape[0], self.cp_group.rank(), cp)
        else:
            queries = torch.arange(query.shape[0])
        mask = blocked(queries, key.shape[0], self.window).to(query.device)  # [s_q, s]
        if attention_mask is not None:  # the document mask [b, 1, s_q, s], True = masked
            mask = mask | attention_mask.to(torch.bool)
        else:
            mask = mask[None, None]
        return super().forward(query, key, value, mask, attn_mask_type=attn_mask_type,
                               attention_bias=attention_bias,
                               packed_seq_params=packed_seq_params)

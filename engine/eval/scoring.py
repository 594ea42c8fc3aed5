"""Scoring token sequences with a model at any layout: the model side of `engine eval`.

`Scorer` runs batches of token sequences through model chunks at any TP/PP/VPP layout (megatron's
pipeline schedule, forward only; logits gathered over tensor parallelism on the last pipeline
stage) and turns the logits into what lm-evaluation-harness asks for: the log-likelihood of a
continuation and whether greedy decoding would produce it, or the next greedy token. Requests are
sorted by length (longest first, so a batch's first row is its padded length) and right-padded,
which causal attention never looks at. Every rank calls every method with the same arguments; the
answers are computed on the last pipeline stage and broadcast, so every rank returns the same.
Data-parallel replicas share the batches (replica r runs batches r, r + dp, ...; the answers are
gathered): a batch is the same batch whatever the layout, so the answers do not depend on dp.

Log-probabilities are over the real vocabulary (the embedding's padding rows are no tokens), in
float32 at least, as the HF backend computes them (`F.log_softmax(logits, dtype=float32)`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Scored:
    """One (context, continuation) request's answer."""

    logprob: float
    """Sum of the continuation tokens' log-probabilities."""
    greedy: bool
    """Whether every continuation token is the most likely one at its position."""


def _pad_rows(rows: Sequence[Sequence[int]], length: int, pad: int) -> torch.Tensor:
    out = torch.full((len(rows), length), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class Scorer:
    """Log-likelihoods and greedy tokens under model chunks (one per virtual pipeline stage)."""

    def __init__(self, chunks: list, *, vocab_size: int, max_length: int, batch_size: int,
                 pad_to: int = 1):
        """`vocab_size`: the tokenizer's (logits beyond it are padding rows); `max_length`: the
        longest input (longer ones keep their last tokens); `pad_to`: sequence lengths are padded
        to a multiple of it (the tensor-parallel size under sequence parallelism)."""
        self.chunks, self.vocab_size, self.max_length = chunks, vocab_size, max_length
        self.batch_size, self.pad_to = batch_size, pad_to
        self.tokens_scored = 0
        """Input tokens run through the model so far (for throughput reports)."""

    # --- the model ---------------------------------------------------------------------------
    def _logprobs(self, tokens: torch.Tensor, wanted: list[range]) -> list[torch.Tensor] | None:
        """Per row of `tokens` [b, s], the float32 log-probabilities [len(wanted[row]), vocab]
        at its `wanted` positions, on the last pipeline stage; None on the other stages. Only
        those positions go through the output layer (engine.models.forward)."""
        from engine.models.forward import parallel_logits

        b, s = tokens.shape
        padded = -(-s // self.pad_to) * self.pad_to
        if padded != s:  # right padding: the causal positions before it do not see it
            tokens = torch.cat([tokens, tokens.new_zeros(b, padded - s)], dim=1)
        positions = torch.tensor([(row, p) for row, span in enumerate(wanted) for p in span],
                                 dtype=torch.long).view(-1, 2)
        device = next(self.chunks[0].parameters()).device
        for chunk in self.chunks:
            chunk.eval()
        try:
            logits = parallel_logits(self.chunks, tokens.to(device), positions)
        finally:
            for chunk in self.chunks:
                chunk.train()
        if logits is None:
            return None
        # [k, padded vocab] -> the real vocabulary (the padding rows are no tokens)
        logprobs = torch.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)
        return list(logprobs.split([len(span) for span in wanted]))

    def _broadcast(self, values: list) -> list:
        """The last pipeline stage's `values` on every rank of its pipeline group."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return values
        box = [values]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
        return box[0]

    def _run(self, batches: list[list[int]], rows: Sequence[Sequence[int]], wanted, answer
             ) -> list:
        """For every batch of row indices: `answer(logprobs, batch)` (a list per batch, computed
        on the last pipeline stage from each row's log-probabilities at the positions
        `wanted(i)`), the batches spread over the data-parallel replicas and gathered, in batch
        order on every rank. A replica short of a batch repeats one and drops its answer, so
        that every rank runs the same number of forwards (expert parallelism's collectives
        need it)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        dp = ps.get_data_parallel_world_size() if dist.is_initialized() else 1
        rank = ps.get_data_parallel_rank() if dp > 1 else 0
        mine = {}
        for first in range(0, len(batches), dp):
            index = first + rank
            batch = batches[min(index, len(batches) - 1)]
            tokens = _pad_rows([rows[i] for i in batch], len(rows[batch[0]]), 0)
            logprobs = self._logprobs(tokens, [wanted(i) for i in batch])
            answers = self._broadcast([] if logprobs is None else answer(logprobs, batch))
            if index < len(batches):
                mine[index] = answers
        self.tokens_scored += sum(len(batch) * len(rows[batch[0]]) for batch in batches)
        if dp == 1:
            return [mine[i] for i in range(len(batches))]
        gathered = [None] * dp
        dist.all_gather_object(gathered, mine, group=ps.get_data_parallel_group())
        merged = {i: a for part in gathered for i, a in part.items()}
        return [merged[i] for i in range(len(batches))]

    def _batches(self, order: list[int]) -> list[list[int]]:
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    # --- requests ----------------------------------------------------------------------------
    def loglikelihoods(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
                       ) -> list[Scored]:
        """For each (context tokens, continuation tokens): the continuation's log-likelihood
        given the context, and whether greedy decoding gives it. Context + continuation longer
        than max_length + 1 keep their last tokens (lm-eval's rule)."""
        inputs, conts = [], []
        for context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            inputs.append(whole[:-1])
            conts.append(list(continuation))
        order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), inputs[i]))

        def wanted(i: int) -> range:  # the continuation's positions
            return range(len(inputs[i]) - len(conts[i]), len(inputs[i]))

        def answer(logprobs: list[torch.Tensor], batch: list[int]) -> list[Scored]:
            scored = []
            for lp, i in zip(logprobs, batch, strict=True):  # lp: [n, vocab]
                target = torch.tensor(conts[i], dtype=torch.long, device=lp.device)
                scored.append(Scored(float(lp.gather(1, target[:, None]).sum()),
                                     bool((lp.argmax(-1) == target).all())))
            return scored

        batches = self._batches(order)
        answers = {i: s for batch, scored in zip(batches, self._run(batches, inputs, wanted,
                                                                    answer), strict=True)
                   for i, s in zip(batch, scored, strict=True)}
        return [answers[i] for i in range(len(inputs))]

    def next_tokens(self, contexts: Sequence[Sequence[int]], choose=None) -> list[int]:
        """The next token after each context (its last max_length tokens): `choose(logprobs)`
        of the [vocab] log-probabilities at its last position, computed on the last pipeline
        stage (greedy, the argmax, by default) and broadcast."""
        choose = choose or (lambda logprobs: int(logprobs.argmax()))
        rows = [list(c)[-self.max_length:] for c in contexts]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        batches = self._batches(order)
        chosen = self._run(batches, rows, lambda i: range(len(rows[i]) - 1, len(rows[i])),
                           lambda logprobs, batch: [choose(lp[0]) for lp in logprobs])
        out = {i: t for batch, tokens in zip(batches, chosen, strict=True)
               for i, t in zip(batch, tokens, strict=True)}
        return [out[i] for i in range(len(rows))]

    def token_losses(self, rows: Sequence[Sequence[int]]) -> list[list[float]]:
        """For each row of at most max_length + 1 tokens, the loss (nats) of every token after
        the first given the ones before it: -log p(row[i+1] | row[:i+1]) for each i,
        computed on the last pipeline stage and broadcast (engine eval --per-position)."""
        for row in rows:
            if len(row) > self.max_length + 1:
                raise ValueError(f"token_losses: a row of {len(row)} tokens; at most max_length"
                                 f" + 1 = {self.max_length + 1}")
        inputs = [list(r)[:-1] for r in rows]
        order = sorted(range(len(rows)), key=lambda i: -len(inputs[i]))

        def answer(logprobs: list[torch.Tensor], batch: list[int]) -> list[list[float]]:
            out = []
            for lp, i in zip(logprobs, batch, strict=True):  # lp: [len(row) - 1, vocab]
                target = torch.tensor(rows[i][1:], dtype=torch.long, device=lp.device)
                out.append((-lp.gather(1, target[:, None])[:, 0]).tolist())
            return out

        batches = self._batches(order)
        got = self._run(batches, inputs, lambda i: range(len(inputs[i])), answer)
        losses = {i: x for batch, part in zip(batches, got, strict=True)
                  for i, x in zip(batch, part, strict=True)}
        return [losses[i] for i in range(len(rows))]

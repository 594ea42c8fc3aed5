"""Vocabulary resize (pure): rows for the tokens an extended tokenizer appends to a model's own.

Symbols: n old tokens (ids 0..n-1, the base tokenizer's), k new ones (ids n..n+k-1, the extended
tokenizer's appended entries), E [rows, hidden] the input embedding, U [rows, hidden] the output
layer (U = E when the embeddings are tied). Rows 0..n-1 of E and U are kept bit for bit; each new
token gets a row of E (and of U when untied) by one of `INITS`:

- `subtoken-mean`: the mean of the rows of the base tokens the *base* tokenizer splits the new
  token's text into (fast vocabulary transfer: Gee et al. 2022, "Fast Vocabulary Transfer for
  Language Model Compression", EMNLP industry track, §3; the FOCUS/WECHSEL family refines it).
  The new token then starts as the average of the pieces it replaces.
- `mean`: the mean of all n old rows (Hewitt 2021, "Initializing New Word Embeddings for
  Pretrained Language Models", nlp.stanford.edu/~johnhew/vocab-expansion.html).
- `normal`: N(0, s^2), s the standard deviation of the old rows' entries (what a naive resize
  does, at the old rows' scale; seeded).

Invariants (tests/unit/upcycle/test_vocab.py, tests/integration/test_upcycle_vocab.py):
1. Any init: on token ids < n, the hidden states and the logits l_0..l_{n-1} are those of the old
   model, bit for bit in float64 (no old row moves; a new row is only read for a new id).
2. Output rows at the mean of the old output rows (`mean`, untied; or tied, where the output rows
   are the input rows and `mean` sets both to the mean of the old rows): every new logit is
   l_new = mean_i l_i, so by Jensen exp(l_new) <= (1/n) sum_i exp(l_i) = Z/n and
   KL(p_old || p_new) = log(1 + sum_{new} exp(l_j) / Z) <= log(1 + k/n)
   (Hewitt 2021, eq. for the partition function). `vocab_shift` measures it; since
   log p_old(y) - log p_new(y) = log(Z_new / Z_old) for every old y, this KL is also exactly the
   increase of the next-token loss on text without new tokens.
Pure: tensors, a ModelConfig and token-id lists in; no module, process group, path or tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.config.recipe import ModelConfig
from engine.models.vocab import trim_vocab
from engine.models.weights import EMBEDDING, OUTPUT
from engine.upcycle import UpcycleError

INITS = ("subtoken-mean", "mean", "normal")
"""How new rows start (module docstring)."""


@dataclass(frozen=True, slots=True)
class VocabSpec:
    """How to fill the new rows."""

    init: str
    """One of INITS."""
    pieces: tuple[tuple[int, ...], ...] | None = None
    """subtoken-mean: for each new token (in id order), the base ids its text splits into; an
    empty tuple (a token the base cannot spell, e.g. a special token) gets the mean row."""
    seed: int = 0
    """normal: the generator's seed (one stream; E's rows first, then U's)."""


def _check(spec: VocabSpec, n: int, k: int) -> None:
    if spec.init not in INITS:
        raise UpcycleError(f"--init {spec.init}: expected one of {', '.join(INITS)}")
    if k < 1:
        raise UpcycleError(f"the new vocabulary has {n + k} tokens, not more than the model's {n}")
    if spec.init != "subtoken-mean":
        return
    if spec.pieces is None or len(spec.pieces) != k:
        got = None if spec.pieces is None else len(spec.pieces)
        raise UpcycleError(f"subtoken-mean: expected the base split of {k} new tokens, got {got}")
    for i, ids in enumerate(spec.pieces):
        bad = [t for t in ids if not 0 <= t < n]
        if bad:
            raise UpcycleError(f"subtoken-mean: new token {n + i} splits into base id {bad[0]}, "
                               f"outside the old vocabulary [0, {n})")


def new_rows(old: torch.Tensor, k: int, spec: VocabSpec,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """k rows [k, hidden] for the new tokens from the n old rows `old` [n, hidden]; computed in
    float64, returned in old's dtype."""
    rows = old.double()
    mean = rows.mean(dim=0)
    if spec.init == "mean":
        out = mean.expand(k, -1)
    elif spec.init == "normal":
        std = rows.std().item()
        noise = torch.randn(k, rows.shape[1], generator=generator, dtype=torch.float64)
        out = noise * std
    else:
        out = torch.stack([rows[list(ids)].mean(dim=0) if ids else mean
                           for ids in spec.pieces])
    return out.to(old.dtype).contiguous()


def resize_vocabulary(state: dict[str, torch.Tensor], model: ModelConfig, vocab_size: int, *,
                      spec: VocabSpec) -> tuple[dict[str, torch.Tensor], dict]:
    """`state` (megatron names, any padding) for a tokenizer of `vocab_size` tokens: the
    vocabulary tensors trimmed to model.vocab_size = n old rows and extended by k = vocab_size - n
    rows (`spec`), unpadded (the writer pads for its layout); other tensors as they are.
    Returns (state, record for the report)."""
    n = model.vocab_size
    if n is None:
        raise UpcycleError("model.vocab_size is not set; the old vocabulary size is needed")
    k = vocab_size - n
    _check(spec, n, k)
    tied = model.share_embeddings_and_output_weights
    names = (EMBEDDING,) if tied else (EMBEDDING, OUTPUT)
    generator = torch.Generator().manual_seed(spec.seed)
    out = dict(state)
    for name in names:
        if name not in state:
            raise UpcycleError(f"'{name}' is missing from the state dict "
                               f"(share_embeddings_and_output_weights={tied})")
        old = trim_vocab(state[name], n)
        out[name] = torch.cat([old, new_rows(old, k, spec, generator)])
    empty = sum(not ids for ids in spec.pieces) if spec.pieces is not None else 0
    lengths = [len(ids) for ids in spec.pieces] if spec.pieces else []
    record = {"old_vocab_size": n, "vocab_size": vocab_size, "added": k, "init": spec.init,
              "tied": tied, "tensors": list(names), "kl_bound": kl_bound(n, k)}
    if spec.init == "subtoken-mean":
        record["subtokens"] = {"mean_pieces": sum(lengths) / max(len(lengths), 1),
                               "max_pieces": max(lengths, default=0),
                               "without_pieces": empty}
    return out, record


def kl_bound(n: int, k: int) -> float:
    """log(1 + k/n): the bound on KL(p_old || p_new) with output rows at the old rows' mean."""
    return math.log1p(k / n)


def vocab_shift(old: torch.Tensor, new: torch.Tensor, n: int, vocab_size: int, *,
                chunk: int = 64) -> dict:
    """How the next-token distribution over the old vocabulary moved: `old` [..., >= n] logits of
    the old model, `new` [..., >= vocab_size] of the resized one at the same positions (padding
    entries are ignored). In float64, `chunk` positions at a time:
    - max_abs_old_logit_change: max |l_new_i - l_old_i| over old tokens i (0 by invariant 1);
    - kl_mean, kl_max: KL(p_old || p_new) summed over old tokens, mean and max over positions,
      with p_new the resized model's softmax over all vocab_size tokens;
    - new_mass_mean: mean probability the resized model gives the k new tokens;
    - kl_bound: log(1 + k/n) (invariant 2)."""
    old_flat = old[..., :n].reshape(-1, n)
    new_flat = new[..., :vocab_size].reshape(-1, vocab_size)
    change = kl_sum = kl_max = mass = 0.0
    for start in range(0, old_flat.shape[0], chunk):
        lo = old_flat[start:start + chunk].double()
        ln = new_flat[start:start + chunk].double()
        change = max(change, (ln[:, :n] - lo).abs().max().item())
        log_p = lo.log_softmax(-1)
        log_q = ln.log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q[:, :n])).sum(-1)
        kl_sum, kl_max = kl_sum + kl.sum().item(), max(kl_max, kl.max().item())
        mass += log_q[:, n:].exp().sum().item()
    positions = old_flat.shape[0]
    return {"max_abs_old_logit_change": change, "kl_mean": kl_sum / positions, "kl_max": kl_max,
            "new_mass_mean": mass / positions, "kl_bound": kl_bound(n, vocab_size - n)}


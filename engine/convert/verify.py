"""`engine convert verify`: the same tokens through transformers and through the engine, both in
fp32; how far apart are the logits? Judged by engine.models.measure's rule (relative to the
logits' scale, against sqrt(eps) of fp32), with max/mean |Δlogit|, KL and top-1 agreement.

Compared over the real vocabulary (the engine's padded rows are not tokens). Random token ids
from a fixed seed; sequences of 256 tokens by default, because a wrong RoPE layout barely shows
at short lengths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from engine.checkpoint.unsharded import assign, forward_logits, read_unsharded, single_process_model
from engine.convert import ConvertError
from engine.models.measure import LogitDiff, compare_logits

COMPUTE = torch.float32
"""Both models run in fp32: transformers' Llama keeps parts of its arithmetic in fp32 (RMSNorm,
RoPE) whatever the model's dtype, so fp64 would not be tighter."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyOptions:
    """`engine convert verify` options (also an export stage's `args`)."""

    seq: int = 256
    """Tokens per random sequence."""
    batch: int = 2
    """Random sequences."""
    rtol: float | None = None
    """Largest max |logit difference| / max |logit| allowed (default: sqrt(eps) of fp32,
    engine.models.measure)."""


def random_tokens(vocab_size: int, *, batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf_dir: str | os.PathLike, tokens: torch.Tensor) -> torch.Tensor:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConvertError("verify needs transformers: pip install '.[hf]'") from None
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=COMPUTE)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def verify(hf_dir: str | os.PathLike, ckpt: str | os.PathLike, *, seq: int = 256,
           batch: int = 2, seed: int = 0) -> LogitDiff:
    model = read_unsharded(ckpt)
    vocab = model.recipe.model.vocab_size
    tokens = random_tokens(vocab, batch=batch, seq=seq, seed=seed)
    reference = hf_logits(hf_dir, tokens)
    with single_process_model(model.recipe, model.padded_vocab_size, dtype=COMPUTE) as engine:
        assign(engine, model.state)
        ours = forward_logits(engine, tokens)
    return compare_logits(reference, ours, vocab_size=vocab, dtype=COMPUTE)

"""`engine generate`: continue a prompt token by token, greedily or by top-p (nucleus) sampling
(Holtzman et al. 2020, arXiv 1904.09751), at any layout. No KV cache: each token runs the whole
sequence again, which is what a check of a converted or grown model needs, not a server. The
choice is made on the last pipeline stage from a generator seeded once, and broadcast."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.eval.scoring import Scorer


@dataclass(frozen=True, kw_only=True, slots=True)
class Sampling:
    top_p: float | None = None
    """Sample from the smallest set of tokens whose probability reaches top_p; None = greedy."""
    temperature: float = 1.0
    seed: int = 0


def top_p_choice(logprobs: torch.Tensor, top_p: float, temperature: float,
                 generator: torch.Generator) -> int:
    """A token from the nucleus of `logprobs` [vocab] at `temperature` (pure but for the draw)."""
    probs = torch.softmax(logprobs.double() / temperature, dim=-1)
    order = probs.argsort(descending=True)
    sorted_probs = probs[order]
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the first token always stays
    nucleus = sorted_probs * keep
    pick = torch.multinomial(nucleus / nucleus.sum(), 1, generator=generator)
    return int(order[pick])


def generate(scorer: Scorer, tokenizer, prompt: str, *, max_new_tokens: int,
             sampling: Sampling = Sampling()) -> list[int]:
    """The generated token ids (stops at the end-of-text token or `max_new_tokens`)."""
    tokens = tokenizer.encode(prompt)
    generator = torch.Generator().manual_seed(sampling.seed)
    choose = None if sampling.top_p is None else (
        lambda lp: top_p_choice(lp.cpu(), sampling.top_p, sampling.temperature, generator))
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = scorer.next_tokens([tokens + out], choose)[0]
        if token == tokenizer.eod:
            break
        out.append(token)
    return out

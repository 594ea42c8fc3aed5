"""How far apart two models' logits are, and whether that is only the arithmetic's noise: the one
rule behind every invariant report (HF import/export `verify`, Scale-Up, Scale-Out).

Logits are compared over the real vocabulary (padding rows are no tokens) in float64. The
difference is judged relative to the logits' scale, max |Δlogit| / max |reference logit|, against
`rtol(dtype) = sqrt(eps(dtype))`, where dtype is the precision that limits the comparison (the
compute dtype of a conversion check, the storage dtype of a grown model evaluated in float64):
a correct result keeps at least half of that precision's significant digits, a wrong one keeps
none of them. fp32: 3.5e-4 (a correct HF import of SmolLM2-135M measures 4e-6; a swapped q/k or a
missing residual scale gives 1e-1 and more); fp64: 1.5e-8; bf16: 0.088. Pure tensor math.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


def rtol(dtype: torch.dtype) -> float:
    """The largest relative logit difference a correct result may show at `dtype`."""
    return torch.finfo(dtype).eps ** 0.5


@dataclass(frozen=True, slots=True)
class LogitDiff:
    max_abs: float
    """max |candidate - reference| over every position and real token."""
    max_rel: float
    """max_abs / max |reference|: the difference at the logits' scale."""
    mean_abs: float
    kl: float
    """Mean over positions of KL(reference || candidate), in nats."""
    top1: float
    """Fraction of positions where both pick the same most likely token."""
    rtol: float
    """The tolerance max_rel is judged against (`rtol` of the limiting dtype)."""

    @property
    def holds(self) -> bool:
        return self.max_rel <= self.rtol

    def line(self) -> str:
        return (f"max_rel {self.max_rel:.2e} (tol {self.rtol:.1e}) | max_abs "
                f"{self.max_abs:.3e} | kl {self.kl:.3e} | top1 {self.top1:.4f}")

    def to_dict(self) -> dict:
        return {**asdict(self), "holds": self.holds}


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, *, vocab_size: int,
                   dtype: torch.dtype, chunk: int = 64) -> LogitDiff:
    """Both [..., >= vocab_size]; the first `vocab_size` entries of the last dimension are the
    tokens. `dtype` names the limiting precision (see the module docstring). Computed in float64,
    `chunk` positions at a time (a real vocabulary makes full float64 copies large)."""
    ref_all = reference[..., :vocab_size].reshape(-1, vocab_size)
    cand_all = candidate[..., :vocab_size].reshape(-1, vocab_size)
    max_abs = sum_abs = scale = kl = agree = 0.0
    for start in range(0, ref_all.shape[0], chunk):
        ref = ref_all[start:start + chunk].double()
        cand = cand_all[start:start + chunk].double()
        diff = (ref - cand).abs()
        max_abs, sum_abs = max(max_abs, diff.max().item()), sum_abs + diff.sum().item()
        scale = max(scale, ref.abs().max().item())
        log_p, log_q = ref.log_softmax(-1), cand.log_softmax(-1)
        kl += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
    positions = ref_all.shape[0]
    scale = max(scale, torch.finfo(torch.float64).tiny)
    return LogitDiff(max_abs=max_abs, max_rel=max_abs / scale,
                     mean_abs=sum_abs / (positions * vocab_size), kl=kl / positions,
                     top1=agree / positions, rtol=rtol(dtype))


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int,
                    chunk: int = 256) -> float:
    """Mean cross-entropy of `labels` [...] under `logits` [..., >= vocab_size] over the real
    vocabulary, in float64, `chunk` positions at a time."""
    flat = logits[..., :vocab_size].reshape(-1, vocab_size)
    targets = labels.reshape(-1)
    total = 0.0
    for start in range(0, flat.shape[0], chunk):
        part = flat[start:start + chunk].double()
        total += torch.nn.functional.cross_entropy(part, targets[start:start + chunk],
                                                   reduction="sum").item()
    return total / flat.shape[0]

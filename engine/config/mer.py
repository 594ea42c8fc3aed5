"""Recipe section `train.mer`: replay with Reptile-style meta-experience replay (MER).

Abbes et al. 2025, "Revisiting Replay and Gradient Alignment for Continual Pre-Training of
Large Language Models" (arXiv 2508.01908): continual pretraining with replay, plus a
Reptile outer step (Nichol et al. 2018, arXiv 1803.02999, Alg. 2) every k updates,
θ ← θ_anchor + ε·(θ − θ_anchor), after which θ is the new anchor. The replayed data then sits
in the same k-step window as the new data, and the interpolation favours updates whose
gradients agree across those batches (Riemer et al. 2019, arXiv 1810.11910, MER). The
authors' GPT-NeoX code (as issue 18 reads it) defaults to k = 500, ε = 0.01 and keeps the
optimizer state, as the engine does (engine.train.mer says why and how).
"""

from dataclasses import dataclass

from engine.config.checks import at_least
from engine.config.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class MerConfig:
    """Key `train.mer` (null = off): every `interval` optimizer steps of the stage the fp32
    main parameters move to anchor + epsilon x (parameters - anchor) and become the next
    anchor; the anchor is one fp32 copy of the parameters this rank updates, saved in
    checkpoints."""

    interval: int = 500
    """k: optimizer steps between two Reptile steps (the authors' default 500)."""
    epsilon: float = 0.01
    """ε in [0, 1]: the Reptile step size; 1 = no change (plain replay, bit for bit), 0 = back
    to the anchor every k steps (the authors' default 0.01)."""

    def __post_init__(self):
        at_least("train.mer.interval", self.interval, 1)
        if not 0.0 <= self.epsilon <= 1.0:
            raise ConfigError(f"train.mer.epsilon: expected a value in [0, 1], got "
                              f"{self.epsilon}")

"""The stability gap of a continual-pretraining stage (Guo et al. 2024, "Efficient Continual
Pre-training by Mitigating the Stability Gap", arXiv 2406.14833; the gap itself: De Lange et
al. 2023, "Continual evaluation for lifelong learning: identifying the stability gap", ICLR):
on a new distribution, performance on the earlier data first drops, then partly or wholly
recovers. One pure function summarizes one series (a validation loss or a task probe's
accuracy) over a stage; no I/O.

Definitions (units: the series' own, nats per token for a loss, a fraction for an accuracy):
- before: the value before the stage's first update: the series' value at step 0 of the stage
  when it was evaluated there, else `before` given by the caller (the earlier stage's last
  value).
- worst: the worst value at a step > 0 of the stage: the maximum of a loss, the minimum of an
  accuracy (`higher_is_better`); worst_step: the first step it occurs at.
- gap: how much worse than before the worst is, positive when worse: worst − before for a loss,
  before − worst for an accuracy.
- regained_step: the first step ≥ worst_step at which the value is back within `tolerance` of
  before (loss ≤ before + tolerance, accuracy ≥ before − tolerance); None = not regained
  within the stage. When the gap is within the tolerance the stage never left the band, and
  regained_step is worst_step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class StabilityGap:
    """The stability-gap summary of one series over one stage (module docstring)."""

    before: float
    worst: float
    worst_step: int
    gap: float
    regained_step: int | None
    tolerance: float
    higher_is_better: bool

    @property
    def regained(self) -> bool:
        return self.regained_step is not None

    def as_dict(self) -> dict:
        return {"before": self.before, "worst": self.worst, "worst_step": self.worst_step,
                "gap": self.gap, "regained_step": self.regained_step,
                "regained": self.regained, "tolerance": self.tolerance,
                "higher_is_better": self.higher_is_better}


def stability_gap(steps: Sequence[int], values: Sequence[float], *,
                  before: float | None = None, higher_is_better: bool = False,
                  tolerance: float = 0.0) -> StabilityGap:
    """The summary of the series (`steps` ascending, the stage's own step numbers); `before`
    is used when step 0 is not in `steps` and ignored when it is."""
    steps, values = list(steps), [float(v) for v in values]
    if len(steps) != len(values):
        raise ValueError(f"stability_gap: {len(steps)} steps but {len(values)} values")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"stability_gap: steps must increase, got {steps[:8]}...")
    if tolerance < 0:
        raise ValueError(f"stability_gap: tolerance must be >= 0, got {tolerance}")
    if steps and steps[0] == 0:
        before, steps, values = values[0], steps[1:], values[1:]
    if before is None:
        raise ValueError("stability_gap: no value before the stage (step 0 is not in the "
                         "series and no `before` was given)")
    if not steps:
        raise ValueError("stability_gap: no value after step 0")
    sign = -1.0 if higher_is_better else 1.0  # compare on "badness": larger is worse
    bad = [sign * v for v in values]
    k = max(range(len(bad)), key=lambda i: (bad[i], -i))  # the first of equal worsts
    limit = sign * before + tolerance
    regained = next((steps[i] for i in range(k, len(bad)) if bad[i] <= limit), None)
    return StabilityGap(before=before, worst=values[k], worst_step=steps[k],
                        gap=sign * (values[k] - before), regained_step=regained,
                        tolerance=tolerance, higher_is_better=higher_is_better)

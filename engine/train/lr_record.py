"""The learning rates a stage actually used, summed as it trains: what the CPT loss law needs of
a finished stage (engine.analyze.loss_law), kept in the checkpoint's TrainState and copied into
the stage history (`earlier_stages[i]["lr"]`) when a later stage starts from it.

The record holds, after n updates with learning rates η_1..η_n (the LR each update used, across
resumes and train.override_schedule changes, so no schedule has to be rebuilt):

    steps  n
    s1     S1 = Σ η_i                                      (forward area, LR x updates)
    s2     S2 = Σ m_i, m_i = λ·m_{i−1} + (η_{i−1} − η_i),   m_0 = 0, η_0 = η_1
    m      m_n, the annealing momentum at the end
    first  η_1,  final  η_n,  peak  max η_i

(Tissue et al. 2024, arXiv 2408.11029, Eq. 2; λ = 0.999 as Wang et al. 2025.) S2 counts only
the stage's own drops (η_0 = η_1); joining stages (the drop from one stage's final LR to the
next one's first, and the momentum carried over) is engine.analyze.loss_law.join_areas. A
record whose `steps` differs from the state's step is incomplete (a checkpoint written before
records existed, resumed): readers ignore it. Pure Python, no torch.
"""

from __future__ import annotations

LAMBDA = 0.999
"""Momentum decay of the annealing area per update (equal to engine.analyze.loss_law.LAMBDA)."""


def advance_record(record: dict | None, lr: float, lam: float = LAMBDA) -> dict:
    """The record after one more update with learning rate `lr` (a new dict)."""
    if not record or not record.get("steps"):
        return {"steps": 1, "s1": lr, "s2": 0.0, "m": 0.0, "first": lr, "final": lr, "peak": lr}
    m = lam * record["m"] + (record["final"] - lr)
    return {"steps": record["steps"] + 1, "s1": record["s1"] + lr, "s2": record["s2"] + m,
            "m": m, "first": record["first"], "final": lr, "peak": max(record["peak"], lr)}


def complete(record: dict | None, steps: int) -> dict | None:
    """`record` when it covers exactly `steps` updates, else None (module docstring)."""
    if record and record.get("steps") == steps:
        return dict(record)
    return None

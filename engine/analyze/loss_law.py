"""The continual-pretraining loss law of Wang et al. 2025 ("Learning Dynamics in Continual
Pre-Training for Large Language Models", ICML 2025, arXiv 2505.07796), on the learning-rate
areas of Tissue et al. 2024 ("Scaling Law with Learning Rate Annealing", arXiv 2408.11029):
a validation set's loss during a CPT stage as a function of the LR schedules of both stages;
its fit on the first part of a curve and the prediction of the rest. Pure functions on
tensors; no I/O (runs.py reads the curves, cli.py writes the results).

Symbols (units):
- η_i: the learning rate of optimizer update i of a stage (i = 1..n; the engine's
  `lr_at(i − 1)`, logged as `train/lr` at step i). The loss evaluated at step t has seen
  updates 1..t.
- S1(t) = Σ_{i≤t} η_i, the forward area after t updates (LR × updates).
- m_i = λ·m_{i−1} + (η_{i−1} − η_i), m_0 = 0; S2(t) = Σ_{i≤t} m_i, the annealing area with
  momentum decay λ per update (Tissue et al. Eq. 2, λ = 0.999). η_0 is the LR before the
  stage's first update: for a CPT stage the previous stage's final LR, so that re-warming makes
  m negative and S2 fall (the loss rise that re-warming causes); unknown: η_1 (the first update
  adds no annealing). A warmup from a small LR therefore counts as negative annealing.
- The law, with S*_pt the areas of all training before the stage (constants during it) and
  S*_cpt(t) the stage's areas:
      L(t) = L0 + A·(S1_pt + S1_cpt)^(−α) − C1·S2_pt − C2·S2_cpt
                + B·(1 − (1 + E·S1_cpt)^(−β))
  L0, L in nats per token; A in nats·(LR·updates)^α; C1, C2 in nats per LR·update; E per
  LR·update; α, β dimensionless. A, α, C1, C2, E, β > 0 as in the paper; B is free in sign
  (the distribution shift raises the loss of the earlier data, B > 0, and lowers the new
  domain's, B < 0); L0 is free. Before the stage (S*_cpt = 0) this is Tissue et al.'s law of
  the pretraining curve, L0 + A·S1^(−α) − C1·S2, which the earlier stage's curve follows.

What the data determine (measured on synthetic curves like tests/unit/analyze's, noise 0.005
nats): the first 20% of one CPT curve determines neither A and α (the power law hardly moves
during the stage) nor C2 against B (re-warming and the distribution shift both raise the loss
early); fitted alone, predictions of a held-out WSD stage's end missed by 0.01 to 0.2 nats.
Fitted together with the earlier stage's curve (`pretrain`, which fixes L0, A, α, C1), and
with a distribution shift that has mostly happened within the fitted part, they missed by at
most 0.013 nats, within the noise's 5 standard errors (the tests prove that bound). Without the
earlier curve, C1·S2_pt cannot be told from L0: `l0` is then L0 − C1·S2_pt and `c1` is 0;
an unknown S1_pt is fitted as a positive parameter. `prediction_band` shows the spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.analyze.fit import HUBER_DELTA, best_of, fit_huber, linear_starts, resample

LAMBDA = 0.999
"""Momentum decay of the annealing area per update (Tissue et al. 2024; Wang et al. 2025)."""


def lr_areas(lrs, lam: float = LAMBDA, *, lr_before: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(S1, S2), each [n + 1] float64: the forward and annealing areas after t = 0..n updates
    with learning rates `lrs` = (η_1, ..., η_n); `lr_before` is η_0 (None: η_1)."""
    eta = torch.as_tensor(lrs, dtype=torch.float64).flatten()
    if eta.numel() == 0:
        raise ValueError("lr_areas: expected at least one learning rate, got none")
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"lr_areas: lam must be in [0, 1), got {lam}")
    first = eta[:1] if lr_before is None else torch.tensor([lr_before], dtype=torch.float64)
    drops = (torch.cat([first, eta[:-1]]) - eta).tolist()  # η_{i−1} − η_i, i = 1..n
    m, acc = [], 0.0
    for d in drops:  # m_i = λ·m_{i−1} + drop_i: a recurrence, O(n)
        acc = lam * acc + d
        m.append(acc)
    zero = torch.zeros(1, dtype=torch.float64)
    s2 = torch.tensor(m, dtype=torch.float64).cumsum(0)
    return torch.cat([zero, eta.cumsum(0)]), torch.cat([zero, s2])


@dataclass(frozen=True, kw_only=True, slots=True)
class JoinedAreas:
    """The areas of several stages' updates one after another (join_areas)."""

    s1: float
    s2: float
    final_lr: float
    """The last update's learning rate (η_0 of a stage that follows)."""


def join_areas(records: list[dict], lam: float = LAMBDA) -> JoinedAreas:
    """S1 and S2 of stages run one after another, from each stage's own record
    (engine.train.lr_record: steps n, s1, s2 and end momentum m counted with η_0 = η_1, first
    and final LR): equal to `lr_areas` over the concatenated learning rates. The momentum
    recurrence is linear, so stage j adds its own S2 plus the carried part: with
    c = λ·M + (final_{j−1} − first_j), M the momentum at the end of the stages before,
    m_i = m_i(own) + λ^(i−1)·c, hence S2 += s2_j + c·(1 − λ^n)/(1 − λ) and
    M ← m_j + λ^(n−1)·c."""
    if not records:
        raise ValueError("join_areas: expected at least one stage record, got none")
    s1 = s2 = carried = 0.0
    final = None
    for r in records:
        n = r["steps"]
        c = 0.0 if final is None else lam * carried + (final - r["first"])
        s1 += r["s1"]
        s2 += r["s2"] + c * (1.0 - lam ** n) / (1.0 - lam)
        carried = r["m"] + lam ** (n - 1) * c
        final = r["final"]
    return JoinedAreas(s1=s1, s2=s2, final_lr=final)


@dataclass(frozen=True, kw_only=True, slots=True)
class LawParams:
    """The parameters of the CPT loss law (module docstring for units)."""

    l0: float
    a: float
    alpha: float
    c1: float
    c2: float
    b: float
    e: float
    beta: float


@dataclass(frozen=True, kw_only=True, slots=True)
class PretrainAreas:
    """What the law needs of the training before the stage."""

    s1: float | None
    """S1_pt: the sum of every earlier update's LR; None = unknown (then fitted)."""
    s2: float = 0.0
    """S2_pt: the earlier updates' annealing area (enters through C1·S2_pt only)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Curve:
    """One validation set's losses at a stage's evaluated steps, with the areas there."""

    steps: torch.Tensor
    """[n] the evaluated steps (updates done in the stage)."""
    s1: torch.Tensor
    """[n] the stage's S1 at those steps (for an earlier stage: counted from the first update
    of all training)."""
    s2: torch.Tensor
    """[n] the stage's S2 at those steps (likewise)."""
    loss: torch.Tensor
    """[n] the validation loss, nats per token."""

    def head(self, fraction: float) -> Curve:
        """The points at steps ≤ fraction × the last step."""
        keep = self.steps <= fraction * float(self.steps[-1])
        return Curve(steps=self.steps[keep], s1=self.s1[keep], s2=self.s2[keep],
                     loss=self.loss[keep])


def cpt_loss(p: LawParams, pt: PretrainAreas, s1_cpt, s2_cpt) -> torch.Tensor:
    """L(t) of Wang et al. 2025 at the stage's areas `s1_cpt`, `s2_cpt` (same shape)."""
    s1 = torch.as_tensor(s1_cpt, dtype=torch.float64)
    s2 = torch.as_tensor(s2_cpt, dtype=torch.float64)
    return (p.l0 + p.a * (pt.s1 + s1) ** (-p.alpha) - p.c1 * pt.s2 - p.c2 * s2
            + p.b * (1.0 - (1.0 + p.e * s1) ** (-p.beta)))


# --- the fit --------------------------------------------------------------------------------
# Unconstrained coordinates on areas divided by a scale k (u = S/k keeps every coordinate of
# order one): θ = (l0, log A_k, log α, [log C1_k,] log C2_k, B, log E_k, log β[, log u1_pt]),
# with A = A_k·k^α, C = C_k/k, E = E_k/k. A point's x = (u1 known part of S1_pt + S1_cpt,
# u2_pt, u1_cpt, u2_cpt): an earlier stage's point has S*_cpt = 0.

@dataclass(frozen=True, slots=True)
class LawProblem:
    """A fit's data in the internal coordinates (the comment above)."""

    names: tuple[str, ...]
    """The free coordinates of θ, in order."""
    k: float
    x: torch.Tensor
    """[n, 4] per point: (known part of S1_pt + S1_cpt, S2_pt, S1_cpt, S2_cpt), over k."""
    y: torch.Tensor
    """[n] the losses."""
    pt: PretrainAreas

    def theta_of(self, p: LawParams, s1_pt: float | None = None) -> torch.Tensor:
        """[p] θ of the physical parameters (`s1_pt` when it is a free coordinate)."""
        k = self.k
        v = {"l0": p.l0 if "log_c1" in self.names else p.l0 - p.c1 * self.pt.s2,
             "log_a": math.log(p.a * k ** -p.alpha), "log_alpha": math.log(p.alpha),
             "log_c1": math.log(max(p.c1, 1e-300) * k), "log_c2": math.log(p.c2 * k),
             "b": p.b, "log_e": math.log(p.e * k), "log_beta": math.log(p.beta),
             "log_u1_pt": math.log(s1_pt / k) if s1_pt else 0.0}
        return torch.tensor([v[n] for n in self.names], dtype=torch.float64)

    def law(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """θ [B, p], x [B, n, 4] -> [B, n]."""
        v = {name: theta[:, i:i + 1] for i, name in enumerate(self.names)}
        base = x[..., 0] + (torch.exp(v["log_u1_pt"]) if "log_u1_pt" in v else 0.0)
        c1 = torch.exp(v["log_c1"]) * x[..., 1] if "log_c1" in v else 0.0
        return (v["l0"] + torch.exp(v["log_a"]) * base ** (-torch.exp(v["log_alpha"])) - c1
                - torch.exp(v["log_c2"]) * x[..., 3]
                + v["b"] * (1.0 - (1.0 + torch.exp(v["log_e"]) * x[..., 2])
                            ** (-torch.exp(v["log_beta"]))))


def law_problem(cpt: Curve, pt: PretrainAreas, pretrain: Curve | None) -> LawProblem:
    """The fit's data: `cpt`'s points, and `pretrain`'s before them."""
    if pretrain is not None and pt.s1 is None:
        raise ValueError("fit_law: an earlier stage's curve needs its areas (pt.s1 is None)")
    k = max(float(cpt.s1.max()) + (pt.s1 or 0.0), 1e-12)
    known = (pt.s1 or 0.0) / k
    u1, u2 = cpt.s1.double() / k, cpt.s2.double() / k
    x = torch.stack([known + u1, torch.full_like(u1, pt.s2 / k), u1, u2], dim=1)
    y = cpt.loss.double()
    names = ["l0", "log_a", "log_alpha", "log_c2", "b", "log_e", "log_beta"]
    if pretrain is not None:
        p1, p2 = pretrain.s1.double() / k, pretrain.s2.double() / k
        zero = torch.zeros_like(p1)
        x = torch.cat([torch.stack([p1, p2, zero, zero], dim=1), x])
        y = torch.cat([pretrain.loss.double(), y])
        names.insert(3, "log_c1")
    if pt.s1 is None:
        names.append("log_u1_pt")
    return LawProblem(tuple(names), k, x, y, pt)


def _starts(prob: LawProblem, keep: int = 8) -> torch.Tensor:
    """Variable projection on a grid of the nonlinear parameters (α, E_k, β[, u1_pt]): the
    law is linear in (L0, A_k, [C1_k,] C2_k, B) given them; the `keep` best grid points, their
    linear parameters clamped positive where the law needs it."""
    x, grid = prob.x, []
    u1_pts = [None] if "log_u1_pt" not in prob.names else [0.1, 0.3, 1.0, 3.0, 10.0]
    for alpha in (0.1, 0.25, 0.5, 0.8, 1.2, 2.0):
        for e in (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0):
            for beta in (0.3, 0.6, 1.2, 2.5):
                for u in u1_pts:
                    grid.append((alpha, e, beta, u))
    designs = []
    for alpha, e, beta, u in grid:
        base = x[:, 0] + (u or 0.0)
        cols = [torch.ones_like(base), base ** (-alpha)]
        cols += [-x[:, 1]] if "log_c1" in prob.names else []
        cols += [-x[:, 3], 1.0 - (1.0 + e * x[:, 2]) ** (-beta)]
        designs.append(torch.stack(cols, dim=1))
    order, coef = linear_starts(torch.stack(designs), prob.y, keep)
    rows = []
    for g, c in zip(order.tolist(), coef.tolist()):
        alpha, e, beta, u = grid[g]
        lin = dict(zip(["l0", "a"] + (["c1"] if "log_c1" in prob.names else []) + ["c2", "b"],
                       c))
        v = {"l0": lin["l0"], "log_a": math.log(max(lin["a"], 1e-6)),
             "log_alpha": math.log(alpha), "log_c2": math.log(max(lin["c2"], 1e-6)),
             "b": lin["b"], "log_e": math.log(e), "log_beta": math.log(beta)}
        if "log_c1" in prob.names:
            v["log_c1"] = math.log(max(lin["c1"], 1e-6))
        if u is not None:
            v["log_u1_pt"] = math.log(u)
        rows.append([v[n] for n in prob.names])
    return torch.tensor(rows, dtype=torch.float64)


@dataclass(frozen=True, kw_only=True, slots=True)
class LawFit:
    """A fitted law and what it was fitted on."""

    params: LawParams
    pt: PretrainAreas
    """S1_pt as given, or fitted when it was unknown; S2_pt as given."""
    s1_pt_fitted: bool
    with_pretrain: bool
    """Whether the earlier stage's curve was fitted too (then L0 and C1 are separate)."""
    objective: float
    """Mean Huber loss of the residuals at the fit."""
    fit_points: int
    theta: tuple[float, ...]
    """The fit in its internal coordinates (`prediction_band` starts from it)."""


def _law_fit(prob: LawProblem, theta: torch.Tensor, objective: float) -> LawFit:
    v = dict(zip(prob.names, theta.tolist()))
    k, alpha = prob.k, math.exp(v["log_alpha"])
    s1_pt = k * math.exp(v["log_u1_pt"]) if "log_u1_pt" in v else prob.pt.s1
    params = LawParams(l0=v["l0"], a=math.exp(v["log_a"]) * k ** alpha, alpha=alpha,
                       c1=math.exp(v["log_c1"]) / k if "log_c1" in v else 0.0,
                       c2=math.exp(v["log_c2"]) / k, b=v["b"], e=math.exp(v["log_e"]) / k,
                       beta=math.exp(v["log_beta"]))
    return LawFit(params=params, pt=PretrainAreas(s1=s1_pt, s2=prob.pt.s2),
                  s1_pt_fitted=prob.pt.s1 is None, with_pretrain="log_c1" in v,
                  objective=objective, fit_points=len(prob.y), theta=tuple(theta.tolist()))


def fit_law(cpt: Curve, pt: PretrainAreas, *, pretrain: Curve | None = None,
            delta: float = HUBER_DELTA) -> LawFit:
    """Fit the law to `cpt` (typically `curve.head(fraction)`), with the Huber loss from the
    best starts of `_starts`, keeping the best; `pretrain`: the earlier stage's curve of the
    same validation set, fitted jointly (module docstring)."""
    prob = law_problem(cpt, pt, pretrain)
    if len(prob.y) <= len(prob.names):
        raise ValueError(f"{len(prob.y)} points cannot determine the law's {len(prob.names)} "
                         "parameters; evaluate more often or fit a larger fraction")
    starts = _starts(prob)
    b = len(starts)
    fit = fit_huber(prob.law, starts, prob.x.expand(b, -1, -1), prob.y.expand(b, -1),
                    delta=delta)
    return _law_fit(prob, *best_of(fit))


def predict(fit: LawFit, s1_cpt, s2_cpt) -> torch.Tensor:
    """The fitted law's loss at the stage's areas."""
    return cpt_loss(fit.params, fit.pt, s1_cpt, s2_cpt)


def prediction_band(fit: LawFit, cpt: Curve, pt: PretrainAreas, s1_cpt, s2_cpt, *,
                    pretrain: Curve | None = None, replicates: int = 50, seed: int = 0,
                    level: float = 0.9, delta: float = HUBER_DELTA
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high): the central `level` interval of the predictions at the given areas over
    bootstrap refits (the fitted points resampled with replacement, seeded; each refit starts
    from `fit`). `cpt`, `pt` and `pretrain` must be what `fit` was fitted on."""
    prob = law_problem(cpt, pt, pretrain)
    idx = resample(len(prob.y), replicates, seed)
    theta0 = torch.tensor(fit.theta, dtype=torch.float64).expand(replicates, -1)
    refit = fit_huber(prob.law, theta0, prob.x[idx], prob.y[idx], delta=delta, iters=100)
    preds = torch.stack([predict(_law_fit(prob, t, 0.0), s1_cpt, s2_cpt) for t in refit.theta])
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(preds, q, dim=0)
    return low, high

"""The critical mixture ratio of continual pretraining (Gu et al., EMNLP 2024, "CMR Scaling
Law: Predicting Critical Mixture Ratios for Continual Pre-training of Language Models",
arXiv 2407.17467): from one CPT run per mixture ratio at equal tokens, the largest share of
domain data that still learns the domain without losing more than ε of general loss. Pure
functions on tensors; no I/O (runs.py reads the runs, cli.py writes the results).

Symbols (units), as we read the paper:
- R: the mixture ratio, the domain data's share of the stage's training tokens, in (0, 1]
  (in this engine 1 − data.replay.fraction: the replay blend is the general data).
- T: tokens trained in the stage so far (tokens/total), T > 0.
- ΔL_domain(T), ΔL_general(T): the validation loss on the domain and on the general set minus
  its value before the stage (the stage's step-0 evaluation), nats per token.
- Per ratio, the paper's fitted forms (§4, power laws in T):
      ΔL_domain(T)  = α1·T^s1 + β1
      ΔL_general(T) = α2·T^s2 + α3·T^s3 + β2
  α_j in nats·tokens^(−s_j), s_j dimensionless with |s_j| < 3, β in nats; all signs free.
  Fitted with the Huber loss from the best starts of a grid over the exponents (the law is
  linear in α, β given them), on T normalized by the run's largest T.
- T_end: the token count the ratios are compared at; by default the largest T every run
  reached (no fit is extrapolated); a caller may pass a larger budget to extrapolate.
- A ratio is feasible when ΔL_general(T_end) ≤ ε and ΔL_domain(T_end) < 0 (the fitted laws
  at T_end). The critical ratio is the largest measured feasible R.
- Between ratios we interpolate linearly: when the next larger measured ratio R' fails the
  general constraint, the interpolated critical ratio is where the straight line between
  (R, ΔL_general(T_end; R)) and (R', ΔL_general(T_end; R')) crosses ε; otherwise it is R
  itself. This assumes ΔL_general(T_end) is roughly linear in R between two neighbours and
  that the domain constraint, met at R, holds above R (more domain data, more domain gain).
- Interval: the bootstrap (Efron 1979) over each curve's points: resample every ratio's
  (T, ΔL) points with replacement (seeded), refit both laws from the full fit, recompute the
  interpolated critical ratio; the central 90% of the replicates that have one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.analyze.fit import HUBER_DELTA, best_of, fit_huber, linear_starts, resample

EPSILON = 0.05
"""Default tolerance on the general loss increase at T_end, nats (the command's --epsilon)."""

_EXPONENTS = (-2.0, -1.5, -1.0, -0.7, -0.5, -0.35, -0.2, -0.1, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0,
              1.5, 2.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class PowerLaw:
    """ΔL(T) = Σ_j a_j·(T/scale)^s_j + β (T in tokens, ΔL in nats); the paper's α_j (for T in
    tokens) is a_j·scale^(−s_j), `coef_tokens`. Evaluated on T/scale so that no power
    overflows."""

    coef: tuple[float, ...]
    """a_j, nats (the coefficients on T/scale)."""
    exponents: tuple[float, ...]
    """s_j, ascending."""
    offset: float
    """β, nats."""
    scale: float
    """Tokens T is divided by (the run's largest T)."""

    @property
    def coef_tokens(self) -> tuple[float, ...]:
        return tuple(a * self.scale ** -s for a, s in zip(self.coef, self.exponents))

    def __call__(self, tokens) -> torch.Tensor:
        t = torch.as_tensor(tokens, dtype=torch.float64) / self.scale
        out = torch.full_like(t, self.offset)
        for a, s in zip(self.coef, self.exponents):
            out = out + a * t ** s
        return out


S_MAX = 3.0
"""|s_j| < S_MAX: the exponent is S_MAX·tanh(u) in the fit, which keeps a term that the data
cannot see from running off to an exponent that overflows (seen without the bound: s = 43
with a = 1e-280)."""


def power_law(theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """θ [B, 2J + 1] = (a_1..a_J, u_1..u_J, β), s_j = S_MAX·tanh(u_j), on normalized tokens
    t [B, n] -> ΔL [B, n]."""
    j = (theta.shape[1] - 1) // 2
    a, s = theta[:, :j, None], S_MAX * torch.tanh(theta[:, j:2 * j, None])
    return theta[:, -1:] + (a * t[:, None, :] ** s).sum(dim=1)


def _unpack(theta: torch.Tensor, scale: float) -> PowerLaw:
    j = (len(theta) - 1) // 2
    a, s = theta[:j].tolist(), (S_MAX * torch.tanh(theta[j:2 * j])).tolist()
    order = sorted(range(j), key=lambda i: s[i])  # a canonical order: exponents ascending
    return PowerLaw(coef=tuple(a[i] for i in order), exponents=tuple(s[i] for i in order),
                    offset=float(theta[-1]), scale=scale)


def _starts(t: torch.Tensor, y: torch.Tensor, terms: int, keep: int = 6) -> torch.Tensor:
    grid = list(itertools.combinations(_EXPONENTS, terms))
    ones = torch.ones_like(t)
    designs = torch.stack([torch.stack([t ** s for s in ss] + [ones], dim=1) for ss in grid])
    order, coef = linear_starts(designs, y, keep)
    return torch.tensor([c[:terms] + [math.atanh(s / S_MAX) for s in grid[g]] + [c[-1]]
                         for g, c in zip(order.tolist(), coef.tolist())], dtype=torch.float64)


@dataclass(frozen=True, kw_only=True, slots=True)
class PowerFit:
    law: PowerLaw
    objective: float
    """Mean Huber loss of the residuals."""
    theta: tuple[float, ...]
    """Internal coordinates (power_law's θ), for the bootstrap."""


def fit_power_law(tokens, delta_loss, terms: int, *, delta: float = HUBER_DELTA) -> PowerFit:
    """Fit Σ_{j≤terms} α_j·T^s_j + β to (T, ΔL) points with T > 0 (1 term: the domain law,
    2 terms: the general law)."""
    t = torch.as_tensor(tokens, dtype=torch.float64)
    y = torch.as_tensor(delta_loss, dtype=torch.float64)
    if t.shape != y.shape or t.dim() != 1 or bool((t <= 0).any()):
        raise ValueError("fit_power_law: expected two [n] series with every T > 0, got "
                         f"shapes {tuple(t.shape)}, {tuple(y.shape)}")
    if len(t) <= 2 * terms + 1:
        raise ValueError(f"fit_power_law: {len(t)} points cannot determine {2 * terms + 1} "
                         "parameters; evaluate more often")
    scale = float(t.max())
    starts = _starts(t / scale, y, terms)
    b = len(starts)
    fit = fit_huber(power_law, starts, (t / scale).expand(b, -1), y.expand(b, -1), delta=delta)
    theta, objective = best_of(fit)
    return PowerFit(law=_unpack(theta, scale), objective=objective,
                    theta=tuple(theta.tolist()))


@dataclass(frozen=True, kw_only=True, slots=True)
class RatioCurves:
    """One run of the sweep: its ratio and its two ΔL curves at the evaluated steps."""

    ratio: float
    """R, the domain data's share of the stage's tokens, in (0, 1]."""
    tokens: torch.Tensor
    """[n] T at the evaluated steps after the stage's start (> 0)."""
    domain: torch.Tensor
    """[n] ΔL_domain at those steps."""
    general: torch.Tensor
    """[n] ΔL_general at those steps."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RatioFit:
    ratio: float
    domain: PowerFit
    general: PowerFit
    domain_end: float
    """ΔL_domain(T_end) of the fitted law."""
    general_end: float
    feasible: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class CmrResult:
    epsilon: float
    tokens_end: float
    fits: tuple[RatioFit, ...]
    """By ratio, ascending."""
    critical_ratio: float | None
    """The largest measured feasible R; None when none is feasible."""
    interpolated: float | None
    """The critical ratio interpolated towards the next measured ratio (module docstring)."""
    interval: tuple[float, float] | None
    """Central 90% of the bootstrap replicates' interpolated critical ratio."""
    replicates: int
    defined_share: float
    """Share of the bootstrap replicates that had a feasible ratio."""


def critical_ratio(ratios: Sequence[float], domain_end: Sequence[float],
                   general_end: Sequence[float], epsilon: float
                   ) -> tuple[float | None, float | None]:
    """(the largest feasible ratio, its linear interpolation towards the next ratio) for
    ratios in ascending order; (None, None) when no ratio is feasible."""
    feasible = [g <= epsilon and d < 0 for d, g in zip(domain_end, general_end)]
    if not any(feasible):
        return None, None
    k = max(i for i, f in enumerate(feasible) if f)
    r = ratios[k]
    if k + 1 < len(ratios) and general_end[k + 1] > epsilon:
        g0, g1 = general_end[k], general_end[k + 1]
        return r, r + (epsilon - g0) * (ratios[k + 1] - r) / (g1 - g0)
    return r, r


def _refit(fit: PowerFit, tokens: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
           at: float, delta: float) -> torch.Tensor:
    """[replicates] the law at T = `at` after refitting on each row of resampled indices."""
    t = tokens / fit.law.scale
    theta0 = torch.tensor(fit.theta, dtype=torch.float64).expand(len(idx), -1)
    refit = fit_huber(power_law, theta0, t[idx], y[idx], delta=delta, iters=100)
    at_t = torch.full((len(idx), 1), at / fit.law.scale, dtype=torch.float64)
    return power_law(refit.theta, at_t)[:, 0]


def fit_cmr(curves: Sequence[RatioCurves], *, epsilon: float = EPSILON,
            tokens_end: float | None = None, replicates: int = 200, seed: int = 0,
            delta: float = HUBER_DELTA) -> CmrResult:
    """Fit both laws per ratio, the critical ratio at T_end and its bootstrap interval."""
    if len({c.ratio for c in curves}) != len(curves) or len(curves) < 1:
        raise ValueError(f"fit_cmr: expected distinct ratios, got {[c.ratio for c in curves]}")
    curves = sorted(curves, key=lambda c: c.ratio)
    t_end = tokens_end or min(float(c.tokens.max()) for c in curves)
    fits, d_boot, g_boot = [], [], []
    for i, c in enumerate(curves):
        dom, gen = fit_power_law(c.tokens, c.domain, 1, delta=delta), \
            fit_power_law(c.tokens, c.general, 2, delta=delta)
        d_end, g_end = float(dom.law(t_end)), float(gen.law(t_end))
        fits.append(RatioFit(ratio=c.ratio, domain=dom, general=gen, domain_end=d_end,
                             general_end=g_end, feasible=g_end <= epsilon and d_end < 0))
        if replicates:
            t = c.tokens.double()
            idx = resample(len(t), replicates, seed + i)
            d_boot.append(_refit(dom, t, c.domain.double(), idx, t_end, delta))
            g_boot.append(_refit(gen, t, c.general.double(), idx, t_end, delta))
    ratios = [f.ratio for f in fits]
    grid, interp = critical_ratio(ratios, [f.domain_end for f in fits],
                                  [f.general_end for f in fits], epsilon)
    values = []
    for r in range(replicates):
        _, v = critical_ratio(ratios, [float(d[r]) for d in d_boot],
                              [float(g[r]) for g in g_boot], epsilon)
        if v is not None and math.isfinite(v):
            values.append(v)
    interval = None
    if values:
        q = torch.quantile(torch.tensor(values, dtype=torch.float64),
                           torch.tensor([0.05, 0.95], dtype=torch.float64))
        interval = (float(q[0]), float(q[1]))
    return CmrResult(epsilon=epsilon, tokens_end=t_end, fits=tuple(fits), critical_ratio=grid,
                     interpolated=interp, interval=interval, replicates=replicates,
                     defined_share=len(values) / replicates if replicates else 0.0)

"""Robust curve fitting shared by the analysis laws: minimize the mean Huber loss of the
residuals of a law `f(theta, x)`, for many independent problems at once (several starts of one
fit, or bootstrap replicates), with a batched Levenberg–Marquardt iteration on iteratively
reweighted least squares. Pure functions on float64 tensors; no I/O.

Why not torch.optim.LBFGS: its line search is shared by all the parameters it holds, so a batch
of problems would couple; here every problem has its own damping and its own accept/reject
test, so a batch of B fits gives exactly what B separate fits would.

The Huber loss (Huber 1964) of a residual r with threshold δ (the residual's units):
    ρ_δ(r) = r²/2 when |r| ≤ δ, else δ·(|r| − δ/2);
scaling-law fits use it so that a few outlying evaluations (a loss spike) do not pull the
curve (Hoffmann et al. 2022, Chinchilla, arXiv 2203.15556 App. D.2: δ = 1e-3). Its minimizer is
the fixed point of weighted least squares with weights w = min(1, δ/|r|) (IRLS), which each
iteration solves to first order in θ with Levenberg–Marquardt damping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Law = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""f(theta [B, p], x [B, n, ...]) -> predictions [B, n]: B independent problems at once."""

HUBER_DELTA = 1e-3
"""Default Huber threshold in loss units (nats): Chinchilla's choice for loss fits."""


@dataclass(frozen=True, slots=True)
class Fit:
    """The result of `fit_huber` for a batch of B problems."""

    theta: torch.Tensor
    """[B, p] the parameters reached (in the law's own, unconstrained coordinates)."""
    objective: torch.Tensor
    """[B] the mean Huber loss of the residuals at `theta` (inf where it is not finite)."""


def huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    """ρ_δ(r) elementwise (see the module docstring)."""
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(law: Law, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               delta: float) -> torch.Tensor:
    pred = law(theta, x)
    obj = huber(y - pred, delta).mean(dim=1)
    return torch.where(torch.isfinite(obj), obj, torch.full_like(obj, float("inf")))


def jacobian(law: Law, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B, n, p] ∂law/∂θ by central differences (step 1e-6·(1 + |θ|): float64 error ~1e-10
    relative, ample for Levenberg–Marquardt, whose steps are accepted on the exact objective);
    2p batched evaluations, far cheaper here than functorch's per-call overhead."""
    h = 1e-6 * (1.0 + theta.abs())
    cols = []
    for i in range(theta.shape[1]):
        e = torch.zeros_like(theta)
        e[:, i] = h[:, i]
        cols.append((law(theta + e, x) - law(theta - e, x)) / (2 * h[:, i:i + 1]))
    return torch.stack(cols, dim=-1)


def fit_huber(law: Law, theta0: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
              delta: float = HUBER_DELTA, iters: int = 300, tol: float = 1e-10) -> Fit:
    """Minimize mean_i ρ_δ(y[b, i] − law(θ[b], x[b, i])) over θ[b], for each b independently.

    theta0: [B, p] starting points; x: [B, n, ...] (expand a shared x: no copy); y: [B, n].
    Stops after `iters` iterations, or once no problem's objective has improved by more than
    `tol` (relative) for 10 iterations in a row.
    """
    if theta0.dim() != 2 or y.dim() != 2 or x.shape[:2] != y.shape or y.shape[0] != len(theta0):
        raise ValueError(f"fit_huber: expected theta0 [B, p], x [B, n, ...], y [B, n]; got "
                         f"{tuple(theta0.shape)}, {tuple(x.shape)}, {tuple(y.shape)}")
    theta = theta0.to(torch.float64).clone()
    b, p = theta.shape
    x, y = x.to(torch.float64), y.to(torch.float64)
    obj = _objective(law, theta, x, y, delta)
    mu = torch.full((b,), 1e-3, dtype=torch.float64)
    eye = torch.eye(p, dtype=torch.float64)
    quiet = 0
    for _ in range(iters):
        r = y - law(theta, x)
        w = torch.clamp(delta / r.abs().clamp_min(1e-300), max=1.0)  # IRLS weights of ρ_δ
        j = jacobian(law, theta, x)
        jw = j * w.unsqueeze(-1)
        a = jw.transpose(1, 2) @ j  # [B, p, p]: JᵀWJ
        g = (jw * r.unsqueeze(-1)).sum(dim=1)  # [B, p]: JᵀWr
        bad = ~(torch.isfinite(a).flatten(1).all(1) & torch.isfinite(g).all(1))
        a = torch.where(bad[:, None, None], eye, a)  # a problem whose Jacobian overflowed:
        g = torch.where(bad[:, None], 0.0, g)  # no step; its damping grows below
        damp = torch.diag_embed(torch.diagonal(a, dim1=1, dim2=2)) + 1e-12 * eye
        step = torch.linalg.lstsq(a + mu[:, None, None] * damp, g.unsqueeze(-1)).solution
        candidate = theta + torch.nan_to_num(step.squeeze(-1), nan=0.0)
        new = _objective(law, candidate, x, y, delta)
        better = (new < obj) & ~bad
        gain = float(((obj - new) / obj.clamp_min(1e-300)).where(better, 0.0).max())
        theta = torch.where(better[:, None], candidate, theta)
        obj = torch.where(better, new, obj)
        mu = torch.where(better, mu / 3, mu * 4).clamp(1e-12, 1e12)
        quiet = quiet + 1 if gain < tol else 0
        if quiet >= 10:
            break
    return Fit(theta=theta, objective=obj)


def best_of(fit: Fit) -> tuple[torch.Tensor, float]:
    """The parameters and objective of the best problem of a multi-start batch."""
    k = int(torch.argmin(fit.objective))
    return fit.theta[k], float(fit.objective[k])


def linear_starts(designs: torch.Tensor, y: torch.Tensor, keep: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting points by variable projection: for laws linear in some parameters given the
    others, `designs` [G, n, q] holds the linear parameters' columns at G grid values of the
    nonlinear ones; returns (the `keep` grid indices with the smallest least-squares residual,
    their linear coefficients [keep, q])."""
    y = y.to(torch.float64)
    coef = torch.linalg.lstsq(designs, y.expand(len(designs), -1).unsqueeze(-1)).solution
    coef = coef.squeeze(-1)
    sse = ((designs @ coef.unsqueeze(-1)).squeeze(-1) - y).pow(2).sum(dim=1)
    sse = torch.where(torch.isfinite(sse), sse, torch.full_like(sse, float("inf")))
    order = torch.argsort(sse)[:keep]
    return order, coef[order]


def standard_errors(law: Law, theta: torch.Tensor, x: torch.Tensor, sigma: float
                    ) -> torch.Tensor:
    """theta [p], x [n, ...] -> [p] standard errors of least-squares estimates of θ for white
    noise of standard deviation `sigma` on every point: sqrt(diag(σ²·(JᵀJ)⁻¹)), J = ∂law/∂θ at
    `theta` (the Gauss–Markov covariance, to first order). A Huber fit with δ well below σ
    behaves like an L1 fit, whose variance is π/2 times larger (efficiency 2/π under Gaussian
    noise)."""
    j = jacobian(law, theta.to(torch.float64)[None], x.to(torch.float64)[None])[0]
    return (sigma ** 2 * torch.linalg.inv(j.T @ j)).diagonal().sqrt()


def resample(n: int, replicates: int, seed: int) -> torch.Tensor:
    """[replicates, n] indices drawn with replacement (the bootstrap of Efron 1979), from a
    generator seeded with `seed` so that an interval is reproducible."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (replicates, n), generator=gen)

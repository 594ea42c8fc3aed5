"""The CPT loss law (engine.analyze.loss_law): the LR areas by hand, and fits on synthetic
curves drawn from known parameters plus seeded Gaussian noise.

Tolerances come from the noise: for white noise σ, least squares has the covariance
σ²(JᵀJ)⁻¹ at the true parameters (J: the law's Jacobian on the fitted points); the Huber fit
with δ = 1e-3 < σ behaves like an L1 fit, whose variance is π/2 times larger. Estimates and
predictions must lie within 5 such standard errors (a Gaussian deviation that large has
probability < 1e-6), and the tests also check that these bounds are tight enough to mean
something."""

import math

import pytest
import torch

from engine.analyze.fit import standard_errors
from engine.analyze.loss_law import (
    Curve,
    LawParams,
    PretrainAreas,
    cpt_loss,
    fit_law,
    law_problem,
    lr_areas,
    predict,
    prediction_band,
)
from engine.config.recipe import ScheduleConfig
from engine.train.schedule import lr_at

SIGMA = 0.003
"""Noise of the synthetic validation losses, nats: evaluation on fixed validation batches."""
L1_FACTOR = math.sqrt(math.pi / 2)
TRUE = LawParams(l0=2.0, a=0.5, alpha=0.5, c1=0.4, c2=0.3, b=0.3, e=50.0, beta=1.0)
"""A general-data loss: the distribution shift (B > 0) has mostly happened within the first
20% of the stage (E·S1_cpt ≈ 13 there), which is when its start predicts its end."""


def test_lr_areas_by_hand():
    # η = (1, 1, 0.5, 0.5), λ = 0.5, η_0 = η_1: drops (0, 0, 0.5, 0),
    # m = (0, 0, 0.5, 0.25), S2 = (0, 0, 0, 0.5, 0.75); S1 = (0, 1, 2, 2.5, 3)
    s1, s2 = lr_areas([1.0, 1.0, 0.5, 0.5], 0.5)
    assert s1.tolist() == [0.0, 1.0, 2.0, 2.5, 3.0]
    assert s2.tolist() == [0.0, 0.0, 0.0, 0.5, 0.75]
    # η_0 = 2 (the earlier stage's last LR): drops (1, 0, 0.5, 0), m = (1, 0.5, 0.75, 0.375)
    _, s2 = lr_areas([1.0, 1.0, 0.5, 0.5], 0.5, lr_before=2.0)
    assert s2.tolist() == [0.0, 1.0, 1.5, 2.25, 2.625]
    # re-warming from a lower LR is negative annealing
    _, s2 = lr_areas([0.5, 1.0], 0.5, lr_before=0.25)
    assert s2.tolist() == [0.0, -0.25, -0.875]


def test_constant_lr_has_no_annealing_area():
    s1, s2 = lr_areas([3e-4] * 50)
    assert torch.equal(s2, torch.zeros(51, dtype=torch.float64))
    assert s1[-1].item() == pytest.approx(50 * 3e-4)


def _lrs(style: str, steps: int, **kw) -> list[float]:
    s = ScheduleConfig(style=style, **kw)
    return [lr_at(i, s, peak_lr=3e-4, total_steps=steps) for i in range(steps)]


PT_LRS = _lrs("cosine", 20000, warmup_steps=500, min_lr=3e-5)
_S1, _S2 = lr_areas(PT_LRS)
PT = PretrainAreas(s1=float(_S1[-1]), s2=float(_S2[-1]))
CPT = dict(warmup_steps=100, warmup_init_lr=3e-5, min_lr=3e-5)


def _cpt_curve(lrs: list[float], gen: torch.Generator | None) -> Curve:
    s1, s2 = lr_areas(lrs, lr_before=PT_LRS[-1])
    steps = torch.arange(0, len(lrs) + 1, 10)
    loss = cpt_loss(TRUE, PT, s1[steps], s2[steps])
    if gen is not None:
        loss = loss + SIGMA * torch.randn(loss.shape, generator=gen, dtype=torch.float64)
    return Curve(steps=steps.double(), s1=s1[steps], s2=s2[steps], loss=loss)


def _pt_curve(gen: torch.Generator) -> Curve:
    steps = torch.arange(550, 20001, 50)  # after the warmup
    loss = TRUE.l0 + TRUE.a * _S1[steps] ** -TRUE.alpha - TRUE.c1 * _S2[steps]
    loss = loss + SIGMA * torch.randn(loss.shape, generator=gen, dtype=torch.float64)
    return Curve(steps=steps.double(), s1=_S1[steps], s2=_S2[steps], loss=loss)


def test_fit_recovers_the_parameters():
    gen = torch.Generator().manual_seed(0)
    pretrain, cpt = _pt_curve(gen), _cpt_curve(_lrs("cosine", 5000, **CPT), gen)
    fit = fit_law(cpt, PT, pretrain=pretrain)
    prob = law_problem(cpt, PT, pretrain)
    truth = prob.theta_of(TRUE)
    se = standard_errors(prob.law, truth, prob.x, SIGMA) * L1_FACTOR
    got = torch.tensor(fit.theta, dtype=torch.float64)
    for name, g, t, s in zip(prob.names, got.tolist(), truth.tolist(), se.tolist()):
        assert abs(g - t) <= 5 * s, f"{name}: fitted {g:.4f}, true {t:.4f}, 5 SE {5 * s:.4f}"
    # the bounds are informative: every parameter within 25% (log ones: a factor 1.25)
    assert all(5 * s < 0.25 * max(1.0, abs(t)) for s, t in zip(se.tolist(), truth.tolist()))
    assert fit.with_pretrain and not fit.s1_pt_fitted


def _points(curve: Curve, k: float) -> torch.Tensor:
    """The law's x (loss_law.LawProblem) of a CPT curve's points at scale k."""
    u1, u2 = curve.s1 / k, curve.s2 / k
    return torch.stack([PT.s1 / k + u1, torch.full_like(u1, PT.s2 / k), u1, u2], dim=1)


def _prediction_se(prob, truth, at: torch.Tensor) -> torch.Tensor:
    """Delta method: SE of the law at the points `at` [m, 4] from θ's covariance."""
    from engine.analyze.fit import jacobian

    j_fit = jacobian(prob.law, truth[None], prob.x[None])[0]
    cov = SIGMA ** 2 * torch.linalg.inv(j_fit.T @ j_fit)
    g = jacobian(prob.law, truth[None], at[None])[0]
    return ((g @ cov) * g).sum(dim=1).sqrt()


@pytest.mark.parametrize("fitted_on", ["cosine", "constant"])
def test_first_20_percent_predicts_a_held_out_wsd_schedule(fitted_on):
    """Fit on the first 20% of a cosine (or constant) CPT stage together with the pretraining
    curve; predict a whole WSD stage of the same length (20% linear decay) it never saw, at
    every evaluated step within 5 standard errors of the prediction (delta method)."""
    gen = torch.Generator().manual_seed(1)
    pretrain = _pt_curve(gen)
    head = _cpt_curve(_lrs(fitted_on, 5000, **CPT), gen).head(0.2)
    wsd = _cpt_curve(_lrs("wsd", 5000, wsd_decay_steps=1000, **CPT), None)
    fit = fit_law(head, PT, pretrain=pretrain)
    error = (predict(fit, wsd.s1, wsd.s2) - wsd.loss).abs()
    prob = law_problem(head, PT, pretrain)
    tol = 5 * L1_FACTOR * _prediction_se(prob, prob.theta_of(TRUE), _points(wsd, prob.k))
    worst = int(torch.argmax(error - tol))
    assert bool((error <= tol).all()), (
        f"step {int(wsd.steps[worst])}: error {error[worst]:.4f} > 5 SE {tol[worst]:.4f}")
    # the bound stays informative: under 0.05 nats (1.5% of the loss) at the end of the
    # decay, where it is widest: C2 is informed only by the re-warming within the first 20%
    assert float(tol.max()) < 0.05


def test_unknown_pretraining_area_is_fitted():
    gen = torch.Generator().manual_seed(2)
    cpt = _cpt_curve(_lrs("cosine", 5000, **CPT), gen)
    fit = fit_law(cpt, PretrainAreas(s1=None))
    assert fit.s1_pt_fitted and fit.pt.s1 > 0
    residual = predict(fit, cpt.s1, cpt.s2) - cpt.loss
    # the law fits its own curve to the noise: RMS residual near σ
    assert float(residual.pow(2).mean().sqrt()) < 1.2 * SIGMA


def test_prediction_band_matches_the_parameter_uncertainty():
    """The bootstrap band of the end-of-stage prediction has the width the noise implies: a
    central 90% interval is 2 × 1.645 standard errors (delta method at the true parameters, as
    above). A bootstrap estimates that from its own sample: over 8 seeds its width was 0.46 to
    1.3 times the expected one, hence the factor 3 allowed here."""
    gen = torch.Generator().manual_seed(3)
    pretrain = _pt_curve(gen)
    head = _cpt_curve(_lrs("cosine", 5000, **CPT), gen).head(0.2)
    end = _cpt_curve(_lrs("cosine", 5000, **CPT), None)
    fit = fit_law(head, PT, pretrain=pretrain)
    low, high = prediction_band(fit, head, PT, end.s1[-1:], end.s2[-1:], pretrain=pretrain,
                                replicates=30, seed=0)
    prob = law_problem(head, PT, pretrain)
    se = _prediction_se(prob, prob.theta_of(TRUE), _points(end, prob.k)[-1:])
    expected = 2 * 1.645 * float(se) * L1_FACTOR
    assert expected / 3 <= float(high - low) <= 3 * expected
    assert float(low) <= float(predict(fit, end.s1[-1:], end.s2[-1:])) <= float(high)


def test_too_few_points_is_an_error():
    cpt = _cpt_curve(_lrs("cosine", 50, **dict(CPT, warmup_steps=5)), None)
    with pytest.raises(ValueError, match="cannot determine"):
        fit_law(cpt, PT)

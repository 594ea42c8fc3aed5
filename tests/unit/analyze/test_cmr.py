"""The CMR law (engine.analyze.cmr): power-law fits on synthetic curves from known parameters
plus seeded Gaussian noise, the critical ratio by its definition, and on a synthetic sweep.

Tolerances come from the noise as in test_loss_law: 5 standard errors of least squares at the
true parameters (σ²(JᵀJ)⁻¹), times sqrt(π/2) for the Huber fit that behaves like L1."""

import math

import pytest
import torch

from engine.analyze.cmr import (
    S_MAX,
    PowerLaw,
    RatioCurves,
    critical_ratio,
    fit_cmr,
    fit_power_law,
    power_law,
)
from engine.analyze.fit import jacobian, standard_errors

SIGMA = 0.003
"""Noise of the synthetic ΔL, nats."""
L1_FACTOR = math.sqrt(math.pi / 2)
SCALE = 1e8
"""Tokens of the stage: T ∈ [2e6, 1e8], 50 evaluations."""
TOKENS = torch.linspace(2e6, SCALE, 50, dtype=torch.float64)


def _law(coef, exponents, offset) -> PowerLaw:
    """A law by its coefficients on T / SCALE."""
    return PowerLaw(coef=tuple(coef), exponents=tuple(exponents), offset=offset, scale=SCALE)


def _theta(coef, exponents, offset) -> torch.Tensor:
    """power_law's internal coordinates of a law (exponent s = S_MAX·tanh(u))."""
    u = [math.atanh(s / S_MAX) for s in exponents]
    return torch.tensor([*coef, *u, offset], dtype=torch.float64)


def _noisy(law: PowerLaw, gen: torch.Generator) -> torch.Tensor:
    return law(TOKENS) + SIGMA * torch.randn(len(TOKENS), generator=gen, dtype=torch.float64)


def test_domain_law_parameters_are_recovered():
    gen = torch.Generator().manual_seed(0)
    truth = _theta([0.1], [-0.4], -0.2)  # a·t^s + b on t = T/SCALE
    fit = fit_power_law(TOKENS, _noisy(_law([0.1], [-0.4], -0.2), gen), 1)
    assert fit.law.scale == SCALE
    se = standard_errors(power_law, truth, TOKENS / SCALE, SIGMA) * L1_FACTOR
    got = torch.tensor(fit.theta, dtype=torch.float64)
    for name, g, t, s in zip(("a", "u", "b"), got.tolist(), truth.tolist(), se.tolist()):
        assert abs(g - t) <= 5 * s, f"{name}: fitted {g:.4f}, true {t:.4f}, 5 SE {5 * s:.4f}"
        assert 5 * s < 0.3 * abs(t)  # informative bounds
    # the paper's α1 is for T in tokens: α1·T^s1 + β1 is the same curve
    a1, s1 = fit.law.coef_tokens[0], fit.law.exponents[0]
    assert torch.allclose(fit.law(TOKENS), a1 * TOKENS ** s1 + fit.law.offset, rtol=1e-9)
    # the law in tokens gives the same curve
    assert float((fit.law(TOKENS) - power_law(got[None], (TOKENS / SCALE)[None])[0]).abs()
                 .max()) < 1e-12


def test_general_law_end_value_is_recovered():
    """Two power laws and an offset: its parameters trade off against each other (their
    standard errors are large), but the fitted curve at T_end is determined."""
    gen = torch.Generator().manual_seed(1)
    truth = _theta([-0.01, 0.02], [-0.5, 0.5], 0.03)
    fit = fit_power_law(TOKENS, _noisy(_law([-0.01, 0.02], [-0.5, 0.5], 0.03), gen), 2)
    t = (TOKENS / SCALE)[None]
    j = jacobian(power_law, truth[None], t)[0]
    g = jacobian(power_law, truth[None], torch.ones(1, 1, dtype=torch.float64))[0, 0]
    se_end = math.sqrt(float(g @ (SIGMA ** 2 * torch.linalg.inv(j.T @ j)) @ g)) * L1_FACTOR
    end = float(fit.law(torch.tensor([SCALE])))
    true_end = float(power_law(truth[None], torch.ones(1, 1, dtype=torch.float64)))
    assert abs(end - true_end) <= 5 * se_end
    assert 5 * se_end < 0.02
    assert fit.law.exponents == tuple(sorted(fit.law.exponents))


def test_critical_ratio_by_definition():
    ratios = [0.1, 0.2, 0.4]
    # 0.2 is the largest feasible; 0.4 fails the general constraint: the line from
    # (0.2, 0.03) to (0.4, 0.07) crosses ε = 0.05 at 0.2 + 0.02 · 0.2 / 0.04 = 0.3
    grid, interp = critical_ratio(ratios, [-0.1, -0.2, -0.3], [0.01, 0.03, 0.07], 0.05)
    assert grid == 0.2 and interp == pytest.approx(0.3)
    # every ratio feasible: the largest, nothing to interpolate towards
    assert critical_ratio(ratios, [-0.1, -0.2, -0.3], [0.0, 0.01, 0.02], 0.05) == (0.4, 0.4)
    # none feasible (the domain loss never falls, or general too high)
    assert critical_ratio(ratios, [0.1, 0.1, 0.1], [0.0, 0.0, 0.0], 0.05) == (None, None)
    assert critical_ratio(ratios, [-1, -1, -1], [0.06, 0.07, 0.08], 0.05) == (None, None)
    # the next ratio fails on the domain loss only: no interpolation
    assert critical_ratio(ratios, [-0.1, -0.2, 0.01], [0.0, 0.01, 0.02], 0.05) == (0.2, 0.2)
    # ε is inclusive, the domain condition strict
    assert critical_ratio([0.5], [-1e-9], [0.05], 0.05) == (0.5, 0.5)
    assert critical_ratio([0.5], [0.0], [0.0], 0.05) == (None, None)


def test_sweep_finds_the_critical_ratio():
    """Five ratios; at T_end the general loss rises by 0.12·R (crossing ε = 0.05 at R = 5/12,
    between the measured 1/3 and 1/2, exactly linear in R as the interpolation assumes) and
    the domain loss falls for every ratio."""
    gen = torch.Generator().manual_seed(2)
    curves = []
    for r in (1 / 8, 1 / 4, 1 / 3, 1 / 2, 2 / 3):
        g_end = 0.12 * r
        general = _law([-0.01, 0.5 * g_end], [-0.5, 0.5], 0.01 + 0.5 * g_end)
        domain = _law([0.1], [-0.4], -0.1 - 0.3 * r)
        curves.append(RatioCurves(ratio=r, tokens=TOKENS, domain=_noisy(domain, gen),
                                  general=_noisy(general, gen)))
    result = fit_cmr(curves, epsilon=0.05, replicates=100, seed=0)
    assert result.tokens_end == SCALE
    assert result.critical_ratio == pytest.approx(1 / 3)
    assert [f.feasible for f in result.fits] == [True, True, True, False, False]
    # the estimate is within the interval's width of the truth, and the interval is narrow
    # against the ratio spacing (1/6). (Over 8 seeds the 90% interval held 5/12 in 5 to 6:
    # it carries the fits' noise at T_end, not the bias of interpolating between ratios.)
    low, high = result.interval
    assert low <= result.interpolated <= high
    assert abs(result.interpolated - 5 / 12) <= high - low
    assert high - low < 1 / 12
    assert result.defined_share == 1.0
    # the fitted ends are the truth within the noise at T_end (5 SE of a 50-point fit of 5
    # parameters is below 0.01 here: test_general_law_end_value_is_recovered)
    for f in result.fits:
        assert f.general_end == pytest.approx(0.12 * f.ratio, abs=0.01)
        assert f.domain_end == pytest.approx(-0.3 * f.ratio, abs=0.01)


def test_fit_needs_points_and_distinct_ratios():
    with pytest.raises(ValueError, match="cannot determine"):
        fit_power_law(TOKENS[:5], torch.zeros(5), 2)
    with pytest.raises(ValueError, match="T > 0"):
        fit_power_law(torch.zeros(10), torch.zeros(10), 1)
    c = RatioCurves(ratio=0.5, tokens=TOKENS, domain=TOKENS * 0, general=TOKENS * 0)
    with pytest.raises(ValueError, match="distinct ratios"):
        fit_cmr([c, c], replicates=0)

"""The batched Huber fit (engine.analyze.fit): independent problems stay independent, the
Huber loss resists an outlier that pulls least squares, starts by variable projection."""

import math

import torch

from engine.analyze.fit import fit_huber, huber, jacobian, linear_starts, standard_errors

SIGMA = 0.01


def line(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return theta[:, :1] * x + theta[:, 1:2]


def exp_decay(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return theta[:, :1] * torch.exp(-theta[:, 1:2] * x) + theta[:, 2:3]


def _data(seed: int, truth: list[float], law=exp_decay):
    gen = torch.Generator().manual_seed(seed)
    x = torch.linspace(0, 5, 80, dtype=torch.float64)
    y = law(torch.tensor([truth], dtype=torch.float64), x[None])[0]
    return x, y + SIGMA * torch.randn(len(x), generator=gen, dtype=torch.float64)


def test_huber_is_quadratic_then_linear():
    r = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64)
    got = huber(r, 1.0)
    assert torch.allclose(got, torch.where(r.abs() <= 1, 0.5 * r * r, r.abs() - 0.5))


def test_a_batch_of_problems_equals_the_problems_alone():
    x1, y1 = _data(0, [1.0, 0.8, 0.2])
    x2, y2 = _data(1, [-0.5, 2.0, 1.0])
    start = torch.tensor([[0.5, 1.0, 0.0], [0.5, 1.0, 0.0]], dtype=torch.float64)
    both = fit_huber(exp_decay, start, torch.stack([x1, x2]), torch.stack([y1, y2]))
    alone = [fit_huber(exp_decay, start[:1], x[None], y[None]) for x, y in ((x1, y1), (x2, y2))]
    for k in range(2):
        assert torch.allclose(both.theta[k], alone[k].theta[0], atol=1e-7)
    # and each recovers its own truth within 5 standard errors (L1-like: × sqrt(π/2))
    for k, (x, truth) in enumerate(((x1, [1.0, 0.8, 0.2]), (x2, [-0.5, 2.0, 1.0]))):
        t = torch.tensor(truth, dtype=torch.float64)
        se = standard_errors(exp_decay, t, x, SIGMA) * math.sqrt(math.pi / 2)
        assert bool(((both.theta[k] - t).abs() <= 5 * se).all())


def test_huber_resists_an_outlier_that_pulls_least_squares():
    x, y = _data(2, [0.3, 1.0], law=line)
    y[-1] += 5.0  # one evaluation gone wrong (a loss spike)
    start = torch.zeros(1, 2, dtype=torch.float64)
    robust = fit_huber(line, start, x[None], y[None], delta=1e-3).theta[0]
    squares = fit_huber(line, start, x[None], y[None], delta=1e6).theta[0]  # δ ≫ r: LS
    truth = torch.tensor([0.3, 1.0], dtype=torch.float64)
    se = standard_errors(line, truth, x, SIGMA) * math.sqrt(math.pi / 2)
    assert bool(((robust - truth).abs() <= 5 * se).all())
    assert not bool(((squares - truth).abs() <= 5 * se).all())


def test_non_finite_regions_are_left_not_followed():
    """A start where the law overflows: the fit must not return NaN."""
    x, y = _data(3, [1.0, 0.8, 0.2])
    start = torch.tensor([[1.0, -400.0, 0.0], [0.5, 1.0, 0.0]], dtype=torch.float64)
    fit = fit_huber(exp_decay, start, x.expand(2, -1), y.expand(2, -1))
    assert bool(torch.isfinite(fit.objective[1])) and not bool(torch.isnan(fit.theta).any())


def test_linear_starts_pick_the_true_grid_point():
    x, y = _data(4, [1.0, 0.8, 0.2])
    rates = [0.1, 0.4, 0.8, 1.6, 3.2]
    designs = torch.stack([torch.stack([torch.exp(-r * x), torch.ones_like(x)], dim=1)
                           for r in rates])
    order, coef = linear_starts(designs, y, 2)
    assert rates[int(order[0])] == 0.8
    assert torch.allclose(coef[0], torch.tensor([1.0, 0.2], dtype=torch.float64), atol=0.02)


def test_jacobian_matches_the_analytic_one():
    theta = torch.tensor([[1.0, 0.8, 0.2]], dtype=torch.float64)
    x = torch.linspace(0, 5, 7, dtype=torch.float64)[None]
    e = torch.exp(-0.8 * x[0])
    want = torch.stack([e, -1.0 * x[0] * e, torch.ones_like(e)], dim=1)
    assert torch.allclose(jacobian(exp_decay, theta, x)[0], want, atol=1e-8)

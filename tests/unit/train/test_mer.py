"""The Reptile step's arithmetic (engine.train.mer.reptile) and the train.mer section: exact at
epsilon 0 and 1 for every float (so epsilon 1 is plain replay bit for bit), the formula between,
one-line errors. The mechanism inside megatron's optimizers: tests/integration/test_mer.py."""

import pytest
import torch

from engine.config.errors import ConfigError
from engine.config.mer import MerConfig
from engine.train.mer import reptile


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(10_000, generator=g) * torch.logspace(-8, 8, 10_000)
    theta = anchor + torch.randn(10_000, generator=g) * torch.logspace(-8, 8, 10_000).flip(0)
    anchor[:3] = torch.tensor([-0.0, 0.0, 1e-45])
    return anchor, theta


def test_epsilon_one_is_theta_and_zero_is_the_anchor_bit_for_bit(tensors):
    anchor, theta = tensors
    assert torch.equal(reptile(anchor, theta, 1.0), theta)
    assert torch.equal(reptile(anchor, theta, 0.0)[3:], anchor[3:])
    # the naive anchor + 1.0 * (theta - anchor) is not exact: 1 + (1e-8 - 1) is 0 in float32
    a, t = torch.tensor([1.0]), torch.tensor([1e-8])
    assert (a + 1.0 * (t - a)).item() == 0.0 and torch.equal(reptile(a, t, 1.0), t)


@pytest.mark.parametrize("epsilon", [0.01, 0.3, 0.5, 0.9])
def test_between_it_is_the_interpolation(tensors, epsilon):
    anchor, theta = (t.double() for t in tensors)
    want = anchor + epsilon * (theta - anchor)
    # within a few roundings of the larger endpoint (both forms round theta - anchor)
    bound = 4 * torch.finfo(torch.float64).eps * torch.maximum(anchor.abs(), theta.abs())
    assert ((reptile(anchor, theta, epsilon) - want).abs() <= bound).all()


def test_the_same_point_stays_put():
    """A parameter that did not move (frozen by train.freeze) keeps every bit."""
    x = torch.randn(1000)
    for epsilon in (0.0, 0.01, 0.5, 0.99, 1.0):
        assert torch.equal(reptile(x, x.clone(), epsilon), x)


def test_config_defaults_and_errors():
    assert MerConfig() == MerConfig(interval=500, epsilon=0.01)
    with pytest.raises(ConfigError, match=r"^train.mer.interval: expected >= 1, got 0$"):
        MerConfig(interval=0)
    with pytest.raises(ConfigError, match=r"^train.mer.epsilon: expected a value in \[0, 1\], "
                                          r"got 1.5$"):
        MerConfig(epsilon=1.5)


@pytest.mark.parametrize("epsilon", [0.0, 0.01, 0.5, 0.7, 1.0])
def test_the_in_place_step_is_the_same_bits(tensors, epsilon):
    """Mer.apply updates the anchor in place (`lerp_`, no temporary the size of the model)."""
    anchor, theta = tensors
    assert torch.equal(anchor.clone().lerp_(theta, epsilon), reptile(anchor, theta, epsilon))

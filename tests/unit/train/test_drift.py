"""drift_scalars (engine.train.drift): the table of summed squares becomes relative norms per
part and over all parts; parts without parameters on a layout (none here) give no scalar."""

import math

import pytest
import torch

from engine.train.drift import drift_scalars, part_names


def test_scalars_are_the_ratios_of_the_summed_squares():
    # rows: embedding, layer0, layer1, output; columns: diff, start, update, now
    squares = torch.tensor([[1.0, 100.0, 0.04, 121.0],
                            [4.0, 16.0, 0.0, 25.0],
                            [0.0, 0.0, 0.0, 0.0],  # a part with no parameters
                            [9.0, 36.0, 1.0, 49.0]], dtype=torch.float64)
    out = drift_scalars(squares, 2)
    assert part_names(2) == ["embedding", "layer0", "layer1", "output"]
    assert out["drift/embedding/weight"] == pytest.approx(0.1)
    assert out["drift/embedding/update"] == pytest.approx(0.2 / 11)
    assert out["drift/layer0/weight"] == pytest.approx(0.5)
    assert out["drift/layer0/update"] == 0.0
    assert "drift/layer1/weight" not in out and "drift/layer1/update" not in out
    assert out["drift/output/weight"] == pytest.approx(0.5)
    assert out["drift/all/weight"] == pytest.approx(math.sqrt(14 / 152))
    assert out["drift/all/update"] == pytest.approx(math.sqrt(1.04 / 195))


def test_without_the_last_step_there_is_no_update_ratio():
    squares = torch.tensor([[1.0, 4.0, 0.0, 9.0]] * 3, dtype=torch.float64)
    out = drift_scalars(squares, 1, with_update=False)
    assert out == {"drift/embedding/weight": 0.5, "drift/layer0/weight": 0.5,
                   "drift/output/weight": 0.5, "drift/all/weight": 0.5}

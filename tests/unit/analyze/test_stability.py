"""The stability-gap summary (engine.analyze.stability) on crafted series."""

import pytest

from engine.analyze.stability import stability_gap


def test_a_loss_that_rises_and_is_regained():
    steps = [0, 10, 20, 30, 40, 50]
    loss = [2.0, 2.3, 2.5, 2.2, 1.99, 1.9]
    g = stability_gap(steps, loss)
    assert (g.before, g.worst, g.worst_step, g.regained_step) == (2.0, 2.5, 20, 40)
    assert g.gap == pytest.approx(0.5) and g.regained


def test_a_loss_that_is_not_regained():
    g = stability_gap([0, 10, 20, 30], [2.0, 2.4, 2.2, 2.1])
    assert g.worst_step == 10 and g.regained_step is None and not g.regained
    assert g.as_dict()["regained"] is False


def test_tolerance_decides_what_counts_as_regained():
    steps, loss = [0, 10, 20], [2.0, 2.3, 2.01]
    assert stability_gap(steps, loss).regained_step is None
    assert stability_gap(steps, loss, tolerance=0.02).regained_step == 20
    with pytest.raises(ValueError, match="tolerance"):
        stability_gap(steps, loss, tolerance=-1.0)


def test_an_accuracy_drops_then_recovers():
    steps = [0, 5, 10, 15, 20]
    acc = [0.60, 0.45, 0.40, 0.55, 0.61]
    g = stability_gap(steps, acc, higher_is_better=True)
    assert (g.worst, g.worst_step, g.regained_step) == (0.40, 10, 20)
    assert g.gap == pytest.approx(0.20)  # positive: worse by 0.2
    # read as a loss (lower is better), the same series never got worse than its start
    assert stability_gap(steps, acc).worst == 0.61


def test_no_gap_counts_as_regained_at_once():
    g = stability_gap([0, 10, 20], [2.0, 1.9, 1.8])
    assert g.gap == pytest.approx(-0.1) and g.worst_step == 10 and g.regained_step == 10


def test_the_first_of_equal_worsts():
    g = stability_gap([0, 10, 20, 30], [2.0, 2.5, 2.5, 2.0])
    assert g.worst_step == 10 and g.regained_step == 30


def test_value_before_from_the_earlier_stage():
    g = stability_gap([10, 20], [2.5, 2.0], before=2.1)
    assert g.before == 2.1 and g.worst_step == 10 and g.regained_step == 20
    # a step-0 evaluation takes precedence over the earlier stage's last value
    assert stability_gap([0, 10], [2.0, 2.5], before=9.0).before == 2.0
    with pytest.raises(ValueError, match="no value before"):
        stability_gap([10, 20], [2.5, 2.0])


def test_bad_series():
    with pytest.raises(ValueError, match="increase"):
        stability_gap([0, 20, 10], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="3 steps but 2 values"):
        stability_gap([0, 1, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="no value after step 0"):
        stability_gap([0], [1.0])

"""Learning rates at chosen steps for every schedule style."""

import math

import pytest

from engine.config.recipe import ScheduleConfig
from engine.train.schedule import lr_at

PEAK = 1e-3


def lrs(schedule: ScheduleConfig, total: int) -> list[float]:
    return [lr_at(s, schedule, peak_lr=PEAK, total_steps=total) for s in range(total)]


def test_warmup_is_linear_and_reaches_peak_on_its_last_step():
    s = ScheduleConfig(style="constant", warmup_steps=4, warmup_init_lr=1e-4)
    got = lrs(s, 6)
    assert got[0] == pytest.approx(1e-4 + (PEAK - 1e-4) / 4)
    assert got[3] == pytest.approx(PEAK)
    assert got[4:] == [PEAK, PEAK]
    assert all(a < b for a, b in zip(got[:4], got[1:4]))


def test_cosine_ends_at_min_lr_and_is_half_way_in_the_middle():
    s = ScheduleConfig(style="cosine", warmup_steps=2, min_lr=1e-4)
    got = lrs(s, 12)  # decay over 10 steps after warmup
    assert got[1] == pytest.approx(PEAK)
    assert got[2 + 4] == pytest.approx(1e-4 + (PEAK - 1e-4) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert got[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(got[1:], got[2:]))


def test_linear_decay_steps_then_hold():
    s = ScheduleConfig(style="linear", warmup_steps=0, min_lr=0.0, decay_steps=4)
    got = lrs(s, 8)
    assert got[:4] == pytest.approx([0.75e-3, 0.5e-3, 0.25e-3, 0.0])
    assert got[4:] == [0.0] * 4


def test_wsd_is_stable_then_decays_over_the_last_steps():
    s = ScheduleConfig(style="wsd", warmup_steps=2, min_lr=0.0, wsd_decay_steps=4)
    got = lrs(s, 10)
    assert got[2:6] == [PEAK] * 4
    assert got[6:] == pytest.approx([0.75e-3, 0.5e-3, 0.25e-3, 0.0])


def test_wsd_default_decay_is_ten_percent():
    s = ScheduleConfig(style="wsd")
    got = lrs(s, 100)
    assert got[89] == PEAK and got[90] < PEAK and got[99] == pytest.approx(0.0)

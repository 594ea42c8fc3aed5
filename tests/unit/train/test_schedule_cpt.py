"""Continual-pretraining schedules at chosen steps (values computed by hand in the comments), and
which changed arguments a resume must refuse."""

import math

import pytest

from engine.config.errors import ConfigError
from engine.config.recipe import ScheduleConfig, TrainConfig
from engine.train.schedule import (
    end_step,
    lr_at,
    schedule_args,
    schedule_changes,
    wsd_decay_start,
)

PEAK = 1e-3


def lrs(schedule: ScheduleConfig, total: int, decay_file_step: int | None = None) -> list[float]:
    return [lr_at(s, schedule, peak_lr=PEAK, total_steps=total, decay_file_step=decay_file_step)
            for s in range(end_step(schedule, total, decay_file_step))]


def test_rewarm_from_an_initial_lr_to_a_new_peak_then_cosine():
    # Gupta et al. 2023: warm up again from the previous stage's last LR (1e-4), then decay.
    s = ScheduleConfig(style="cosine", warmup_steps=4, warmup_init_lr=1e-4, min_lr=1e-4)
    got = lrs(s, 12)
    assert got[0] == pytest.approx(1e-4 + 9e-4 * 1 / 4)  # 3.25e-4
    assert got[2] == pytest.approx(1e-4 + 9e-4 * 3 / 4)  # 7.75e-4
    assert got[3] == pytest.approx(PEAK)
    # decay over 12 - 4 = 8 steps; step 4 is 1/8 of the way: 1e-4 + 9e-4 * (1 + cos(pi/8)) / 2
    assert got[4] == pytest.approx(9.6574578e-4)
    assert got[7] == pytest.approx(1e-4 + 9e-4 * 0.5)  # half way: frac 4/8
    assert got[11] == pytest.approx(1e-4)
    assert len(got) == 12


def test_rewarm_then_linear_decay():
    s = ScheduleConfig(style="linear", warmup_steps=2, warmup_init_lr=2e-4, min_lr=0.0)
    got = lrs(s, 6)  # warmup 6e-4, 1e-3; then 4 decay steps of 2.5e-4
    assert got == pytest.approx([6e-4, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3, 0.0])


def test_wsd_decay_started_by_the_file_runs_and_ends_the_run():
    s = ScheduleConfig(style="wsd", warmup_steps=2, wsd_decay_steps=4, decay_file="stop")
    assert end_step(s, 100) == 100  # no file yet: an open-ended run, decay at 96..99
    got = lrs(s, 100, decay_file_step=5)  # the file appeared before step 5
    assert got == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3, 0.0])
    assert end_step(s, 100, 5) == 9


def test_wsd_decay_start_is_the_earliest_trigger_after_warmup_and_cooldown():
    s = ScheduleConfig(style="wsd", warmup_steps=2, wsd_decay_steps=4, decay_start=50)
    assert wsd_decay_start(s, 100) == 50
    assert wsd_decay_start(s, 100, decay_file_step=10) == 10
    assert wsd_decay_start(s, 100, decay_file_step=60) == 50
    assert wsd_decay_start(s, 52) == 48  # train.steps - wsd_decay_steps comes first
    cool = ScheduleConfig(style="wsd", warmup_steps=2, cooldown_steps=3, constant_lr=5e-4,
                          wsd_decay_steps=4)
    assert wsd_decay_start(cool, 100, decay_file_step=1) == 5  # never inside warmup/cooldown
    assert lrs(s, 100)[50:54] == pytest.approx([0.75e-3, 0.5e-3, 0.25e-3, 0.0])
    assert end_step(s, 100) == 54


def test_infinite_schedule_warmup_cooldown_constant_anneal():
    # Ibrahim et al. 2024: warmup 2, cosine cooldown 1e-3 -> 4e-4 over 4, constant, anneal 4.
    s = ScheduleConfig(style="wsd", warmup_steps=2, cooldown_steps=4, constant_lr=4e-4,
                       wsd_decay_steps=4)
    got = lrs(s, 20)
    assert got[:2] == pytest.approx([5e-4, 1e-3])
    cooldown = [4e-4 + 6e-4 * 0.5 * (1 + math.cos(math.pi * f)) for f in (0.25, 0.5, 0.75, 1)]
    assert got[2:6] == pytest.approx(cooldown)
    assert got[2:6] == pytest.approx([9.12132e-4, 7e-4, 4.87868e-4, 4e-4])
    assert got[6:16] == [4e-4] * 10
    assert got[16:] == pytest.approx([3e-4, 2e-4, 1e-4, 0.0])  # annealed from the plateau


def test_constant_with_a_cooldown_at_the_end_is_wsd():
    s = ScheduleConfig(style="wsd", wsd_decay_steps=2, min_lr=1e-4)
    assert lrs(s, 5) == pytest.approx([1e-3, 1e-3, 1e-3, 5.5e-4, 1e-4])


def test_constant_and_cosine_end_at_train_steps():
    assert end_step(ScheduleConfig(style="constant"), 7) == 7
    assert end_step(ScheduleConfig(style="cosine"), 7) == 7


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(style="cosine", decay_file="f"),
     "train.schedule.decay_file is set but train.schedule.style is 'cosine', not 'wsd'"),
    (dict(style="wsd", decay_file="f"), "train.schedule.decay_start/decay_file need "
                                        "train.schedule.wsd_decay_steps"),
    (dict(style="wsd", cooldown_steps=3), "train.schedule.cooldown_steps=3 and "
                                          "train.schedule.constant_lr=None go together"),
    (dict(style="wsd", cooldown_steps=3, constant_lr=1e-5, min_lr=1e-4),
     "train.schedule.constant_lr=1e-05 is below train.schedule.min_lr=0.0001"),
])
def test_schedule_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match="^" + message.replace("+", r"\+").replace("(", r"\(")):
        ScheduleConfig(**kwargs)


def test_decay_start_must_leave_room_for_the_decay():
    s = ScheduleConfig(style="wsd", warmup_steps=2, wsd_decay_steps=4, decay_start=8)
    with pytest.raises(ConfigError, match=r"decay_start=8: expected a step in \[2, 6\]"):
        TrainConfig(steps=10, schedule=s)
    with pytest.raises(ConfigError, match="eval_interval_early=2 and train.eval_early_steps=None"):
        TrainConfig(steps=10, eval_interval_early=2)


# --- what a resume may change ------------------------------------------------------------------

def args(steps: int = 100, lr: float = PEAK, **schedule) -> dict:
    return schedule_args(ScheduleConfig(**schedule), lr=lr, steps=steps)


def test_unchanged_arguments_and_the_decay_file_path_are_not_changes():
    saved = args(style="wsd", wsd_decay_steps=4, decay_file="a")
    assert schedule_changes(saved, args(style="wsd", wsd_decay_steps=4, decay_file="b"),
                            step=10) == []
    assert schedule_changes({}, args(), step=10) == []  # an importer's step-0 checkpoint
    assert schedule_changes(args(lr=1.0), args(), step=0) == []  # no step used the old ones


def test_changed_arguments_are_listed_with_old_and_new_values():
    saved = args(style="cosine", min_lr=1e-4, warmup_steps=10)
    now = args(lr=3e-4, style="cosine", min_lr=0.0, warmup_steps=10)
    assert schedule_changes(saved, now, step=50) == [
        ("optim.lr", PEAK, 3e-4), ("train.schedule.min_lr", 1e-4, 0.0)]


def test_arguments_saved_before_the_dotted_keys_are_read():
    saved = {"style": "cosine", "warmup_steps": 0, "warmup_init_lr": 0.0, "min_lr": 0.0,
             "decay_steps": None, "wsd_decay_steps": None, "lr": PEAK, "steps": 100}
    assert schedule_changes(saved, args(), step=5) == []
    assert schedule_changes(saved, args(style="wsd", cooldown_steps=2, constant_lr=1e-4,
                                        wsd_decay_steps=3), step=5) == [
        ("train.schedule.style", "cosine", "wsd"), ("train.schedule.wsd_decay_steps", None, 3),
        ("train.schedule.cooldown_steps", 0, 2), ("train.schedule.constant_lr", None, 1e-4)]


def test_train_steps_counts_where_it_moves_the_lr_of_steps_taken():
    # cosine over the whole run: any step past warmup has seen the old length
    assert schedule_changes(args(style="cosine", warmup_steps=5), args(200, warmup_steps=5),
                            step=20) == [("train.steps", 100, 200)]
    assert schedule_changes(args(style="cosine", warmup_steps=5), args(200, warmup_steps=5),
                            step=5) == []
    assert schedule_changes(args(style="cosine", decay_steps=50),
                            args(200, style="cosine", decay_steps=50), step=20) == []
    assert schedule_changes(args(style="constant"), args(200, style="constant"), step=20) == []
    # wsd: extending the run before its decay begins is what wsd is for
    wsd = dict(style="wsd", wsd_decay_steps=10)
    assert schedule_changes(args(**wsd), args(500, **wsd), step=50) == []
    assert schedule_changes(args(**wsd), args(500, **wsd), step=95) == [("train.steps", 100, 500)]
    assert schedule_changes(args(**wsd), args(60, **wsd), step=55) == [("train.steps", 100, 60)]
    # a decay started by the file does not move with train.steps
    on_demand = dict(style="wsd", wsd_decay_steps=10, decay_file="f")
    assert schedule_changes(args(**on_demand), args(500, **on_demand), step=45,
                            decay_file_step=40) == []

"""The stage's LR record (engine.train.lr_record) equals the areas computed from the whole list
of learning rates (engine.analyze.loss_law.lr_areas), and join_areas of per-stage records equals
lr_areas over the concatenated stages (re-warming drops and carried momentum included)."""

import math

import pytest

from engine.analyze.loss_law import LAMBDA, join_areas, lr_areas
from engine.train import lr_record
from engine.train.lr_record import advance_record, complete
from engine.train.schedule import lr_at


def record_of(lrs):
    record = {}
    for lr in lrs:
        record = advance_record(record, lr)
    return record


def schedule(style, steps, **kw):
    from engine.config.recipe import ScheduleConfig

    s = ScheduleConfig(style=style, **kw)
    return [lr_at(i, s, peak_lr=1e-3, total_steps=steps) for i in range(steps)]


STAGES = [schedule("cosine", 300, warmup_steps=30, min_lr=1e-4),
          schedule("wsd", 200, warmup_steps=20, warmup_init_lr=1e-4, min_lr=1e-5,
                   wsd_decay_steps=40),
          schedule("linear", 100, warmup_steps=10, min_lr=0.0)]


def test_the_lambdas_agree():
    assert lr_record.LAMBDA == LAMBDA


@pytest.mark.parametrize("lrs", STAGES)
def test_a_record_is_the_areas_of_its_learning_rates(lrs):
    record = record_of(lrs)
    s1, s2 = lr_areas(lrs)
    assert record["steps"] == len(lrs)
    assert record["s1"] == pytest.approx(float(s1[-1]), rel=1e-12)
    assert record["s2"] == pytest.approx(float(s2[-1]), rel=1e-9, abs=1e-15)
    assert (record["first"], record["final"], record["peak"]) == (lrs[0], lrs[-1], max(lrs))


def test_join_areas_equals_the_areas_of_the_concatenation():
    records = [record_of(lrs) for lrs in STAGES]
    s1, s2 = lr_areas([lr for lrs in STAGES for lr in lrs])
    joined = join_areas(records)
    assert joined.s1 == pytest.approx(float(s1[-1]), rel=1e-12)
    assert joined.s2 == pytest.approx(float(s2[-1]), rel=1e-9)
    assert joined.final_lr == STAGES[-1][-1]
    assert not math.isclose(joined.s2, sum(r["s2"] for r in records))  # the joins matter


def test_an_incomplete_record_is_none():
    record = record_of([1e-3, 2e-3])
    assert complete(record, 2) == record
    assert complete(record, 5) is None and complete({}, 3) is None


def test_the_stage_history_keeps_a_complete_record(tmp_path):
    """completed_stages (what a later stage starts with) carries the record when it covers
    every step of the stage, not otherwise."""
    import json
    from dataclasses import asdict

    from engine.checkpoint import TrainState, completed_stages

    record = record_of(STAGES[0][:40])
    for step, has in ((40, True), (41, False)):
        ckpt = tmp_path / str(step)
        ckpt.mkdir()
        state = TrainState(step=step, consumed_samples=0, consumed_tokens=0, schedule={},
                           stage="pt", lr_record=record)
        (ckpt / "train_state.json").write_text(json.dumps(asdict(state)))
        (entry,) = completed_stages(ckpt)
        assert (entry.get("lr") == record) is has and ("lr" in entry) is has

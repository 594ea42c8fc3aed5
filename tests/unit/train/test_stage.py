"""What a stage carries: the schedule check on resume (one line, or the override), the history of
earlier stages from a pretrained checkpoint's train_state.json, the token totals."""

import json
from dataclasses import asdict

import pytest

from engine.checkpoint import CheckpointError, TrainState, completed_stages, read_train_state
from engine.config.loader import recipe_from_dict
from engine.train.stage import TokenCounts, current_schedule, resumed_schedule, stage_start_text


def recipe(**train):
    return recipe_from_dict({
        "model": {"num_layers": 2, "hidden_size": 8, "ffn_hidden_size": 16,
                  "num_attention_heads": 2, "vocab_size": 64},
        "data": {"synthetic": True},
        "train": {"steps": 10, "schedule": {"style": "cosine", "min_lr": 1e-5}, **train},
        "optim": {"lr": 1e-3}})


def state(step: int, schedule: dict, **more) -> TrainState:
    return TrainState(step=step, consumed_samples=step * 8, consumed_tokens=step * 256,
                      schedule=schedule, **more)


def test_resume_with_changed_schedule_is_refused_in_one_line():
    saved = state(4, current_schedule(recipe()))
    assert resumed_schedule(recipe(), "ck", saved) == saved.schedule
    changed = recipe(schedule={"style": "cosine", "min_lr": 0.0, "warmup_steps": 2})
    with pytest.raises(CheckpointError) as e:
        resumed_schedule(changed, "runs/x/iter_0000004", saved)
    assert str(e.value) == (
        "runs/x/iter_0000004: the LR schedule differs from the checkpoint's "
        "(train.schedule.warmup_steps 0 -> 2, train.schedule.min_lr 1e-05 -> 0.0); set "
        "train.override_schedule=true to apply the new values from step 4")


def test_override_schedule_takes_the_new_values(caplog):
    saved = state(4, current_schedule(recipe()))
    changed = recipe(override_schedule=True, steps=20)
    assert resumed_schedule(changed, "ck", saved) == current_schedule(changed)
    assert "LR schedule changed at step 4: train.steps 10 -> 20" in caplog.text


def test_completed_stages_of_a_pretrained_checkpoint(tmp_path):
    assert completed_stages(tmp_path) == []  # no train_state.json: another tool's checkpoint
    earlier = [{"stage": "pretrain", "steps": 100, "tokens": 5000, "source_tokens": {"web": 5000}}]
    parent = state(3, {}, source_tokens={"code": 600, "web": 168}, stage="cpt",
                   earlier_stages=earlier)
    (tmp_path / "train_state.json").write_text(json.dumps(asdict(parent)))
    assert read_train_state(tmp_path) == parent
    assert completed_stages(tmp_path) == earlier + [
        {"stage": "cpt", "steps": 3, "tokens": 768, "source_tokens": {"code": 600, "web": 168}}]
    step0 = state(0, {}, earlier_stages=earlier)  # e.g. an upcycled checkpoint of pretrain
    (tmp_path / "train_state.json").write_text(json.dumps(asdict(step0)))
    assert completed_stages(tmp_path) == earlier


def test_train_state_without_the_cpt_fields_still_reads(tmp_path):
    old = {"step": 5, "consumed_samples": 40, "consumed_tokens": 1280, "schedule": {"lr": 1e-3}}
    (tmp_path / "train_state.json").write_text(json.dumps(old))
    got = read_train_state(tmp_path)
    assert got.source_tokens == {} and got.earlier_stages == [] and got.decay_file_step is None


def test_token_counts_and_the_stage_line():
    counts = TokenCounts(step=4, interval={"a": 96, "b": 32}, stage={"a": 192, "b": 64},
                         earlier=1000)
    assert (counts.total, counts.total_all_stages) == (256, 1256)
    start = state(0, {}, stage="cpt", earlier_stages=[
        {"stage": None, "steps": 3, "tokens": 1000, "source_tokens": {}}])
    assert stage_start_text(start, None) == (
        "stage cpt starts at step 0 | earlier stages: (unnamed) | earlier tokens 1,000")

"""Continual pretraining end to end on the tiny model: a pretrain stage, then a CPT stage from it
with replay, early evaluation and token accounting across stages; a resume that changes the LR
schedule (refused, then accepted with train.override_schedule); a wsd decay started by a file.

TensorBoard events are read back with tensorboard's own EventAccumulator."""

import math

import pytest

from engine.checkpoint import CheckpointError, find_checkpoint, read_train_state
from engine.config.loader import recipe_from_dict
from engine.train.loop import train

GBS, SEQ = 8, 32  # the tiny recipe's global batch and sequence length
PRETRAIN_STEPS = 3


def events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def pretrained(make_recipe, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    train(recipe_from_dict(make_recipe(
        train={"steps": PRETRAIN_STEPS}, checkpoint={"save": str(tmp / "ckpt")},
        logging={"stage": "pretrain"})))
    return tmp / "ckpt"


@pytest.fixture(scope="module")
def cpt(make_recipe, tiny_data, pretrained, tmp_path_factory):
    """4 steps from the pretrained weights, a quarter of every batch replayed from 'general'."""
    tmp = tmp_path_factory.mktemp("cpt")
    recipe = make_recipe(
        data={"replay": {"blend": [{"path": tiny_data["valid"], "name": "general"}],
                         "fraction": 0.25}},
        train={"steps": 4, "eval_interval": 4, "eval_steps": 1, "eval_interval_early": 1,
               "eval_early_steps": 2},
        checkpoint={"save": str(tmp / "ckpt"), "pretrained": str(pretrained)},
        logging={"log_interval": 2, "tensorboard_dir": str(tmp / "tb"), "stage": "cpt"})
    return tmp, train(recipe_from_dict(recipe))


def test_replay_fractions_are_logged_per_source(cpt):
    tmp, _ = cpt
    acc = events(tmp / "tb")
    # 2 of every 8 samples are replay (round(0.25 x 8)), whatever the layout
    assert scalars(acc, "tokens/fraction/general") == {2: 0.25, 4: 0.25}
    assert scalars(acc, "tokens/fraction/code-train") == {2: 0.75, 4: 0.75}
    assert scalars(acc, "tokens/source/general") == {2: 2 * 2 * SEQ, 4: 4 * 2 * SEQ}
    assert scalars(acc, "tokens/source/code-train") == {2: 2 * 6 * SEQ, 4: 4 * 6 * SEQ}


def test_early_evaluation_and_the_stage_boundary(cpt):
    tmp, result = cpt
    # the starting weights (step 0), every step of the first 2, then every 4
    assert sorted(result.valid) == [0, 1, 2, 4]
    acc = events(tmp / "tb")
    assert sorted(scalars(acc, "valid/code/loss")) == [0, 1, 2, 4]
    assert scalars(acc, "stage/index") == {0: 1.0}  # one stage (pretrain) came before
    [marker] = acc.Tensors("stage/text_summary")
    text = marker.tensor_proto.string_val[0].decode()
    assert marker.step == 0 and "stage cpt starts at step 0" in text and "pretrain" in text
    pretrain_tokens = PRETRAIN_STEPS * GBS * SEQ
    assert scalars(acc, "tokens/total_all_stages") == {
        s: pretrain_tokens + s * GBS * SEQ for s in (0, 1, 2, 4)}
    assert scalars(acc, "tokens/total") == {s: s * GBS * SEQ for s in (0, 1, 2, 4)}


def test_tokens_per_source_and_the_earlier_stages_are_in_the_checkpoint(cpt):
    tmp, _ = cpt
    state = read_train_state(find_checkpoint(tmp / "ckpt"))
    assert state.step == 4 and state.stage == "cpt"
    assert state.source_tokens == {"code-train": 4 * 6 * SEQ, "general": 4 * 2 * SEQ}
    (earlier,) = state.earlier_stages
    lr = earlier.pop("lr")  # the pretraining's learning rates, summed (engine.train.lr_record)
    assert earlier == {"stage": "pretrain", "steps": PRETRAIN_STEPS,
                       "tokens": PRETRAIN_STEPS * GBS * SEQ,
                       "source_tokens": {"code-train": PRETRAIN_STEPS * GBS * SEQ}}
    assert lr["steps"] == PRETRAIN_STEPS and lr["peak"] >= lr["final"] > 0
    assert state.lr_record["steps"] == 4


def test_resume_with_a_changed_schedule_needs_override(make_recipe, tmp_path):
    def recipe(**train_):
        return recipe_from_dict(make_recipe(
            train={"steps": 4, **train_}, checkpoint={"save": str(tmp_path / "ckpt")},
            logging={"log_interval": 1, "tensorboard_dir": str(tmp_path / "tb")}))

    first = train(recipe(exit_interval=2))
    assert first.final_step == 2
    changed = {"schedule": {"style": "cosine", "warmup_steps": 1, "min_lr": 0.0}}
    with pytest.raises(CheckpointError) as refused:
        train(recipe_from_dict(make_recipe(
            train={"steps": 4, **changed}, optim={"lr": 1e-3},
            checkpoint={"save": str(tmp_path / "ckpt")})))
    message = str(refused.value)
    assert "\n" not in message
    assert "(optim.lr 0.003 -> 0.001, train.schedule.min_lr 0.0001 -> 0.0); set " \
           "train.override_schedule=true to apply the new values from step 2" in message
    assert read_train_state(find_checkpoint(tmp_path / "ckpt")).step == 2  # nothing ran

    second = train(recipe_from_dict(make_recipe(
        train={"steps": 4, "override_schedule": True, **changed}, optim={"lr": 1e-3},
        checkpoint={"save": str(tmp_path / "ckpt")},
        logging={"log_interval": 1, "tensorboard_dir": str(tmp_path / "tb")})))
    assert sorted(second.losses) == [3, 4]
    lr = scalars(events(tmp_path / "tb"), "train/lr")
    # the new cosine from step index 2 of 4 (warmup 1): frac 2/3 and 3/3 of 1e-3 -> 0
    assert lr[3] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 3)), rel=1e-6)
    assert lr[4] == pytest.approx(0.0, abs=1e-12)
    state = read_train_state(find_checkpoint(tmp_path / "ckpt"))
    assert state.schedule["optim.lr"] == 1e-3 and state.schedule["train.schedule.min_lr"] == 0.0
    assert state.source_tokens == {"code-train": 4 * GBS * SEQ}  # carried over the resume


def test_wsd_decay_started_by_a_file_continues_after_resume(make_recipe, tmp_path):
    flag = tmp_path / "decay-now"
    recipe = recipe_from_dict(make_recipe(
        train={"steps": 100, "exit_interval": 2,
               "schedule": {"style": "wsd", "wsd_decay_steps": 2, "decay_file": str(flag)}},
        checkpoint={"save": str(tmp_path / "ckpt")},
        logging={"log_interval": 1, "tensorboard_dir": str(tmp_path / "tb")}))
    assert train(recipe).final_step == 2  # stable phase, open-ended
    flag.touch()
    decayed = train(recipe)  # the file is seen before step index 2: decay over indices 2 and 3
    assert sorted(decayed.losses) == [3, 4] and decayed.final_step == 4
    state = read_train_state(find_checkpoint(tmp_path / "ckpt"))
    assert state.decay_file_step == 2 and state.step == 4
    lr = scalars(events(tmp_path / "tb"), "train/lr")
    assert lr[1] == lr[2] == pytest.approx(3e-3)
    assert lr[3] == pytest.approx(1.5e-3) and lr[4] == pytest.approx(0.0, abs=1e-12)
    assert train(recipe).losses == {}  # the decay is over: nothing left to run

"""Data position that survives changes: the training samples do not depend on train.steps, so
the first N steps of a 2N-step run equal an N-step run bit for bit and a resume with more steps
continues the same order; a resume whose mixture changed stops in one line unless
data.override_on_resume, which then reads each source on from where it stopped."""

import pytest

from engine.checkpoint import CheckpointError, find_checkpoint, read_train_state
from engine.config.loader import recipe_from_dict
from engine.train.loop import train

pytestmark = pytest.mark.slow

CONSTANT = {"style": "constant", "warmup_steps": 0}  # the LR of a step does not depend on steps


def blend(tiny_data, a: float, b: float) -> list:
    return [{"path": tiny_data["train"], "weight": a, "name": "a"},
            {"path": tiny_data["train"], "weight": b, "name": "b"}]


def run(make_recipe, tiny_data, save, steps, weights=(0.5, 0.5), **train_keys):
    return train(recipe_from_dict(make_recipe(
        data={"blend": blend(tiny_data, *weights)},
        train={"steps": steps, "schedule": CONSTANT, **train_keys},
        checkpoint={"save": str(save), "save_interval": 100})))


def test_a_longer_run_reads_the_same_samples_first(make_recipe, tiny_data, tmp_path):
    short = run(make_recipe, tiny_data, tmp_path / "short", 3)
    long = run(make_recipe, tiny_data, tmp_path / "long", 6)
    assert {s: long.losses[s] for s in short.losses} == short.losses  # bit for bit
    # resuming the 3-step run with train.steps=6 continues the same order
    resumed = run(make_recipe, tiny_data, tmp_path / "short", 6)
    assert sorted(resumed.losses) == [4, 5, 6]
    assert resumed.losses == {s: long.losses[s] for s in (4, 5, 6)}


def test_a_changed_mixture_needs_override_and_then_continues_each_source(
        make_recipe, tiny_data, tmp_path):
    first = run(make_recipe, tiny_data, tmp_path / "ck", 2)
    with pytest.raises(CheckpointError, match=r"data\.blend \[a:0\.5, b:0\.5\] -> \[a:0\.9, "
                                              r"b:0\.1\]\); set data\.override_on_resume=true"):
        run(make_recipe, tiny_data, tmp_path / "ck", 4, weights=(0.9, 0.1))
    before = read_train_state(find_checkpoint(tmp_path / "ck"))
    assert first.final_step == 2 and before.mixture["start"] == 0
    recipe = make_recipe(data={"blend": blend(tiny_data, 0.9, 0.1), "override_on_resume": True},
                         train={"steps": 4, "schedule": CONSTANT},
                         checkpoint={"save": str(tmp_path / "ck"), "save_interval": 100})
    after = train(recipe_from_dict(recipe))
    assert sorted(after.losses) == [3, 4]
    state = read_train_state(find_checkpoint(tmp_path / "ck"))
    seq = recipe["data"]["seq_length"]
    assert state.mixture["start"] == before.consumed_samples == 16
    assert state.mixture["offsets"] == {k: v // seq for k, v in before.source_tokens.items()}
    read = {k: (state.source_tokens[k] - before.source_tokens[k]) // seq for k in ("a", "b")}
    assert read == {"a": 14, "b": 2}  # 0.9 / 0.1 of 16 samples

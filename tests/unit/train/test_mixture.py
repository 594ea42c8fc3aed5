"""engine.train.mixture: a resume keeps the checkpoint's mixture, refuses a changed one in one
line naming old -> new, and with data.override_on_resume starts the new one at the resumed step
with each source continuing where it stopped."""

import pytest

from engine.checkpoint import CheckpointError, TrainState
from engine.config.loader import recipe_from_dict
from engine.train.mixture import new_mixture, resumed_mixture


def recipe(**data):
    return recipe_from_dict({
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
                  "num_attention_heads": 4, "vocab_size": 100},
        "data": {"blend": [{"path": "d/a", "weight": 0.5}, {"path": "d/b", "weight": 0.5}],
                 "seq_length": 16, **data}})


def saved(r, batch=8, **extra) -> TrainState:
    return TrainState(step=10, consumed_samples=80, consumed_tokens=1280, schedule={},
                      source_tokens={"a": 40 * 16, "b": 40 * 16},
                      mixture=new_mixture(r, batch), **extra)


def test_the_same_mixture_resumes_as_saved():
    r = recipe()
    state = saved(r)
    assert resumed_mixture(r, "ck", state, 8) == state.mixture


def test_a_changed_mixture_is_one_line_naming_old_and_new():
    state = saved(recipe())
    other = recipe(blend=[{"path": "d/a", "weight": 0.9}, {"path": "d/b", "weight": 0.1}])
    with pytest.raises(CheckpointError) as err:
        resumed_mixture(other, "ck", state, 16)
    assert str(err.value) == (
        "ck: the data differs from the checkpoint's (data.blend [a:0.5, b:0.5] -> [a:0.9, b:0.1];"
        " train.global_batch_size 8 -> 16); set data.override_on_resume=true to start the new "
        "mixture at step 10")


def test_override_starts_the_new_mixture_where_the_sources_stopped():
    state = saved(recipe())
    other = recipe(blend=[{"path": "d/a", "weight": 0.9}, {"path": "d/b", "weight": 0.1}],
                   override_on_resume=True)
    mix = resumed_mixture(other, "ck", state, 8)
    assert mix["start"] == 80 and mix["offsets"] == {"a": 40, "b": 40}
    longer = recipe(seq_length=32, override_on_resume=True)  # other samples: from the start
    assert resumed_mixture(longer, "ck", state, 8)["offsets"] == {}

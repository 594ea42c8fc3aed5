"""NaN/Inf in a step (train.on_nonfinite): `skip` takes no update for that step (the weights
equal those of a run that stopped before it), counts and logs it, and stops after
train.max_skips in a row; `stop` is one error before the update reaches a checkpoint. Faults are
injected with torch hooks on the model of a built session (a NaN gradient from one parameter's
backward, or a NaN activation in the forward), only during the chosen steps."""

import math

import pytest
import torch

from engine.checkpoint import find_checkpoint, read_train_state
from engine.config.loader import recipe_from_dict
from engine.distributed import destroy_parallel_state, init_distributed
from engine.train.loop import run
from engine.train.session import build_session
from engine.train.step import NonFiniteError

pytestmark = pytest.mark.slow

MICRO = 4  # microbatches per step: global batch 8 / micro batch 2


def session(make_recipe, tmp_path, steps, **train):
    recipe = recipe_from_dict(make_recipe(
        train={"steps": steps, "schedule": {"style": "constant", "warmup_steps": 0}, **train},
        checkpoint={"save": str(tmp_path / "ck"), "save_interval": 1},
        logging={"tensorboard_dir": str(tmp_path / "tb")}))
    return build_session(recipe, init_distributed(recipe))


def poison(s, steps: set[int], where: str) -> None:
    """NaN into the gradient of one weight (`grad`) or into the hidden states (`forward`)
    while the session runs `steps` (counted by the hook's own calls)."""
    model = getattr(s.chunks[0], "module", s.chunks[0])
    calls = [0]

    def due() -> bool:
        calls[0] += 1
        return (calls[0] - 1) // MICRO + 1 in steps

    if where == "grad":
        weight = model.decoder.layers[0].mlp.linear_fc2.weight
        weight.register_hook(lambda g: g * math.nan if due() else g)
    else:
        model.decoder.layers[0].register_forward_hook(
            lambda mod, args, out: ((out[0] * math.nan,) + tuple(out[1:])) if due() else out)


def weights(s) -> dict:
    model = getattr(s.chunks[0], "module", s.chunks[0])
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize("where", ["grad", "forward"])
def test_skip_takes_no_update_and_goes_on(make_recipe, tmp_path, where):
    try:
        one = session(make_recipe, tmp_path / "one", 1)
        run(one)
        after_one = weights(one)
    finally:
        destroy_parallel_state()
    try:
        s = session(make_recipe, tmp_path / "two", 2, on_nonfinite="skip")
        poison(s, {2}, where)
        result = run(s)
        assert result.skipped == [2] and math.isfinite(result.losses[1])
        got = weights(s)
        assert all(torch.equal(got[k], after_one[k]) for k in after_one)  # no update at step 2
    finally:
        destroy_parallel_state()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "two" / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/skipped_steps")] == [(2, 1.0)]


def test_skips_in_a_row_stop_at_max_skips(make_recipe, tmp_path):
    try:
        s = session(make_recipe, tmp_path, 6, on_nonfinite="skip", max_skips=2)
        poison(s, {2, 3, 4, 5, 6}, "grad")
        with pytest.raises(NonFiniteError, match=r"2 steps in a row skipped .* train.max_skips=2"):
            run(s)
    finally:
        destroy_parallel_state()


def test_stop_raises_before_the_update_is_saved(make_recipe, tmp_path):
    try:
        s = session(make_recipe, tmp_path, 4)  # on_nonfinite: stop (the default)
        poison(s, {3}, "forward")
        with pytest.raises(NonFiniteError, match=r"loss nan \(train.on_nonfinite=stop"):
            run(s)
    finally:
        destroy_parallel_state()
    assert read_train_state(find_checkpoint(tmp_path / "ck")).step == 2

"""Resume is exact: 6 steps straight equal 3 steps + resume + 3 steps, bit for bit on CPU.

Also: TensorBoard events read back with tensorboard's own reader, retention, and the resume /
pretrained precedence that makes a requeued job continue instead of restarting."""

import pytest

from engine.checkpoint import find_checkpoint, read_train_state
from engine.config.loader import recipe_from_dict
from engine.train.loop import train


@pytest.fixture(scope="module")
def straight(make_recipe, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    recipe = make_recipe(
        train={"steps": 6, "eval_interval": 3, "eval_steps": 1},
        checkpoint={"save": str(tmp / "ckpt"), "save_interval": 2, "keep_last": 2},
        logging={"log_interval": 1, "tensorboard_dir": str(tmp / "tb")},
    )
    return tmp, train(recipe_from_dict(recipe))


def test_resume_is_bit_identical(straight, make_recipe, tmp_path):
    _, full = straight
    recipe = make_recipe(
        train={"steps": 6, "eval_interval": 3, "eval_steps": 1, "exit_interval": 3},
        checkpoint={"save": str(tmp_path / "ckpt")},
    )
    first = train(recipe_from_dict(recipe))
    assert sorted(first.losses) == [1, 2, 3]
    assert read_train_state(find_checkpoint(tmp_path / "ckpt")).step == 3
    second = train(recipe_from_dict(recipe))  # the same command again: resumes at step 3
    assert sorted(second.losses) == [4, 5, 6]
    assert {**first.losses, **second.losses} == full.losses  # exact, not approximate
    assert {**first.grad_norms, **second.grad_norms} == full.grad_norms
    assert second.valid[6] == full.valid[6]
    state = read_train_state(find_checkpoint(tmp_path / "ckpt"))
    assert state.step == 6 and state.consumed_samples == 6 * 8


def test_resume_with_distributed_optimizer_is_bit_identical(make_recipe, tmp_path):
    """megatron-core's distributed optimizer with torch's Adam (CPU) needs the compat layer's fix
    of the per-parameter `step`; without it the resumed run drifts from step 5 on."""

    def recipe(name, **train_):
        return recipe_from_dict(
            make_recipe(
                parallel={"distributed_optimizer": True},
                train={"steps": 6, **train_},
                checkpoint={"save": str(tmp_path / name)},
            )
        )

    full = train(recipe("full"))
    first = train(recipe("split", exit_interval=3))
    second = train(recipe("split"))
    assert {**first.losses, **second.losses} == full.losses
    assert {**first.grad_norms, **second.grad_norms} == full.grad_norms


def test_tensorboard_scalars_read_back(straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, result = straight
    events = EventAccumulator(str(tmp / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/tflops_per_device",
        "valid/code/loss",
        "valid/code/ppl",
    } <= tags
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged.keys() == result.losses.keys()
    for step, loss in result.losses.items():
        assert logged[step] == pytest.approx(loss, rel=1e-6)  # TensorBoard stores float32
    assert [e.step for e in events.Scalars("valid/code/loss")] == [3, 6]


def test_a_run_killed_before_its_first_checkpoint_is_not_logged_twice(straight, make_recipe,
                                                                        tmp_path):
    """What an attempt logged before it was killed, with no checkpoint yet (its events are
    in the directory: here a finished run's, copied), is replaced by the run that starts over
    from step 0: each step once, with the new run's values (found by tests/chaos.py)."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shutil.copytree(straight[0] / "tb", tmp_path / "tb")
    again = train(recipe_from_dict(make_recipe(
        train={"steps": 2}, logging={"log_interval": 1, "tensorboard_dir": str(tmp_path / "tb")},
        checkpoint={"save": str(tmp_path / "ckpt")})))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in logged] == [1, 2]
    assert logged == [(s, pytest.approx(again.losses[s], rel=1e-6)) for s in (1, 2)]


def test_keep_last_retention_and_tracker(straight):
    tmp, _ = straight
    ckpt = tmp / "ckpt"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000004", "iter_0000006"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (ckpt / "iter_0000006" / "recipe.yaml").is_file()


def test_pretrained_is_weights_only_and_ignored_once_a_checkpoint_exists(
    straight, make_recipe, tmp_path
):
    tmp, full = straight
    recipe = make_recipe(
        train={"steps": 2},
        checkpoint={"save": str(tmp_path / "cpt"), "pretrained": str(tmp / "ckpt")},
    )
    cpt = train(recipe_from_dict(recipe))
    assert sorted(cpt.losses) == [1, 2]  # a fresh run: step 0, fresh schedule and optimizer
    # Step 1's loss is the pretrained weights' loss on batch 0: lower than the random init's,
    # nearer the trained run's last losses than its first.
    last = full.losses[max(full.losses)]
    assert cpt.losses[1] < full.losses[1] and \
        abs(cpt.losses[1] - last) < abs(cpt.losses[1] - full.losses[1]), (cpt.losses, full.losses)
    again = train(
        recipe_from_dict(
            make_recipe(
                # 2 -> 4 steps stretches the cosine over steps already taken: explicit
                train={"steps": 4, "override_schedule": True},
                checkpoint={"save": str(tmp_path / "cpt"), "pretrained": str(tmp / "ckpt")},
            )
        )
    )
    assert sorted(again.losses) == [3, 4]  # resumed from cpt's own step 2, pretrained ignored

"""train.mer on a tiny Llama, one process, with the regular optimizer (fp32 and bf16: its fp32
main copies) and the distributed optimizer (fp32 and bf16: its shards, and the anchor gathered
per bucket for the checkpoint): epsilon 1 trains bit for bit like no MER; epsilon 0 puts the
weights back to the anchor (the stage's start) every k steps; a resume in the middle of a cycle
is bit-identical to the run straight through, anchor and phase read back from the checkpoint.
DP=2, TP=2 and PP=2 equal one process: tests/dist/test_mer_parallel.py."""

import pytest
import torch

from engine.checkpoint.unsharded import read_unsharded
from engine.config.loader import recipe_from_dict
from engine.train.loop import train

pytestmark = pytest.mark.slow  # ~10 short trainings, ~25 s each on 2 busy cores

OPTIMIZERS = {"fp32": ({}, {}), "bf16": ({"precision": "bf16"}, {}),
              "distopt": ({}, {"distributed_optimizer": True}),
              "distopt_bf16": ({"precision": "bf16"}, {"distributed_optimizer": True})}


@pytest.fixture(scope="module")
def base(make_recipe, tmp_path_factory):
    """Random-init weights saved at step 0: the `checkpoint.pretrained` of every run here."""
    out = tmp_path_factory.mktemp("mer") / "base"
    train(recipe_from_dict(make_recipe(train={"steps": 0, "schedule": {"warmup_steps": 0}},
                                       checkpoint={"save": str(out)})))
    return read_unsharded(out)


def run(make_recipe, base, save, *, steps=4, mer=None, kind="fp32", **train_):
    train_extra, parallel = OPTIMIZERS[kind]
    recipe = make_recipe(
        train={"steps": steps, **train_extra, **({"mer": mer} if mer else {}), **train_},
        parallel=parallel,
        checkpoint={"pretrained": str(base.path), "save": str(save), "save_interval": 1})
    return train(recipe_from_dict(recipe))


def weights(save, step):
    return read_unsharded(save / f"iter_{step:07d}").state


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_epsilon_one_is_bit_identical_to_no_mer(make_recipe, base, tmp_path, kind):
    plain = run(make_recipe, base, tmp_path / "plain", kind=kind)
    mer = run(make_recipe, base, tmp_path / "mer", kind=kind, mer={"interval": 2, "epsilon": 1.0})
    assert plain.losses == mer.losses and plain.grad_norms == mer.grad_norms
    for step in (2, 4):  # right after each Reptile step
        assert same(weights(tmp_path / "plain", step), weights(tmp_path / "mer", step))


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_epsilon_zero_returns_to_the_anchor_every_k_steps(make_recipe, base, tmp_path, kind):
    result = run(make_recipe, base, tmp_path / "cpt", kind=kind,
                 mer={"interval": 2, "epsilon": 0.0})
    assert sorted(result.losses) == [1, 2, 3, 4]
    start = weights(tmp_path / "cpt", 2)  # bf16 runs round the fp32 base once: compare to step 2
    if "bf16" not in kind:
        assert same(start, base.state)
    for step in (1, 3):  # trained in between
        assert not same(weights(tmp_path / "cpt", step), start)
    assert same(weights(tmp_path / "cpt", 4), start)  # and back, bit for bit


@pytest.mark.parametrize("kind", ["fp32", "distopt"])
def test_a_resume_inside_a_cycle_is_bit_identical(make_recipe, base, tmp_path, kind):
    """Saved at step 3 (anchor of step 2, phase 1 of 2), resumed: the Reptile step at step 4
    uses the anchor read back, and everything after equals the run straight through."""
    mer = {"interval": 2, "epsilon": 0.5}
    straight = run(make_recipe, base, tmp_path / "straight", steps=5, kind=kind, mer=mer)
    first = run(make_recipe, base, tmp_path / "split", steps=5, kind=kind, mer=mer,
                exit_interval=3)
    assert sorted(first.losses) == [1, 2, 3]
    second = run(make_recipe, base, tmp_path / "split", steps=5, kind=kind, mer=mer)
    assert sorted(second.losses) == [4, 5]
    assert {**first.losses, **second.losses} == straight.losses
    for step in (4, 5):
        assert same(weights(tmp_path / "straight", step), weights(tmp_path / "split", step))


def test_a_resume_without_an_anchor_takes_the_current_weights(make_recipe, base, tmp_path):
    """MER switched on at a resume: the anchor is the resumed weights, the phase 0 there."""
    run(make_recipe, base, tmp_path / "cpt", steps=4, exit_interval=2)
    run(make_recipe, base, tmp_path / "cpt", steps=4, mer={"interval": 2, "epsilon": 0.0})
    assert same(weights(tmp_path / "cpt", 4), weights(tmp_path / "cpt", 2))

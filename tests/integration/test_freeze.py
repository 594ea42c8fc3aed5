"""train.freeze on a tiny Llama, one process: during the first K steps every parameter but the
embedding and output layer keeps every bit (with weight decay and Adam, regular and distributed
optimizer), after them every parameter trains; `new_rows` keeps the old rows too; a resume inside
the frozen phase is bit-identical to the run straight through. DP=2 with the distributed
optimizer: tests/dist/test_freeze_parallel.py."""

import pytest
import torch

from engine.checkpoint.unsharded import read_unsharded
from engine.config.loader import recipe_from_dict
from engine.models.weights import EMBEDDING, OUTPUT
from engine.train.loop import train

K = 2
VOCAB = (EMBEDDING, OUTPUT)


@pytest.fixture(scope="module")
def base(make_recipe, tmp_path_factory):
    """Random-init weights saved at step 0: the `checkpoint.pretrained` of every run here."""
    out = tmp_path_factory.mktemp("freeze") / "base"
    train(recipe_from_dict(make_recipe(train={"steps": 0, "schedule": {"warmup_steps": 0}},
                                       checkpoint={"save": str(out)})))
    return read_unsharded(out)


def run(make_recipe, base, save, *, steps=4, freeze=None, parallel=None, **train_):
    recipe = make_recipe(
        train={"steps": steps, "freeze": freeze or {"steps": K}, **train_},
        optim={"lr": 3e-3, "weight_decay": 0.1},  # decay would move frozen weights if applied
        parallel=parallel or {},
        checkpoint={"pretrained": str(base.path), "save": str(save), "save_interval": 1})
    return train(recipe_from_dict(recipe))


def weights(save, step):
    return read_unsharded(save / f"iter_{step:07d}").state


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_only_the_vocabulary_trains_for_k_steps_then_everything(make_recipe, base, tmp_path,
                                                                distributed_optimizer):
    result = run(make_recipe, base, tmp_path / "cpt",
                 parallel={"distributed_optimizer": distributed_optimizer})
    assert sorted(result.losses) == [1, 2, 3, 4]
    for step in range(1, K + 1):
        state = weights(tmp_path / "cpt", step)
        for name, tensor in base.state.items():
            if name in VOCAB:
                assert not torch.equal(state[name], tensor), (step, name)
            else:  # bit for bit, not approximately
                assert torch.equal(state[name], tensor), (step, name)
    thawed = weights(tmp_path / "cpt", K + 1)
    frozen = weights(tmp_path / "cpt", K)
    for name in base.state:
        assert not torch.equal(thawed[name], frozen[name]), name


def test_new_rows_keeps_the_old_rows_too(make_recipe, base, tmp_path):
    first_new = base.recipe.model.vocab_size - 100  # pretend the last 100 tokens are new
    run(make_recipe, base, tmp_path / "cpt", steps=K,
        freeze={"steps": K, "train": "new_rows", "new_rows_from": first_new})
    state = weights(tmp_path / "cpt", K)
    for name, tensor in base.state.items():
        if name in VOCAB:
            assert torch.equal(state[name][:first_new], tensor[:first_new]), name
            assert not torch.equal(state[name][first_new:], tensor[first_new:]), name
        else:
            assert torch.equal(state[name], tensor), name


def test_a_resume_inside_the_frozen_phase_is_bit_identical(make_recipe, base, tmp_path):
    freeze = {"steps": 3}
    straight = run(make_recipe, base, tmp_path / "straight", steps=5, freeze=freeze)
    first = run(make_recipe, base, tmp_path / "split", steps=5, freeze=freeze, exit_interval=2)
    assert sorted(first.losses) == [1, 2]
    second = run(make_recipe, base, tmp_path / "split", steps=5, freeze=freeze)
    assert sorted(second.losses) == [3, 4, 5]
    assert {**first.losses, **second.losses} == straight.losses
    assert {**first.grad_norms, **second.grad_norms} == straight.grad_norms
    a, b = weights(tmp_path / "straight", 5), weights(tmp_path / "split", 5)
    assert all(torch.equal(a[k], b[k]) for k in a)

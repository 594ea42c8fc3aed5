"""Scale-Up's --carry-optimizer through megatron-core: a tiny model trains 4 steps (Adam state
at step 4), then takes one more step as a new stage with its own optimizer state
(checkpoint.pretrained_optim) -- the source's update. Grown exactly (width x1.25 at a non-integer
ratio, heads 4 -> 6) with the state carried, the grown model's first step on the same batch
moves every element that has a source by that source element's update (Adam's direction is
invariant to the gradient's scale a_j when the moments carry a_j and a_j^2,
engine.upcycle.moments). With a fresh optimizer instead the same comparison is off by orders of
magnitude, so the check can fail. Weight decay 0, no clipping and eps 1e-16 isolate Adam's
direction (decay maps like the weights; clipping sees the grown norm; eps is not scaled)."""

import pytest
import torch

from engine.checkpoint import CheckpointError
from engine.checkpoint.adam import read_adam_state
from engine.checkpoint.unsharded import read_unsharded
from engine.config.errors import ConfigError
from engine.config.loader import recipe_from_dict, recipe_to_dict
from engine.train.loop import train
from engine.upcycle.commands import scale_up_checkpoint
from engine.upcycle.moments import element_maps
from engine.upcycle.scale_up import ScaleUpSpec

pytestmark = pytest.mark.slow

GROWTH = dict(hidden_size=80, ffn_hidden_size=160, num_attention_heads=6, width_method="exact",
              eval_samples=0)
ISOLATED = {"weight_decay": 0.0, "clip_grad": 0.0, "adam_eps": 1e-16, "lr": 3e-3}


@pytest.fixture(scope="module")
def runs(make_recipe, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("carry")
    base = make_recipe(optim=ISOLATED, train={"steps": 4, "schedule": {"style": "constant"}},
                       checkpoint={"save": str(tmp / "source")})
    source = train(recipe_from_dict(base)).checkpoint

    def one_step(ckpt, save, carried=True):
        recipe = recipe_to_dict(read_unsharded(ckpt).recipe)
        recipe["train"].update(steps=1, schedule={"style": "constant"})
        recipe["optim"].update(ISOLATED)
        recipe["checkpoint"] = {"pretrained": str(ckpt), "pretrained_optim": carried,
                                "save": str(tmp / save)}
        return train(recipe_from_dict(recipe)).checkpoint

    cont = one_step(source, "continued")
    grown = tmp / "grown"
    report = scale_up_checkpoint(source, grown, carry_optimizer=True, **GROWTH)
    return {"source": source, "continued": cont, "grown": grown, "report": report,
            "grown_step": one_step(grown, "grown_step"),
            "fresh_step": one_step(grown, "fresh_step", carried=False)}


def updates(before, after) -> dict:
    a, b = read_unsharded(before).state, read_unsharded(after).state
    return {k: (b[k].double() - a[k].double()) for k in a}


def mismatch(runs, grown_run) -> tuple[float, int]:
    """(max |grown update - source update at the source element| / max |source update|, the
    number of elements compared)."""
    source = read_unsharded(runs["source"])
    grown = read_unsharded(runs["grown"])
    ref, got = updates(runs["source"], runs["continued"]), updates(runs["grown"], grown_run)
    keys, maps = element_maps(source.state, source.recipe.model, grown.recipe.model,
                              ScaleUpSpec(width_method="exact"))
    flat = torch.cat([ref[k].reshape(-1) for k in keys])
    scale = flat.abs().max().item()
    worst, compared = 0.0, 0
    for name, em in maps.items():
        rows = em.index.shape[0]  # the grown tensor's vocabulary rows are padded alike
        sourced = em.index >= 0
        diff = (got[name][:rows] - flat[em.index.clamp(min=0)]).abs()[sourced]
        worst = max(worst, diff.max().item() if diff.numel() else 0.0)
        compared += int(sourced.sum())
    return worst / scale, compared


def test_first_update_of_the_grown_model_is_the_source_update(runs):
    assert runs["report"]["optimizer"]["adam_step"] == 4
    assert read_adam_state(runs["grown_step"]).step == 5  # kept, then one more
    worst, compared = mismatch(runs, runs["grown_step"])
    assert compared == runs["report"]["optimizer"]["elements_carried"] > 0
    print(f"carried: max |update difference| / max |update| = {worst:.2e} over {compared} "
          "elements")
    assert worst < 1e-4, worst  # fp32 gradients of two shapes; measured 7e-6


def test_a_fresh_optimizer_does_not_take_the_source_update(runs):
    worst, _ = mismatch(runs, runs["fresh_step"])
    print(f"fresh: max |update difference| / max |update| = {worst:.2e}")
    assert worst > 0.1, worst  # the check above can fail: a fresh Adam moves by ~lr*sign(g)


def test_new_units_start_from_zero_moments_and_train(runs):
    grown = read_adam_state(runs["grown"])
    emb = grown.exp_avg["embedding.word_embeddings.weight"]
    assert not emb[:, 64:].any() and emb[:, :64].abs().max() > 0
    after = updates(runs["grown"], runs["grown_step"])
    # the new stream dimensions are read by fresh weights, so their writers get gradient
    for name in ("embedding.word_embeddings.weight", "decoder.layers.0.mlp.linear_fc2.weight"):
        new = after[name][:, 64:] if name.startswith("embedding") else after[name][64:]
        assert new.abs().max() > 0, name


def test_pretrained_optim_needs_optimizer_state(runs, tmp_path):
    recipe = recipe_to_dict(read_unsharded(runs["source"]).recipe)
    plain = tmp_path / "plain"
    scale_up_checkpoint(runs["source"], plain, **GROWTH)  # no --carry-optimizer
    grown = recipe_to_dict(read_unsharded(plain).recipe)
    grown["checkpoint"] = {"pretrained": str(plain), "pretrained_optim": True,
                           "save": str(tmp_path / "x")}
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        train(recipe_from_dict(grown))
    with pytest.raises(CheckpointError, match="holds no optimizer state to carry"):
        scale_up_checkpoint(plain, tmp_path / "again", carry_optimizer=True, num_layers=5,
                            depth_method="identity", eval_samples=0)
    assert not (tmp_path / "again").exists()
    recipe["checkpoint"] = {"pretrained_optim": True}
    with pytest.raises(ConfigError, match="pretrained_optim needs checkpoint.pretrained"):
        recipe_from_dict(recipe)

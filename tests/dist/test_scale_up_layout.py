"""Scale-Up is layout-independent: the same weights saved by a TP=2 run (two ranks, each writing
its shards) and by a TP=1 run grow into exactly the same tensors and the same report, and the
grown checkpoint written for TP=2 trains at TP=2 as the TP=1 one does at TP=1 (same loss to
1e-5, fp32, gloo)."""

import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint.layout import read_saved_layout
from engine.checkpoint.unsharded import read_unsharded
from engine.config.loader import recipe_from_dict, recipe_to_dict
from engine.train.loop import train
from engine.upcycle.commands import scale_up_checkpoint

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker.py")
GROWTH = dict(num_layers=6, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8,
              width_method="aki-pro", depth_method="interpolate", noise=1e-2, seed=11)


def launch(torchrun, tmp: Path, name: str, recipe: dict) -> dict:
    spec, out = tmp / f"{name}.json", tmp / f"{name}-out.json"
    spec.write_text(json.dumps({"runs": [{"name": name, "recipe": recipe}]}))
    torchrun(2, WORKER, str(spec), str(out), timeout=600)
    return json.loads(out.read_text())[name]


def one_step(grown: Path, save: Path) -> dict:
    """The grown checkpoint's own recipe, trained one step from it."""
    plain = recipe_to_dict(read_unsharded(grown).recipe)
    plain["train"].update(steps=1)
    plain["checkpoint"]["save"] = str(save)
    return plain


def test_growth_is_the_same_from_any_saved_layout_and_trains_at_its_target_layout(
        make_recipe, torchrun, tmp_path):
    trained = train(recipe_from_dict(make_recipe(checkpoint={"save": str(tmp_path / "trained")})))
    # the trained weights saved again, unchanged (train.steps=0), by a TP=2 and a TP=1 run
    resave = {"train": {"steps": 0, "schedule": {"warmup_steps": 0}}}
    at_tp2 = launch(torchrun, tmp_path, "save_tp2", make_recipe(
        parallel={"tp": 2}, **resave,
        checkpoint={"pretrained": str(trained.checkpoint), "save": str(tmp_path / "tp2")}))
    assert at_tp2["layout"]["tp"] == 2 and at_tp2["layout"]["world_size"] == 2
    train(recipe_from_dict(make_recipe(**resave, checkpoint={
        "pretrained": str(trained.checkpoint), "save": str(tmp_path / "tp1")})))
    assert read_saved_layout(tmp_path / "tp2" / "iter_0000000").tp == 2
    assert read_saved_layout(tmp_path / "tp1" / "iter_0000000").tp == 1

    from_tp2 = scale_up_checkpoint(tmp_path / "tp2", tmp_path / "grown_tp2", **GROWTH)
    from_tp1 = scale_up_checkpoint(tmp_path / "tp1", tmp_path / "grown_tp1", **GROWTH)
    assert from_tp2["target"]["tp"] == 2 and from_tp1["target"]["tp"] == 1  # the source's
    assert from_tp2["source_map"] == from_tp1["source_map"]
    assert from_tp2["invariant"] == from_tp1["invariant"]
    a = read_unsharded(tmp_path / "grown_tp2").state
    b = read_unsharded(tmp_path / "grown_tp1").state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    grown_at_tp2 = launch(torchrun, tmp_path, "grown_at_tp2",
                          one_step(tmp_path / "grown_tp2", tmp_path / "trained_tp2"))
    assert grown_at_tp2["layout"]["tp"] == 2
    grown_at_tp1 = train(recipe_from_dict(one_step(tmp_path / "grown_tp1",
                                                   tmp_path / "trained_tp1")))
    assert grown_at_tp1.layout["tp"] == 1
    assert grown_at_tp2["losses"]["1"] == pytest.approx(grown_at_tp1.losses[1], rel=1e-5)
    assert grown_at_tp2["grad_norms"]["1"] == pytest.approx(grown_at_tp1.grad_norms[1], rel=1e-5)

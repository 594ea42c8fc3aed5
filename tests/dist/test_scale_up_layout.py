"""Scale-Up is layout-independent: a model trained and saved at TP=2 grows into exactly the
tensors that the same weights saved at TP=1 grow into, and the grown checkpoint written for TP=2
trains at TP=2 as the TP=1 one does at TP=1 (same loss to 1e-5, fp32, gloo)."""

import json
from pathlib import Path

import pytest
import torch

from engine.config.loader import recipe_from_dict, recipe_to_dict
from engine.train.loop import train
from engine.upcycle.cli import scale_up_checkpoint
from engine.upcycle.io import derived_recipe, read_checkpoint, write_checkpoint

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker.py")
GROWTH = dict(num_layers=6, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8,
              width_method="aki-pro", depth_method="interpolate", noise=1e-3, seed=11)


def launch(torchrun, tmp: Path, name: str, recipe: dict) -> dict:
    spec, out = tmp / f"{name}.json", tmp / f"{name}-out.json"
    spec.write_text(json.dumps({"runs": [{"name": name, "recipe": recipe}]}))
    torchrun(2, WORKER, str(spec), str(out), timeout=600)
    return json.loads(out.read_text())[name]


def one_step(grown: Path, save: Path) -> dict:
    """The grown checkpoint's own recipe, trained one step from it."""
    plain = recipe_to_dict(read_checkpoint(grown)[1])
    plain["train"].update(steps=1)
    plain["checkpoint"]["save"] = str(save)
    return plain


def test_growth_is_the_same_from_any_saved_layout_and_trains_at_its_target_layout(
        make_recipe, torchrun, tmp_path):
    launch(torchrun, tmp_path, "source_tp2", make_recipe(
        parallel={"tp": 2}, checkpoint={"save": str(tmp_path / "tp2")}))
    _, recipe, state, _ = read_checkpoint(tmp_path / "tp2")
    assert recipe.parallel.tp == 2
    write_checkpoint(tmp_path / "tp1", derived_recipe(recipe, parallel={"tp": 1},
                                                      model={"vocab_size": 512}),
                     state, report={})

    from_tp2 = scale_up_checkpoint(tmp_path / "tp2", tmp_path / "grown_tp2", **GROWTH)
    from_tp1 = scale_up_checkpoint(tmp_path / "tp1", tmp_path / "grown_tp1", **GROWTH, tp=1)
    assert from_tp2["target"]["tp"] == 2 and from_tp1["target"]["tp"] == 1
    assert from_tp2["source_map"] == from_tp1["source_map"]
    assert from_tp2["validation"] == from_tp1["validation"]
    a, b = read_checkpoint(tmp_path / "grown_tp2")[2], read_checkpoint(tmp_path / "grown_tp1")[2]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    at_tp2 = launch(torchrun, tmp_path, "grown_at_tp2",
                    one_step(tmp_path / "grown_tp2", tmp_path / "trained_tp2"))
    at_tp1 = train(recipe_from_dict(one_step(tmp_path / "grown_tp1", tmp_path / "trained_tp1")))
    assert at_tp2["losses"]["1"] == pytest.approx(at_tp1.losses[1], rel=1e-5)
    assert at_tp2["grad_norms"]["1"] == pytest.approx(at_tp1.grad_norms[1], rel=1e-5)

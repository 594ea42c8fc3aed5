"""Replay does not depend on the parallel layout: a CPT run with a quarter of every batch replayed
gives the same losses in one process, at DP=2 and at TP=2 (fp32, gloo, to 1e-5 relative), so every
layout sees the same samples in the same global batches."""

import json
from pathlib import Path

import pytest

from engine.config.loader import recipe_from_dict
from engine.train.loop import train

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).parents[1] / "dist" / "worker.py"


def test_replay_batches_are_the_same_at_every_layout(make_recipe, tiny_data, tmp_path, torchrun):
    init = tmp_path / "init"
    train(recipe_from_dict(make_recipe(train={"steps": 0, "schedule": {"warmup_steps": 0}},
                                       checkpoint={"save": str(init)})))

    def recipe(parallel):
        return make_recipe(
            parallel=parallel,
            data={"replay": {"blend": [{"path": tiny_data["valid"], "name": "general"}],
                             "fraction": 0.25}},
            train={"steps": 3}, checkpoint={"pretrained": str(init)})

    single = train(recipe_from_dict(recipe({}))).losses
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"runs": [{"name": "dp2", "recipe": recipe({})},
                                         {"name": "tp2", "recipe": recipe({"tp": 2})}]}))
    torchrun(2, WORKER, str(spec), str(out), timeout=600)
    for name, res in json.loads(out.read_text()).items():
        losses = {int(s): v for s, v in res["losses"].items()}
        assert losses == pytest.approx(single, rel=1e-5), name

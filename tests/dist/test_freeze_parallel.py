"""train.freeze at DP=2 with megatron-core's distributed optimizer (each rank updates its shard of
the fp32 main parameters): the frozen parameters keep every bit for K steps, then train; the
losses equal the one-process run's (1e-5, fp32, gloo); a resume inside the frozen phase is
bit-identical to the run straight through."""

import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint.unsharded import read_unsharded
from engine.config.loader import recipe_from_dict
from engine.models.weights import EMBEDDING, OUTPUT
from engine.train.loop import train

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker.py")
K, STEPS = 2, 4


def test_frozen_phase_under_the_distributed_optimizer(make_recipe, torchrun, tmp_path):
    train(recipe_from_dict(make_recipe(train={"steps": 0, "schedule": {"warmup_steps": 0}},
                                       checkpoint={"save": str(tmp_path / "base")})))
    base = read_unsharded(tmp_path / "base").state

    def recipe(name, parallel, **train_):
        return make_recipe(
            parallel=parallel, optim={"lr": 3e-3, "weight_decay": 0.1},
            train={"steps": STEPS, "freeze": {"steps": K}, **train_},
            checkpoint={"pretrained": str(tmp_path / "base"), "save": str(tmp_path / name),
                        "save_interval": 1})

    dp2 = {"distributed_optimizer": True}
    runs = {"dp2": recipe("dp2", dp2), "split_a": recipe("split", dp2, exit_interval=1),
            "split_b": recipe("split", dp2)}
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"runs": [{"name": k, "recipe": r} for k, r in runs.items()]}))
    torchrun(2, WORKER, str(spec), str(out), timeout=600)
    results = json.loads(out.read_text())
    assert results["dp2"]["layout"]["dp"] == 2

    def weights(name, step):
        return read_unsharded(tmp_path / name / f"iter_{step:07d}").state

    for step in range(1, K + 1):
        state = weights("dp2", step)
        for name, tensor in base.items():
            assert torch.equal(state[name], tensor) is (name not in (EMBEDDING, OUTPUT)), \
                (step, name)
    thawed, frozen = weights("dp2", K + 1), weights("dp2", K)
    assert all(not torch.equal(thawed[k], frozen[k]) for k in base)

    one = train(recipe_from_dict(recipe("dp1", {})))
    for step, loss in one.losses.items():
        assert results["dp2"]["losses"][str(step)] == pytest.approx(loss, rel=1e-5)

    split = {**results["split_a"]["losses"], **results["split_b"]["losses"]}
    assert split == results["dp2"]["losses"]  # resumed at step 1, inside the frozen phase
    a, b = weights("dp2", STEPS), weights("split", STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a)

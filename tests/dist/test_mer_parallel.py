"""train.mer and logging.drift across layouts (gloo, fp32): with a Reptile step every 2 steps
(epsilon 0.5) and the drift figures at every step, DP=2 with the distributed optimizer (each rank
steps its shard of the main parameters and its shard of the anchor), TP=2 (tensor-parallel
shards, drift norms summed over them) and PP=2 (each pipeline rank's layers under their global
numbers) train like one process: losses within 1e-5, drift within 1e-4 relative, and each run
reports the layout that ran. A DP=2 run stopped in the middle of a
cycle resumes bit-identically, and its checkpoint (the anchor gathered into the weights' layout)
resumes at one process too."""

import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint.unsharded import read_unsharded
from engine.config.loader import recipe_from_dict
from engine.train.loop import train

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker.py")
STEPS, RTOL, DRIFT_RTOL = 4, 1e-5, 1e-4
MER = {"interval": 2, "epsilon": 0.5}


@pytest.fixture(scope="module")
def runs(make_recipe, torchrun, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mer_parallel")
    train(recipe_from_dict(make_recipe(train={"steps": 0, "schedule": {"warmup_steps": 0}},
                                       checkpoint={"save": str(tmp / "base")})))

    def recipe(parallel=None, save=None, load=None, **train_):
        return make_recipe(
            parallel=parallel or {},
            train={"steps": STEPS, "eval_interval": 1, "eval_steps": 1, "mer": MER, **train_},
            logging={"log_interval": 1, "drift": True},
            checkpoint={"pretrained": str(tmp / "base"),
                        **({"save": str(tmp / save)} if save else {}),
                        **({"load": str(tmp / load)} if load else {})})

    distopt = {"distributed_optimizer": True}
    layouts = {"dp2_distopt": recipe(distopt, save="dp2"),
               "tp2": recipe({"tp": 2}),
               "pp2": recipe({"pp": 2}),
               "dp2_split_a": recipe(distopt, save="split", exit_interval=3),
               "dp2_split_b": recipe(distopt, save="split")}
    spec, out = tmp / "spec.json", tmp / "out.json"
    spec.write_text(json.dumps({"runs": [{"name": k, "recipe": r} for k, r in layouts.items()]}))
    torchrun(2, WORKER, str(spec), str(out), timeout=900)
    results = {name: {k: v if k == "layout" else {int(s): x for s, x in v.items()}
                      for k, v in res.items()} for name, res in json.loads(out.read_text()).items()}
    for name, r in {"single": recipe(),  # the reference; then the DP=2 checkpoint of step 3
                    "dp1_from_dp2": recipe(distopt, load="split/iter_0000003")}.items():
        res = train(recipe_from_dict(r))
        results[name] = {"losses": res.losses, "drift": res.drift, "layout": res.layout}
    results["tmp"] = tmp
    return results


def assert_close(run: dict, ref: dict, steps) -> None:
    for step in steps:
        assert run["losses"][step] == pytest.approx(ref["losses"][step], rel=RTOL), step
        assert run["drift"][step].keys() == ref["drift"][step].keys()
        for tag, value in ref["drift"][step].items():
            assert run["drift"][step][tag] == pytest.approx(value, rel=DRIFT_RTOL), (step, tag)


@pytest.mark.parametrize("name,tp,pp,dp", [("dp2_distopt", 1, 1, 2), ("tp2", 2, 1, 1),
                                         ("pp2", 1, 2, 1)])
def test_layout_trains_like_one_process(runs, name, tp, pp, dp):
    assert runs[name]["layout"] == {"world_size": 2, "tp": tp, "pp": pp, "vpp": None, "dp": dp,
                                    "ep": 1, "cp": 1}
    assert runs["single"]["layout"]["world_size"] == 1
    assert sorted(runs[name]["losses"]) == list(range(1, STEPS + 1))
    assert_close(runs[name], runs["single"], range(1, STEPS + 1))
    # per layer, the embedding, the output side and all: two figures each
    assert len(runs["single"]["drift"][STEPS]) == 2 * (4 + 3)


def test_a_resume_in_the_middle_of_a_cycle_is_bit_identical_at_dp2(runs):
    split = {**runs["dp2_split_a"]["losses"], **runs["dp2_split_b"]["losses"]}
    assert sorted(runs["dp2_split_b"]["losses"]) == [4]
    assert split == runs["dp2_distopt"]["losses"]
    tmp = runs["tmp"]
    a = read_unsharded(tmp / "dp2" / f"iter_{STEPS:07d}").state
    b = read_unsharded(tmp / "split" / f"iter_{STEPS:07d}").state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_dp2_checkpoint_resumes_at_one_process(runs):
    """The anchor, gathered into the weights' layout at DP=2, is sliced for DP=1: the Reptile
    step at step 4 and the drift from W_0 (also read back) match the DP=2 run's."""
    run = runs["dp1_from_dp2"]
    assert run["layout"]["world_size"] == 1 and sorted(run["losses"]) == [4]
    assert_close(run, runs["dp2_distopt"], [4])

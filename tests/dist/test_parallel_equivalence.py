"""Every parallel layout trains the same model: losses and gradient norms of TP, SP, PP (1F1B and
interleaved), DP (DDP and distributed optimizer) and their combinations equal the single-process
run to 1e-5 relative, from the same initial checkpoint and data (fp32, gloo). Checkpoints saved at
one layout resume at another, optimizer state included.

Launches are shared: one torchrun per world size runs many layouts (see worker.py)."""

import json
from pathlib import Path

import pytest

from engine.config.loader import recipe_from_dict
from engine.train.loop import train

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker.py")
STEPS = 4
RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(make_recipe, tmp_path_factory, torchrun):
    tmp = tmp_path_factory.mktemp("equivalence")
    init = tmp / "init"
    train(
        recipe_from_dict(
            make_recipe(
                train={"steps": 0, "schedule": {"warmup_steps": 0}}, checkpoint={"save": str(init)}
            )
        )
    )

    def recipe(parallel=None, train_=None, checkpoint=None):
        return make_recipe(
            parallel=parallel or {},
            train={"steps": STEPS, "eval_interval": 2, "eval_steps": 1, **(train_ or {})},
            checkpoint={"pretrained": str(init), **(checkpoint or {})},
        )

    def saving(parallel, name):  # stops at step 3 with a checkpoint, to be resumed elsewhere
        return recipe(parallel, {"exit_interval": 3}, {"save": str(tmp / name)})

    def resuming(parallel, name):
        return recipe(parallel, checkpoint={"load": str(tmp / name)})

    launches = {
        4: {"tp2_pp2": saving({"tp": 2, "pp": 2}, "ck_tp2_pp2"), "tp2_dp2": recipe({"tp": 2})},
        2: {
            "tp2": recipe({"tp": 2}),
            "tp2_sp": recipe({"tp": 2, "sequence_parallel": True}),
            "pp2": recipe({"pp": 2}),
            "pp2_vpp2": recipe({"pp": 2, "vpp": 2}),
            "dp2": recipe({}),
            "dp2_distopt": saving({"distributed_optimizer": True}, "ck_dp2_distopt"),
            "pp2_from_tp2_pp2": resuming({"pp": 2}, "ck_tp2_pp2"),
        },
    }
    results = {}
    for nproc, layouts in launches.items():  # 4 first: the 2-process launch resumes its checkpoint
        spec, out = tmp / f"spec{nproc}.json", tmp / f"out{nproc}.json"
        spec.write_text(
            json.dumps({"runs": [{"name": n, "recipe": r} for n, r in layouts.items()]})
        )
        torchrun(nproc, WORKER, str(spec), str(out), timeout=900)
        for name, res in json.loads(out.read_text()).items():
            results[name] = {k: {int(s): v for s, v in res[k].items()} for k in res}
    single = {
        "single": recipe(),
        "recompute_full": recipe(train_={"recompute": "full"}),
        "recompute_selective": recipe(train_={"recompute": "selective"}),
        "tp1_from_tp2_pp2": resuming({}, "ck_tp2_pp2"),
        "dp1_distopt_from_dp2": resuming({"distributed_optimizer": True}, "ck_dp2_distopt"),
    }
    for name, r in single.items():
        res = train(recipe_from_dict(r))
        results[name] = {"losses": res.losses, "grad_norms": res.grad_norms, "valid": res.valid}
    return results


def assert_same(run: dict, ref: dict):
    assert run["losses"].keys() <= ref["losses"].keys() and run["losses"]
    for step, loss in run["losses"].items():
        assert loss == pytest.approx(ref["losses"][step], rel=RTOL), f"loss at step {step}"
        assert run["grad_norms"][step] == pytest.approx(ref["grad_norms"][step], rel=RTOL), (
            f"grad norm at step {step}"
        )
    for step, losses in run["valid"].items():
        assert losses["code"] == pytest.approx(ref["valid"][step]["code"], rel=RTOL)


@pytest.mark.parametrize(
    "layout", ["tp2", "tp2_sp", "pp2", "pp2_vpp2", "dp2", "dp2_distopt", "tp2_pp2", "tp2_dp2"]
)
def test_layout_matches_single_process(runs, layout):
    assert sorted(runs["single"]["losses"]) == list(range(1, STEPS + 1))
    assert_same(runs[layout], runs["single"])


@pytest.mark.parametrize("mode", ["recompute_full", "recompute_selective"])
def test_recomputation_changes_nothing(runs, mode):
    assert_same(runs[mode], runs["single"])


@pytest.mark.parametrize(
    "resumed", ["tp1_from_tp2_pp2", "pp2_from_tp2_pp2", "dp1_distopt_from_dp2"]
)
def test_checkpoint_resumes_at_another_layout(runs, resumed):
    """Step 4 after resuming: its loss checks the resharded weights, the step-4 validation loss
    (after the update) checks the resharded optimizer state."""
    assert sorted(runs[resumed]["losses"]) == [STEPS]
    assert sorted(runs[resumed]["valid"]) == [STEPS]
    assert_same(runs[resumed], runs["single"])

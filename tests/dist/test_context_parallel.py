"""Context parallelism on CPU trains the same model as one process: CP=2 (also with selective
recomputation), CP=2 x DP=2 (distributed optimizer), TP=2 x CP=2 (sequence parallel) and PP=2 x
CP=2 reproduce the CP=1 losses, gradient norms and validation losses to 1e-5 relative (fp32,
gloo), with document masking off and on, and report cp=2 from megatron's parallel state.
Checkpoints saved at CP=2 resume at CP=1 and the reverse, with the same next-step loss.

The data are short packed documents (tests/conftest.py `short_docs`), so most 32-token samples
cross a document boundary and the document mask matters (tests/integration/
test_document_masking.py shows it against each document alone). One torchrun launch per world
size runs several layouts (worker.py)."""

import json
from pathlib import Path

import pytest

from engine.config.loader import recipe_from_dict
from engine.train.loop import train

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker.py")
STEPS = 4
RTOL = 1e-5


def summary(result) -> dict:
    return {"losses": result.losses, "grad_norms": result.grad_norms, "valid": result.valid,
            "layout": result.layout}


@pytest.fixture(scope="module")
def plan(make_recipe, short_docs, tmp_path_factory):
    """Recipe builders sharing one initial checkpoint: `recipe(parallel, masked)` trains STEPS
    steps on the short documents, document masking on or off."""
    tmp = tmp_path_factory.mktemp("context_parallel")
    init = tmp / "init"
    train(recipe_from_dict(make_recipe(train={"steps": 0, "schedule": {"warmup_steps": 0}},
                                       checkpoint={"save": str(init)})))

    def recipe(parallel=None, masked=False, train_=None, checkpoint=None):
        keys = ("reset_attention_mask", "reset_position_ids", "eod_mask_loss")
        return make_recipe(
            parallel=parallel or {},
            data={"blend": [{"path": short_docs["prefix"], "weight": 1.0}],
                  **{k: masked for k in keys}},
            train={"steps": STEPS, "eval_interval": 2, "eval_steps": 1, **(train_ or {})},
            checkpoint={"pretrained": str(init), **(checkpoint or {})})

    return recipe, tmp


@pytest.fixture(scope="module")
def runs(plan, tmp_path_factory, torchrun):
    recipe, tmp = plan
    results = {}
    for name, masked in (("single", False), ("single_masked", True)):
        results[name] = summary(train(recipe_from_dict(recipe(masked=masked), source=name)))
    saved_cp1 = tmp / "ck_cp1"  # stops after step 3 with a checkpoint, resumed at CP=2 below
    results["single_masked_saving"] = summary(train(recipe_from_dict(recipe(
        masked=True, train_={"exit_interval": 3}, checkpoint={"save": str(saved_cp1)}))))

    def launch(nproc: int, layouts: dict) -> None:
        where = tmp_path_factory.mktemp(f"cp_launch{nproc}")
        spec, out = where / "spec.json", where / "out.json"
        spec.write_text(json.dumps({"runs": [{"name": n, "recipe": r}
                                             for n, r in layouts.items()]}))
        torchrun(nproc, WORKER, str(spec), str(out), timeout=900)
        for name, res in json.loads(out.read_text()).items():
            results[name] = {k: v if k == "layout" else {int(s): x for s, x in v.items()}
                             for k, v in res.items()}

    saved = tmp / "ck_cp2"
    launch(2, {
        "cp2": recipe({"cp": 2}),
        "cp2_masked": recipe({"cp": 2}, masked=True),
        # stops after step 3 with a checkpoint, resumed at CP=1 below
        "cp2_masked_saving": recipe({"cp": 2}, masked=True, train_={"exit_interval": 3},
                                    checkpoint={"save": str(saved)}),
        # selective recomputation runs the core attention (and its all-gather) again
        "cp2_masked_recompute": recipe({"cp": 2}, masked=True, train_={"recompute": "selective"}),
        "cp2_from_cp1": recipe({"cp": 2}, masked=True, checkpoint={"load": str(saved_cp1)}),
    })
    launch(4, {
        "tp2_cp2": recipe({"tp": 2, "cp": 2}),
        "tp2_cp2_masked": recipe({"tp": 2, "cp": 2, "sequence_parallel": True}, masked=True),
        "cp2_dp2_masked": recipe({"cp": 2, "distributed_optimizer": True}, masked=True),
        "pp2_cp2_masked": recipe({"pp": 2, "cp": 2}, masked=True),
    })
    results["cp1_from_cp2"] = summary(train(recipe_from_dict(
        recipe(masked=True, checkpoint={"load": str(saved)}), source="cp1_from_cp2")))
    return results


def assert_same(run: dict, ref: dict, steps) -> float:
    """Every step of `steps` ran, and only those; losses, gradient norms and the validation
    losses at the evaluated steps equal the reference's. Returns the largest relative
    difference seen."""
    assert sorted(run["losses"]) == list(steps) == sorted(run["grad_norms"])
    worst = 0.0
    for step in steps:
        for key in ("losses", "grad_norms"):
            got, want = run[key][step], ref[key][step]
            assert got == pytest.approx(want, rel=RTOL), f"{key} at step {step}"
            worst = max(worst, abs(got - want) / abs(want))
    evaluated = [s for s in steps if s % 2 == 0 or s == STEPS]  # eval_interval 2
    assert sorted(run["valid"]) == evaluated
    for step in evaluated:
        got, want = run["valid"][step]["code"], ref["valid"][step]["code"]
        assert got == pytest.approx(want, rel=RTOL), f"validation loss at step {step}"
        worst = max(worst, abs(got - want) / abs(want))
    return worst


LAYOUTS = {  # name: (reference, world_size, tp, pp, dp, last step)
    "cp2": ("single", 2, 1, 1, 1, STEPS),
    "cp2_masked": ("single_masked", 2, 1, 1, 1, STEPS),
    "cp2_masked_saving": ("single_masked", 2, 1, 1, 1, 3),
    "cp2_masked_recompute": ("single_masked", 2, 1, 1, 1, STEPS),
    "tp2_cp2": ("single", 4, 2, 1, 1, STEPS),
    "tp2_cp2_masked": ("single_masked", 4, 2, 1, 1, STEPS),
    "cp2_dp2_masked": ("single_masked", 4, 1, 1, 2, STEPS),
    "pp2_cp2_masked": ("single_masked", 4, 1, 2, 1, STEPS),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_context_parallel_matches_one_process(runs, layout):
    ref, world, tp, pp, dp, last = LAYOUTS[layout]
    assert runs[layout]["layout"] == {"world_size": world, "tp": tp, "pp": pp, "vpp": None,
                                      "dp": dp, "ep": 1, "cp": 2}
    worst = assert_same(runs[layout], runs[ref], range(1, last + 1))
    print(f"{layout}: max relative difference {worst:.1e}")


def test_document_masking_changes_the_losses(runs):
    """The masked reference is another computation (the mask is applied at all)."""
    plain, masked = runs["single"]["losses"], runs["single_masked"]["losses"]
    assert max(abs(plain[s] - masked[s]) / plain[s] for s in plain) > 1e-3


@pytest.mark.parametrize("resumed, cp", [("cp1_from_cp2", 1), ("cp2_from_cp1", 2)])
def test_checkpoints_reshard_across_cp(runs, resumed, cp):
    """Step 4 after resuming from the step-3 checkpoint of the other CP size: the loss checks
    the weights, the step-4 validation loss the optimizer state."""
    assert runs[resumed]["layout"]["cp"] == cp
    worst = assert_same(runs[resumed], runs["single_masked"], [STEPS])
    print(f"{resumed}: max relative difference {worst:.1e}")

"""Every parallel layout trains the same model: losses and gradient norms of TP, SP, PP (1F1B and
interleaved), DP (DDP and distributed optimizer, with overlapped communication) and their
combinations equal the single-process run to 1e-5 relative on every step, from the same initial
checkpoint and data (fp32, gloo), and each run reports the layout megatron's parallel state ran.
Checkpoints saved at one layout resume at another, optimizer state included.

Launches are shared: one torchrun per world size runs many layouts (see worker.py), and the
single-process runs happen in this process (with a count of the attention and MLP forwards, so
recomputation is seen to happen)."""

import collections
import contextlib
import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint import CheckpointError
from engine.config.loader import recipe_from_dict
from engine.train.loop import train

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker.py")
STEPS = 4
RTOL = 1e-5


def summary(result) -> dict:
    return {"losses": result.losses, "grad_norms": result.grad_norms, "valid": result.valid,
            "layout": result.layout}


@contextlib.contextmanager
def forward_calls():
    """Counts of attention and MLP forward calls in this process (recomputation runs them
    again in the backward pass)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.mlp import MLP

    counts = collections.Counter()

    def hook(module, args, output):
        if isinstance(module, DotProductAttention):
            counts["attention"] += 1
        elif isinstance(module, MLP):
            counts["mlp"] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def plan(make_recipe, tmp_path_factory):
    """Recipe builders sharing one initial checkpoint and one scratch directory."""
    tmp = tmp_path_factory.mktemp("equivalence")
    init = tmp / "init"
    train(recipe_from_dict(make_recipe(train={"steps": 0, "schedule": {"warmup_steps": 0}},
                                       checkpoint={"save": str(init)})))

    def recipe(parallel=None, train_=None, checkpoint=None):
        return make_recipe(
            parallel=parallel or {},
            train={"steps": STEPS, "eval_interval": 2, "eval_steps": 1, **(train_ or {})},
            checkpoint={"pretrained": str(init), **(checkpoint or {})},
        )

    def saving(parallel, name, **checkpoint):  # stops at step 3 with a checkpoint
        return recipe(parallel, {"exit_interval": 3}, {"save": str(tmp / name), **checkpoint})

    def resuming(parallel, name, **checkpoint):
        return recipe(parallel, checkpoint={"load": str(tmp / name), **checkpoint})

    return recipe, saving, resuming


@pytest.fixture(scope="module")
def runs(plan, tmp_path_factory, torchrun):
    recipe, saving, resuming = plan
    results = {}

    def in_process(layouts: dict) -> None:
        for name, r in layouts.items():
            with forward_calls() as calls:
                results[name] = summary(train(recipe_from_dict(r, source=name)))
            results[name]["forward_calls"] = dict(calls)

    def launch(nproc: int, layouts: dict) -> None:
        tmp = tmp_path_factory.mktemp(f"launch{nproc}")
        spec, out = tmp / "spec.json", tmp / "out.json"
        runs_ = [{"name": n, **r} if "recipe" in r else {"name": n, "recipe": r}
                 for n, r in layouts.items()]
        spec.write_text(json.dumps({"runs": runs_}))
        torchrun(nproc, WORKER, str(spec), str(out), timeout=900)
        for name, res in json.loads(out.read_text()).items():
            results[name] = {k: v if k == "layout" else {int(s): x for s, x in v.items()}
                             for k, v in res.items()}

    in_process({"single": recipe(), "single_saving": saving({}, "ck_single")})
    launch(4, {"tp2_pp2": saving({"tp": 2, "pp": 2}, "ck_tp2_pp2"),
               "tp2_dp2": recipe({"tp": 2})})
    launch(2, {
        "tp2": recipe({"tp": 2}),
        "tp2_sp": recipe({"tp": 2, "sequence_parallel": True}),
        "pp2": recipe({"pp": 2}),
        "pp2_vpp2": recipe({"pp": 2, "vpp": 2}),
        # The trap: megatron's default batched p2p swaps interleaved-pipeline messages on gloo.
        "pp2_vpp2_batch_p2p": {"recipe": recipe({"pp": 2, "vpp": 2}), "without_compat_p2p": True},
        "dp2": recipe({}),
        "dp2_distopt": saving({"distributed_optimizer": True}, "ck_dp2_distopt"),
        "dp2_overlap": recipe({"distributed_optimizer": True, "overlap_grad_reduce": True,
                               "overlap_param_gather": True}),
        "dp2_distopt_full": saving({"distributed_optimizer": True}, "ck_dp2_full",
                                   optim_sharding="fully_reshardable"),
        "pp2_distopt_from_dp2_full": resuming({"pp": 2, "distributed_optimizer": True},
                                              "ck_dp2_full"),
        "pp2_from_tp2_pp2": resuming({"pp": 2}, "ck_tp2_pp2"),
        "tp2_from_single": resuming({"tp": 2}, "ck_single"),
    })
    in_process({
        "recompute_full": recipe(train_={"recompute": "full"}),
        "recompute_selective": recipe(train_={"recompute": "selective"}),
        "tp1_from_tp2_pp2": resuming({}, "ck_tp2_pp2"),
        "dp1_distopt_from_dp2": resuming({"distributed_optimizer": True}, "ck_dp2_distopt"),
        "weights_only_from_tp2_pp2": resuming({"distributed_optimizer": True}, "ck_tp2_pp2",
                                              load_optim=False),
        "bf16": recipe(train_={"precision": "bf16"}),
    })
    return results


def assert_same(run: dict, ref: dict, *, steps=range(1, STEPS + 1), valid: bool = True):
    """Every step of `steps` ran, and only those; losses, gradient norms (and validation losses
    at the evaluated steps) equal the reference's."""
    assert sorted(run["losses"]) == list(steps) == sorted(run["grad_norms"])
    for step in steps:
        assert run["losses"][step] == pytest.approx(ref["losses"][step], rel=RTOL), (
            f"loss at step {step}")
        assert run["grad_norms"][step] == pytest.approx(ref["grad_norms"][step], rel=RTOL), (
            f"grad norm at step {step}")
    if valid:
        evaluated = [s for s in steps if s % 2 == 0 or s == STEPS]  # eval_interval 2
        assert sorted(run["valid"]) == evaluated and all(run["valid"][s] for s in evaluated)
        for step in evaluated:
            assert run["valid"][step]["code"] == pytest.approx(ref["valid"][step]["code"],
                                                               rel=RTOL)


LAYOUTS = {  # name: (world_size, tp, pp, vpp, dp, last step: 3 for the runs that save and stop)
    "tp2": (2, 2, 1, None, 1, 4), "tp2_sp": (2, 2, 1, None, 1, 4), "pp2": (2, 1, 2, None, 1, 4),
    "pp2_vpp2": (2, 1, 2, 2, 1, 4), "dp2": (2, 1, 1, None, 2, 4),
    "dp2_distopt": (2, 1, 1, None, 2, 3), "dp2_overlap": (2, 1, 1, None, 2, 4),
    "dp2_distopt_full": (2, 1, 1, None, 2, 3), "tp2_pp2": (4, 2, 2, None, 1, 3),
    "tp2_dp2": (4, 2, 1, None, 2, 4),
}


def test_the_single_process_reference_ran_at_one_process(runs):
    assert runs["single"]["layout"] == {"world_size": 1, "tp": 1, "pp": 1, "vpp": None,
                                        "dp": 1, "ep": 1, "cp": 1}
    assert sorted(runs["single"]["losses"]) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(runs, layout):
    world, tp, pp, vpp, dp, last = LAYOUTS[layout]
    assert runs[layout]["layout"] == {"world_size": world, "tp": tp, "pp": pp, "vpp": vpp,
                                      "dp": dp, "ep": 1, "cp": 1}
    assert_same(runs[layout], runs["single"], steps=range(1, last + 1))


def test_batched_p2p_trap_is_real_and_closed(runs):
    """Without the compat layer's batch_p2p_comm=False the interleaved schedule on gloo trains a
    different model, silently; with it (pp2_vpp2 above) the numbers are exact."""
    trapped, ref = runs["pp2_vpp2_batch_p2p"]["losses"], runs["single"]["losses"]
    assert max(abs(trapped[s] - ref[s]) / ref[s] for s in ref) > 1e-4


@pytest.mark.parametrize("mode", ["recompute_full", "recompute_selective"])
def test_recomputation_happens_and_changes_nothing(runs, mode):
    """Selective recomputation runs core attention again in the backward pass, full
    recomputation the whole layer: each training forward (steps x 4 microbatches x 4 layers)
    once more; the numbers stay the same."""
    assert_same(runs[mode], runs["single"])
    once, again = runs["single"]["forward_calls"], runs[mode]["forward_calls"]
    training_forwards = STEPS * 4 * 4
    assert again["attention"] - once["attention"] == training_forwards
    assert again["mlp"] - once["mlp"] == (training_forwards if mode == "recompute_full" else 0)


@pytest.mark.parametrize("resumed", ["tp1_from_tp2_pp2", "pp2_from_tp2_pp2", "tp2_from_single",
                                     "dp1_distopt_from_dp2", "pp2_distopt_from_dp2_full"])
def test_checkpoint_resumes_at_another_layout(runs, resumed):
    """Step 4 after resuming: its loss checks the resharded weights, the step-4 validation loss
    (after the update) checks the resharded optimizer state."""
    assert_same(runs[resumed], runs["single"], steps=[STEPS])


def test_unloadable_optimizer_state_is_refused_and_load_optim_false_works(runs, plan):
    """A regular optimizer's state cannot become a distributed optimizer's: one line says so and
    names the way out; with it, the weights resume exactly (same step-4 loss), fresh optimizer."""
    _, _, resuming = plan
    with pytest.raises(CheckpointError, match="distributed_optimizer=false.*load_optim=false"):
        train(recipe_from_dict(resuming({"distributed_optimizer": True}, "ck_tp2_pp2")))
    assert_same(runs["weights_only_from_tp2_pp2"], runs["single"], steps=[STEPS], valid=False)


def test_bf16_with_fp32_main_params_tracks_fp32(runs):
    """bf16 ran (its losses differ from fp32 far beyond the 1e-6 the fp32 layouts agree to)
    and tracks fp32 to 1e-2."""
    bf16, fp32 = runs["bf16"]["losses"], runs["single"]["losses"]
    assert sorted(bf16) == sorted(fp32)
    rel = [abs(bf16[s] - fp32[s]) / fp32[s] for s in fp32]
    assert max(rel) > 1e-4 and max(rel) < 1e-2, rel

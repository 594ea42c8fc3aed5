"""Reading runs (engine.analyze.runs): the layouts, the learning rates from a recipe or from
the logged train/lr, tokens by step, the earlier stages' schedules, and the errors."""

import pytest

from engine.analyze.loss_law import join_areas, lr_areas
from engine.analyze.runs import history, mixture_ratio, open_run, stage_lrs, tokens_at
from engine.config.errors import ConfigError
from engine.config.recipe import ScheduleConfig
from engine.train.schedule import lr_at

LINEAR = ScheduleConfig(style="linear", warmup_steps=10, min_lr=1e-4)


def _lr(i: int) -> float:
    return lr_at(i, LINEAR, peak_lr=1e-3, total_steps=100)


def test_a_bare_tensorboard_dir_uses_the_logged_learning_rates(tmp_path, run_files):
    # logged every 10 steps (train/lr at step t is the LR of update t, lr_at(t - 1)); a linear
    # warmup and decay with kinks at logged steps: interpolation is exact
    logged = [(t, _lr(t - 1)) for t in range(10, 101, 10)]
    run_files.events(tmp_path, {"train/lr": logged, "valid/general/loss": [(0, 3.0)],
                                "tokens/total": [(10, 2560.0), (20, 5120.0)]})
    run = open_run(tmp_path)
    assert run.recipe is None and run.tensorboard == tmp_path
    got = stage_lrs(run, 100)
    want = [_lr(i) for i in range(100)]
    # from step 10 on, exact; before the first log, the first logged value is held
    assert got[9:] == pytest.approx(want[9:], rel=1e-6)
    assert got[:9] == pytest.approx([want[9]] * 9, rel=1e-6)
    assert tokens_at(run, [0, 5, 20, 30]).tolist() == pytest.approx([0, 1280, 5120, 7680])
    with pytest.raises(ConfigError, match="RATIO=DIR"):
        mixture_ratio(run)


def test_a_stage_dir_uses_the_recipe_schedule(tmp_path, run_files):
    stage = tmp_path / "cpt"
    stage.mkdir()
    run_files.recipe(stage / "recipe.yaml", {
        "train.steps": 100, "train.schedule": {"style": "linear", "warmup_steps": 10,
                                               "min_lr": 1e-4}, "optim.lr": 1e-3,
        "data.replay": {"blend": [{"path": "g", "weight": 1.0}], "fraction": 0.25}})
    run_files.events(stage / "tensorboard", {"valid/general/loss": [(0, 3.0), (10, 2.9)],
                                             "train/lr": [(100, 123.0)]})  # not used
    run = open_run(stage)
    assert run.tensorboard == stage / "tensorboard"
    assert stage_lrs(run, 100) == [_lr(i) for i in range(100)]
    assert mixture_ratio(run) == 0.75


def test_the_earlier_stage_is_found_through_checkpoint_pretrained(tmp_path, run_files):
    pt = tmp_path / "pt"
    pt.mkdir()
    pt_recipe = run_files.recipe(pt / "recipe.yaml", {
        "train.steps": 300, "train.schedule": {"style": "cosine", "warmup_steps": 20,
                                               "min_lr": 1e-4},
        "optim.lr": 2e-3, "logging.tensorboard_dir": str(pt / "tensorboard")})
    run_files.events(pt / "tensorboard", {"valid/general/loss": [(100, 3.0), (300, 2.5)]})
    run_files.checkpoint(pt / "checkpoints", 300, pt_recipe, [])
    cpt = tmp_path / "cpt"
    cpt.mkdir()
    cpt_recipe = run_files.recipe(cpt / "recipe.yaml", {
        "checkpoint.pretrained": str(pt / "checkpoints"), "train.steps": 50})
    run_files.checkpoint(cpt / "checkpoints", 50, cpt_recipe, [300])
    run_files.events(cpt / "tensorboard", {"valid/general/loss": [(0, 2.5)]})
    hist = history(open_run(cpt))
    pt_lrs = [lr_at(i, ScheduleConfig(style="cosine", warmup_steps=20, min_lr=1e-4),
                    peak_lr=2e-3, total_steps=300) for i in range(300)]
    s1, s2 = lr_areas(pt_lrs)
    assert hist.pt.s1 == pytest.approx(float(s1[-1])) and hist.pt.s2 == pytest.approx(
        float(s2[-1]))
    assert hist.final_lr == pt_lrs[-1]
    assert hist.earlier is not None and hist.earlier.series("valid/general/loss")[-1][0] == 300
    # a stage history with more steps than the chain explains: S1_pt unknown, not wrong
    (cpt / "checkpoints" / "iter_0000050" / "train_state.json").write_text(
        (cpt / "checkpoints" / "iter_0000050" / "train_state.json").read_text()
        .replace('"steps": 300', '"steps": 400'))
    assert history(open_run(cpt)).pt.s1 is None


def _record(lrs: list[float]) -> dict:
    from engine.train.lr_record import advance_record

    record = {}
    for lr in lrs:
        record = advance_record(record, lr)
    return record


def test_the_stage_history_records_beat_the_schedules(tmp_path, run_files):
    """Recorded learning rates (what the updates used) give S1_pt, S2_pt and the last LR, even
    where the recipes are gone or say otherwise; the chain still finds the earlier run."""
    pt = tmp_path / "pt"
    pt.mkdir()
    pt_recipe = run_files.recipe(pt / "recipe.yaml", {
        "train.steps": 300, "optim.lr": 2e-3, "logging.tensorboard_dir": str(pt / "tb")})
    run_files.events(pt / "tb", {"valid/general/loss": [(100, 3.0), (300, 2.5)]})
    run_files.checkpoint(pt / "checkpoints", 300, pt_recipe, [])
    used = [1e-3 * (1 - i / 400) for i in range(300)]  # not the recipe's cosine: overridden
    cpt = tmp_path / "cpt"
    cpt.mkdir()
    cpt_recipe = run_files.recipe(cpt / "recipe.yaml", {
        "checkpoint.pretrained": str(pt / "checkpoints"), "train.steps": 50})
    run_files.checkpoint(cpt / "checkpoints", 50, cpt_recipe, [300], records=[_record(used)])
    run_files.events(cpt / "tensorboard", {"valid/general/loss": [(0, 2.5)]})
    hist = history(open_run(cpt))
    s1, s2 = lr_areas(used)
    assert hist.pt.s1 == pytest.approx(float(s1[-1]), rel=1e-12)
    assert hist.pt.s2 == pytest.approx(float(s2[-1]), rel=1e-9)
    assert hist.final_lr == used[-1]
    assert hist.earlier is not None and len(hist.earlier_lrs) == 300
    # two recorded stages, no recipes to follow: joined, and no earlier run to join the fit
    records = [_record(used), _record([5e-4] * 20)]
    run_files.checkpoint(tmp_path / "alone", 10, cpt_recipe.with_name("recipe.yaml"), [300, 20],
                         records=records)
    (tmp_path / "alone" / "iter_0000010" / "recipe.yaml").write_text(
        (cpt / "recipe.yaml").read_text().replace(str(pt / "checkpoints"), "gone"))
    run_files.events(tmp_path / "alone" / "tensorboard", {"valid/general/loss": [(0, 2.5)]})
    hist = history(open_run(tmp_path / "alone"))
    assert hist.pt.s2 == pytest.approx(join_areas(records).s2) and hist.earlier is None
    # an incomplete record (written before records existed, then resumed): rebuilt instead
    run_files.checkpoint(tmp_path / "old", 10, cpt_recipe, [300], records=[_record(used[:5])])
    run_files.events(tmp_path / "old" / "tensorboard", {"valid/general/loss": [(0, 2.5)]})
    rebuilt = history(open_run(tmp_path / "old"))
    assert rebuilt.pt.s1 != pytest.approx(float(s1[-1]))  # the recipe's cosine, not `used`


def test_every_step_logged_lr_beats_a_changed_schedule(tmp_path, run_files):
    stage = tmp_path / "cpt"
    stage.mkdir()
    run_files.recipe(stage / "recipe.yaml", {
        "train.steps": 100, "train.schedule": {"style": "linear", "warmup_steps": 10,
                                               "min_lr": 1e-4}, "optim.lr": 1e-3})
    same = [(t, _lr(t - 1)) for t in range(1, 101)]
    run_files.events(stage / "tensorboard", {"train/lr": same})
    assert stage_lrs(open_run(stage), 100) == [_lr(i) for i in range(100)]  # float64, exact
    changed = [(t, v if t <= 50 else 2e-4) for t, v in same]  # override_schedule at step 50
    run_files.events(tmp_path / "b" / "tensorboard", {"train/lr": changed})
    (tmp_path / "b" / "recipe.yaml").write_text((stage / "recipe.yaml").read_text())
    got = stage_lrs(open_run(tmp_path / "b"), 100)
    assert got[60] == pytest.approx(2e-4, rel=1e-6) and got[10] == pytest.approx(_lr(10),
                                                                                 rel=1e-6)


def test_errors_name_the_run(tmp_path, run_files):
    with pytest.raises(ConfigError, match="not a directory"):
        open_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no TensorBoard events"):
        open_run(tmp_path / "empty")
    run_files.events(tmp_path / "tb", {"valid/general/loss": [(0, 3.0)],
                                       "valid/domain/loss": [(0, 4.0)]})
    with pytest.raises(ConfigError) as e:
        open_run(tmp_path / "tb").valid("code")
    assert str(tmp_path / "tb") in str(e.value) and "(it has: domain, general)" in str(e.value)
    assert "\n" not in str(e.value)

"""`engine analyze predict | gap | cmr` through engine.cli.main on runs written to disk with
real TensorBoard event files: the JSON, the PNGs, the tables, and the one-line errors. The
accuracy of the fits is proven in test_loss_law and test_cmr; here the wiring: that the
commands read the right series, follow the stage chain and write what they claim."""

import json

import pytest
import torch

from engine.analyze.cmr import PowerLaw
from engine.analyze.loss_law import LawParams, PretrainAreas, cpt_loss, lr_areas
from engine.cli import main
from engine.config.recipe import ScheduleConfig
from engine.train.schedule import lr_at

SIGMA = 0.002
TOKENS_PER_STEP = 8 * 256  # configs/tiny-cpu.yaml: global_batch_size x seq_length
PT_SCHEDULE = {"style": "cosine", "warmup_steps": 50, "min_lr": 3e-5}
CPT_SCHEDULE = {"style": "cosine", "warmup_steps": 20, "warmup_init_lr": 3e-5, "min_lr": 3e-5}
LAWS = {"general": LawParams(l0=2.0, a=0.3, alpha=0.5, c1=0.4, c2=0.3, b=0.2, e=100.0,
                             beta=1.0),
        "domain": LawParams(l0=2.5, a=0.3, alpha=0.5, c1=0.4, c2=0.3, b=-0.6, e=100.0,
                            beta=1.0)}


def _lrs(schedule: dict, steps: int) -> list[float]:
    return [lr_at(i, ScheduleConfig(**schedule), peak_lr=3e-4, total_steps=steps)
            for i in range(steps)]


@pytest.fixture
def stages(tmp_path, run_files):
    """A pretraining stage (2000 steps) and a CPT stage started from it (1000 steps), laid
    out as engine.pipeline does, with curves from the CPT law plus noise."""
    gen = torch.Generator().manual_seed(0)
    noise = lambda n: SIGMA * torch.randn(n, generator=gen, dtype=torch.float64)  # noqa: E731
    pt, cpt = tmp_path / "pt", tmp_path / "cpt"
    pt_lrs, cpt_lrs = _lrs(PT_SCHEDULE, 2000), _lrs(CPT_SCHEDULE, 1000)
    s1, s2 = lr_areas(pt_lrs)
    area = PretrainAreas(s1=float(s1[-1]), s2=float(s2[-1]))
    pt.mkdir()
    recipe = run_files.recipe(pt / "recipe.yaml", {
        "train.steps": 2000, "train.schedule": PT_SCHEDULE, "optim.lr": 3e-4,
        "logging.tensorboard_dir": str(pt / "tensorboard")})
    steps = torch.arange(100, 2001, 50)
    run_files.events(pt / "tensorboard", {
        f"valid/{name}/loss": list(zip(steps.tolist(), (
            p.l0 + p.a * s1[steps] ** -p.alpha - p.c1 * s2[steps] + noise(len(steps))).tolist()))
        for name, p in LAWS.items()})
    run_files.checkpoint(pt / "checkpoints", 2000, recipe, [])
    cpt.mkdir()
    recipe = run_files.recipe(cpt / "recipe.yaml", {
        "train.steps": 1000, "train.schedule": CPT_SCHEDULE, "optim.lr": 3e-4,
        "checkpoint.pretrained": str(pt / "checkpoints"),
        "data.replay": {"blend": [{"path": "g", "weight": 1.0}], "fraction": 0.25}})
    c1, c2 = lr_areas(cpt_lrs, lr_before=pt_lrs[-1])
    steps = torch.arange(0, 1001, 10)
    scalars = {f"valid/{name}/loss": list(zip(steps.tolist(), (
        cpt_loss(p, area, c1[steps], c2[steps]) + noise(len(steps))).tolist()))
        for name, p in LAWS.items()}
    scalars["tokens/total"] = [(s, s * TOKENS_PER_STEP) for s in range(10, 1001, 10)]
    scalars["tasks/probe/acc"] = [(0, 0.5), (100, 0.3), (200, 0.45), (300, 0.52), (400, 0.55)]
    run_files.events(cpt / "tensorboard", scalars)
    run_files.checkpoint(cpt / "checkpoints", 1000, recipe, [2000])
    return {"pt": pt, "cpt": cpt, "s1_pt": area.s1}


def test_predict_fits_the_start_with_the_pretraining_curve(stages, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "predict", str(stages["cpt"]), "--fit-fraction", "0.2",
                 "--replicates", "10", "--out", str(out)]) == 0
    report = json.loads((out / "predict.json").read_text())
    rows = {r["valid"]: r for r in report["rows"]}
    assert sorted(rows) == ["domain", "general"]
    for name, row in rows.items():
        assert row["fitted_upto_step"] == 200 and row["with_pretrain_curve"]
        assert row["s1_pt"] == pytest.approx(stages["s1_pt"]) and not row["s1_pt_fitted"]
        end = row["end"]
        assert end["step"] == 1000 and end["truth"] == pytest.approx(row["curve"]["truth"][-1])
        assert end["error"] == pytest.approx(end["prediction"] - end["truth"])
        assert end["band"][0] <= end["prediction"] <= end["band"][1]
        assert row["heldout"]["points"] == 80
        assert (out / f"predict_{name}.png").stat().st_size > 0
    # the sign of the distribution shift is the data's: general up (B > 0), domain down
    assert rows["general"]["params"]["b"] > 0 > rows["domain"]["params"]["b"]
    printed = capsys.readouterr().out
    assert "general" in printed and "domain" in printed and "note:" not in printed


def test_gap_summarizes_every_series(stages, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "gap", str(stages["cpt"]), "--out", str(out)]) == 0
    rows = {r["series"]: r for r in json.loads((out / "gap.json").read_text())["rows"]}
    assert sorted(rows) == ["tasks/probe/acc", "valid/domain/loss", "valid/general/loss"]
    acc = rows["tasks/probe/acc"]  # 0.5 before, 0.3 at step 100, back above 0.5 at 300
    assert (acc["worst_step"], acc["regained_step"]) == (100, 300)
    assert acc["gap"] == pytest.approx(0.2, abs=1e-6) and acc["higher_is_better"]
    general = rows["valid/general/loss"]  # re-warming and the shift raise it: a gap
    assert general["gap"] > 0 and general["worst_step"] > 0
    assert "at step 300" in capsys.readouterr().out


def _sweep_run(path, run_files, ratio: float, gen) -> None:
    """ΔL_general(T_end) = 0.08·R, ΔL_domain(T_end) = −0.3·R, 50 evaluations."""
    steps = list(range(0, 1001, 20))
    t = torch.tensor(steps, dtype=torch.float64) * TOKENS_PER_STEP
    scale = 1000 * TOKENS_PER_STEP
    general = PowerLaw(coef=(-0.01, 0.04 * ratio), exponents=(-0.5, 0.5),
                       offset=0.01 + 0.04 * ratio, scale=scale)
    domain = PowerLaw(coef=(0.1,), exponents=(-0.4,), offset=-0.1 - 0.3 * ratio, scale=scale)
    scalars = {}
    for name, base, law in (("general", 2.0, general), ("domain", 3.0, domain)):
        values = base + law(t.clamp_min(1.0)) + SIGMA * torch.randn(len(t), generator=gen)
        values[0] = base
        scalars[f"valid/{name}/loss"] = list(zip(steps, values.tolist()))
    scalars["tokens/total"] = [(s, s * TOKENS_PER_STEP) for s in steps[1:]]
    run_files.events(path, scalars)


def test_cmr_over_a_sweep(tmp_path, run_files, capsys):
    gen = torch.Generator().manual_seed(1)
    for r in (0.25, 0.5):
        _sweep_run(tmp_path / f"r{r}", run_files, r, gen)
    stage = tmp_path / "r75"  # the ratio from its recipe: 1 - replay fraction 0.25
    stage.mkdir()
    run_files.recipe(stage / "recipe.yaml", {
        "data.replay": {"blend": [{"path": "g", "weight": 1.0}], "fraction": 0.25}})
    _sweep_run(stage / "tensorboard", run_files, 0.75, gen)
    out = tmp_path / "out"
    argv = ["analyze", "cmr", f"0.25={tmp_path / 'r0.25'}", f"1/2={tmp_path / 'r0.5'}",
            str(stage), "--domain", "domain", "--general", "general", "--replicates", "20",
            "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "cmr.json").read_text())
    assert [r["ratio"] for r in report["runs"]] == [0.25, 0.5, 0.75]
    assert report["tokens_end"] == 1000 * TOKENS_PER_STEP
    # 0.08·R crosses ε = 0.05 at R = 0.625: 0.5 is the critical ratio, 0.75 infeasible
    assert report["critical_ratio"] == 0.5 and 0.5 < report["interpolated"] < 0.75
    assert [r["feasible"] for r in report["runs"]] == [True, True, False]
    assert (out / "cmr.png").stat().st_size > 0
    assert "critical ratio 0.5000" in capsys.readouterr().out


def test_errors_are_one_line_naming_the_input(stages, tmp_path, capsys):
    rc = main(["analyze", "predict", str(stages["cpt"]), "--valid", "code", "--out",
               str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert err.startswith("error: ") and str(stages["cpt"]) in err
    assert "(it has: domain, general)" in err
    # the CMR sweep needs the loss before the stage (a step-0 evaluation)
    pt = stages["pt"]
    rc = main(["analyze", "cmr", f"0.5={pt}", "--domain", "domain", "--general", "general",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no value at step 0" in err and str(pt) in err
    assert main(["analyze", "predict", str(stages["cpt"]), "--fit-fraction", "1.5",
                 "--out", str(tmp_path)]) == 2
    assert "--fit-fraction" in capsys.readouterr().err
    assert main(["analyze", "nope"]) == 2

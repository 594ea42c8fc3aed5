"""A miniature of configs/pipelines/growth-study-tiny.yaml (`make growth-study`): the same file,
its stages for the depth growth only, a few steps each on the test corpus, run by `engine
pipeline run`. Checks the machinery the study's numbers rest on: the baseline's LR is the best
of the sweep by final validation loss and its seed repeats use it, the grown stages take that LR,
the carried-optimizer stage starts from Adam's state, best_of repeats the winning variant, and
the report's growth-study table recomputes from the TensorBoard curves."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.config.loader import load_recipe
from engine.pipeline.config import load_pipeline
from engine.pipeline.report import read_curve, tokens_to_reach
from engine.pipeline.select import final_valid_loss

pytestmark = pytest.mark.slow

FILE = Path(__file__).parents[2] / "configs/pipelines/growth-study-tiny.yaml"
KEEP = ["source", "grow_stack", "deep_lr2e-3", "deep_lr4e-3", "deep_seed2",
        "stack_fresh", "stack_carried", "best_grown_seed2"]
SMALL = {"train.steps": 8, "train.eval_interval": 4, "train.eval_interval_early": 2,
         "train.eval_early_steps": 4, "train.eval_steps": 1,
         "checkpoint": {"save_interval": None, "keep_last": 1}, "logging.log_interval": 4}


def miniature(tmp_path, make_recipe, tiny_data) -> Path:
    pipe = yaml.safe_load(FILE.read_text())
    base = make_recipe()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    pipe["out"], pipe["recipe"] = str(tmp_path / "run"), str(tmp_path / "base.yaml")
    o = pipe["overrides"]
    o["data.blend"] = [{"path": tiny_data["train"], "weight": 1.0}]
    o["data.valid"] = {"general": tiny_data["valid"], "domain": tiny_data["valid"]}
    o["train"].update(micro_batch_size=2)
    o["train.schedule"].update(warmup_steps=2, wsd_decay_steps=2)
    o.update(SMALL)
    stages = [s for s in pipe["stages"] if s["name"] in KEEP]
    for s in stages:
        for key in ("best_of", "lr_from"):
            if key in s:
                s[key] = [n for n in s[key] if n in KEEP]
        if s["name"] == "source":
            s["overrides"]["train.schedule"].update(warmup_steps=2)
    pipe["stages"] = stages
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


def test_growth_study_miniature(tmp_path, make_recipe, tiny_data):
    path = miniature(tmp_path, make_recipe, tiny_data)
    run = subprocess.run([sys.executable, "-m", "engine", "pipeline", "run", str(path)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    pipe = load_pipeline(path)
    out = Path(pipe.out)
    recipe = {n: load_recipe(out / n / "recipe.yaml") for n in KEEP if n != "grow_stack"}

    lrs = ["deep_lr2e-3", "deep_lr4e-3"]
    chosen = min(lrs, key=lambda n: final_valid_loss(pipe, n))
    assert recipe["deep_seed2"].optim.lr == recipe[chosen].optim.lr
    assert recipe["deep_seed2"].train.seed == 2 and recipe[chosen].train.seed != 2
    assert recipe["deep_seed2"].checkpoint.pretrained is None  # random init, like its pick
    for n in ("stack_fresh", "stack_carried"):
        assert recipe[n].optim.lr == recipe[chosen].optim.lr
        assert recipe[n].model.num_layers == 8 and recipe[n].checkpoint.pretrained
    assert recipe["stack_carried"].checkpoint.pretrained_optim
    assert "optimizer state from" in (out / "stack_carried" / "log.txt").read_text()
    assert "optimizer state from" not in (out / "stack_fresh" / "log.txt").read_text()
    grown = json.loads((out / "grow_stack" / "model" / "report.json").read_text())
    assert grown["optimizer"]["adam_step"] == 8 and grown["growth"]["depth"]["g_stack"] == 4

    best = min(["stack_fresh", "stack_carried"], key=lambda n: final_valid_loss(pipe, n))
    assert recipe["best_grown_seed2"].checkpoint.pretrained_optim == \
        recipe[best].checkpoint.pretrained_optim and recipe["best_grown_seed2"].train.seed == 2

    report = json.loads((out / "report.json").read_text())["growth_study"]
    assert {(t["stage"], t["chosen"]) for t in report["lr"]} == \
        {(n, n == chosen) for n in lrs}
    rows = {(r["variant"], r["valid_set"]): r for r in report["rows"]}
    assert set(rows) == {(v, s) for v in ("stack_fresh", "stack_carried")
                         for s in ("general", "domain")}
    assert rows[best, "general"]["runs"] == 2 and rows[best, "general"]["baseline_runs"] == 2
    curves = {n: read_curve(pipe, pipe.stage(n)) for n in KEEP if n != "grow_stack"}
    for (variant, valid), r in rows.items():
        finals = [curves[n].valid[valid][-1][1] for n in (chosen, "deep_seed2")]
        assert r["target_loss"] == pytest.approx(sum(finals) / 2, rel=1e-12)
        if variant != best:  # one run: its tokens to reach, over the baseline's tokens
            c = curves[variant]
            t = tokens_to_reach(c.valid[valid], r["target_loss"], c.tokens_per_step)
            expect = None if t is None else t / curves[chosen].tokens
            assert r["tokens_after_growth"] == (None if expect is None else
                                                pytest.approx(expect, rel=1e-12))
            source = curves["source"]
            if t is not None:
                assert r["total_tokens"] == pytest.approx(
                    (source.tokens + t) / curves[chosen].tokens, rel=1e-12)
                assert r["total_flops"] == pytest.approx(
                    (source.tokens * source.flops_per_token + t * c.flops_per_token) /
                    (curves[chosen].tokens * curves[chosen].flops_per_token), rel=1e-12)
    md = (out / "report.md").read_text()
    assert "## Growth study" in md and (out / "growth_study.png").stat().st_size > 10_000

"""`engine pipeline run` end to end at micro size: every stage kind, skipping what is done,
continuing after an interruption, the report with its continuity and baseline tables."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from engine.pipeline.config import load_pipeline
from engine.pipeline.report import growth_steps, read_curve, read_scalars, step0_continuity
from engine.pipeline.stages import done

pytestmark = pytest.mark.slow


def _pipeline(tmp_path, make_recipe, tiny_data) -> str:
    from engine.eval.tasks import NextLineSpec, next_line_docs, write_task

    texts = [json.loads(line)["text"] for line in open(tiny_data["dir"] / "code-valid.jsonl")]
    spec = NextLineSpec(samples=8, seed=1)
    write_task("micro_next_line", tmp_path / "tasks", next_line_docs(texts, spec), spec,
               source="code-valid")
    base = make_recipe(train={"eval_interval": 2, "eval_steps": 1},
                       checkpoint={"save_interval": 1})
    base["eval"] = {"tasks": ["micro_next_line"], "include_path": str(tmp_path / "tasks")}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    cpt = {"train.steps": 4, "optim.lr": 1e-3, "train.eval_interval_early": 1,
           "train.eval_early_steps": 2}  # evaluates step 0: continuity on the valid sets
    pipe = {
        "name": "micro", "out": str(tmp_path / "run"), "recipe": str(tmp_path / "base.yaml"),
        "overrides": {"model": {"num_layers": 2}, "train": {"steps": 4}},
        "stages": [
            {"name": "pretrain", "kind": "train"},
            {"name": "grow", "kind": "scale_up", "source": "pretrain",
             "args": {"hidden_size": 96, "ffn_hidden_size": 192, "num_attention_heads": 6,
                      "num_query_groups": 2, "num_layers": 4, "width_method": "exact",
                      "depth_method": "identity"}},
            {"name": "cpt", "kind": "train", "source": "grow", "overrides": cpt},
            {"name": "cpt_random", "kind": "train", "source": "grow", "init": "random",
             "baseline_for": "cpt", "overrides": cpt},
            {"name": "moe", "kind": "scale_out", "source": "cpt",
             "args": {"num_experts": 4, "topk": 2, "aux_loss_coeff": 0.0}},
            {"name": "cpt_moe", "kind": "train", "source": "moe",
             "overrides": {**cpt, "train.steps": 2}},
            {"name": "hf", "kind": "export", "source": "cpt_moe",
             "args": {"dtype": "fp32", "seq": 32}},
        ],
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return str(path)


def _run(path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "engine", "pipeline", "run", path, *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=900)


def test_pipeline_runs_resumes_and_reports(tmp_path, make_recipe, tiny_data):
    path = _pipeline(tmp_path, make_recipe, tiny_data)
    pipe = load_pipeline(path)
    # interrupted: a stop request ends the first stage after one step, with a checkpoint
    stop = tmp_path / "STOP"
    stop.touch()
    first = _run(path, env={"ENGINE_STOP_FILE": str(stop)})
    assert first.returncode == 1, first.stdout[-2000:] + first.stderr[-2000:]
    assert "stage pretrain stopped before its end" in first.stderr
    assert not done(pipe, pipe.stage("pretrain"))
    stop.unlink()

    second = _run(path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert all(done(pipe, s) for s in pipe.stages)
    assert "resum" in (tmp_path / "run" / "pretrain" / "log.txt").read_text().lower()
    steps = [s for s, _ in read_scalars(tmp_path / "run" / "pretrain" / "tensorboard")
             ["train/loss"]]
    assert steps == [1, 2, 3, 4]  # one curve: the resumed run continued the first one

    # the MoE's checkpoint knows every stage its weights went through, across both growths
    from engine.checkpoint.io import find_checkpoint, read_train_state

    history = read_train_state(find_checkpoint(tmp_path / "run" / "cpt_moe" / "checkpoints"))
    assert [s["stage"] for s in history.earlier_stages] == ["pretrain", "cpt"]
    assert history.stage == "cpt_moe"

    # continuity: exact Scale-Up and coarse Scale-Out keep the loss on the same tokens
    growth = {g["stage"]: g for g in growth_steps(pipe)}
    assert abs(growth["grow"]["change"]) < 1e-4 and abs(growth["moe"]["change"]) < 1e-4
    curves = {s.name: read_curve(pipe, s) for s in pipe.stages if s.kind == "train"}
    step0 = {r["stage"]: r for r in step0_continuity(pipe, curves)}
    assert set(step0) == {"cpt", "cpt_moe"}
    assert all(abs(r["after"] - r["before"]) < 1e-4 for r in step0.values())
    # the task probes: exact growth keeps the accuracy, and the report shows it per stage
    assert curves["cpt"].tasks["micro_next_line"][0] == \
        (0, curves["pretrain"].tasks["micro_next_line"][-1][1])

    report = (tmp_path / "run" / "report.md").read_text()
    figures = json.loads((tmp_path / "run" / "report.json").read_text())  # the same numbers
    assert {g["stage"] for g in figures["growth"]} == {"grow", "moe"}
    assert [s["stage"] for s in figures["stages"]] == [s.name for s in pipe.stages]
    assert "| cpt | cpt_random (random init) | code |" in report
    assert "acc micro_next_line" in report
    stages = {s["stage"]: s for s in figures["stages"]}
    assert stages["cpt"]["task_acc"]["micro_next_line"] == \
        curves["cpt"].tasks["micro_next_line"][-1][1]
    # the stability gap of each stage from earlier weights, per valid set and probe
    gaps = {(g["stage"], g["kind"], g["name"]): g for g in figures["stability_gap"]}
    assert {("cpt", "valid", "code"), ("cpt", "task", "micro_next_line"),
            ("cpt_moe", "valid", "code")} <= set(gaps)
    code = curves["cpt"].valid["code"]
    assert gaps["cpt", "valid", "code"]["before"] == code[0][1]
    assert gaps["cpt", "valid", "code"]["worst"] == max(v for st, v in code if st > 0)
    assert "## Stability gap" in report
    for png in ("loss_all_stages.png", "tasks_all_stages.png", "growth_step0.png",
                "baselines_cpt.png"):
        assert (tmp_path / "run" / png).stat().st_size > 10_000
    assert "hf" in report and (tmp_path / "run" / "hf" / "verify.json").is_file()

    third = _run(path)  # everything done: nothing runs again
    assert third.returncode == 0
    assert third.stderr.count("done, skipped") == len(pipe.stages)

    # an export whose verification fails is not done: the run exits non-zero, a rerun retries
    data = yaml.safe_load(open(path))
    data["stages"][-1]["args"]["rtol"] = 1e-12  # no fp32 comparison meets this
    (tmp_path / "run" / "hf" / "verify.json").unlink()
    yaml.safe_dump(data, open(path, "w"), sort_keys=False)
    failing = _run(path)
    assert failing.returncode == 1 and "stage hf failed (exit code 1)" in failing.stderr
    assert not done(load_pipeline(path), pipe.stage("hf"))
    assert '"ok": false' in (tmp_path / "run" / "hf" / "verify.json").read_text()
    del data["stages"][-1]["args"]["rtol"]
    yaml.safe_dump(data, open(path, "w"), sort_keys=False)
    fixed = _run(path)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert done(load_pipeline(path), pipe.stage("hf"))
    assert "removing" in fixed.stderr and fixed.stderr.count("done, skipped") == \
        len(pipe.stages) - 1

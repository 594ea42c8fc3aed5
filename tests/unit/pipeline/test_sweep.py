"""The sweep stage kind (engine.pipeline.sweep): its checks in one line each, its members
(names, overrides, fractions), the evaluation count a member needs, and Slurm submission as one
independent job per member waiting only for the sweep's source."""

import shlex

import pytest
import yaml

from engine.config.errors import ConfigError
from engine.config.loader import recipe_from_dict
from engine.pipeline.cli import submit
from engine.pipeline.config import pipeline_from_dict
from engine.pipeline.sweep import (
    MIN_EVALUATIONS,
    check_member_recipe,
    evaluations,
    member,
    members,
)

SWEEP = {"name": "ratios", "kind": "sweep", "source": "pre",
         "overrides": {"train.steps": 100},
         "sweep": {"key": "data.replay.fraction", "values": [0.125, "1/3", 0.5]}}


def pipe(**changes):
    stage = {**SWEEP, **changes}
    return pipeline_from_dict({"name": "p", "out": "runs/p", "recipe": "r.yaml", "stages": [
        {"name": "pre", "kind": "train"}, stage]}, "p.yaml")


def test_members_are_train_stages_with_the_value():
    p = pipe()
    ms = members(p.stage("ratios"))
    assert [m.name for m in ms] == ["ratios/fraction-0.125", "ratios/fraction-1_3",
                                    "ratios/fraction-0.5"]
    assert all(m.kind == "train" and m.source == "pre" and not m.sweep for m in ms)
    assert ms[1].overrides == {"train.steps": 100, "data.replay.fraction": 1 / 3}
    assert str(p.stage_dir(ms[0].name)) == "runs/p/ratios/fraction-0.125"
    assert member(p, "ratios/fraction-0.5") == ms[2] and member(p, "pre").name == "pre"
    with pytest.raises(ConfigError, match="no sweep member 'ratios/x'"):
        member(p, "ratios/x")


@pytest.mark.parametrize("changes, message", [
    ({"sweep": {"key": "train.steps", "values": [10, 20]}}, "changes the tokens"),
    ({"sweep": {"key": "optim.lr", "values": [1e-3]}}, "at least two values"),
    ({"sweep": {"key": "optim.lr", "values": [1e-3, 1e-3]}}, "distinct values"),
    ({"sweep": {"key": "optim.lr"}}, "expected {key: a.recipe.key, values: [...]}"),
    ({"sweep": {"key": "optim.lr", "values": [1, 2]}, "overrides": {"optim.lr": 1}},
     "optim.lr is both swept and in overrides"),
    ({"kind": "train"}, "only a sweep stage has one"),
    ({"args": {"x": 1}}, "take `overrides`, not `args`"),
])
def test_bad_sweeps_fail_in_one_line(changes, message):
    with pytest.raises(ConfigError) as e:
        pipe(**changes)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_sweep_is_no_source():
    with pytest.raises(ConfigError, match=r"'ratios' is a sweep stage \(no single checkpoint"):
        pipeline_from_dict({"name": "p", "out": "o", "recipe": "r.yaml", "stages": [
            {"name": "pre", "kind": "train"}, SWEEP,
            {"name": "next", "kind": "train", "source": "ratios"}]}, "p.yaml")


def recipe(**train):
    return recipe_from_dict({
        "model": {"num_layers": 2, "hidden_size": 8, "ffn_hidden_size": 16,
                  "num_attention_heads": 2, "vocab_size": 64},
        "data": {"blend": [{"path": "d", "weight": 1.0}], "valid": {"v": "v"}},
        "train": {"steps": 100, **train}})


def test_members_must_evaluate_from_step_0_at_enough_points():
    good = recipe(eval_interval=2, eval_interval_early=1, eval_early_steps=10)
    assert evaluations(good.train) == 56 >= MIN_EVALUATIONS
    check_member_recipe(good, "m")
    with pytest.raises(ConfigError, match=r"^m: evaluates at 21 steps .* needs >= 50"):
        check_member_recipe(recipe(eval_interval=5, eval_interval_early=5, eval_early_steps=5),
                            "m")
    with pytest.raises(ConfigError, match="set train.eval_interval_early"):
        check_member_recipe(recipe(eval_interval=1), "m")


def test_submit_makes_each_member_a_job_on_the_sources(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "out": str(tmp_path / "run"),
                                    "recipe": "r.yaml",
                                    "stages": [{"name": "pre", "kind": "train"}, SWEEP]}))
    submit(str(path), [], dry_run=True)
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert [cmd[-1] for cmd in lines] == ["pre", "ratios/fraction-0.125",
                                          "ratios/fraction-1_3", "ratios/fraction-0.5"]
    for cmd in lines[1:]:
        assert "--dependency=afterok:<pre>" in cmd  # side by side: none waits for another
        assert f"--job-name=p-{cmd[-1].replace('/', '-')}" in cmd

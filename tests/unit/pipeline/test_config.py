"""The pipeline file: its checks, and how stage overrides become a recipe."""

import pytest
import yaml

from engine.config.errors import ConfigError
from engine.config.loader import apply_overrides, recipe_from_dict
from engine.pipeline.config import load_pipeline, pipeline_from_dict
from engine.pipeline.stages import plan

BASE = {"name": "p", "out": "runs/p", "recipe": "r.yaml", "stages": [
    {"name": "pre", "kind": "train"},
    {"name": "grow", "kind": "scale_up", "source": "pre", "args": {"hidden_size": 8}},
    {"name": "cpt", "kind": "train", "source": "grow"},
    {"name": "rand", "kind": "train", "source": "grow", "init": "random", "baseline_for": "cpt"},
]}


def _with(**changes):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    stage = changes.pop("stage", None)
    if stage is not None:
        i, values = stage
        data["stages"][i].update(values)
    data.update(changes)
    return data


def test_valid_pipeline_parses():
    pipe = pipeline_from_dict(BASE, "p.yaml")
    assert [s.name for s in pipe.stages] == ["pre", "grow", "cpt", "rand"]
    assert pipe.stage("rand").baseline_for == "cpt"
    assert str(pipe.stage_dir("cpt")) == "runs/p/cpt"


@pytest.mark.parametrize("data, message", [
    (_with(stagez=[]), "unknown key 'stagez' (did you mean 'stages'?)"),
    (_with(stage=(1, {"kind": "scaleup"})), "stages[1].kind: 'scaleup' is not one of"),
    (_with(stage=(2, {"source": "later"})), "stages[2].source: 'later' is not an earlier stage"),
    (_with(stage=(1, {"source": None})), "stages[1].source: a scale_up stage needs"),
    (_with(stage=(3, {"init": "zeros"})), "stages[3].init: 'zeros' is not one of"),
    (_with(stage=(2, {"name": "pre"})), "stage 'pre' is defined twice"),
    (_with(stage=(2, {"name": "a b"})), "stages[2].name: 'a b' must be"),
    (_with(stage=(0, {"args": {"x": 1}})), "train stages take `overrides`"),
    (_with(stage=(0, {"overide": {}})), "unknown key 'overide' (did you mean 'overrides'?)"),
    (_with(stages=[]), "'stages' must be a non-empty list"),
    (_with(nproc=0), "nproc: expected a positive integer"),
    (_with(stage=(0, {"sbatch": "--nodes=2"})), "stages[0].sbatch: expected a list of sbatch"),
    (_with(stage=(0, {"sbatch": ["nodes=2"]})), "such as [--nodes=2], got ['nodes=2']"),
    # stage args are the command's options, checked on load with the recipe key names
    (_with(stage=(1, {"args": {"hidden": 8}})),
     "stages[1].args: unknown option 'hidden' (did you mean 'hidden_size'?)"),
    (_with(stage=(1, {"args": {"hidden_size": "wide"}})),
     "stages[1].args: hidden_size: expected int or null, got 'wide'"),
    (_with(stage=(1, {"args": {"width_method": "wide"}})),
     "stages[1].args: width_method: 'wide' is not one of fpi, aki, aki-pro, exact"),
    # best_of / lr_from: earlier train stages, at least two, and a best_of takes its source
    (_with(stage=(3, {"lr_from": ["cpt"]})), "stages[3].lr_from: expected a list of at least two"),
    (_with(stage=(3, {"lr_from": ["cpt", "grow"]})), "lr_from: 'grow' is not an earlier train"),
    (_with(stage=(2, {"best_of": ["pre", "rand"]})), "best_of: 'rand' is not an earlier train"),
    (_with(stage=(3, {"best_of": ["pre", "cpt"]})), "a best_of stage takes its source and init"),
    (_with(stage=(1, {"best_of": ["pre", "cpt"]})), "stages[1].best_of: for train stages only"),
    (_with(stage=(3, {"best_of": ["pre", "pre"]})), "stages[3].best_of: expected a list of at"),
])
def test_bad_pipeline_is_one_line(data, message):
    with pytest.raises(ConfigError) as err:
        pipeline_from_dict(data, "p.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("p.yaml: ")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read pipeline"):
        load_pipeline(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_pipeline(tmp_path / "bad.yaml")


def test_section_mapping_overrides_merge_key_by_key():
    base = {"model": {"num_layers": 2, "hidden_size": 8, "ffn_hidden_size": 16,
                      "num_attention_heads": 2},
            "data": {"blend": [{"path": "a"}], "seq_length": 16},
            "train": {"steps": 5, "micro_batch_size": 2}}
    out = apply_overrides(base, {"train": {"steps": 9}, "optim.lr": 0.5,
                                 "data.valid": {"general": "g", "domain": "d"}})
    r = recipe_from_dict(out)
    assert (r.train.steps, r.train.micro_batch_size, r.optim.lr) == (9, 2, 0.5)
    assert [(v.name, v.path) for v in r.data.valid] == [("general", "g"), ("domain", "d")]
    assert base["train"]["steps"] == 5  # a copy
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'.*'train.steps'"):
        apply_overrides(base, {"train": {"stpes": 9}})


def test_upcycle_and_export_commands(tmp_path):
    """The commands are built from the options: the same flags a user types."""
    pipe = pipeline_from_dict(_with(out=str(tmp_path), stages=BASE["stages"] + [
        {"name": "hf", "kind": "export", "source": "cpt", "args": {"dtype": "fp32", "rtol": 1e-4}},
    ]), "p.yaml")
    (cmd,) = plan(pipe, pipe.stage("grow")).commands
    assert cmd[-7:] == ("scale-up", "--ckpt", f"{tmp_path}/pre/checkpoints", "--out",
                        f"{tmp_path}/grow/model", "--hidden-size", "8")
    export, verify = plan(pipe, pipe.stage("hf")).commands
    assert export[3:5] == ("convert", "engine-to-hf") and export[-2:] == ("--dtype", "fp32")
    assert verify[3:5] == ("convert", "verify") and verify[-2:] == ("--rtol", "0.0001")
    assert f"{tmp_path}/cpt/checkpoints" in verify


def _seq_pipeline(tmp_path, recipe_train: dict, **long_stage):
    recipe = {"model": {"num_layers": 2, "hidden_size": 8, "ffn_hidden_size": 16,
                        "num_attention_heads": 2, "vocab_size": 64,
                        "max_position_embeddings": 1024},
              "data": {"synthetic": True, "seq_length": 64}, "train": recipe_train}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return pipeline_from_dict({"name": "p", "out": str(tmp_path / "out"),
                               "recipe": str(tmp_path / "r.yaml"), "stages": [
                                   {"name": "short", "kind": "train"},
                                   {"name": "long", "kind": "train", **long_stage}]}, "p.yaml")


def test_keep_batch_tokens_scales_the_global_batch_with_the_sequence(tmp_path):
    from engine.pipeline.stages import stage_recipe

    pipe = _seq_pipeline(tmp_path, {"global_batch_size": 16, "micro_batch_size": 2},
                         keep_batch_tokens=True, overrides={"data.seq_length": 256})
    short, long_ = (stage_recipe(pipe, s) for s in pipe.stages)
    assert (short.data.seq_length, short.train.global_batch_size) == (64, 16)
    assert (long_.data.seq_length, long_.train.global_batch_size) == (256, 4)
    assert long_.train.micro_batch_size == 2
    # without the flag the stage keeps the samples per step (4x the tokens)
    plain = _seq_pipeline(tmp_path, {"global_batch_size": 16},
                          overrides={"data.seq_length": 256})
    assert stage_recipe(plain, plain.stage("long")).train.global_batch_size == 16


@pytest.mark.parametrize("train, stage, message", [
    ({"global_batch_size": 16}, {"overrides": {"data.seq_length": 384}},
     "keep_batch_tokens: train.global_batch_size x data.seq_length = 16 x 64 = 1024 tokens is "
     "not a multiple of the stage's data.seq_length=384"),
    ({"global_batch_size": 16}, {"overrides": {"data.seq_length": 256,
                                               "train": {"global_batch_size": 8}}},
     "keep_batch_tokens and an override of train.global_batch_size: set one of them"),
    ({}, {"overrides": {"data.seq_length": 256}},
     "keep_batch_tokens needs train.global_batch_size in the pipeline's recipe"),
])
def test_keep_batch_tokens_errors_are_one_line(tmp_path, train, stage, message):
    from engine.pipeline.stages import stage_recipe

    pipe = _seq_pipeline(tmp_path, train, keep_batch_tokens=True, **stage)
    with pytest.raises(ConfigError) as err:
        stage_recipe(pipe, pipe.stage("long"))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_keep_batch_tokens_is_for_train_stages():
    with pytest.raises(ConfigError, match="are for train stages only"):
        pipeline_from_dict(_with(stage=(1, {"keep_batch_tokens": True})), "p.yaml")


def test_the_growth_study_pipeline_loads():
    pipe = load_pipeline("configs/pipelines/growth-study-tiny.yaml")
    assert list(pipe.stage("deep_seed2").best_of) == ["deep_lr1e-3", "deep_lr2e-3", "deep_lr4e-3"]
    assert pipe.stage("grow_exact").args["carry_optimizer"] is True


def test_the_long_context_pipeline_loads():
    from pathlib import Path

    from engine.pipeline.stages import batch_for_seq_length

    root = Path(__file__).resolve().parents[3]
    pipe = load_pipeline(root / "configs" / "pipelines" / "long-context-tiny.yaml")
    long_ = pipe.stage("long")
    assert long_.keep_batch_tokens and long_.overrides["data.seq_length"] == 1024
    assert batch_for_seq_length(8, 256, 1024, "x") == 2  # tiny-cpu's 8 x 256 tokens per step

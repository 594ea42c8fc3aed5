"""The pipeline's `vocab` stage: options checked on load, the command it runs, and the train stage
after it taking the resized model's tokenizer; a first train stage may start from an imported
model (checkpoint.pretrained); configs/pipelines/language-cpt-smollm2.yaml loads."""

from pathlib import Path

import pytest
import yaml

from engine.config.errors import ConfigError
from engine.pipeline.config import load_pipeline, pipeline_from_dict
from engine.pipeline.stages import plan, stage_recipe

ROOT = Path(__file__).resolve().parents[3]
MODEL = {"num_layers": 2, "hidden_size": 8, "ffn_hidden_size": 16, "num_attention_heads": 2,
         "vocab_size": 64}


def pipeline(tmp_path, **vocab_args):
    recipe = {"model": MODEL, "data": {"synthetic": True, "seq_length": 16},
              "tokenizer": {"type": "hf", "path": "base-tok"},
              "checkpoint": {"pretrained": "imported/model"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return pipeline_from_dict({"name": "p", "out": str(tmp_path / "out"),
                               "recipe": str(tmp_path / "r.yaml"), "stages": [
        {"name": "base", "kind": "train", "overrides": {"train.steps": 0}},
        {"name": "vocab", "kind": "vocab", "source": "base",
         "args": {"tokenizer": "new-tok", **vocab_args}},
        {"name": "cpt", "kind": "train", "source": "vocab",
         "overrides": {"train.freeze": {"steps": 5}}},
    ]}, "p.yaml")


@pytest.mark.parametrize("args, message", [
    ({"tokenizer": None}, "args: tokenizer: expected str, got None"),
    ({"init": "zeros"}, "args: init: 'zeros' is not one of subtoken-mean, mean, normal"),
    ({"tokenizr": "x"}, "unknown option 'tokenizr' (did you mean 'tokenizer'?)"),
])
def test_vocab_args_are_checked_on_load(tmp_path, args, message):
    with pytest.raises(ConfigError) as err:
        pipeline(tmp_path, **args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_vocab_stage_runs_engine_upcycle_vocab(tmp_path):
    pipe = pipeline(tmp_path, init="mean", tp=2)
    (cmd,) = plan(pipe, pipe.stage("vocab")).commands
    assert cmd[3:] == ("upcycle", "vocab", "--ckpt", f"{tmp_path}/out/base/checkpoints",
                       "--out", f"{tmp_path}/out/vocab/model", "--tp", "2", "--tokenizer",
                       "new-tok", "--init", "mean")


def test_a_first_train_stage_starts_from_the_recipes_pretrained_model(tmp_path):
    pipe = pipeline(tmp_path)
    recipe = stage_recipe(pipe, pipe.stage("base"))
    assert recipe.checkpoint.pretrained == "imported/model"
    assert recipe.checkpoint.save == f"{tmp_path}/out/base/checkpoints"


def test_the_train_stage_after_a_vocab_stage_takes_its_model_and_tokenizer(tmp_path):
    pipe = pipeline(tmp_path)
    ckpt = tmp_path / "out" / "vocab" / "model" / "iter_0000000"
    ckpt.mkdir(parents=True)
    (ckpt / "metadata.json").write_text("{}")
    (ckpt.parent / "latest_checkpointed_iteration.txt").write_text("0")
    stored = {"model": {**MODEL, "vocab_size": 80},
              "tokenizer": {"type": "hf", "path": "/abs/vocab/model/tokenizer"}}
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump(stored))
    recipe = stage_recipe(pipe, pipe.stage("cpt"))
    assert recipe.model.vocab_size == 80
    assert recipe.tokenizer.path == "/abs/vocab/model/tokenizer"
    assert recipe.checkpoint.pretrained == f"{tmp_path}/out/vocab/model"
    assert recipe.train.freeze.steps == 5


def test_the_language_cpt_pipeline_loads():
    pipe = load_pipeline(ROOT / "configs" / "pipelines" / "language-cpt-smollm2.yaml")
    kinds = [s.kind for s in pipe.stages]
    assert "vocab" in kinds and kinds[0] == "train"
    vocab = next(s for s in pipe.stages if s.kind == "vocab")
    assert vocab.args["init"] == "subtoken-mean"
    cpt = next(s for s in pipe.stages if s.source == vocab.name)
    assert cpt.overrides["train.freeze"]["steps"] > 0

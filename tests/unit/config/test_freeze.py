"""Recipe section train.freeze: documented, frozen, its own checks and the cross-section rule
against model.vocab_size, each one line; a recipe without it freezes nothing."""

import ast
import dataclasses
from pathlib import Path

import pytest

import engine.config.freeze as freeze_module
from engine.config import ConfigError, recipe_from_dict, validate
from engine.config.freeze import FreezeConfig

MODEL = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
             vocab_size=1000)


def recipe(**freeze):
    return recipe_from_dict({"model": MODEL, "data": {"synthetic": True},
                             "train": {"freeze": freeze}}, "r.yaml")


def test_every_field_is_documented_and_the_section_is_frozen():
    tree = ast.parse(Path(freeze_module.__file__).read_text())
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    documented = {stmt.target.id for stmt, nxt in zip(node.body, node.body[1:])
                  if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                  and isinstance(nxt.value, ast.Constant) and str(nxt.value.value).strip()}
    assert documented == {f.name for f in dataclasses.fields(FreezeConfig)}
    assert FreezeConfig.__dataclass_params__.frozen and hasattr(FreezeConfig, "__slots__")
    with pytest.raises(TypeError):
        FreezeConfig(5)  # keyword-only


def test_off_unless_asked_and_read_from_yaml():
    assert recipe().train.freeze == FreezeConfig(steps=0)
    r = recipe(steps=20, train="new_rows", new_rows_from=900)
    assert r.train.freeze == FreezeConfig(steps=20, train="new_rows", new_rows_from=900)
    validate(r, 1)


@pytest.mark.parametrize("freeze, message", [
    ({"steps": -1}, "train.freeze.steps: expected >= 0, got -1"),
    ({"steps": 5, "train": "layers"}, "train.freeze.train: expected one of embeddings|new_rows"),
    ({"steps": 5, "train": "new_rows"}, "train.freeze.train=new_rows and train.freeze."
                                        "new_rows_from=None: new_rows needs the first new id"),
    ({"steps": 5, "new_rows_from": 900}, "train.freeze.train=embeddings and train.freeze."
                                         "new_rows_from=900"),
    ({"steps": 5, "stpes": 1}, "unknown config key 'train.freeze.stpes'"),
])
def test_bad_section_is_one_line(freeze, message):
    with pytest.raises(ConfigError) as err:
        recipe(**freeze)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_new_rows_must_start_inside_the_vocabulary():
    with pytest.raises(ConfigError) as err:
        validate(recipe(steps=5, train="new_rows", new_rows_from=1000), 1)
    assert "train.freeze.new_rows_from=1000 must be below model.vocab_size=1000" in str(err.value)

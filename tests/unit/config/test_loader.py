"""YAML recipes, overrides, coercion, unknown-key suggestions, round trips."""

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import (
    BlendEntry,
    ConfigError,
    RopeScaling,
    ValidSet,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    validate,
)

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

BASE = """\
model:
  num_layers: 2
  hidden_size: 64
  ffn_hidden_size: 128
  num_attention_heads: 4
  vocab_size: 256
data:
  synthetic: true
train:
  steps: 10
"""


@pytest.fixture
def recipe_file(tmp_path):
    """Write YAML text to tmp/configs/x.yaml and return its path."""
    def write(text: str = BASE) -> Path:
        path = tmp_path / "configs" / "x.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return path
    return write


def _error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --- every shipped recipe ------------------------------------------------------------------------

def test_configs_exist():
    assert {"llama3-8b.yaml", "aquila-7b.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_validates_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    par = recipe.parallel
    world_size = par.tp * par.pp * par.cp * (par.dp or par.ep)
    layout = validate(recipe, world_size)
    assert layout.world_size == world_size
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
    dump_recipe(recipe, tmp_path / path.name)
    assert load_recipe(tmp_path / path.name) == recipe


def test_real_shapes():
    llama = load_recipe(ROOT / "configs" / "llama3-8b.yaml").model
    assert (llama.num_layers, llama.hidden_size, llama.ffn_hidden_size) == (32, 4096, 14336)
    assert (llama.num_attention_heads, llama.num_query_groups, llama.vocab_size) == (32, 8, 128256)
    assert llama.rotary_base == 500000.0 and not llama.share_embeddings_and_output_weights
    aquila = load_recipe(ROOT / "configs" / "aquila-7b.yaml").model
    assert (aquila.num_layers, aquila.hidden_size, aquila.ffn_hidden_size) == (32, 4096, 11008)
    assert (aquila.num_attention_heads, aquila.num_query_groups) == (32, None)
    assert aquila.vocab_size == 100008 and not aquila.share_embeddings_and_output_weights


# --- values and overrides ------------------------------------------------------------------------

def test_yaml_numbers_without_a_dot_are_floats_for_float_fields(recipe_file):
    # PyYAML (YAML 1.1) reads `3e-4` as the string '3e-4'; float fields coerce it.
    assert yaml.safe_load("lr: 3e-4") == {"lr": "3e-4"}
    path = recipe_file(BASE + "optim:\n  lr: 3e-4\n  adam_eps: 1E-8\n  weight_decay: 0\n")
    optim = load_recipe(path).optim
    assert (optim.lr, optim.adam_eps, optim.weight_decay) == (3e-4, 1e-8, 0.0)
    assert isinstance(optim.weight_decay, float)


def test_overrides_of_every_value_kind(recipe_file):
    recipe = load_recipe(recipe_file(), [
        "train.steps=20",                                   # int
        "optim.lr=3e-4",                                    # float written as a YAML 1.1 string
        "train.schedule.min_lr=1.5e-5",                     # nested section
        "parallel.sequence_parallel=false",                 # bool
        "train.global_batch_size=null",                     # Optional -> None
        "data.cache_dir=",                                  # empty value -> null
        "data.blend=[{path: data/a, weight: 1}, {path: data/b, weight: 0.5}]",  # list of mappings
        "data.valid={wiki: data/wiki, code: data/code}",    # name -> path mapping
        "model.rotary_scaling={factor: 8, original_max_position_embeddings: 4096}",
        "tokenizer.type=hf",
        "tokenizer.path=data/tok",
        "train.steps=30",                                   # later overrides win
    ])
    assert recipe.train.steps == 30 and recipe.optim.lr == 3e-4
    assert recipe.train.schedule.min_lr == 1.5e-5
    assert recipe.train.global_batch_size is None and recipe.data.cache_dir is None
    assert recipe.data.blend == (BlendEntry(path="data/a", weight=1.0),
                                 BlendEntry(path="data/b", weight=0.5))
    assert recipe.data.valid == (ValidSet(name="wiki", path="data/wiki"),
                                 ValidSet(name="code", path="data/code"))
    assert recipe.model.rotary_scaling == RopeScaling(
        factor=8.0, original_max_position_embeddings=4096)
    assert (recipe.tokenizer.type, recipe.tokenizer.path) == ("hf", "data/tok")


def test_override_into_an_absent_optional_section(recipe_file):
    recipe = load_recipe(recipe_file(), ["model.rotary_scaling.factor=4"])
    assert recipe.model.rotary_scaling == RopeScaling(factor=4.0)


def test_rope_scaling_without_a_type_is_llama3_and_other_types_load(recipe_file):
    old = load_recipe(recipe_file(), ["model.rotary_scaling={factor: 32.0}"])
    assert old.model.rotary_scaling.type == "llama3"
    yarn = load_recipe(recipe_file(), [
        "model.rotary_scaling={type: yarn, factor: 4, mscale: 1, mscale_all_dim: 0.5, "
        "truncate: false}"])
    assert yarn.model.rotary_scaling == RopeScaling(type="yarn", factor=4.0, mscale=1.0,
                                                    mscale_all_dim=0.5, truncate=False)


def test_overrides_do_not_touch_the_file(recipe_file):
    path = recipe_file()
    load_recipe(path, ["train.steps=5"])
    assert path.read_text() == BASE


def test_override_errors(recipe_file):
    path = recipe_file()
    assert _error(path, ["train.steps"]) == (
        "override 'train.steps': expected key=value, e.g. train.steps=100")
    assert _error(path, ["train.steps=[1,"]).startswith(
        "override 'train.steps=[1,': the value is not valid YAML")
    assert _error(path, ["data.blend.0.weight=2"]) == (
        f"{path}: data.blend is not a section: set it whole (data.blend=...); "
        "set by override 'data.blend.0.weight=2'")
    scalar = recipe_file(BASE + "logging: 5\n")
    assert _error(scalar, ["logging.level=debug"]) == (
        f"{scalar}: logging: expected a mapping, got 5 (int); "
        "set by override 'logging.level=debug'")


# --- unknown keys --------------------------------------------------------------------------------

def test_unknown_key_suggests_the_closest_key_anywhere(recipe_file):
    path = recipe_file(BASE.replace("  steps: 10\n", "  steps: 10\n  warmup: 5\n"))
    assert _error(path) == (
        f"{path}: unknown config key 'train.warmup' (did you mean 'train.schedule.warmup_steps'?)")
    path = recipe_file(BASE + "  lr: 3e-4\n")
    assert _error(path) == f"{path}: unknown config key 'train.lr' (did you mean 'optim.lr'?)"


def test_unknown_key_in_an_override_names_the_override(recipe_file):
    path = recipe_file()
    assert _error(path, ["train.lr=1e-3"]) == (
        f"{path}: unknown config key 'train.lr' (did you mean 'optim.lr'?); "
        "set by override 'train.lr=1e-3'")


@pytest.mark.parametrize("key, hint", [
    ("optimizer", "optim"),
    ("data2", "data"),
    ("lr", "optim.lr"),
    ("checkpoint.keep", "checkpoint.keep_last"),
    ("parallel.tensor_parallel", "parallel.tp"),
    ("parallel.tensor_model_parallel_size", "parallel.tp"),
    ("model.rope_theta", "model.rotary_base"),
    ("model.seq_length", "data.seq_length"),
    ("train.batch_size", "train.micro_batch_size"),
    ("train.iters", "train.steps"),
    ("train.bf16", "train.precision"),
])
def test_unknown_key_hints(recipe_file, key, hint):
    data = yaml.safe_load(BASE)
    *sections, leaf = key.split(".")
    node = data
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = 1
    path = recipe_file(yaml.safe_dump(data))
    assert _error(path) == f"{path}: unknown config key {key!r} (did you mean {hint!r}?)"


def test_unknown_key_inside_a_list_entry(recipe_file):
    path = recipe_file(BASE.replace("  synthetic: true\n", "  blend:\n    - {pth: a}\n"))
    assert _error(path) == (
        f"{path}: unknown config key 'data.blend[0].pth' (did you mean 'data.blend[].path'?)")


def test_unknown_key_without_a_close_match(recipe_file):
    path = recipe_file(BASE + "zzzzzzzz: 1\n")
    assert _error(path) == f"{path}: unknown config key 'zzzzzzzz'"


# --- types, required keys, files -----------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.steps=ten", "train.steps: expected int, got 'ten' (str)"),
    ("train.steps=true", "train.steps: expected int, got True (bool)"),
    ("train.steps=2.0", "train.steps: expected int, got 2.0 (float)"),
    ("train.steps=3e2", "train.steps: expected int, got '3e2' (str)"),
    ("train.global_batch_size=1.5",
     "train.global_batch_size: expected int or null, got 1.5 (float)"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast' (str)"),
    ("optim.lr=true", "optim.lr: expected float, got True (bool)"),
    ("parallel.sequence_parallel=1", "parallel.sequence_parallel: expected bool, got 1 (int)"),
    ("model.family=7", "model.family: expected str, got 7 (int)"),
    ("data.blend={path: a}", "data.blend: expected a list of mappings, got {'path': 'a'} (dict)"),
    ("data.blend=[a]", "data.blend[0]: expected a mapping, got 'a' (str)"),
    ("data.valid=[a]", "data.valid: expected a mapping name: path, got ['a'] (list)"),
    ("train.schedule=3", "train.schedule: expected a mapping, got 3 (int)"),
])
def test_type_errors(recipe_file, override, message):
    path = recipe_file()
    assert _error(path, [override]) == f"{path}: {message}; set by override {override!r}"


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_floats_are_refused(recipe_file, value):
    """YAML's .nan/.inf parse as floats; no recipe value means them (a NaN lr trains NaNs)."""
    path = recipe_file(BASE + "optim:\n  weight_decay: " + value + "\n")
    shown = {".nan": "nan", ".inf": "inf", "-.inf": "-inf"}[value]
    assert _error(path) == f"{path}: optim.weight_decay: expected a finite number, got {shown}"
    override = f"optim.lr={value}"
    assert _error(recipe_file(), [override]) == (
        f"{path}: optim.lr: expected a finite number, got {shown}; set by override {override!r}")


def test_type_error_in_the_file(recipe_file):
    path = recipe_file(BASE.replace("steps: 10", "steps: ten"))
    assert _error(path) == f"{path}: train.steps: expected int, got 'ten' (str)"


def test_missing_required_keys(recipe_file):
    path = recipe_file(BASE.replace("  hidden_size: 64\n", ""))
    assert _error(path) == f"{path}: model.hidden_size is required"
    path = recipe_file(BASE.replace("data:\n  synthetic: true\n", ""))
    assert _error(path) == f"{path}: data is required"
    assert _error(recipe_file("train:\n  steps: 3\n")) == f"{path}: model is required"


def test_post_init_errors_get_the_source(recipe_file):
    path = recipe_file(BASE + "  schedule:\n    warmup_steps: -3\n")
    assert _error(path) == f"{path}: train.schedule.warmup_steps: expected >= 0, got -3"
    assert _error(recipe_file(), ["parallel.sequence_parallel=true"]).startswith(
        f"{path}: parallel.sequence_parallel requires parallel.tp > 1")


def test_file_errors(tmp_path, recipe_file):
    missing = tmp_path / "nope.yaml"
    assert _error(missing).startswith(f"{missing}: cannot read recipe")
    broken = recipe_file("model: [1, 2\n")
    assert _error(broken).startswith(f"{broken}: invalid YAML at line ")
    listing = recipe_file("- 1\n- 2\n")
    assert _error(listing) == f"{listing}: expected a mapping of sections, got list"


def test_overrides_must_be_a_sequence_of_strings(recipe_file):
    with pytest.raises(TypeError):
        load_recipe(recipe_file(), "train.steps=3")


# --- round trips ---------------------------------------------------------------------------------

def test_round_trip_with_every_kind_of_value(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file(), [
        "data.synthetic=false", "data.blend=[{path: a, weight: 0.25}, {path: b, weight: 3}]",
        "data.valid={v: c}", "model.rotary_scaling={factor: 32}", "optim.lr=1e-5",
        "checkpoint.save=out", "checkpoint.keep_last=2",
    ])
    plain = recipe_to_dict(recipe)
    assert plain["data"]["valid"] == {"v": "c"}
    assert plain["data"]["blend"] == [{"path": "a", "weight": 0.25, "name": None},
                                      {"path": "b", "weight": 3.0, "name": None}]
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # plain YAML-able data
    assert recipe_from_dict(plain) == recipe
    out = tmp_path / "run" / "recipe.yaml"
    out.parent.mkdir()
    dump_recipe(recipe, out)
    assert load_recipe(out) == recipe
    assert [p.name for p in out.parent.iterdir()] == ["recipe.yaml"]  # no temporary left behind


def test_dump_failure_leaves_no_file(tmp_path, recipe_file, monkeypatch):
    recipe = load_recipe(recipe_file())
    target = tmp_path / "out.yaml"
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(yaml, "safe_dump", disk_full)
    with pytest.raises(OSError):
        dump_recipe(recipe, target)
    assert not target.exists() and not list(tmp_path.glob(".out.yaml*"))


def test_recipe_from_dict_does_not_mutate_its_input():
    data = yaml.safe_load(BASE)
    snapshot = yaml.safe_dump(data)
    recipe_from_dict(data)
    assert yaml.safe_dump(data) == snapshot
    with pytest.raises(ConfigError, match=r"^<dict>: model\.num_layers is required$"):
        recipe_from_dict({"model": {}, "data": {"synthetic": True}})


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=1e-12, max_value=10.0, allow_nan=False, allow_infinity=False))
def test_any_float_spelling_overrides_exactly(lr):
    recipe = recipe_from_dict(yaml.safe_load(BASE))
    for text in (repr(lr), f"{lr:e}", f"{lr:E}"):
        data = recipe_to_dict(recipe)
        data["optim"]["lr"] = yaml.safe_load(text)  # the way an override value is parsed
        assert math.isclose(recipe_from_dict(data).optim.lr, float(text), rel_tol=0, abs_tol=0)

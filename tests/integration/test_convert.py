"""HF interop against real transformers models: import -> the same logits (256 tokens, fp32,
judged relative to the logits' scale by engine.models.measure, top-1 equal); export ->
`from_pretrained` -> the identical state dict; bad input -> one line, no output."""

import json
import shutil

import pytest
import torch

from engine.checkpoint import CheckpointError
from engine.checkpoint.unsharded import (
    assign,
    forward_logits,
    read_unsharded,
    single_process_model,
)
from engine.convert import ConvertError
from engine.convert.exporter import engine_to_hf
from engine.convert.importer import hf_to_engine
from engine.convert.verify import random_tokens, verify
from engine.models.measure import compare_logits

FAMILIES = ["llama2", "llama3", "mistral", "qwen2", "aquila", "mixtral", "qwen2_moe"]


def reference_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def engine_logits(model, tokens):
    """fp32 logits [b, s, padded vocab] of an UnshardedModel."""
    with single_process_model(model.recipe, model.padded_vocab_size, dtype=torch.float32) as m:
        assign(m, model.state)
        return forward_logits(m, tokens)


@pytest.mark.parametrize("name", FAMILIES)
def test_imported_model_has_the_same_logits(name, hf_models, converted):
    hf_dir, model = hf_models[name]
    if name == "aquila":  # no transformers class: its Qwen2 twin is the reference
        engine = read_unsharded(converted[name])
        tokens = random_tokens(engine.recipe.model.vocab_size, batch=2, seq=256, seed=0)
        diff = compare_logits(reference_logits(model, tokens), engine_logits(engine, tokens),
                              vocab_size=engine.recipe.model.vocab_size, dtype=torch.float32)
    else:
        diff = verify(hf_dir, converted[name], seq=256)
    assert diff.holds and diff.top1 == 1.0, diff.line()


@pytest.mark.parametrize("name", ["llama2", "llama3", "mistral", "qwen2", "mixtral", "qwen2_moe"])
def test_export_round_trip_is_bit_exact(name, hf_models, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    _, model = hf_models[name]
    out = engine_to_hf(converted[name], tmp_path / "hf", dtype="fp32", progress=False).path
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours, theirs = again.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]


def test_export_of_a_family_without_transformers_class_is_exact(hf_models, converted, tmp_path):
    from safetensors.torch import load_file

    out = engine_to_hf(converted["aquila"], tmp_path / "hf", dtype="fp32", progress=False).path
    written = {}
    for shard in out.glob("*.safetensors"):
        written.update(load_file(str(shard)))
    original = load_file(str(hf_models["aquila"][0] / "model.safetensors"))
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["AquilaForCausalLM"]


def test_bf16_export_and_sharding(converted, tmp_path):
    out = engine_to_hf(converted["llama2"], tmp_path / "hf", dtype="bf16",
                       max_shard_bytes=200_000, progress=False).path
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_dtype_defaults_to_the_imported_models_then_the_training_precision(
        converted, make_recipe, tmp_path):
    imported = engine_to_hf(converted["llama2"], tmp_path / "a", progress=False)
    assert (imported.dtype, imported.dtype_from) == ("fp32",
                                                     "the imported model's torch_dtype float32")
    assert json.loads((imported.path / "config.json").read_text())["torch_dtype"] == "float32"
    from engine.config.loader import recipe_from_dict
    from engine.train.loop import train

    recipe = make_recipe(train={"steps": 0, "precision": "bf16", "schedule": {"warmup_steps": 0}},
                         checkpoint={"save": str(tmp_path / "bf16")})
    train(recipe_from_dict(recipe))  # random init, no HF origin
    trained = engine_to_hf(tmp_path / "bf16", tmp_path / "b", progress=False)
    assert (trained.dtype, trained.dtype_from) == ("bf16",
                                                   "the training precision train.precision")
    assert json.loads((trained.path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_import_refuses_a_tp_the_heads_or_groups_do_not_allow(hf_models, tmp_path):
    """The same line training gives, with the HF directory as its source."""
    from engine.config.errors import ConfigError
    from engine.config.loader import recipe_from_dict, recipe_to_dict
    from engine.config.validate import validate

    hf_dir = hf_models["llama3"][0]  # 4 heads in 2 KV groups
    imported = recipe_to_dict(read_unsharded(hf_to_engine(hf_dir, tmp_path / "tp1",
                                                          progress=False)).recipe)
    for tp, key in ((3, "num_attention_heads=4"), (4, "num_query_groups=2")):
        with pytest.raises(ConfigError) as err:
            hf_to_engine(hf_dir, tmp_path / "out", tp=tp, progress=False)
        with pytest.raises(ConfigError) as training:
            validate(recipe_from_dict({**imported, "parallel": {"tp": tp}}), tp,
                     source="r.yaml")
        assert str(err.value) == f"{hf_dir}: " + str(training.value).removeprefix("r.yaml: ")
        assert key in str(err.value) and not (tmp_path / "out").exists()


def test_recipe_fragment_trains(converted, make_recipe, tiny_data, tmp_path):
    """`engine train --config <recipe> --config <ckpt>/recipe-fragment.yaml` starts from it."""
    import yaml

    from engine.cli import main

    base = tmp_path / "base.yaml"
    recipe = make_recipe(train={"steps": 1})
    del recipe["model"]
    base.write_text(yaml.safe_dump(recipe))
    fragment = converted["llama2"] / "recipe-fragment.yaml"
    assert main(["train", "--config", str(base), "--config", str(fragment),
                 f"tokenizer.path={tiny_data['tokenizer']}", "tokenizer.type=sentencepiece",
                 f"checkpoint.save={tmp_path / 'cpt'}"]) == 0
    saved = yaml.safe_load((tmp_path / "cpt" / "iter_0000001" / "recipe.yaml").read_text())
    assert saved["checkpoint"]["pretrained"] == str(converted["llama2"])


# --- bad input: one clear line, nothing left behind ------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_fails_cleanly(hf_dir, out, match):
    with pytest.raises(ConvertError, match=match) as err:
        hf_to_engine(hf_dir, out, progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_missing_shard(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _copy(hf_models["llama2"][0], tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    names = sorted(tensors)
    (hf / "model.safetensors").unlink()
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(hf / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (hf / "model-00002-of-00002.safetensors").unlink()
    assert_fails_cleanly(hf, tmp_path / "out", "model-00002-of-00002.safetensors.*missing")


def test_unsupported_architecture(hf_models, tmp_path):
    hf = _copy(hf_models["llama2"][0], tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (hf / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(hf, tmp_path / "out", "unsupported HF architecture 'GPT2LMHeadModel'")


def test_shape_mismatch_with_config(hf_models, tmp_path):
    hf = _copy(hf_models["llama2"][0], tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["intermediate_size"] = 96
    (hf / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(hf, tmp_path / "out",
                         r"'model.layers.0.mlp.gate_proj.weight' is \(160, 64\); expected "
                         r"\(96, 64\)")


def test_existing_output_is_refused(hf_models, converted):
    with pytest.raises(CheckpointError, match="already exists"):
        hf_to_engine(hf_models["llama2"][0], converted["llama2"], progress=False)


def test_verify_command_exit_codes(hf_models, converted, capsys):
    from engine.cli import main

    assert main(["convert", "verify", "--hf", str(hf_models["llama2"][0]),
                 "--ckpt", str(converted["llama2"]), "--rtol", "1e-4"]) == 0
    assert "(tol 1.0e-04)" in capsys.readouterr().out
    # a different model: far beyond tolerance, exit 1
    assert main(["convert", "verify", "--hf", str(hf_models["mistral"][0]),
                 "--ckpt", str(converted["llama2"])]) == 1


# --- the tests catch the classic conversion bugs ----------------------------------------------

def _naive_qkv(q, k, v, shape):  # [q; k; v] without megatron's per-group interleave
    return torch.cat([q, k, v])


def _up_gate(gate, up, shape):  # SwiGLU halves swapped
    return torch.cat([up, gate])


def _broken(family, bug):
    from dataclasses import replace

    weights = list(family.weights)
    if bug == "swapped_norms":
        a = next(i for i, m in enumerate(weights) if m.engine.endswith("input_layernorm.weight"))
        b = next(i for i, m in enumerate(weights) if m.engine.endswith("pre_mlp_layernorm.weight"))
        weights[a] = replace(weights[a], engine=family.weights[b].engine)
        weights[b] = replace(weights[b], engine=family.weights[a].engine)
    else:
        target, fn = {"naive_qkv": ("linear_qkv.weight", _naive_qkv),
                      "up_gate": ("linear_fc1.weight", _up_gate)}[bug]
        i = next(i for i, m in enumerate(weights) if m.engine.endswith(target))
        weights[i] = replace(weights[i], to_engine=fn)
    return replace(family, weights=tuple(weights))


@pytest.mark.parametrize("bug", ["swapped_norms", "naive_qkv", "up_gate"])
def test_a_broken_table_is_caught(bug, hf_models):
    """The logit comparison used above fails for each classic mistake (GQA model), by orders of
    magnitude beyond its tolerance."""
    from engine.convert.hf_io import HFCheckpoint
    from engine.convert.importer import _import_recipe, _read

    hf_dir, model = hf_models["llama3"]
    hf = HFCheckpoint(hf_dir)
    family, _, recipe = _import_recipe(hf, tp=1, pp=1, ep=1, dtype="fp32")
    engine = _read(hf, _broken(family, bug), recipe, progress=False)
    vocab = recipe.model.vocab_size
    tokens = random_tokens(vocab, batch=1, seq=256, seed=1)
    diff = compare_logits(reference_logits(model, tokens), engine_logits(engine, tokens),
                          vocab_size=vocab, dtype=torch.float32)
    assert diff.max_rel > 100 * diff.rtol, diff.line()

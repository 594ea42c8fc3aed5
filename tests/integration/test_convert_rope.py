"""HF interop of every RoPE scaling type: a tiny random-init transformers Llama per type, trained
context 64, imported and run at 256 tokens (past the original context, where the scaling acts):
logits equal transformers' to 1e-4 of their scale, while the same weights with plain RoPE are
far off; exported back, transformers reads the same RoPE and gives bit-identical logits; both
transformers spellings of config.json import alike."""

import json

import pytest
import torch

from engine.convert.exporter import engine_to_hf
from engine.convert.importer import hf_to_engine
from engine.convert.verify import random_tokens, verify
from engine.models.hf_config import model_config_from_hf
from engine.models.measure import compare_logits

SEQ, ORIGINAL, RTOL = 256, 64, 1e-4

# name -> (max_position_embeddings, rope_parameters without rope_theta): ORIGINAL is the trained
# context (dynamic NTK takes max_position_embeddings as that)
TYPES = {
    "linear": (SEQ, {"rope_type": "linear", "factor": 4.0}),
    "llama3": (SEQ, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
    "yarn": (SEQ, {"rope_type": "yarn", "factor": 4.0,
                   "original_max_position_embeddings": ORIGINAL}),
    # the mscale ratio (DeepSeek-style), beta range and truncate (gpt-oss-style) all non-default
    "yarn_mscale": (SEQ, {"rope_type": "yarn", "factor": 4.0,
                          "original_max_position_embeddings": ORIGINAL, "beta_fast": 16.0,
                          "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                          "truncate": False}),
    "dynamic": (ORIGINAL, {"rope_type": "dynamic", "factor": 4.0}),
}


def hf_config(max_positions: int, rope: dict):
    from transformers import LlamaConfig

    return LlamaConfig(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=max_positions,
                       rope_parameters={**rope, "rope_theta": 10000.0})


def hf_model(config, seed: int):
    """Random init with randomized norms and 4x query/key weights: sharp attention, so the
    positions (the RoPE under test) move the logits well above the tolerance."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.fixture(scope="module", params=list(TYPES))
def imported(request, tmp_path_factory):
    """(type name, HF directory, HF model, engine checkpoint)."""
    name = request.param
    tmp = tmp_path_factory.mktemp(f"rope-{name}")
    model = hf_model(hf_config(*TYPES[name]), seed=list(TYPES).index(name))
    model.save_pretrained(tmp / "hf")
    return name, tmp / "hf", model, hf_to_engine(tmp / "hf", tmp / "engine", progress=False)


def test_imported_logits_equal_transformers_past_the_original_context(imported):
    name, hf_dir, model, ckpt = imported
    diff = verify(hf_dir, ckpt, seq=SEQ)
    print(f"{name}: {diff.line()}")
    assert diff.max_rel <= RTOL and diff.top1 == 1.0, diff.line()
    # the same weights with plain RoPE (rope_theta kept) are far from the scaled model
    plain = hf_model(hf_config(SEQ, {"rope_type": "default"}), seed=0)
    plain.load_state_dict(model.state_dict())
    tokens = random_tokens(512, batch=2, seq=SEQ, seed=0)
    off = compare_logits(logits(model, tokens), logits(plain, tokens), vocab_size=512,
                         dtype=torch.float32)
    assert off.max_rel > 100 * RTOL, off.line()


def test_export_gives_transformers_the_same_rope(imported, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    name, hf_dir, model, ckpt = imported
    out = engine_to_hf(ckpt, tmp_path / "hf", dtype="fp32", progress=False).path
    written = json.loads((out / "config.json").read_text())
    rope = TYPES[name][1]
    # both spellings: transformers 4's rope_theta + rope_scaling, 5's rope_parameters
    assert written["rope_theta"] == 10000.0
    assert written["rope_scaling"]["rope_type"] == rope["rope_type"]
    assert written["rope_parameters"] == {**written["rope_scaling"], "rope_theta": 10000.0}
    # what the original says, the export says (plus transformers' defaults, spelt out)
    original = AutoConfig.from_pretrained(hf_dir).rope_parameters
    exported = AutoConfig.from_pretrained(out).rope_parameters
    assert {k: exported.get(k) for k in original} == original
    assert model_config_from_hf(written) == model_config_from_hf(
        json.loads((hf_dir / "config.json").read_text()))
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = random_tokens(512, batch=1, seq=SEQ, seed=1)
    assert torch.equal(logits(again, tokens), logits(model, tokens))


@pytest.mark.parametrize("name", list(TYPES))
def test_transformers_4_spelling_imports_like_5(name):
    max_positions, rope = TYPES[name]
    v5 = hf_config(max_positions, rope).to_dict()
    assert "rope_scaling" not in v5 and "rope_theta" not in v5  # transformers 5 writes only these
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    # transformers 4 wrote `type` in older configs and `rope_type` in newer ones
    v4.update(rope_theta=10000.0, rope_scaling={"type": rope["rope_type"], **{
        k: v for k, v in rope.items() if k != "rope_type"}})
    assert model_config_from_hf(v4) == model_config_from_hf(v5)
    family, section = model_config_from_hf(v5)
    assert section["rotary_base"] == 10000.0
    assert section["rotary_scaling"]["type"] == {"dynamic": "ntk"}.get(rope["rope_type"],
                                                                       rope["rope_type"])


def test_unsupported_rope_keys_are_refused_by_name():
    from engine.config.errors import ConfigError

    v5 = hf_config(SEQ, TYPES["yarn"][1]).to_dict()
    v5["rope_parameters"]["attention_factor"] = 1.5
    with pytest.raises(ConfigError, match="rope_scaling 'attention_factor' of rope type 'yarn'"):
        model_config_from_hf(v5)

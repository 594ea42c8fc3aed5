"""HF config.json <-> recipe `model`: both transformers spellings read, what megatron cannot
represent refused by name."""

import pytest

from engine.config.errors import ConfigError
from engine.config.loader import recipe_from_dict
from engine.models import FAMILIES
from engine.models.hf_config import hf_config_from_model, model_config_from_hf

LLAMA3 = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096,
          "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
          "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "tie_word_embeddings": False}


def model(section: dict):
    return recipe_from_dict({"model": section, "data": {"synthetic": True}}).model


def test_transformers_4_and_5_rope_spellings_agree():
    v4 = {**LLAMA3, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}}
    v5 = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": 500000.0}
    assert model_config_from_hf(v4) == model_config_from_hf(v5)
    family, section = model_config_from_hf(v4)
    assert family.name == "llama" and section["rotary_scaling"]["factor"] == 8.0
    assert section["rotary_base"] == 500000.0 and section["num_query_groups"] == 8


def test_written_config_reads_back_the_same_model():
    family, section = model_config_from_hf(LLAMA3)
    written = hf_config_from_model(family, model(section), dtype="bfloat16")
    assert model_config_from_hf(written) == (family, section)


@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "o_proj"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope type 'longrope'"),
    ({"architectures": ["BertForMaskedLM"]}, "unsupported HF architecture 'BertForMaskedLM'"),
])
def test_unrepresentable_configs_are_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        model_config_from_hf({**LLAMA3, **change})


def test_qwen2_bias_is_the_architecture_and_llama_bias_has_no_export():
    family, section = model_config_from_hf({**LLAMA3, "architectures": ["Qwen2ForCausalLM"]})
    assert section["add_qkv_bias"] is True
    with pytest.raises(ConfigError, match="use family qwen2 or aquila"):
        hf_config_from_model(FAMILIES["llama"], model({**section, "family": "llama"}),
                             dtype="float32")

"""RoPE scaling math (engine.models.rope) against transformers' `ROPE_INIT_FUNCTIONS`: inverse
frequencies and attention factor of every type, for real models' settings and small ones.

transformers computes in float32, we in float64: the frequencies agree to float32's rounding of
base^(2i/d) (relative (ln base + 4) eps32: the exponent's rounding times ln base, the power,
the reciprocal and the blend), and each type differs from plain RoPE by far more than that."""

import math

import pytest
import torch

from engine.config.model import ModelConfig, RopeScaling
from engine.models.rope import attention_factor, inverse_frequencies, rotary_dim

HF_TYPE = {"linear": "linear", "llama3": "llama3", "yarn": "yarn", "ntk": "dynamic"}

# (type, base, head_dim, max_position_embeddings, scaling keys: the same names on both sides)
CASES = [
    ("linear", 10000.0, 64, 4096, dict(factor=2.0)),
    ("linear", 500000.0, 16, 64, dict(factor=4.0)),
    # Llama 3.1 and 3.2
    ("llama3", 500000.0, 128, 131072, dict(factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    ("llama3", 500000.0, 64, 131072, dict(factor=32.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    ("llama3", 10000.0, 16, 256, dict(factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
                                      original_max_position_embeddings=64)),
    # Qwen3's long-context recipe, gpt-oss (truncate false), DeepSeek-V3 (mscale ratio),
    # an mscale ratio other than 1, and mscale alone (ignored, as in transformers)
    ("yarn", 1000000.0, 128, 131072, dict(factor=4.0, original_max_position_embeddings=32768)),
    ("yarn", 150000.0, 64, 131072, dict(factor=32.0, original_max_position_embeddings=4096,
                                        beta_fast=32.0, beta_slow=1.0, truncate=False)),
    ("yarn", 10000.0, 64, 163840, dict(factor=40.0, original_max_position_embeddings=4096,
                                       mscale=1.0, mscale_all_dim=1.0)),
    ("yarn", 10000.0, 16, 256, dict(factor=4.0, original_max_position_embeddings=64,
                                    beta_fast=16.0, beta_slow=2.0, mscale=1.0,
                                    mscale_all_dim=0.5)),
    ("yarn", 10000.0, 16, 256, dict(factor=4.0, original_max_position_embeddings=64,
                                    mscale=0.707)),
    ("ntk", 10000.0, 64, 2048, dict(factor=2.0)),
    ("ntk", 500000.0, 16, 64, dict(factor=4.0)),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


def ours(kind, base, head_dim, max_positions, keys) -> ModelConfig:
    return ModelConfig(num_layers=1, hidden_size=4 * head_dim, ffn_hidden_size=8,
                       num_attention_heads=4, max_position_embeddings=max_positions,
                       rotary_base=base, rotary_scaling=RopeScaling(type=kind, **keys))


def theirs(kind, base, head_dim, max_positions, keys):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=max_positions,
                       rope_parameters={"rope_type": HF_TYPE[kind], "rope_theta": base, **keys})


def hf_rope(config, seq_len=None):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, factor = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](
        config, "cpu", seq_len=seq_len)
    return inv_freq.double(), factor


def tolerance(base: float) -> float:
    return (math.log(base) + 4) * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inverse_frequencies_and_attention_factor_equal_transformers(case):
    model = ours(*case)
    expected, factor = hf_rope(theirs(*case))
    got = inverse_frequencies(model)
    assert got.dtype == torch.float64 and got.shape == (rotary_dim(model) // 2,)
    torch.testing.assert_close(got, expected, rtol=tolerance(case[1]), atol=0)
    assert attention_factor(model.rotary_scaling) == pytest.approx(factor, rel=1e-15)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_scaling_changes_the_frequencies_far_beyond_the_tolerance(case):
    model = ours(*case)
    seq = 4 * model.max_position_embeddings  # ntk scales only past max_position_embeddings
    plain = inverse_frequencies(ModelConfig(**{
        f: getattr(model, f) for f in ModelConfig.__dataclass_fields__ if f != "rotary_scaling"}))
    scaled = inverse_frequencies(model, seq_len=seq)
    assert ((scaled - plain).abs() / plain).max() > 1000 * tolerance(case[1])


@pytest.mark.parametrize("seq_len", [None, 16, 64, 65, 100, 256, 1000])
def test_dynamic_ntk_follows_the_sequence_length_like_transformers(seq_len):
    case = ("ntk", 10000.0, 16, 64, dict(factor=4.0))
    model, config = ours(*case), theirs(*case)
    expected, _ = hf_rope(config, seq_len=seq_len)
    got = inverse_frequencies(model, seq_len=seq_len)
    torch.testing.assert_close(got, expected, rtol=tolerance(case[1]), atol=0)
    # what transformers' forward passes: max(position_ids) + 1 as a tensor (float32 arithmetic)
    if seq_len is not None:
        expected, _ = hf_rope(config, seq_len=torch.tensor(seq_len))
        torch.testing.assert_close(got, expected, rtol=tolerance(case[1]), atol=0)
    if seq_len is None or seq_len <= 64:  # plain RoPE up to max_position_embeddings
        unscaled = inverse_frequencies(ModelConfig(**{**{f: getattr(model, f) for f in (
            "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
            "max_position_embeddings", "rotary_base")}}))
        torch.testing.assert_close(got, unscaled, rtol=1e-15, atol=0)


def test_rotary_percent_rotates_fewer_channels():
    model = ModelConfig(num_layers=1, hidden_size=64, ffn_hidden_size=8, num_attention_heads=4,
                        rotary_percent=0.5, rotary_scaling=RopeScaling(type="linear", factor=2.0))
    assert rotary_dim(model) == 8
    expected = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8) / 2.0
    torch.testing.assert_close(inverse_frequencies(model), expected, rtol=1e-15, atol=0)


def test_attention_factor_is_one_without_yarn():
    assert attention_factor(None) == 1.0
    for kind in ("linear", "llama3", "ntk"):
        assert attention_factor(RopeScaling(type=kind, factor=16.0)) == 1.0
    assert attention_factor(RopeScaling(type="yarn", factor=16.0)) == pytest.approx(
        0.1 * math.log(16.0) + 1)

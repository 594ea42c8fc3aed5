"""RoPE's inverse frequencies and attention factor for every `model.rotary_scaling` type (pure).

RoPE (Su et al. 2021, RoFormer, arXiv 2104.09864, eq. 15) turns channel pair i of a head at
position m by the angle m * theta_i, theta_i = base^(-2i/d), with d = head_dim x rotary_percent
the rotated channels and base = model.rotary_base. A scaling type (model.rotary_scaling) changes
the theta_i for a context longer than L0, the one the model was trained with:

- linear: theta_i / s, position interpolation (Chen et al. 2023, arXiv 2306.15595, eq. 4).
- llama3: by wavelength lambda_i = 2 pi / theta_i: kept below L0 / high_freq_factor, divided by
  s above L0 / low_freq_factor, blended linearly in between (Meta's Llama 3.1 `apply_scaling`).
- yarn: YaRN's NTK-by-parts (Peng et al. 2023, arXiv 2309.00071, sec. 3.2): dimensions turning
  fewer than beta_slow times over L0 are interpolated (theta_i / s), more than beta_fast times
  kept, a linear ramp between; plus cos and sin multiplied by the attention factor
  0.1 ln s + 1 (sec. 3.4; DeepSeek-V2's mscale / mscale_all_dim ratio where both are given).
- ntk: dynamic NTK-aware scaling (YaRN sec. 3.3, after /u/emozilla): RoPE with the base
  base * (s L / L0 - (s - 1))^(d / (d - 2)), L = max(sequence length, L0), L0 =
  model.max_position_embeddings; plain RoPE up to L0. Static NTK-aware scaling (sec. 3.1) is a
  model.rotary_base change and needs no type.

Each equals transformers' `modeling_rope_utils.ROPE_INIT_FUNCTIONS` entry (linear, llama3,
yarn, dynamic): tests/unit/models/test_rope.py compares them. Computed in float64 by default
(transformers computes in float32; the two agree to float32's rounding). Imports torch and the
recipe's config only: engine.models.rotary puts these frequencies into megatron's model.
"""

from __future__ import annotations

import math

import torch

from engine.config.model import ModelConfig, RopeScaling


def rotary_dim(model: ModelConfig) -> int:
    """d: the rotated channels of a head (megatron's and transformers' rounding)."""
    head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    return int(head_dim * model.rotary_percent)


def default_inverse_frequencies(dim: int, base: float, dtype: torch.dtype) -> torch.Tensor:
    """theta_i = base^(-2i/d), i = 0 .. d/2 - 1: [d / 2]."""
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=dtype) / dim)


def _linear(dim: int, base: float, s: RopeScaling, dtype: torch.dtype) -> torch.Tensor:
    return default_inverse_frequencies(dim, base, dtype) / s.factor


def _llama3(dim: int, base: float, s: RopeScaling, dtype: torch.dtype) -> torch.Tensor:
    theta = default_inverse_frequencies(dim, base, dtype)
    context = s.original_max_position_embeddings
    wavelength = 2 * math.pi / theta
    long_wave = context / s.low_freq_factor   # longer: interpolated
    short_wave = context / s.high_freq_factor  # shorter: kept
    scaled = torch.where(wavelength > long_wave, theta / s.factor, theta)
    # between the two: a linear blend in L0 / lambda of the interpolated and the kept frequency
    smooth = (context / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelength >= short_wave) & (wavelength <= long_wave)
    return torch.where(medium, blended, scaled)


def _yarn_dimension(rotations: float, dim: int, base: float, context: int) -> float:
    """The (fractional) channel index whose pair turns `rotations` times over `context`
    positions: solves context * theta_i / (2 pi) = rotations for 2i (YaRN sec. 3.2)."""
    return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_ramp_range(dim: int, base: float, s: RopeScaling) -> tuple[float, float]:
    """(low, high): pair indices below low keep their frequency, above high are interpolated."""
    context = s.original_max_position_embeddings
    low = _yarn_dimension(s.beta_fast, dim, base, context)
    high = _yarn_dimension(s.beta_slow, dim, base, context)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn(dim: int, base: float, s: RopeScaling, dtype: torch.dtype) -> torch.Tensor:
    theta = default_inverse_frequencies(dim, base, dtype)
    low, high = yarn_ramp_range(dim, base, s)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=dtype) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency (extrapolation), 0: theta / s (interpolation)
    return theta / s.factor * (1 - keep) + theta * keep


def dynamic_ntk_base(base: float, dim: int, s: RopeScaling, *, seq_len: int,
                     original: int) -> float:
    """ntk: the base for `seq_len` positions of a model trained on `original` (YaRN sec. 3.3)."""
    length = max(seq_len, original)
    return base * (s.factor * length / original - (s.factor - 1)) ** (dim / (dim - 2))


_SCALED = {"linear": _linear, "llama3": _llama3, "yarn": _yarn}
"""type -> theta_i of the static types (ntk is RoPE with dynamic_ntk_base)."""


def inverse_frequencies(model: ModelConfig, *, seq_len: int | None = None,
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """theta_i [rotary_dim(model) / 2] of `model` (rotary_base, rotary_percent, rotary_scaling).

    seq_len: positions 0 .. seq_len - 1 are embedded; only ntk depends on it (None = not past
    model.max_position_embeddings)."""
    dim, base, s = rotary_dim(model), model.rotary_base, model.rotary_scaling
    if s is None:
        return default_inverse_frequencies(dim, base, dtype)
    if s.type == "ntk":
        original = model.max_position_embeddings
        base = dynamic_ntk_base(base, dim, s, seq_len=seq_len or original, original=original)
        return default_inverse_frequencies(dim, base, dtype)
    return _SCALED[s.type](dim, base, s, dtype)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(scaling: RopeScaling | None) -> float:
    """The factor cos and sin are multiplied by (so attention logits by its square): YaRN's
    0.1 ln s + 1, or the mscale / mscale_all_dim ratio when both are non-zero; 1 otherwise."""
    if scaling is None or scaling.type != "yarn":
        return 1.0
    if scaling.mscale and scaling.mscale_all_dim:
        return (_yarn_mscale(scaling.factor, scaling.mscale)
                / _yarn_mscale(scaling.factor, scaling.mscale_all_dim))
    return _yarn_mscale(scaling.factor, 1.0)

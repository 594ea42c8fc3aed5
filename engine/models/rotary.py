"""The model's rotary embedding: megatron-core's `RotaryEmbedding` with engine.models.rope's
frequencies, and YaRN's attention factor where megatron's attention reads it.

megatron-core 0.16.1's `RotaryEmbedding` (models/common/embeddings/rotary_pos_embedding.py)
scales only Llama-3-style with fixed low/high frequency factors and original context, and its
`YarnRotaryEmbedding` differs from transformers (no rotary_percent, no `truncate`, other mscale
defaults). So `engine.models.build` builds GPTModel with plain RoPE and puts a
`ScaledRotaryEmbedding` in `rotary_pos_emb`: the same module interface and output (angles
[s, 1, 1, d], sliced per context-parallel rank by the parent's forward), with every type's
theta_i from `engine.models.rope.inverse_frequencies`, recomputed per sequence length for ntk.

Attention: megatron's `Attention.forward` multiplies cos and sin by
`_yarn_get_concentration_factor_from_config(config)` (yarn_rotary_pos_embedding.py), which reads
`yarn_rotary_scaling_factor`, `yarn_mscale` and `yarn_mscale_all_dim` from the
TransformerConfig when they exist. `set_attention_factor` sets them so that value equals
transformers' attention factor (`engine.models.rope.attention_factor`), and checks it does.
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)

from engine.config.model import ModelConfig
from engine.models.rope import attention_factor, inverse_frequencies


class ScaledRotaryEmbedding(RotaryEmbedding):
    """megatron's RotaryEmbedding whose inverse frequencies are engine.models.rope's (fp32, as
    megatron and transformers apply them)."""

    def __init__(self, model: ModelConfig, *, kv_channels: int, rotary_interleaved: bool,
                 cp_group=None):
        super().__init__(kv_channels=kv_channels, rotary_percent=model.rotary_percent,
                         rotary_interleaved=rotary_interleaved, rotary_base=model.rotary_base,
                         use_cpu_initialization=True, cp_group=cp_group)
        self.model_config = model
        self.dynamic = model.rotary_scaling is not None and model.rotary_scaling.type == "ntk"
        self.inv_freq = inverse_frequencies(model).float()

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        """Angles m * theta_i [max_seq_len, d / 2] of positions offset .. offset+max_seq_len-1."""
        inv_freq = self.inv_freq
        if self.dynamic:  # the base depends on how many positions there are
            inv_freq = inverse_frequencies(self.model_config, seq_len=max_seq_len + offset).to(
                device=inv_freq.device, dtype=inv_freq.dtype)
        positions = torch.arange(max_seq_len, device=inv_freq.device, dtype=inv_freq.dtype)
        return torch.outer(positions + offset, inv_freq)


def set_attention_factor(tc, model: ModelConfig) -> None:
    """Give `tc` (a TransformerConfig) the yarn_* attributes megatron's attention reads for the
    cos/sin factor, when the recipe's is not 1; raise if megatron would compute another."""
    expected = attention_factor(model.rotary_scaling)
    if expected == 1.0:
        return
    s = model.rotary_scaling
    # megatron: ratio of mscales when neither is None, else 0.1 ln s + 1; transformers: the ratio
    # only when both are non-zero
    both = bool(s.mscale) and bool(s.mscale_all_dim)
    tc.yarn_rotary_scaling_factor = s.factor
    tc.yarn_mscale = s.mscale if both else None
    tc.yarn_mscale_all_dim = s.mscale_all_dim if both else None
    got = _yarn_get_concentration_factor_from_config(tc)
    if not math.isclose(got, expected, rel_tol=1e-12):
        raise RuntimeError(f"megatron-core's YaRN attention factor is {got}, expected {expected} "
                           "(yarn_rotary_pos_embedding._yarn_get_concentration_factor moved?)")


def install_rotary_embedding(chunk, model: ModelConfig) -> None:
    """Replace a GPTModel chunk's plain rotary embedding with a ScaledRotaryEmbedding."""
    old = chunk.rotary_pos_emb
    chunk.rotary_pos_emb = ScaledRotaryEmbedding(
        model, kv_channels=chunk.config.kv_channels,
        rotary_interleaved=old.rotary_interleaved, cp_group=old.cp_group)

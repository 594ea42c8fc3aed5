"""Spec modules that put the fused kernels into megatron-core's local layers.

Each is a subclass of the megatron-core module it replaces (same constructor, parameters and
checkpoint keys) and takes its fused path only where it computes exactly what the parent would;
anything else (biases, per-token scales, inference caches, packed sequences, YaRN, sliding
windows, attention dropout, masks) goes to the parent's own forward.

- `FusedMLP`: SwiGLU (`engine.kernels.swiglu`) between fc1 and fc2.
- `FusedRopeSelfAttention`: RoPE (`engine.kernels.rope`) on query and key.
- `SdpaAttention`: core attention by `torch.nn.functional.scaled_dot_product_attention` (flash
  kernels on CPU and GPU) instead of megatron's unfused baddbmm + masked softmax + bmm.
- `FusedLossGPTModel`: the output layer and the loss by the chunked linear cross-entropy
  (`engine.kernels.cross_entropy`); the model builder uses it at tensor-parallel size 1 only,
  since megatron's vocab-parallel cross-entropy at TP > 1 is distributed over ranks.
"""

from __future__ import annotations

import contextlib
import logging

import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP

from engine.kernels.cross_entropy import IGNORE_INDEX, fused_linear_cross_entropy
from engine.kernels.rope import fused_rope
from engine.kernels.swiglu import fused_swiglu


class FusedMLP(MLP):
    """megatron's MLP with the fused SwiGLU when the fc1 output is a bias-free [gate | up].

    megatron's TransformerLayer passes `tp_group` only to the exact class MLP and warns
    "Unknown MLP type" for a subclass; MLP then takes the same global tensor-parallel group
    itself. `quiet_mlp_type_warning` drops that one message while the model is built."""

    def _fusable(self, per_token_scale) -> bool:
        c = self.config
        return (c.gated_linear_unit and self.activation_func is F.silu and per_token_scale is None
                and not c.use_te_activation_func and c.activation_func_clamp_value is None
                and c.glu_linear_offset == 0.0)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self._fusable(per_token_scale):
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(fused_swiglu(intermediate))


class _DropUnknownMlpType(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


@contextlib.contextmanager
def quiet_mlp_type_warning():
    """Build models with FusedMLP without megatron's per-layer "Unknown MLP type" warning."""
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    drop = _DropUnknownMlpType()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class FusedRopeSelfAttention(SelfAttention):
    """megatron's SelfAttention with the fused RoPE.

    The parent applies RoPE inside its forward; this class takes the frequencies out of the
    call and applies them to query and key right where `get_query_key_value_tensors` returns
    them, which is where the parent's training path would (nothing happens in between)."""

    _rope = None

    def _fusable(self, kwargs) -> bool:
        c = self.config
        return (kwargs.get("rotary_pos_emb") is not None
                and kwargs.get("inference_context") is None
                and kwargs.get("inference_params") is None
                and kwargs.get("packed_seq_params") is None
                and not c.rotary_interleaved and not c.multi_latent_attention
                and not c.flash_decode and not c.fused_single_qkv_rope and not c.no_rope_freq
                and not hasattr(c, "yarn_rotary_scaling_factor"))  # YaRN's mscale != 1

    def forward(self, hidden_states, *args, **kwargs):
        if not self._fusable(kwargs):
            return super().forward(hidden_states, *args, **kwargs)
        emb = kwargs.pop("rotary_pos_emb")
        self._rope = emb if isinstance(emb, tuple) else (emb, emb)
        try:
            return super().forward(hidden_states, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self._rope = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, *args,
                                                  **kwargs)
        if self._rope is None:
            return out
        q_emb, k_emb = self._rope
        query, key = out[0], out[1]  # [s, b, heads, head_dim]
        if q_emb is not None:
            query = fused_rope(query, q_emb)
        if k_emb is not None:
            key = fused_rope(key, k_emb)
        return (query, key, *out[2:])


class SdpaAttention(DotProductAttention):
    """megatron's DotProductAttention computed by torch's scaled_dot_product_attention for
    plain causal self-attention (no mask tensor, no window, no dropout, vanilla softmax)."""

    def _fusable(self, query, key, attention_mask, attn_mask_type, attention_bias,
                 packed_seq_params) -> bool:
        c = self.config
        dropout = self.attention_dropout.p if self.training else 0.0
        return ((attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
                and attention_mask is None and attention_bias is None
                and packed_seq_params is None and self.softmax_offset is None
                and self.scale_mask_softmax.window_size is None and dropout == 0.0
                and not c.apply_query_key_layer_scaling and query.shape[0] == key.shape[0])

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if not self._fusable(query, key, attention_mask, attn_mask_type, attention_bias,
                             packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # grouped-query attention: each KV head serves `groups` query heads
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)


class FusedLossGPTModel(GPTModel):
    """GPTModel whose training loss is the chunked fused linear cross-entropy (TP = 1 only)."""

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if (labels is None or not self.post_process or kwargs.get("mtp_in_postprocess")
                or self.config.mtp_num_layers is not None
                or kwargs.get("inference_context") is not None
                or self.config.tensor_model_parallel_size != 1):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args,
                                        **kwargs)
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else self.output_layer.weight)
        s, b, h = hidden_states.shape
        target = labels.transpose(0, 1).reshape(-1)  # [b, s] -> [s * b], the hidden-state order
        loss = fused_linear_cross_entropy(hidden_states.reshape(s * b, h), weight, target,
                                          ignore_index=IGNORE_INDEX)
        return loss.view(s, b).transpose(0, 1).contiguous()  # [b, s], as megatron returns it

"""HF `config.json` <-> the recipe's `model` section, for every Llama-shaped family (pure).

Reads and writes both transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`)
spellings, for every RoPE type (HF `dynamic` is the recipe's `ntk`). What megatron's layers
cannot represent (MLP or o_proj biases, other activations, other RoPE types or keys) is refused
by name, never dropped.
"""

from __future__ import annotations

from engine.config.errors import ConfigError
from engine.config.recipe import ModelConfig
from engine.models import family_for_hf_architecture
from engine.models.family import Family

# HF key -> recipe key, for the plain one-to-one entries
_PLAIN = (("num_hidden_layers", "num_layers"), ("hidden_size", "hidden_size"),
          ("intermediate_size", "ffn_hidden_size"), ("num_attention_heads", "num_attention_heads"),
          ("vocab_size", "vocab_size"), ("max_position_embeddings", "max_position_embeddings"),
          ("rms_norm_eps", "layernorm_epsilon"))


_NEEDED = object()
"""No default: the HF config must give the key."""
_MAX_POSITIONS = object()
"""Default max_position_embeddings (transformers' `standardize_rope_params`)."""

# HF rope_type -> (model.rotary_scaling.type, {key: default}); the keys are spelt alike on both
# sides; the defaults are transformers' (`modeling_rope_utils`)
_ROPE_TYPES = {
    "linear": ("linear", {"factor": _NEEDED}),
    "llama3": ("llama3", {"factor": _NEEDED, "low_freq_factor": _NEEDED,
                          "high_freq_factor": _NEEDED,
                          "original_max_position_embeddings": _MAX_POSITIONS}),
    "yarn": ("yarn", {"factor": _NEEDED, "original_max_position_embeddings": _MAX_POSITIONS,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": None,
                      "mscale_all_dim": None, "truncate": True}),
    "dynamic": ("ntk", {"factor": _NEEDED}),
}
_HF_ROPE_TYPE = {ours: theirs for theirs, (ours, _) in _ROPE_TYPES.items()}
_ROPE_COMMON = ("rope_type", "type", "rope_theta")


def _rope(hf: dict, source: str) -> tuple[float, dict | None]:
    """(rotary_base, rotary_scaling section) from either transformers spelling."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in _ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {kind!r} is not supported "
                          f"(default, {', '.join(_ROPE_TYPES)})")
    ours, keys = _ROPE_TYPES[kind]
    unread = sorted(k for k, v in merged.items()
                    if k not in keys and k not in _ROPE_COMMON and v is not None)
    if unread:
        raise ConfigError(f"{source}: rope_scaling {', '.join(map(repr, unread))} of rope type "
                          f"{kind!r} is not supported (only {', '.join(keys)})")
    section = {"type": ours}
    for key, default in keys.items():
        value = merged.get(key)
        if value is None and default is _NEEDED:
            raise ConfigError(f"{source}: rope type {kind!r} needs rope_scaling.{key}")
        section[key] = (value if value is not None else
                        hf["max_position_embeddings"] if default is _MAX_POSITIONS else default)
    return float(theta), section


def _rope_to_hf(model: ModelConfig) -> dict:
    """The RoPE keys of config.json in both spellings: transformers 4 reads `rope_theta` and
    `rope_scaling`, 5 writes and reads `rope_parameters` (and takes the 4 spelling too)."""
    theta, s = model.rotary_base, model.rotary_scaling
    if s is None:
        return {"rope_theta": theta, "rope_parameters": {"rope_type": "default",
                                                         "rope_theta": theta}}
    kind = _HF_ROPE_TYPE[s.type]
    scaling = {"rope_type": kind, **{k: getattr(s, k) for k in _ROPE_TYPES[kind][1]
                                     if getattr(s, k) is not None}}
    return {"rope_theta": theta, "rope_scaling": scaling,
            "rope_parameters": {**scaling, "rope_theta": theta}}


def model_config_from_hf(hf: dict, source: str = "config.json") -> tuple[Family, dict]:
    """(family, recipe `model` section) for an HF config dict."""
    archs = hf.get("architectures") or []
    if not archs:
        raise ConfigError(f"{source}: no 'architectures' entry; cannot tell the model family")
    try:
        family = family_for_hf_architecture(archs[0])
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    missing = [k for k, _ in _PLAIN if k not in hf]
    if missing:
        raise ConfigError(f"{source}: missing {', '.join(repr(k) for k in missing)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) is "
                          "supported")
    if hf.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true has no slot in megatron's MLP")
    if family.qkv_bias is None and hf.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true also biases o_proj, which megatron's "
                          "attention has no slot for")
    model = {ours: hf[theirs] for theirs, ours in _PLAIN}
    theta, scaling = _rope(hf, source)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    model.update(
        family=family.name, rotary_base=theta, rotary_scaling=scaling,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim if head_dim * heads != hf["hidden_size"] else None,
        add_qkv_bias=bool(family.qkv_bias),
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        window_size=window if window and window < hf["max_position_embeddings"] else None,
    )
    if family.hf_moe is not None:
        model["moe"] = _moe_from_hf(family, hf, source)
    return family, model


def _moe_from_hf(family: Family, hf: dict, source: str) -> dict:
    keys = family.hf_moe
    step = hf.get(keys.sparse_step, 1) if keys.sparse_step else 1
    if step != 1 or hf.get("mlp_only_layers"):
        raise ConfigError(f"{source}: only every-layer MoE is supported ({keys.sparse_step}="
                          f"{step}, mlp_only_layers={hf.get('mlp_only_layers')})")
    moe = {"num_experts": hf[keys.num_experts], "topk": hf["num_experts_per_tok"],
           "ffn_hidden_size": hf[keys.expert_width],
           "router_pre_softmax": bool(keys.renormalize) and not hf.get(keys.renormalize, False),
           "aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.0))}
    shared = hf.get(keys.shared_expert_width) if keys.shared_expert_width else None
    if shared:
        moe.update(shared_expert_ffn_hidden_size=shared,
                   shared_expert_gate=keys.shared_expert_gate)
    return moe


def _moe_to_hf(family: Family, model: ModelConfig) -> dict:
    keys, moe = family.hf_moe, model.moe
    if moe is None or moe.layer_freq != 1 or moe.shared_expert_gate != (
            keys.shared_expert_gate and moe.shared_expert_ffn_hidden_size is not None):
        raise ConfigError(f"model.moe does not fit the {family.name} HF layout (every layer MoE"
                          f"{', a gated shared expert' if keys.shared_expert_gate else ''})")
    if moe.router_score_function != "softmax":  # Mixtral and Qwen2-MoE route by softmax
        raise ConfigError(f"{family.name} routes by softmax: model.moe.router_score_function="
                          f"{moe.router_score_function} (and the aux_free expert bias) has no "
                          "HF equivalent in this family")
    out = {keys.num_experts: moe.num_experts, "num_experts_per_tok": moe.topk,
           keys.expert_width: moe.ffn_hidden_size or model.ffn_hidden_size,
           "router_aux_loss_coef": moe.aux_loss_coeff}
    if keys.renormalize:
        out[keys.renormalize] = not moe.router_pre_softmax
    elif moe.router_pre_softmax:
        raise ConfigError(f"{family.name} renormalizes the top-k weights: model.moe."
                          "router_pre_softmax must be false")
    if keys.shared_expert_width:
        out[keys.shared_expert_width] = moe.shared_expert_ffn_hidden_size or 0
    if keys.sparse_step:
        out[keys.sparse_step] = 1
    return out


def hf_config_from_model(family: Family, model: ModelConfig, *, dtype: str) -> dict:
    """config.json for `model` (the inverse of `model_config_from_hf` on what it reads)."""
    if family.qkv_bias is None and model.add_qkv_bias:
        raise ConfigError(f"model.family={family.name} with add_qkv_bias has no HF equivalent "
                          "(its attention_bias also biases o_proj); use family qwen2 or aquila")
    heads = model.num_attention_heads
    config = {
        "architectures": [family.hf_architectures[0]], "model_type": family.hf_model_type,
        "num_hidden_layers": model.num_layers, "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size, "num_attention_heads": heads,
        "num_key_value_heads": model.num_query_groups or heads,
        "head_dim": model.kv_channels or model.hidden_size // heads,
        "vocab_size": model.vocab_size, "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.layernorm_epsilon, "hidden_act": "silu",
        "tie_word_embeddings": model.share_embeddings_and_output_weights,
        **_rope_to_hf(model), "torch_dtype": dtype, "dtype": dtype,
        "attention_bias": model.add_qkv_bias if family.qkv_bias is None else family.qkv_bias,
        "mlp_bias": False, "sliding_window": model.window_size, **dict(family.hf_extra),
    }
    if family.hf_moe is not None:
        config.update(_moe_to_hf(family, model))
    elif model.moe is not None:
        raise ConfigError(f"model.family={family.name} is dense; model.moe has no HF equivalent "
                          "(use family mixtral or qwen2_moe)")
    return config

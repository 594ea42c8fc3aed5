"""Recipe section `model` (with `model.moe`, `model.rotary_scaling`): megatron-core's
`TransformerConfig`/`GPTModel` names, so the model builder can pass them through."""

import math
from dataclasses import dataclass

from engine.config.checks import at_least, fraction, one_of, positive_float
from engine.config.errors import ConfigError

ROPE_TYPES = ("linear", "llama3", "yarn", "ntk")
"""The `model.rotary_scaling.type`s (engine.models.rope computes each)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RopeScaling:
    """Key `model.rotary_scaling`: RoPE frequency scaling for a context longer than the one the
    model was trained with (HF `rope_scaling` / `rope_parameters`). The frequencies and the
    attention scaling are engine.models.rope's, equal to transformers' `ROPE_INIT_FUNCTIONS`.

    Each field names the types that read it; the others ignore it. Defaults of the Llama-3
    fields are Llama 3.1's (and megatron-core 0.16.1's `RotaryEmbedding._apply_scaling`)."""

    type: str = "llama3"
    """linear|llama3|yarn|ntk. linear: position interpolation, every frequency / factor (Chen et
    al. 2023, arXiv 2306.15595). llama3: Llama 3.1's by-wavelength blend of interpolated and
    original frequencies. yarn: YaRN (Peng et al. 2023, arXiv 2309.00071): NTK-by-parts ramp
    plus an attention temperature. ntk: dynamic NTK-aware scaling (HF `dynamic`): the base grows
    with the sequence length beyond model.max_position_embeddings (static NTK-aware scaling is a
    model.rotary_base change). Absent = llama3, the only type before this key existed."""
    factor: float = 8.0
    """Context extension factor, > 1 (all types)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_position_embeddings / low_freq_factor are fully
    interpolated."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_position_embeddings / high_freq_factor are left
    alone."""
    original_max_position_embeddings: int = 8192
    """llama3, yarn: context length the unscaled model was trained with, in tokens."""
    beta_fast: float = 32.0
    """yarn: dimensions turning more than beta_fast times over the original context keep their
    frequency (extrapolation)."""
    beta_slow: float = 1.0
    """yarn: dimensions turning fewer than beta_slow times are fully interpolated."""
    mscale: float | None = None
    """yarn: with mscale_all_dim (both non-zero), the attention factor is
    (0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1) (DeepSeek-V2); null = 0.1 ln s + 1."""
    mscale_all_dim: float | None = None
    """yarn: see mscale."""
    truncate: bool = True
    """yarn: round the ramp's ends to whole dimensions (HF `truncate`; gpt-oss uses false)."""

    def __post_init__(self):
        p = "model.rotary_scaling"
        one_of(f"{p}.type", self.type, ROPE_TYPES)
        if not (math.isfinite(self.factor) and self.factor > 1.0):
            raise ConfigError(f"{p}.factor: expected > 1 (a longer context), got {self.factor}")
        positive_float(f"{p}.low_freq_factor", self.low_freq_factor)
        positive_float(f"{p}.high_freq_factor", self.high_freq_factor)
        at_least(f"{p}.original_max_position_embeddings", self.original_max_position_embeddings, 1)
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"{p}.high_freq_factor={self.high_freq_factor} must be greater than "
                f"low_freq_factor={self.low_freq_factor}"
            )
        positive_float(f"{p}.beta_fast", self.beta_fast)
        positive_float(f"{p}.beta_slow", self.beta_slow)


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig:
    """Key `model.moe`: mixture-of-experts MLPs (megatron-core's MoE layer; names shortened from
    its `moe_*` TransformerConfig fields). Absent = a dense model."""

    num_experts: int
    """Experts per MoE layer (megatron num_moe_experts)."""
    topk: int = 2
    """Experts each token is routed to (moe_router_topk)."""
    ffn_hidden_size: int | None = None
    """Inner width of one expert; null = model.ffn_hidden_size (fine-grained experts: smaller)."""
    router_pre_softmax: bool = False
    """true: softmax over all experts, then top-k (Qwen2-MoE without renormalization);
    false: top-k, then softmax over the chosen (Mixtral): the weights of a token sum to 1."""
    router_score_function: str = "softmax"
    """softmax|sigmoid."""
    load_balancing: str = "aux_loss"
    """aux_loss (Switch Transformer, per global batch)|seq_aux_loss (per sequence)|aux_free|none.
    aux_free: no loss; a per-expert bias added to the routing scores for the top-k choice only,
    moved by bias_update_rate after each update towards the experts that got fewer tokens than
    the mean (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3). megatron-core's expert bias
    (moe_router_enable_expert_bias), which needs router_score_function: sigmoid."""
    bias_update_rate: float = 1e-3
    """aux_free: the bias's step per optimizer update, sign(mean load - load) x rate (DeepSeek-V3:
    1e-3)."""
    aux_loss_coeff: float = 0.0
    """Load-balancing loss coefficient (AquilaMoE used 0.001)."""
    z_loss_coeff: float | None = None
    """Router z-loss coefficient (ST-MoE, Zoph et al. 2022; AquilaMoE used 0.01); null = off."""
    capacity_factor: float | None = None
    """Tokens an expert takes, as a multiple of its fair share; extra tokens are dropped;
    null = dropless."""
    token_dispatcher: str = "allgather"
    """allgather|alltoall: how tokens reach experts on other expert-parallel ranks."""
    layer_freq: int = 1
    """Layer i is MoE when i % layer_freq == 0 (1 = every layer)."""
    shared_expert_ffn_hidden_size: int | None = None
    """Width of an always-on shared expert (Qwen2-MoE); null = none."""
    shared_expert_gate: bool = False
    """Scale the shared expert by sigmoid(gate(x)) (Qwen2-MoE's shared_expert_gate)."""
    grouped_gemm: bool = False
    """One grouped GEMM for all local experts (TE, GPU); false = one GEMM per expert."""

    def __post_init__(self):
        p = "model.moe"
        at_least(f"{p}.num_experts", self.num_experts, 1)
        at_least(f"{p}.topk", self.topk, 1)
        at_least(f"{p}.ffn_hidden_size", self.ffn_hidden_size, 1)
        at_least(f"{p}.layer_freq", self.layer_freq, 1)
        at_least(f"{p}.shared_expert_ffn_hidden_size", self.shared_expert_ffn_hidden_size, 1)
        if self.topk > self.num_experts:
            raise ConfigError(f"{p}.topk={self.topk} exceeds {p}.num_experts={self.num_experts}")
        one_of(f"{p}.router_score_function", self.router_score_function, ("softmax", "sigmoid"))
        one_of(f"{p}.load_balancing", self.load_balancing,
               ("aux_loss", "seq_aux_loss", "aux_free", "none"))
        if self.load_balancing == "aux_free" and self.router_score_function != "sigmoid":
            raise ConfigError(f"{p}.load_balancing=aux_free needs {p}.router_score_function="
                              f"sigmoid (megatron-core's expert bias), got "
                              f"{self.router_score_function!r}")
        positive_float(f"{p}.bias_update_rate", self.bias_update_rate)
        one_of(f"{p}.token_dispatcher", self.token_dispatcher, ("allgather", "alltoall"))
        if self.aux_loss_coeff < 0 or (self.z_loss_coeff or 0) < 0:
            raise ConfigError(f"{p}: loss coefficients must be >= 0")
        if self.capacity_factor is not None:
            positive_float(f"{p}.capacity_factor", self.capacity_factor)
        if self.shared_expert_gate and self.shared_expert_ffn_hidden_size is None:
            raise ConfigError(f"{p}.shared_expert_gate needs {p}.shared_expert_ffn_hidden_size")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Key `model`: the decoder's shape, in megatron-core `TransformerConfig`/`GPTModel` names."""

    family: str = "llama"
    """Model family: a key of the family registry in engine.models (checked there)."""
    num_layers: int
    """Number of transformer layers."""
    hidden_size: int
    """Width of the residual stream."""
    ffn_hidden_size: int
    """Inner width of the MLP (per gate/up projection for SwiGLU)."""
    num_attention_heads: int
    """Number of query heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; null = multi-head (one per query head)."""
    kv_channels: int | None = None
    """Width of one attention head; null = hidden_size // num_attention_heads."""
    vocab_size: int | None = None
    """Vocabulary size before padding; null = take the tokenizer's."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times parallel.tp (megatron's rule)."""
    max_position_embeddings: int = 4096
    """Longest sequence the model supports, in tokens."""
    rotary_base: float = 10000.0
    """RoPE base (HF `rope_theta`)."""
    rotary_percent: float = 1.0
    """Fraction of each head's channels that RoPE rotates, in (0, 1]."""
    rotary_scaling: RopeScaling | None = None
    """RoPE scaling for a longer context as a mapping {type: linear|llama3|yarn|ntk, factor,
    ...} (RopeScaling); null = none. Like rotary_base it has no weights: a stage started from
    checkpoint.pretrained may change both."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of the (RMS) norms."""
    add_qkv_bias: bool = False
    """Add a bias to the fused query/key/value projection (Qwen2-style)."""
    window_size: int | None = None
    """Sliding-window attention (Mistral): each token attends to itself and the window_size - 1
    tokens before it; null = full causal attention."""
    share_embeddings_and_output_weights: bool = False
    """Tie the output layer to the input embedding."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialization of weights."""
    hidden_dropout: float = 0.0
    """Dropout on the residual branches, in [0, 1)."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities, in [0, 1)."""
    moe: MoEConfig | None = None
    """Mixture-of-experts MLPs; null = dense."""
    spec: str = "auto"
    """Layer spec: auto|local|te; auto = te when transformer-engine imports and CUDA is present,
    else local."""
    fused_kernels: bool = True
    """Local spec only: use the engine's fused kernels (csrc/: RMSNorm, SwiGLU, RoPE, and at
    parallel.tp=1 the chunked linear cross-entropy) and torch's scaled_dot_product_attention for
    core attention; where engine/_C is not built their PyTorch references run (said once).
    false = megatron-core's local layers as they are. The TE spec has its own fused layers."""

    def __post_init__(self):
        p = "model"
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "vocab_size",
                     "make_vocab_size_divisible_by", "max_position_embeddings", "window_size"):
            at_least(f"{p}.{name}", getattr(self, name), 1)
        heads, groups = self.num_attention_heads, self.num_query_groups
        if self.kv_channels is None and self.hidden_size % heads:
            raise ConfigError(
                f"{p}.hidden_size={self.hidden_size} must be divisible by "
                f"{p}.num_attention_heads={heads} (or set {p}.kv_channels)"
            )
        if groups is not None and heads % groups:
            raise ConfigError(
                f"{p}.num_query_groups={groups} must divide {p}.num_attention_heads={heads}"
            )
        positive_float(f"{p}.rotary_base", self.rotary_base)
        fraction(f"{p}.rotary_percent", self.rotary_percent, open_low=True, closed_high=True)
        positive_float(f"{p}.layernorm_epsilon", self.layernorm_epsilon)
        positive_float(f"{p}.init_method_std", self.init_method_std)
        fraction(f"{p}.hidden_dropout", self.hidden_dropout)
        fraction(f"{p}.attention_dropout", self.attention_dropout)
        one_of(f"{p}.spec", self.spec, ("auto", "local", "te"))
        if not self.family:
            raise ConfigError(f"{p}.family: expected a family name, got ''")



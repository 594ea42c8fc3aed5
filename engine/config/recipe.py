"""Recipe sections: one frozen dataclass per YAML section, a docstring under every field.

Owns the shape of a recipe and the checks each section can make on its own fields. Rules that
need two sections (tp vs heads, degrees vs world size) live in `engine.config.validate`; YAML,
overrides and type coercion live in `engine.config.loader`. Imports neither torch nor megatron:
`model` uses megatron-core's `TransformerConfig`/`GPTModel` names so the model builder can pass
them through, but building anything is someone else's job. `__post_init__` only raises.
"""

import math
from dataclasses import dataclass, field

from engine.config.errors import ConfigError


def _at_least(key: str, value: int | float | None, low: int | float) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{key}: expected >= {low}, got {value}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {'|'.join(choices)}, got {value!r}")


def _fraction(key: str, value: float, *, open_low: bool = False, closed_high: bool = False) -> None:
    low_ok = value > 0.0 if open_low else value >= 0.0
    high_ok = value <= 1.0 if closed_high else value < 1.0
    if not (low_ok and high_ok):
        interval = ("(0" if open_low else "[0") + (", 1]" if closed_high else ", 1)")
        raise ConfigError(f"{key}: expected a value in {interval}, got {value}")


def _positive_float(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0.0):
        raise ConfigError(f"{key}: expected a finite number > 0, got {value}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RopeScaling:
    """Llama-3.x RoPE frequency scaling (HF `rope_scaling` with `rope_type: llama3`).

    Defaults are megatron-core 0.16.1's `RotaryEmbedding._apply_scaling` defaults; note that
    `GPTModel` passes only `rope_scaling_factor` through, the other three stay at these values.
    """

    factor: float = 8.0
    """Context extension factor: low frequencies are divided by it."""
    low_freq_factor: float = 1.0
    """Wavelengths above original_max_position_embeddings / low_freq_factor are fully scaled."""
    high_freq_factor: float = 4.0
    """Wavelengths below original_max_position_embeddings / high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """Context length the unscaled model was trained with, in tokens."""

    def __post_init__(self):
        p = "model.rotary_scaling"
        _positive_float(f"{p}.factor", self.factor)
        _positive_float(f"{p}.low_freq_factor", self.low_freq_factor)
        _positive_float(f"{p}.high_freq_factor", self.high_freq_factor)
        _at_least(f"{p}.original_max_position_embeddings", self.original_max_position_embeddings, 1)
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"{p}.high_freq_factor={self.high_freq_factor} must be greater than "
                f"low_freq_factor={self.low_freq_factor}"
            )


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
    """aux_loss (Switch Transformer, per global batch)|seq_aux_loss (per sequence)|none."""
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
        _at_least(f"{p}.num_experts", self.num_experts, 1)
        _at_least(f"{p}.topk", self.topk, 1)
        _at_least(f"{p}.ffn_hidden_size", self.ffn_hidden_size, 1)
        _at_least(f"{p}.layer_freq", self.layer_freq, 1)
        _at_least(f"{p}.shared_expert_ffn_hidden_size", self.shared_expert_ffn_hidden_size, 1)
        if self.topk > self.num_experts:
            raise ConfigError(f"{p}.topk={self.topk} exceeds {p}.num_experts={self.num_experts}")
        _one_of(f"{p}.router_score_function", self.router_score_function, ("softmax", "sigmoid"))
        _one_of(f"{p}.load_balancing", self.load_balancing, ("aux_loss", "seq_aux_loss", "none"))
        _one_of(f"{p}.token_dispatcher", self.token_dispatcher, ("allgather", "alltoall"))
        if self.aux_loss_coeff < 0 or (self.z_loss_coeff or 0) < 0:
            raise ConfigError(f"{p}: loss coefficients must be >= 0")
        if self.capacity_factor is not None:
            _positive_float(f"{p}.capacity_factor", self.capacity_factor)
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
    """Llama-3.x RoPE scaling as a mapping (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings); null = none."""
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
            _at_least(f"{p}.{name}", getattr(self, name), 1)
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
        _positive_float(f"{p}.rotary_base", self.rotary_base)
        _fraction(f"{p}.rotary_percent", self.rotary_percent, open_low=True, closed_high=True)
        _positive_float(f"{p}.layernorm_epsilon", self.layernorm_epsilon)
        _positive_float(f"{p}.init_method_std", self.init_method_std)
        _fraction(f"{p}.hidden_dropout", self.hidden_dropout)
        _fraction(f"{p}.attention_dropout", self.attention_dropout)
        _one_of(f"{p}.spec", self.spec, ("auto", "local", "te"))
        if not self.family:
            raise ConfigError(f"{p}.family: expected a family name, got ''")


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelConfig:
    """Key `parallel`: parallel degrees and the data-parallel/optimizer communication options."""

    tp: int = 1
    """Tensor-parallel size (megatron tensor_model_parallel_size)."""
    pp: int = 1
    """Pipeline-parallel size (pipeline_model_parallel_size)."""
    vpp: int | None = None
    """Model chunks per pipeline rank, for the interleaved schedule (megatron
    virtual_pipeline_model_parallel_size); null = no virtual pipeline."""
    ep: int = 1
    """Expert-parallel size (expert_model_parallel_size); must divide the data-parallel size."""
    cp: int = 1
    """Context-parallel size (context_parallel_size)."""
    dp: int | None = None
    """Data-parallel size; null = world_size / (tp * pp * cp); when set, checked against it."""
    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence over the TP group; needs tp > 1."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (megatron use_distributed_optimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the gradient all-reduce/reduce-scatter with the backward pass."""
    overlap_param_gather: bool = False
    """Overlap the parameter all-gather with the forward pass; needs distributed_optimizer and
    overlap_grad_reduce."""
    backend: str = "auto"
    """torch.distributed backend: auto|gloo|nccl; auto = nccl with CUDA, else gloo."""

    def __post_init__(self):
        p = "parallel"
        for name in ("tp", "pp", "ep", "cp", "dp"):
            _at_least(f"{p}.{name}", getattr(self, name), 1)
        if self.vpp is not None:
            _at_least(f"{p}.vpp", self.vpp, 2)  # one chunk per rank is "no virtual pipeline": null
            if self.pp <= 1:
                raise ConfigError(
                    f"{p}.vpp={self.vpp} requires {p}.pp > 1 (interleaved schedule), "
                    f"got pp={self.pp}"
                )
        if self.sequence_parallel and self.tp <= 1:
            raise ConfigError(
                f"{p}.sequence_parallel requires {p}.tp > 1 (no sequence parallelism without "
                f"tensor parallelism), got tp={self.tp}"
            )
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ConfigError(f"{p}.overlap_param_gather requires {p}.distributed_optimizer: true")
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise ConfigError(f"{p}.overlap_param_gather requires {p}.overlap_grad_reduce: true")
        _one_of(f"{p}.backend", self.backend, ("auto", "gloo", "nccl"))


@dataclass(frozen=True, kw_only=True, slots=True)
class BlendEntry:
    """One weighted dataset of `data.blend` (or `data.replay.blend`), YAML `{path, weight, name}`;
    DataConfig checks it."""

    path: str
    """Path prefix of a megatron IndexedDataset (the `.bin`/`.idx` pair without extension)."""
    weight: float = 1.0
    """Relative sampling weight; finite and > 0 (weights are normalized over the blend)."""
    name: str | None = None
    """The source's name in token accounting (TensorBoard `tokens/source/<name>`,
    `tokens/fraction/<name>`, checkpoints); null = the last component of `path`. Names are
    unique over data.blend and data.replay.blend."""


def source_name(entry: BlendEntry) -> str:
    """The name `entry` is counted under: its `name`, else the last component of its path."""
    return entry.name or entry.path.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplayConfig:
    """Key `data.replay`: general (pretraining-like) data mixed into every global batch of a
    continual-pretraining run, against forgetting (Ibrahim et al. 2024, arXiv 2403.08763 §5).

    Each global batch of G samples holds exactly round(fraction x G) replay samples (halves up),
    spread evenly over its positions, so its content does not depend on TP/PP/DP; the replay
    samples come from this blend, the others from data.blend."""

    blend: tuple[BlendEntry, ...]
    """The replay datasets, a list of `{path, weight, name}` like data.blend."""
    fraction: float
    """Share of every global batch's samples taken from the replay blend, in (0, 1)."""

    def samples_per_batch(self, global_batch_size: int) -> int:
        """round(fraction x global_batch_size), halves up: the replay samples of every batch."""
        return math.floor(self.fraction * global_batch_size + 0.5)


@dataclass(frozen=True, kw_only=True, slots=True)
class ValidSet:
    """One named validation dataset; YAML writes `data.valid` as a mapping `name: path`."""

    name: str
    """Name of the validation set, used in log lines and TensorBoard tags."""
    path: str
    """Path prefix of its megatron IndexedDataset."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Key `data`: what the model trains and evaluates on."""

    blend: tuple[BlendEntry, ...] = ()
    """Training datasets, a list of `{path, weight}`; may be empty only when synthetic."""
    valid: tuple[ValidSet, ...] = field(default=(), metadata={"yaml": "name_to_path"})
    """Validation datasets; in YAML a mapping `name: path prefix`, kept in file order."""
    seq_length: int = 2048
    """Tokens per training sample."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    cache_dir: str | None = None
    """Where dataset index caches go; null = next to the data (megatron's default)."""
    synthetic: bool = False
    """Train on random tokens (benchmarks, smoke tests); the blend is then ignored."""
    replay: ReplayConfig | None = None
    """Replay of general data in every global batch, `{blend, fraction}`; null = none."""

    def __post_init__(self):
        p = "data"
        if not self.blend and not self.synthetic:
            raise ConfigError(
                f"{p}.blend: expected at least one {{path, weight}} entry "
                f"(or {p}.synthetic: true), got []"
            )
        _check_blend(f"{p}.blend", self.blend)
        if self.replay is not None:
            if self.synthetic:
                raise ConfigError(f"{p}.replay needs real data, but {p}.synthetic is true")
            if not self.replay.blend:
                raise ConfigError(f"{p}.replay.blend: expected at least one {{path, weight}} "
                                  "entry, got []")
            _check_blend(f"{p}.replay.blend", self.replay.blend)
            _fraction(f"{p}.replay.fraction", self.replay.fraction, open_low=True)
        seen: dict[str, str] = {}
        for key, entry in _sources(self):
            name = source_name(entry)
            if name in seen:
                raise ConfigError(f"{key}: source name {name!r} is also {seen[name]}'s; "
                                  f"give one of them a distinct `name`")
            seen[name] = key
        names = [v.name for v in self.valid]
        for v in self.valid:
            if names.count(v.name) > 1:
                raise ConfigError(f"{p}.valid: name {v.name!r} appears {names.count(v.name)} times")
            if not v.path:
                raise ConfigError(f"{p}.valid.{v.name}: expected a path prefix, got ''")
        _at_least(f"{p}.seq_length", self.seq_length, 1)
        _at_least(f"{p}.num_workers", self.num_workers, 0)


def _check_blend(key: str, blend: tuple[BlendEntry, ...]) -> None:
    for i, entry in enumerate(blend):
        if not entry.path:
            raise ConfigError(f"{key}[{i}].path: expected a path prefix, got ''")
        if not (math.isfinite(entry.weight) and entry.weight > 0.0):
            raise ConfigError(
                f"{key}[{i}].weight: expected a finite number > 0, got {entry.weight}")
        if entry.name is not None and not entry.name:
            raise ConfigError(f"{key}[{i}].name: expected a name or null, got ''")


def _sources(data: DataConfig) -> list[tuple[str, BlendEntry]]:
    """(recipe key, entry) of every training source: data.blend, then data.replay.blend."""
    out = [(f"data.blend[{i}]", e) for i, e in enumerate(data.blend)]
    if data.replay is not None:
        out += [(f"data.replay.blend[{i}]", e) for i, e in enumerate(data.replay.blend)]
    return out


def source_names(data: DataConfig) -> tuple[str, ...]:
    """The training sources' names in token-accounting order: data.blend, then the replay blend
    (data.synthetic: the one source `synthetic`)."""
    if data.synthetic:
        return ("synthetic",)
    return tuple(source_name(e) for _, e in _sources(data))


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenizerConfig:
    """Key `tokenizer`: how text becomes token ids."""

    type: str = "none"
    """sentencepiece|hf|none; none = pretokenized or synthetic data (set model.vocab_size)."""
    path: str | None = None
    """The sentencepiece `.model` file or the HF tokenizer folder; required unless type is none."""

    def __post_init__(self):
        _one_of("tokenizer.type", self.type, ("sentencepiece", "hf", "none"))
        if self.type != "none" and not self.path:
            raise ConfigError(f"tokenizer.path is required when tokenizer.type is {self.type!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleConfig:
    """Key `train.schedule`: the learning rate of each optimizer step (engine.train.schedule).

    Steps count from the start of the stage: a run started from checkpoint.pretrained starts its
    schedule at step 0. Re-warming for continual pretraining (Gupta et al. 2023, arXiv
    2308.04014) is warmup_init_lr -> optim.lr over warmup_steps, then any decay; the infinite
    schedule of Ibrahim et al. 2024 (arXiv 2403.08763 §7.3) is wsd with cooldown_steps and
    constant_lr; a constant learning rate with a cooldown at the end (Hägele et al. 2024, arXiv
    2405.18392) is plain wsd."""

    style: str = "cosine"
    """constant|linear|cosine|wsd (warmup-stable-decay, MiniCPM arXiv 2404.06395)."""
    warmup_steps: int = 0
    """Linear warmup length, in optimizer steps."""
    warmup_init_lr: float = 0.0
    """Learning rate at step 0, where the warmup starts (re-warming: the previous stage's last
    learning rate)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay (and after it); at most optim.lr."""
    decay_steps: int | None = None
    """linear/cosine: length of the decay after warmup; null = train.steps - warmup_steps."""
    wsd_decay_steps: int | None = None
    """wsd only: length of the linear decay to min_lr; null = 10% of train.steps (as MiniCPM)."""
    cooldown_steps: int = 0
    """wsd only: after warmup, a cosine step down from optim.lr to constant_lr over this many
    steps (the "cooldown" of Ibrahim et al.'s infinite schedule); 0 = none."""
    constant_lr: float | None = None
    """wsd only: learning rate of the stable phase, reached after cooldown_steps; null = optim.lr.
    Set together with cooldown_steps."""
    decay_start: int | None = None
    """wsd only: start the decay at this step, if that is earlier than
    train.steps - wsd_decay_steps; the run then ends when the decay does. null = no fixed start."""
    decay_file: str | None = None
    """wsd only: start the decay at the step when this file appears (checked before every step;
    touch it to end an open-ended run); the start is saved in checkpoints, so a resumed run
    continues the decay, and the run ends when the decay does. A file left from an earlier stage
    starts the decay right after warmup (a warning says so). null = no file."""

    def __post_init__(self):
        p = "train.schedule"
        _one_of(f"{p}.style", self.style, ("constant", "linear", "cosine", "wsd"))
        _at_least(f"{p}.warmup_steps", self.warmup_steps, 0)
        _at_least(f"{p}.warmup_init_lr", self.warmup_init_lr, 0.0)
        _at_least(f"{p}.min_lr", self.min_lr, 0.0)
        _at_least(f"{p}.decay_steps", self.decay_steps, 1)
        _at_least(f"{p}.wsd_decay_steps", self.wsd_decay_steps, 1)
        _at_least(f"{p}.cooldown_steps", self.cooldown_steps, 0)
        _at_least(f"{p}.constant_lr", self.constant_lr, 0.0)
        _at_least(f"{p}.decay_start", self.decay_start, 0)
        for name in ("wsd_decay_steps", "cooldown_steps", "constant_lr", "decay_start",
                     "decay_file"):
            if getattr(self, name) not in (None, 0) and self.style != "wsd":
                raise ConfigError(
                    f"{p}.{name} is set but {p}.style is {self.style!r}, not 'wsd'")
        if (self.cooldown_steps > 0) != (self.constant_lr is not None):
            raise ConfigError(
                f"{p}.cooldown_steps={self.cooldown_steps} and {p}.constant_lr="
                f"{self.constant_lr} go together (a cooldown to a constant learning rate)")
        if self.constant_lr is not None and self.constant_lr < self.min_lr:
            raise ConfigError(
                f"{p}.constant_lr={self.constant_lr} is below {p}.min_lr={self.min_lr}")
        if (self.decay_start is not None or self.decay_file) and self.wsd_decay_steps is None:
            raise ConfigError(f"{p}.decay_start/decay_file need {p}.wsd_decay_steps (the decay's "
                              "length when it starts on demand)")
        if self.decay_file == "":
            raise ConfigError(f"{p}.decay_file: expected a path or null, got ''")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """Key `train`: steps, batch sizes, precision, evaluation cadence and recomputation."""

    steps: int = 100
    """Optimizer steps to train for (megatron train_iters); 0 saves the initial weights."""
    micro_batch_size: int = 1
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks; null = micro_batch_size * dp (no accumulation)."""
    seed: int = 1234
    """Seed of model initialization, dropout and data order."""
    precision: str = "fp32"
    """fp32|bf16|fp16: parameter and compute precision (fp16 uses a dynamic loss scale)."""
    fp8: str | None = None
    """FP8 matrix multiplies through Transformer Engine: hybrid (e4m3 forward, e5m2 gradients)
    or e4m3; null = off. Needs the TE layer spec (a CUDA machine with transformer-engine)."""
    fp8_recipe: str = "delayed"
    """TE scaling recipe with fp8: delayed|tensorwise|mxfp8|blockwise (megatron's fp8_recipe)."""
    eval_interval: int | None = None
    """Evaluate on data.valid every this many steps; null = no evaluation."""
    eval_steps: int = 10
    """Batches per validation set at each evaluation."""
    eval_interval_early: int | None = None
    """Also evaluate every this many steps during the first eval_early_steps steps of the stage
    (forgetting and the stability gap right after a continual-pretraining stage starts; De Lange
    et al. 2023, arXiv 2205.13452); a stage that starts at step 0 is then also evaluated before
    its first step. null = only eval_interval."""
    eval_early_steps: int | None = None
    """How many steps from the stage's start eval_interval_early applies to."""
    override_schedule: bool = False
    """On resume, accept LR schedule arguments (train.schedule.*, optim.lr, and train.steps where
    it moves the learning rate of steps already taken) that differ from the checkpoint's: the new
    values apply from the resumed step on and the change is logged. false = such a resume stops
    with an error naming the changed keys."""
    recompute: str = "none"
    """Activation recomputation: none|selective (core attention)|full (whole layers)."""
    recompute_num_layers: int = 1
    """With full recompute, layers per recomputed group (megatron's uniform method)."""
    exit_interval: int | None = None
    """Stop (saving a checkpoint) once the step is a multiple of this; the schedule still spans
    `steps`, so a later run resumes it (megatron's --exit-interval); null = run to `steps`."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule."""

    def __post_init__(self):
        p = "train"
        _at_least(f"{p}.steps", self.steps, 0)
        for name in ("micro_batch_size", "exit_interval", "global_batch_size", "eval_interval",
                     "eval_steps", "recompute_num_layers", "eval_interval_early",
                     "eval_early_steps"):
            _at_least(f"{p}.{name}", getattr(self, name), 1)
        _at_least(f"{p}.seed", self.seed, 0)
        _one_of(f"{p}.precision", self.precision, ("fp32", "bf16", "fp16"))
        if self.fp8 is not None:
            _one_of(f"{p}.fp8", self.fp8, ("hybrid", "e4m3"))
        _one_of(f"{p}.fp8_recipe", self.fp8_recipe, ("delayed", "tensorwise", "mxfp8", "blockwise"))
        _one_of(f"{p}.recompute", self.recompute, ("none", "selective", "full"))
        s = self.schedule
        if s.warmup_steps > self.steps:
            raise ConfigError(
                f"{p}.schedule.warmup_steps={s.warmup_steps} exceeds {p}.steps={self.steps}"
            )
        if s.wsd_decay_steps is not None:
            phases = {"warmup_steps": s.warmup_steps, "cooldown_steps": s.cooldown_steps,
                      "wsd_decay_steps": s.wsd_decay_steps}
            if not s.cooldown_steps:
                del phases["cooldown_steps"]
            if sum(phases.values()) > self.steps:
                raise ConfigError(
                    f"{p}.schedule.{'+'.join(phases)}={sum(phases.values())} exceeds "
                    f"{p}.steps={self.steps} ("
                    + ", ".join(f"{k}={v}" for k, v in phases.items()) + ")")
        if s.decay_start is not None:
            earliest, latest = s.warmup_steps + s.cooldown_steps, self.steps - s.wsd_decay_steps
            if not earliest <= s.decay_start <= latest:
                raise ConfigError(
                    f"{p}.schedule.decay_start={s.decay_start}: expected a step in "
                    f"[{earliest}, {latest}] (after warmup_steps+cooldown_steps, leaving "
                    f"wsd_decay_steps={s.wsd_decay_steps} before {p}.steps={self.steps})")
        if (self.eval_interval_early is None) != (self.eval_early_steps is None):
            raise ConfigError(
                f"{p}.eval_interval_early={self.eval_interval_early} and {p}.eval_early_steps="
                f"{self.eval_early_steps} go together (evaluate every eval_interval_early steps "
                "during the first eval_early_steps)")


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    """Key `optim`: the optimizer, in megatron-core `OptimizerConfig` names where they exist."""

    name: str = "adam"
    """adam|sgd (megatron `optimizer`); adam is AdamW (decoupled weight decay)."""
    lr: float = 3e-4
    """Peak learning rate; the schedule multiplies it."""
    weight_decay: float = 0.01
    """Decoupled weight decay coefficient."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.95
    """Adam's second-moment decay."""
    adam_eps: float = 1e-8
    """Adam's denominator epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient L2 norm to this; 0 = no clipping."""
    sgd_momentum: float = 0.9
    """SGD momentum."""

    def __post_init__(self):
        p = "optim"
        _one_of(f"{p}.name", self.name, ("adam", "sgd"))
        _positive_float(f"{p}.lr", self.lr)
        _at_least(f"{p}.weight_decay", self.weight_decay, 0.0)
        _fraction(f"{p}.adam_beta1", self.adam_beta1)
        _fraction(f"{p}.adam_beta2", self.adam_beta2)
        _positive_float(f"{p}.adam_eps", self.adam_eps)
        _at_least(f"{p}.clip_grad", self.clip_grad, 0.0)
        _fraction(f"{p}.sgd_momentum", self.sgd_momentum)


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointConfig:
    """Key `checkpoint`: where to save, what to resume from, what to initialize weights from."""

    save: str | None = None
    """Directory to save checkpoints into; null = never save."""
    load: str | None = None
    """Directory to resume from (its latest complete checkpoint); null = the save directory."""
    pretrained: str | None = None
    """Checkpoint whose weights initialize the model when there is nothing to resume (CPT start)."""
    save_interval: int | None = None
    """Save every this many steps; null = only at the end."""
    keep_last: int | None = None
    """Keep this many most recent checkpoints, deleting older ones; null = keep all."""
    load_optim: bool = True
    """On resume, restore optimizer state (and the schedule's step)."""
    load_rng: bool = True
    """On resume, restore the random generators' states."""
    optim_sharding: str = "dp_reshardable"
    """How the distributed optimizer's state is saved (megatron-core's sharding types):
    dp_reshardable (every rank writes its shard; resumes at another data-parallel size only) or
    fully_reshardable (gathered per parameter on data-parallel rank 0; resumes at any TP/PP/DP)."""

    def __post_init__(self):
        p = "checkpoint"
        _one_of(f"{p}.optim_sharding", self.optim_sharding, ("dp_reshardable", "fully_reshardable"))
        _at_least(f"{p}.save_interval", self.save_interval, 1)
        _at_least(f"{p}.keep_last", self.keep_last, 1)
        if self.save is None:
            for name in ("save_interval", "keep_last"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{p}.{name}={getattr(self, name)} needs {p}.save (a directory)")


@dataclass(frozen=True, kw_only=True, slots=True)
class LoggingConfig:
    """Key `logging`: console lines and TensorBoard."""

    log_interval: int = 10
    """Print one progress line every this many steps."""
    tensorboard_dir: str | None = None
    """Directory for TensorBoard event files; null = no TensorBoard."""
    level: str = "info"
    """Python logging level of the engine's loggers: debug|info|warning|error."""
    stage: str | None = None
    """Name of this stage of a multi-stage run (pretrain, cpt-domain, ...): written to TensorBoard
    (text `stage`) at the stage's step 0 and into checkpoints, where later stages started from
    them (checkpoint.pretrained) list it among their earlier stages. null = unnamed."""
    moe_collapse_intervals: int = 3
    """Warn when an expert gets under 1/(4 x num_experts) of its layer's tokens for this many
    consecutive log intervals (router collapse)."""

    def __post_init__(self):
        _at_least("logging.log_interval", self.log_interval, 1)
        _at_least("logging.moe_collapse_intervals", self.moe_collapse_intervals, 1)
        _one_of("logging.level", self.level, ("debug", "info", "warning", "error"))
        if self.stage == "":
            raise ConfigError("logging.stage: expected a name or null, got ''")


@dataclass(frozen=True, kw_only=True, slots=True)
class Recipe:
    """A whole training run; cross-section rules are in `engine.config.validate.validate`."""

    model: ModelConfig
    """The model's shape (required)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    data: DataConfig
    """Training and validation data (required: a run that forgot it must not train on noise)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""

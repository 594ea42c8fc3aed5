"""Recipe sections: one frozen dataclass per YAML section, a docstring under every field.
`model` and `data` live in engine/config/{model,data}.py and are re-exported here, so this module
names every section.

Owns the shape of a recipe and the checks each section can make on its own fields. Rules that
need two sections (tp vs heads, degrees vs world size) live in `engine.config.validate`; YAML,
overrides and type coercion live in `engine.config.loader`. Imports neither torch nor megatron:
`model` uses megatron-core's `TransformerConfig`/`GPTModel` names so the model builder can pass
them through, but building anything is someone else's job. `__post_init__` only raises.
"""

from dataclasses import dataclass, field

from engine.config.checks import at_least, fraction, one_of, positive_float
from engine.config.data import (  # noqa: F401  (re-exported: one import path for every section)
    BlendEntry,
    DataConfig,
    ReplayConfig,
    ValidSet,
    source_name,
    source_names,
)
from engine.config.errors import ConfigError
from engine.config.freeze import FreezeConfig
from engine.config.mer import MerConfig
from engine.config.model import ModelConfig, MoEConfig, RopeScaling  # noqa: F401
from engine.config.spike import SpikeConfig


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
    """Context-parallel size (context_parallel_size): each sample's sequence is split over cp
    ranks in megatron's load-balanced 2*cp chunks (rank r holds chunks r and 2*cp-1-r), so
    data.seq_length must be a multiple of 2*cp. TE attention on GPU; on the local spec
    engine.models.cp_attention (keys and values all-gathered over the CP group)."""
    cp_comm_type: str = "p2p"
    """How Transformer Engine's attention exchanges keys and values under context parallelism
    (megatron cp_comm_type): p2p (ring), all_gather, or a2a (Ulysses-style: attention heads
    per tensor-parallel rank must be a multiple of cp). The local spec's CP attention always
    all-gathers (same numbers)."""
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
            at_least(f"{p}.{name}", getattr(self, name), 1)
        if self.vpp is not None:
            at_least(f"{p}.vpp", self.vpp, 2)  # one chunk per rank is "no virtual pipeline": null
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
        one_of(f"{p}.backend", self.backend, ("auto", "gloo", "nccl"))
        one_of(f"{p}.cp_comm_type", self.cp_comm_type, ("p2p", "all_gather", "a2a"))



@dataclass(frozen=True, kw_only=True, slots=True)
class TokenizerConfig:
    """Key `tokenizer`: how text becomes token ids."""

    type: str = "none"
    """sentencepiece|hf|none; none = pretokenized or synthetic data (set model.vocab_size)."""
    path: str | None = None
    """The sentencepiece `.model` file or the HF tokenizer folder; required unless type is none."""

    def __post_init__(self):
        one_of("tokenizer.type", self.type, ("sentencepiece", "hf", "none"))
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
        one_of(f"{p}.style", self.style, ("constant", "linear", "cosine", "wsd"))
        at_least(f"{p}.warmup_steps", self.warmup_steps, 0)
        at_least(f"{p}.warmup_init_lr", self.warmup_init_lr, 0.0)
        at_least(f"{p}.min_lr", self.min_lr, 0.0)
        at_least(f"{p}.decay_steps", self.decay_steps, 1)
        at_least(f"{p}.wsd_decay_steps", self.wsd_decay_steps, 1)
        at_least(f"{p}.cooldown_steps", self.cooldown_steps, 0)
        at_least(f"{p}.constant_lr", self.constant_lr, 0.0)
        at_least(f"{p}.decay_start", self.decay_start, 0)
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
    on_nonfinite: str = "stop"
    """A step whose loss or gradient norm is NaN/Inf: stop (an error, before its update reaches
    a checkpoint) or skip (no update for that step, counted and logged as
    `train/skipped_steps`; its batch is consumed). Every rank decides alike (global values)."""
    max_skips: int = 10
    """With on_nonfinite=skip: stop once this many steps in a row were skipped."""
    spike: SpikeConfig | None = None
    """Loss spikes: warn, or rewind to the checkpoint before and skip data (engine.config.spike);
    null = off."""
    recompute: str = "none"
    """Activation recomputation: none|selective (core attention)|full (whole layers)."""
    recompute_num_layers: int = 1
    """With full recompute, layers per recomputed group (megatron's uniform method)."""
    exit_interval: int | None = None
    """Stop (saving a checkpoint) once the step is a multiple of this; the schedule still spans
    `steps`, so a later run resumes it (megatron's --exit-interval); null = run to `steps`."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule."""
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    """Train only the embedding and output layer for the stage's first steps (after a vocabulary
    extension), then everything (engine.config.freeze)."""
    mer: MerConfig | None = None
    """Replay with a Reptile step every k steps (engine.config.mer: Abbes et al. 2025); null =
    off."""

    def __post_init__(self):
        p = "train"
        at_least(f"{p}.steps", self.steps, 0)
        for name in ("micro_batch_size", "exit_interval", "global_batch_size", "eval_interval",
                     "eval_steps", "recompute_num_layers", "eval_interval_early",
                     "eval_early_steps"):
            at_least(f"{p}.{name}", getattr(self, name), 1)
        at_least(f"{p}.seed", self.seed, 0)
        one_of(f"{p}.precision", self.precision, ("fp32", "bf16", "fp16"))
        if self.fp8 is not None:
            one_of(f"{p}.fp8", self.fp8, ("hybrid", "e4m3"))
        one_of(f"{p}.fp8_recipe", self.fp8_recipe, ("delayed", "tensorwise", "mxfp8", "blockwise"))
        one_of(f"{p}.recompute", self.recompute, ("none", "selective", "full"))
        one_of(f"{p}.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        at_least(f"{p}.max_skips", self.max_skips, 1)
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
        one_of(f"{p}.name", self.name, ("adam", "sgd"))
        positive_float(f"{p}.lr", self.lr)
        at_least(f"{p}.weight_decay", self.weight_decay, 0.0)
        fraction(f"{p}.adam_beta1", self.adam_beta1)
        fraction(f"{p}.adam_beta2", self.adam_beta2)
        positive_float(f"{p}.adam_eps", self.adam_eps)
        at_least(f"{p}.clip_grad", self.clip_grad, 0.0)
        fraction(f"{p}.sgd_momentum", self.sgd_momentum)


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
    pretrained_optim: bool = False
    """A new stage from checkpoint.pretrained also takes its optimizer state: Adam's moments and
    step count (e.g. Scale-Up's --carry-optimizer), with this recipe's hyperparameters and
    learning-rate schedule; false starts a fresh optimizer."""
    load_rng: bool = True
    """On resume, restore the random generators' states."""
    optim_sharding: str = "dp_reshardable"
    """How the distributed optimizer's state is saved (megatron-core's sharding types):
    dp_reshardable (every rank writes its shard; resumes at another data-parallel size only) or
    fully_reshardable (gathered per parameter on data-parallel rank 0; resumes at any TP/PP/DP)."""
    fallback: bool = False
    """When the latest checkpoint is damaged (a file missing, truncated or corrupted against its
    manifest), resume from the newest intact earlier one instead of stopping."""
    verify_checksums: bool = True
    """On resume, check every file's CRC-32 against the manifest (the ranks share the reading);
    false checks sizes only."""

    def __post_init__(self):
        p = "checkpoint"
        if self.pretrained_optim and not self.pretrained:
            raise ConfigError(f"{p}.pretrained_optim needs {p}.pretrained (the checkpoint whose "
                              "optimizer state to start from)")
        one_of(f"{p}.optim_sharding", self.optim_sharding, ("dp_reshardable", "fully_reshardable"))
        at_least(f"{p}.save_interval", self.save_interval, 1)
        at_least(f"{p}.keep_last", self.keep_last, 1)
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
    drift: bool = False
    """At every evaluation, per-layer weight drift ||W_t - W_0|| / ||W_0|| from the stage's start
    and the last step's update/weight ratio, as `drift/layer<i>/weight|update` (engine.train.drift).
    Costs one copy of the parameters (kept, and saved in checkpoints) plus a transient one."""

    def __post_init__(self):
        at_least("logging.log_interval", self.log_interval, 1)
        at_least("logging.moe_collapse_intervals", self.moe_collapse_intervals, 1)
        one_of("logging.level", self.level, ("debug", "info", "warning", "error"))
        if self.stage == "":
            raise ConfigError("logging.stage: expected a name or null, got ''")


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalConfig:
    """Key `eval`: lm-evaluation-harness task probes during training (engine.eval), on the
    training model at the steps the validation losses are evaluated (train.eval_interval and
    train.eval_interval_early, step 0 included), logged as `tasks/<task>/acc` and `acc_norm`."""

    tasks: tuple[str, ...] = ()
    """Task names: eval.include_path, configs/tasks/, lm-eval's registry (data available
    locally); empty = no probes."""
    limit: int | None = 100
    """At most this many documents per task at each evaluation (bounds the cost); null = all."""
    num_fewshot: int | None = None
    """Few-shot examples per request; null = each task's own setting."""
    include_path: str | None = None
    """Another directory of task YAMLs, searched before configs/tasks/ (its tasks replace the
    shipped ones of the same name)."""
    batch_size: int = 16
    """Sequences per forward pass of the probes."""
    seed: int = 1234
    """Few-shot sampling seed (engine eval --seed)."""

    def __post_init__(self):
        at_least("eval.limit", self.limit, 1)
        at_least("eval.num_fewshot", self.num_fewshot, 0)
        at_least("eval.batch_size", self.batch_size, 1)
        if len(set(self.tasks)) != len(self.tasks) or any(not t for t in self.tasks):
            raise ConfigError(f"eval.tasks: expected distinct task names, got {list(self.tasks)}")


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Task probes during training (lm-evaluation-harness)."""

"""Cross-section rules of a recipe, in one place, and the parallel layout they imply.

Owns `validate(recipe, world_size) -> Layout`. Each rule raises a one-line
ConfigError that shows every factor it multiplied, like torchtitan's `ParallelDims`. Pure: imports
neither torch nor megatron, reads no environment; the world size is an argument.
"""

from dataclasses import dataclass

from engine.config.errors import ConfigError
from engine.config.recipe import Recipe


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    """The resolved parallel layout and batch arithmetic of one run."""

    world_size: int
    """Number of ranks."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    vpp: int | None
    """Model chunks per pipeline rank; None = no virtual pipeline."""
    cp: int
    """Context-parallel size."""
    ep: int
    """Expert-parallel size (divides dp)."""
    dp: int
    """Data-parallel size: world_size / (tp * pp * cp)."""
    micro_batch_size: int
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int
    """Samples per optimizer step: num_microbatches * micro_batch_size * dp."""
    num_microbatches: int
    """Microbatches each data-parallel rank accumulates per optimizer step."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _data_parallel_size(recipe: Recipe, world_size: int) -> int:
    par = recipe.parallel
    _require(world_size >= 1, f"world_size: expected >= 1, got {world_size}")
    model_parallel = par.tp * par.pp * par.cp
    factors = f"tp={par.tp}, pp={par.pp}, cp={par.cp}"
    _require(world_size % model_parallel == 0,
             f"world_size={world_size} is not divisible by tp*pp*cp={model_parallel} ({factors})")
    dp = world_size // model_parallel
    _require(par.dp is None or par.dp == dp,
             f"parallel.dp={par.dp} but world_size/(tp*pp*cp)={dp} "
             f"(world_size={world_size}, {factors})")
    _require(dp % par.ep == 0,
             f"parallel.ep={par.ep} must divide dp={dp} (dp = world_size/(tp*pp*cp) = "
             f"{world_size}/({par.tp}*{par.pp}*{par.cp}))")
    return dp


def _check_model_split(recipe: Recipe) -> None:
    model, par = recipe.model, recipe.parallel
    tp = par.tp
    _require(model.num_attention_heads % tp == 0,
             f"parallel.tp={tp} must divide model.num_attention_heads={model.num_attention_heads}")
    if model.num_query_groups is not None:
        _require(model.num_query_groups % tp == 0,
                 f"parallel.tp={tp} must divide model.num_query_groups={model.num_query_groups}")
    _require(model.ffn_hidden_size % tp == 0,
             f"parallel.tp={tp} must divide model.ffn_hidden_size={model.ffn_hidden_size}")
    if par.vpp is None:
        _require(model.num_layers % par.pp == 0,
                 f"model.num_layers={model.num_layers} must be divisible by parallel.pp={par.pp}")
    else:
        chunks = par.pp * par.vpp
        _require(model.num_layers % chunks == 0,
                 f"model.num_layers={model.num_layers} must be divisible by pp*vpp={chunks} "
                 f"(pp={par.pp}, vpp={par.vpp})")
    _check_moe(recipe)


def _check_moe(recipe: Recipe) -> None:
    model, par = recipe.model, recipe.parallel
    if model.moe is None:
        _require(par.ep == 1, f"parallel.ep={par.ep} needs a mixture-of-experts model (model.moe)")
        return
    experts = model.moe.num_experts
    _require(experts % par.ep == 0,
             f"parallel.ep={par.ep} must divide model.moe.num_experts={experts}")
    # megatron-core refuses MoE with tensor parallelism but without sequence parallelism
    _require(par.tp == 1 or par.sequence_parallel,
             f"model.moe with parallel.tp={par.tp} needs parallel.sequence_parallel=true")
    ffn = model.moe.ffn_hidden_size or model.ffn_hidden_size
    _require(ffn % par.tp == 0, f"parallel.tp={par.tp} must divide the expert width {ffn}")


def _check_sequence(recipe: Recipe) -> None:
    model, par, seq = recipe.model, recipe.parallel, recipe.data.seq_length
    # RoPE scaling is what makes positions past max_position_embeddings meaningful (ntk takes
    # max_position_embeddings as its original context, like transformers' `dynamic`)
    _require(seq <= model.max_position_embeddings or model.rotary_scaling is not None,
             f"data.seq_length={seq} exceeds model.max_position_embeddings="
             f"{model.max_position_embeddings} and model.rotary_scaling is not set")
    if par.cp > 1:
        # megatron's load-balanced split: 2*cp equal chunks, rank r holds r and 2*cp-1-r
        _require(seq % (2 * par.cp) == 0,
                 f"data.seq_length={seq} must be divisible by 2*parallel.cp={2 * par.cp} "
                 f"(the load-balanced split into 2*cp chunks; cp={par.cp})")
        heads = model.num_attention_heads // par.tp
        _require(par.cp_comm_type != "a2a" or heads % par.cp == 0,
                 f"parallel.cp_comm_type=a2a: attention heads per tensor-parallel rank "
                 f"{heads} (model.num_attention_heads={model.num_attention_heads} / parallel.tp="
                 f"{par.tp}) must be divisible by parallel.cp={par.cp}")
        _require(not recipe.eval.tasks,
                 f"eval.tasks={list(recipe.eval.tasks)} with parallel.cp={par.cp}: the task "
                 "probes run whole sequences (cp=1); run engine eval on the checkpoint instead")
    if par.sequence_parallel:
        per_cp_rank = seq // par.cp
        _require(per_cp_rank % par.tp == 0,
                 f"data.seq_length/cp={per_cp_rank} must be divisible by parallel.tp={par.tp} "
                 f"with parallel.sequence_parallel (seq_length={seq}, cp={par.cp})")


def _check_vocab(recipe: Recipe) -> None:
    if recipe.model.vocab_size is None:
        _require(recipe.tokenizer.type != "none",
                 "model.vocab_size is required when tokenizer.type is 'none'")
    first_new, vocab = recipe.train.freeze.new_rows_from, recipe.model.vocab_size
    _require(first_new is None or vocab is None or first_new < vocab,
             f"train.freeze.new_rows_from={first_new} must be below model.vocab_size={vocab} "
             "(the new rows are the ids from it on)")
    _require(not (recipe.train.freeze.steps and recipe.checkpoint.pretrained_optim),
             f"train.freeze.steps={recipe.train.freeze.steps} with "
             "checkpoint.pretrained_optim=true: the freeze starts every frozen parameter from "
             "zero moments; start a fresh optimizer (pretrained_optim=false) or drop the freeze")


def _check_documents(recipe: Recipe) -> None:
    data = recipe.data
    for key in ("reset_attention_mask", "reset_position_ids", "eod_mask_loss"):
        # document boundaries are the tokenizer's end-of-document id
        _require(not getattr(data, key) or recipe.tokenizer.type != "none",
                 f"data.{key}=true needs the tokenizer's end-of-document id, but "
                 "tokenizer.type is none")


def _num_microbatches(recipe: Recipe, dp: int) -> tuple[int, int]:
    """(global_batch_size, num_microbatches)."""
    train, par = recipe.train, recipe.parallel
    mbs = train.micro_batch_size
    per_step = mbs * dp
    gbs = per_step if train.global_batch_size is None else train.global_batch_size
    _require(gbs % per_step == 0,
             f"train.global_batch_size={gbs} must be divisible by micro_batch_size*dp={per_step} "
             f"(micro_batch_size={mbs}, dp={dp})")
    num_microbatches = gbs // per_step
    if par.vpp is not None:  # the interleaved schedule runs microbatches in groups of pp
        _require(num_microbatches % par.pp == 0,
                 f"with parallel.vpp={par.vpp}, num_microbatches={num_microbatches} must be a "
                 f"multiple of parallel.pp={par.pp} (num_microbatches = global_batch_size/"
                 f"(micro_batch_size*dp) = {gbs}/({mbs}*{dp}))")
    return gbs, num_microbatches


def _check_training(recipe: Recipe) -> None:
    train, optim, data = recipe.train, recipe.optim, recipe.data
    min_lr = train.schedule.min_lr
    _require(min_lr <= optim.lr, f"train.schedule.min_lr={min_lr} exceeds optim.lr={optim.lr}")
    constant_lr = train.schedule.constant_lr
    _require(constant_lr is None or constant_lr <= optim.lr,
             f"train.schedule.constant_lr={constant_lr} exceeds optim.lr={optim.lr}")
    for key in ("eval_interval", "eval_interval_early"):
        value = getattr(train, key)
        if value is not None:
            _require(bool(data.valid) or data.synthetic or bool(recipe.eval.tasks),
                     f"train.{key}={value} needs data.valid or eval.tasks (none given)")
    if train.spike is not None and train.spike.action == "rewind":
        _require(bool(recipe.checkpoint.save), "train.spike.action=rewind needs checkpoint.save "
                 "(the checkpoints it rewinds to)")
        _require(not data.synthetic, "train.spike.action=rewind needs data.blend: synthetic "
                 "data has no position to skip")
    if recipe.eval.tasks:
        _require(recipe.tokenizer.type != "none",
                 f"eval.tasks={list(recipe.eval.tasks)} needs a tokenizer (tokenizer.type is "
                 "none): the probes are text")
        _require(train.eval_interval is not None or train.eval_interval_early is not None,
                 f"eval.tasks={list(recipe.eval.tasks)} runs at the evaluation steps: set "
                 "train.eval_interval (or train.eval_interval_early)")


def _check_replay(recipe: Recipe, global_batch_size: int) -> None:
    """Every global batch must hold at least one replay sample and one domain sample."""
    replay = recipe.data.replay
    if replay is None:
        return
    per_batch = replay.samples_per_batch(global_batch_size)
    _require(0 < per_batch < global_batch_size,
             f"data.replay.fraction={replay.fraction} of train.global_batch_size="
             f"{global_batch_size} rounds to {per_batch} replay samples per batch; expected 1.."
             f"{global_batch_size - 1}")


def validate(recipe: Recipe, world_size: int, *, source: str | None = None) -> Layout:
    """Check the rules that span sections for a run on `world_size` ranks; return its Layout.
    `source` (the recipe's file) prefixes the error: `configs/x.yaml: parallel.tp=3 must ...`."""
    try:
        return _layout(recipe, world_size)
    except ConfigError as e:
        if source is None:
            raise
        raise ConfigError(f"{source}: {e}") from None


def _layout(recipe: Recipe, world_size: int) -> Layout:
    dp = _data_parallel_size(recipe, world_size)
    _check_model_split(recipe)
    _check_sequence(recipe)
    _check_vocab(recipe)
    _check_documents(recipe)
    gbs, num_microbatches = _num_microbatches(recipe, dp)
    _check_training(recipe)
    _check_replay(recipe, gbs)
    par = recipe.parallel
    return Layout(world_size=world_size, tp=par.tp, pp=par.pp, vpp=par.vpp, cp=par.cp, ep=par.ep,
                  dp=dp, micro_batch_size=recipe.train.micro_batch_size, global_batch_size=gbs,
                  num_microbatches=num_microbatches)

"""Everything a training run holds, built from a recipe: model chunks, optimizer, data, state.

Order matters and is written once here: tokenizer (vocab) -> TransformerConfig -> model chunks
-> DDP -> optimizer -> resume or pretrained weights -> datasets at the resumed position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from engine.checkpoint import (
    CheckpointError,
    SavedLayout,
    TrainState,
    completed_stages,
    current_layout,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    origin_of,
    read_saved_layout,
    read_train_state,
)
from engine.checkpoint.unsharded import check_writable
from engine.config.errors import ConfigError
from engine.config.recipe import Recipe, RopeScaling, source_names
from engine.distributed import Runtime
from engine.models.build import build_model, moe_aux_loss_scale, transformer_config
from engine.models.initialize import init_spec, initialize_weights
from engine.models.optimizer import build_optimizer, wrap_ddp
from engine.models.spec import check_training_attention, resolve_spec
from engine.models.vocab import VocabError, padded_vocab_size
from engine.train.batches import MicrobatchPlan, SyntheticDataset
from engine.train.drift import build_drift
from engine.train.freeze import optimizer_overrides
from engine.train.mer import build_mer
from engine.train.mixture import new_mixture, resumed_mixture
from engine.train.stage import current_schedule, resumed_schedule

log = logging.getLogger(__name__)


@dataclass
class Session:
    recipe: Recipe
    runtime: Runtime
    chunks: list
    """DDP-wrapped model chunks (one per virtual pipeline stage)."""
    optimizer: object
    train_data: object
    valid_data: dict
    plan: MicrobatchPlan
    padded_vocab_size: int
    """Embedding rows (engine.models.vocab)."""
    state: TrainState
    resumed_from: Path | None = None
    initialized_from: Path | None = None
    tokenizer: object = None
    moe_monitor: object = None
    """engine.train.moe_metrics.MoEMonitor for MoE models."""
    probes: object = None
    """engine.eval.probes.TaskProbes when the recipe has eval.tasks."""
    mer: object = None
    """engine.train.mer.Mer with train.mer (the anchor and the Reptile step)."""
    drift: object = None
    """engine.train.drift.Drift with logging.drift (the stage's start weights)."""


def _tokenizer(recipe: Recipe):
    if recipe.tokenizer.type == "none":
        return None
    from engine.data.tokenizer import load_tokenizer

    return load_tokenizer(recipe.tokenizer.type, recipe.tokenizer.path)


def _optimizer(recipe: Recipe, tc, chunks):
    # train.freeze: the embedding and output layer in their own groups (engine.train.freeze)
    return build_optimizer(recipe, tc, chunks,
                           overrides=lambda config: optimizer_overrides(recipe.train.freeze,
                                                                        config))


def _hook_schedules(recipe: Recipe, tc, chunks, optimizer) -> None:
    """The callbacks megatron-core's schedules call (as Megatron-LM's training.py sets them)."""
    from megatron.core.distributed import finalize_model_grads

    def one_or_list(fns):
        return fns[0] if len(fns) == 1 else fns

    tc.grad_scale_func = optimizer.scale_loss
    tc.finalize_model_grads_func = finalize_model_grads
    if recipe.parallel.overlap_grad_reduce:
        tc.no_sync_func = one_or_list([c.no_sync for c in chunks])
        tc.grad_sync_func = one_or_list([c.start_grad_sync for c in chunks])
    if recipe.parallel.overlap_param_gather:
        tc.param_sync_func = one_or_list([c.start_param_sync for c in chunks])


@dataclass(frozen=True, slots=True)
class Source:
    """The checkpoint this run starts from: resume (everything) or pretrained (weights only)."""

    path: Path
    resume: bool
    layout: SavedLayout | None
    """How it was saved (None for checkpoints without the engine's metadata)."""


def _remove_partial(root: Path) -> None:
    """Rank 0 deletes what an interrupted save left (iter_*.partial, never loaded)."""
    import torch.distributed as dist

    from engine.checkpoint.integrity import remove_partial

    if not dist.is_initialized() or dist.get_rank() == 0:
        remove_partial(root)
    if dist.is_initialized():
        dist.barrier()


def locate_source(recipe: Recipe) -> Source | None:
    """Resume beats pretrained, so a requeued job resumes instead of restarting."""
    from engine.checkpoint.io import intact_checkpoint

    ck = recipe.checkpoint
    if ck.save:
        _remove_partial(Path(ck.save))
    load_dir = ck.load or ck.save
    ckpt = intact_checkpoint(Path(load_dir), fallback=ck.fallback,
                             checksums=ck.verify_checksums) if load_dir else None
    if ckpt is None and ck.load is not None and ck.load != ck.save:
        raise CheckpointError(f"checkpoint.load={ck.load}: no checkpoint there "
                              "(expected latest_checkpointed_iteration.txt or an iter_ directory)")
    if ckpt is not None:
        if ck.pretrained:
            log.info("checkpoint.pretrained=%s ignored: resuming from %s", ck.pretrained, ckpt)
        return Source(ckpt, True, read_saved_layout(ckpt))
    if ck.pretrained:
        src = find_checkpoint(ck.pretrained)
        if src is None:
            raise CheckpointError(f"checkpoint.pretrained={ck.pretrained}: no checkpoint there")
        return Source(src, False, read_saved_layout(src))
    return None


ROPE_KEYS = ("rotary_base", "rotary_percent", "rotary_scaling")
"""The model keys without weights: a long-context stage may change them (ABF, RoPE scaling)."""


def check_rope_change(recipe: Recipe, source: Source) -> None:
    """A new stage from checkpoint.pretrained may change RoPE (rotary_base, rotary_percent,
    rotary_scaling: no weights; "Effective Long-Context Scaling", Xiong et al. 2023, raises the
    base at the long stage): said in one log line. A resume may not: the weights were trained
    with the checkpoint's RoPE and would silently see other positions."""
    stored = source.path / "recipe.yaml"
    if not stored.is_file():  # not an engine checkpoint: nothing to compare with
        return
    from engine.config.loader import read_recipe_yaml, recipe_from_dict

    model = read_recipe_yaml(stored).get("model") or {}
    was = recipe_from_dict({"model": model, "data": {"synthetic": True}}, str(stored)).model
    keys = ROPE_KEYS
    if any(m.rotary_scaling is not None and m.rotary_scaling.type == "ntk"
           for m in (was, recipe.model)):  # ntk's original context is max_position_embeddings
        keys += ("max_position_embeddings",)
    changes = "; ".join(f"model.{key} {_rope_text(getattr(was, key))} -> "
                        f"{_rope_text(getattr(recipe.model, key))}" for key in keys
                        if getattr(was, key) != getattr(recipe.model, key))
    if not changes:
        return
    if source.resume:
        raise CheckpointError(f"{source.path}: resuming with {changes}; a RoPE change starts a "
                              "new stage (checkpoint.pretrained)")
    log.info("RoPE changed from %s: %s", source.path, changes)


def _rope_text(value) -> str:
    """A RoPE value in a log line: numbers as they are, a scaling as type(changed fields)."""
    if not isinstance(value, RopeScaling):
        return "null" if value is None else str(value)
    defaults = RopeScaling(type=value.type)
    fields = ", ".join(f"{f}={getattr(value, f)}" for f in value.__dataclass_fields__
                       if f != "type" and getattr(value, f) != getattr(defaults, f))
    return f"{value.type}({fields})"


def embedding_rows(recipe: Recipe, tokenizer_vocab: int | None, source: Source | None) -> int:
    """The embedding's rows (engine.models.vocab): the checkpoint's when starting from one (a
    model keeps the rows it was made with), else megatron's padding at this run's tp."""
    vocab = recipe.model.vocab_size or tokenizer_vocab
    if vocab is None:
        raise ConfigError("model.vocab_size is required when tokenizer.type is none")
    saved = source.layout.padded_vocab_size if source and source.layout else None
    try:
        return padded_vocab_size(vocab, recipe.model.make_vocab_size_divisible_by,
                                 recipe.parallel.tp, saved=saved)
    except VocabError as e:
        raise CheckpointError(f"{source.path}: {e}" if source else str(e)) from None


def _restore(recipe: Recipe, source: Source | None, chunks, optimizer, vocab: int):
    if source is None:
        return None
    if source.resume:
        ck = recipe.checkpoint
        return load_checkpoint(source.path, chunks, optimizer,
                               layout=checkpoint_layout(recipe, vocab), load_optim=ck.load_optim,
                               load_rng=ck.load_rng)
    if recipe.checkpoint.pretrained_optim:  # weights and Adam's state, this recipe's settings
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        load_checkpoint(source.path, chunks, optimizer, layout=checkpoint_layout(recipe, vocab),
                        load_rng=False, require_optim=True)
        for group, settings in zip(optimizer.param_groups, fresh, strict=True):
            group.update(settings)
        log.info("optimizer state from %s (checkpoint.pretrained_optim)", source.path)
        return None
    load_weights(source.path, chunks)
    optimizer.reload_model_params()  # the optimizer's fp32 main copies follow the new weights
    return None


def _streams(blend, built: list, offsets: dict, *, seed: int, first: int):
    """A Blend (engine.data.streams) of built one-epoch datasets, sources numbered from
    `first` (domain blend first, then replay), each started at its offset."""
    from engine.config.data import source_name
    from engine.data.streams import Blend, EpochStream

    return Blend([EpochStream(d, seed=seed, index=first + i) for i, d in enumerate(built)],
                 [b.weight for b in blend], offsets=[offsets.get(source_name(b), 0)
                                                     for b in blend])


def _datasets(recipe: Recipe, runtime: Runtime, tokenizer, mixture: dict | None):
    """The training mix (engine.data.mixing over engine.data.streams: domain blend + replay,
    sources named, read from `mixture`'s start and offsets) and the validation sets."""
    from engine.data.mixing import TrainingMix

    layout, train, data = runtime.layout, recipe.train, recipe.data
    batch = layout.global_batch_size
    if train.steps == 0:  # train.steps=0 only writes the initial weights
        return None, {}
    names = source_names(data)
    if data.synthetic:
        vocab = tokenizer.vocab_size if tokenizer is not None else recipe.model.vocab_size
        synthetic = SyntheticDataset(vocab, data.seq_length, train.seed, train.steps * batch)
        return TrainingMix(synthetic, names, num_domain_sources=1, global_batch_size=batch), {}
    from engine.data.datasets import build_sources, build_valid_sets
    from engine.data.token_range import check_token_range

    replay = data.replay.samples_per_batch(batch) if data.replay else 0
    evaluates = train.eval_interval or train.eval_interval_early
    # an id past the vocabulary would index past the embedding mid-run: refuse it now, one line
    check_token_range([b.path for b in data.blend] +
                      [b.path for b in (data.replay.blend if data.replay else ())] +
                      [v.path for v in data.valid if evaluates],
                      recipe.model.vocab_size or tokenizer.vocab_size)
    common = dict(tokenizer=tokenizer, seq_length=data.seq_length, seed=train.seed,
                  data_cache_dir=data.cache_dir, reset_attention_mask=data.reset_attention_mask,
                  reset_position_ids=data.reset_position_ids, eod_mask_loss=data.eod_mask_loss)
    # Every rank reads its own batches (no broadcast); megatron builds index caches on rank 0 first.
    replay_blend = data.replay.blend if replay else ()
    built = build_sources([b.path for b in (*data.blend, *replay_blend)], **common)
    offsets, seed = mixture["offsets"], train.seed
    domain = _streams(data.blend, built[:len(data.blend)], offsets, seed=seed, first=0)
    replayed = _streams(replay_blend, built[len(data.blend):], offsets, seed=seed,
                        first=len(data.blend)) if replay else None
    valid = {}
    if evaluates and data.valid:
        valid = build_valid_sets({v.name: v.path for v in data.valid},
                                 valid_samples=train.eval_steps * batch, **common)
    mix = TrainingMix(domain, names, num_domain_sources=len(data.blend), global_batch_size=batch,
                      replay=replayed, replay_per_batch=replay, start=mixture["start"])
    return mix, valid


def checkpoint_layout(recipe: Recipe, rows: int) -> SavedLayout:
    return current_layout(
        distributed_optimizer=recipe.parallel.distributed_optimizer,
        optim_sharding=recipe.checkpoint.optim_sharding,
        padded_vocab_size=rows,
    )


def build_session(recipe: Recipe, runtime: Runtime) -> Session:
    tokenizer = _tokenizer(recipe)
    if tokenizer is not None and recipe.model.vocab_size is not None:
        from engine.data.datasets import check_vocab

        check_vocab(tokenizer.vocab_size, recipe.model.vocab_size)
    save = recipe.checkpoint.save
    if save:  # a save directory nothing can be written to: said now, not after the first steps
        check_writable(save, f"checkpoint.save={save}")
    source = locate_source(recipe)
    if source is not None:
        check_rope_change(recipe, source)
    # The schedule check reads JSON only: a refused resume fails before anything is built.
    resumed = source is not None and source.resume
    saved = read_train_state(source.path) if resumed else None
    schedule = resumed_schedule(recipe, source.path, saved) if resumed else \
        current_schedule(recipe)
    batch = runtime.layout.global_batch_size
    mixture = None if recipe.data.synthetic else (
        resumed_mixture(recipe, source.path, saved, batch) if resumed else
        new_mixture(recipe, batch))
    rows = embedding_rows(recipe, tokenizer.vocab_size if tokenizer else None, source)
    # Data first: a bad path or a corrupt .idx fails in seconds, before the model is built.
    train_data, valid_data = _datasets(recipe, runtime, tokenizer, mixture)
    spec = resolve_spec(recipe.model.spec, fp8=recipe.train.fp8)
    check_training_attention(spec, reset_attention_mask=recipe.data.reset_attention_mask)
    tc = transformer_config(recipe, runtime.layout, on_cpu=runtime.on_cpu,
                            gloo=runtime.backend == "gloo")
    models = build_model(recipe, tc, padded_vocab_size=rows, spec=spec)
    if not runtime.on_cpu:
        models = [m.to(runtime.device) for m in models]
    if source is None:  # from scratch: the same weights at every layout (megatron-core's own
        # init, which also marks the tensor-parallel weights, depends on pipeline/expert rank)
        vocab = recipe.model.vocab_size or tokenizer.vocab_size
        initialize_weights(models, init_spec(recipe.model, seed=recipe.train.seed,
                                             vocab_size=vocab))
    chunks = wrap_ddp(recipe, tc, models)
    optimizer = _optimizer(recipe, tc, chunks)
    _hook_schedules(recipe, tc, chunks, optimizer)
    state = _restore(recipe, source, chunks, optimizer, rows)
    if state is None:  # a new stage: from scratch or from checkpoint.pretrained
        state = TrainState(step=0, consumed_samples=0, consumed_tokens=0, schedule=schedule,
                           earlier_stages=completed_stages(source.path) if source else [],
                           origin=origin_of(source.path) if source else None)
    state = replace(state, schedule=schedule, stage=recipe.logging.stage, mixture=mixture)
    from megatron.core import parallel_state as ps

    plan = MicrobatchPlan(layout=runtime.layout, dp_rank=ps.get_data_parallel_rank())
    moe = recipe.model.moe
    monitor = None
    if moe is not None:
        from engine.train.moe_metrics import MoEMonitor

        monitor = MoEMonitor([getattr(c, "module", c) for c in chunks],
                             num_layers=recipe.model.num_layers, num_experts=moe.num_experts,
                             collapse_intervals=recipe.logging.moe_collapse_intervals,
                             aux_loss_scale=moe_aux_loss_scale(recipe.parallel))
    resumed_from = source.path if resumed else None
    return Session(recipe=recipe, runtime=runtime, chunks=chunks, optimizer=optimizer,
                   train_data=train_data, valid_data=valid_data, plan=plan,
                   padded_vocab_size=rows, state=state,
                   resumed_from=resumed_from,
                   initialized_from=source.path if source and not resumed else None,
                   tokenizer=tokenizer, moe_monitor=monitor,
                   probes=_probes(recipe, chunks, tokenizer),
                   mer=build_mer(recipe.train.mer, optimizer, chunks, step=state.step,
                                 resumed_from=resumed_from),
                   drift=build_drift(recipe.logging.drift, chunks, recipe.model.num_layers,
                                     step=state.step, resumed_from=resumed_from))


def _probes(recipe: Recipe, chunks, tokenizer):
    if not recipe.eval.tasks:
        return None
    from engine.eval.probes import TaskProbes

    return TaskProbes(recipe, chunks, tokenizer)

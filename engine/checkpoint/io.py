"""Save and load training checkpoints with megatron-core `dist_checkpointing`.

Layout of `checkpoint.save` (Megatron-LM's names, so its tools recognise it):

    <save>/iter_0000100/            one dist_checkpointing directory per saved step
        recipe.yaml, train_state.json   the recipe and the step beside the weights
    <save>/latest_checkpointed_iteration.txt   the tracker: written last, atomically

A checkpoint is written into `iter_XXXXXXX.partial`, renamed when every rank has finished, and
only then named by the tracker: a crash mid-save leaves the previous checkpoint as the latest.
Tensors are stored sharded by their global shape (ShardedTensor), so a checkpoint saved at one
TP/PP/DP layout loads at another. Everything read back goes through `torch.load(weights_only=True)`
(megatron-core's default on torch >= 2.6) or JSON.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model: one line says which."""


@dataclass(frozen=True, slots=True)
class TrainState:
    """Where training stands; stored in the checkpoint's common state and as train_state.json
    (plain JSON types only). Counts are of this stage: a run started from checkpoint.pretrained
    starts at zero and lists the stages before it in `earlier_stages`."""

    step: int
    """Optimizer steps done."""
    consumed_samples: int
    """Training samples consumed, the data position."""
    consumed_tokens: int
    """Loss tokens consumed."""
    schedule: dict
    """The LR schedule's arguments by recipe key (engine.train.schedule.schedule_args), checked
    on resume so that they never change silently."""
    source_tokens: dict = field(default_factory=dict)
    """Tokens read per training source name (samples x seq_length; data.blend and
    data.replay.blend names)."""
    decay_file_step: int | None = None
    """The step at which train.schedule.decay_file appeared and the wsd decay began; None = not."""
    stage: str | None = None
    """logging.stage of the run that saved this state."""
    earlier_stages: list = field(default_factory=list)
    """The stages before this one, oldest first, carried over checkpoint.pretrained: each
    {"stage", "steps", "tokens", "source_tokens"}."""


def _iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint directory `path` names: a save directory (via its tracker) or an iter_ dir.

    None when `path` holds no checkpoint yet; CheckpointError when the tracker points nowhere."""
    root = Path(path)
    if (root / "metadata.json").is_file():
        return root
    tracker = root / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected a step number, found {text[:40]!r}")
    ckpt = _iter_dir(root, int(text))
    if not (ckpt / "metadata.json").is_file():
        raise CheckpointError(
            f"{tracker} names step {text} but {ckpt} is missing or incomplete (no metadata.json)"
        )
    return ckpt


def read_train_state(ckpt: Path) -> TrainState:
    path = ckpt / "train_state.json"
    try:
        return TrainState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable train state ({e})") from None


def completed_stages(ckpt: Path) -> list[dict]:
    """The training stages the weights of `ckpt` went through, oldest first: its TrainState's
    earlier_stages, then its own stage when it trained (an imported or upcycled step-0 checkpoint
    adds none; pass its source's list as its earlier_stages to keep the history). A run started
    from `ckpt` as checkpoint.pretrained takes this as its earlier_stages."""
    if not (ckpt / "train_state.json").is_file():
        return []  # written by another tool
    state = read_train_state(ckpt)
    stages = list(state.earlier_stages)
    if state.step > 0:
        tokens = sum(state.source_tokens.values()) or state.consumed_tokens
        stages.append({"stage": state.stage, "steps": state.step, "tokens": tokens,
                       "source_tokens": dict(state.source_tokens)})
    return stages


def _rng_object(layout_shape, layout_offset, replica_id=0):
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", state, layout_shape, layout_offset, replica_id=replica_id)


def _rng_layout():
    """RNG states are per rank: one object per (pp, tp, dp) coordinate."""
    from megatron.core import parallel_state as ps

    shape = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return shape, offset


@dataclass(frozen=True, slots=True)
class SavedLayout:
    """How a checkpoint was written; stored as dist_checkpointing content metadata."""

    tp: int
    pp: int
    dp: int
    distributed_optimizer: bool
    optim_sharding: str
    """megatron-core's `distrib_optim_sharding_type` of the optimizer state."""
    ep: int = 1
    padded_vocab_size: int | None = None
    """Rows of the embedding. megatron pads the vocabulary to a multiple of
    make_vocab_size_divisible_by x tp, so a model loading this checkpoint at another tp must
    keep this size rather than recompute it."""

    def optimizer_metadata(self) -> dict:
        # fully_reshardable gathers each parameter's state on DP rank 0: megatron's default path
        # moves the buffers with `.cuda()`, its memory-efficient path gathers over gloo (same
        # files either way), which is the one that exists without CUDA.
        # The sharding type only for the distributed optimizer: megatron prefixes a chained
        # (dense + expert) optimizer's keys whenever a non-reshardable type is named, which would
        # tie a regular optimizer's state to its expert-parallel layout.
        if not self.distributed_optimizer:
            return {"chained_optim_avoid_prefix": True}
        return {"distrib_optim_sharding_type": self.optim_sharding,
                "chained_optim_avoid_prefix": True,
                "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


def current_layout(*, distributed_optimizer: bool, optim_sharding: str,
                   padded_vocab_size: int | None = None) -> SavedLayout:
    from megatron.core import parallel_state as ps

    return SavedLayout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        distributed_optimizer=distributed_optimizer,
        optim_sharding=optim_sharding,
        padded_vocab_size=padded_vocab_size,
    )


def read_saved_layout(ckpt: Path) -> SavedLayout | None:
    from megatron.core import dist_checkpointing

    try:
        meta = dist_checkpointing.load_content_metadata(str(ckpt)) or {}
    except Exception:  # noqa: BLE001 - checkpoints from other tools carry no metadata
        return None
    return SavedLayout(**meta["layout"]) if "layout" in meta else None


def _check_optimizer_compatible(ckpt: Path, saved: SavedLayout | None, now: SavedLayout) -> None:
    """Refuse, in one line, optimizer state that megatron-core cannot reshard to this layout."""
    if saved is None:
        return
    hint = "set checkpoint.load_optim=false to resume the weights with a fresh optimizer"
    if (saved.ep > 1) != (now.ep > 1):
        # expert weights get their own optimizer only with expert parallelism: the saved
        # optimizer is one chained pair, the new one a single optimizer, or the reverse
        raise CheckpointError(f"{ckpt}: optimizer state saved at ep={saved.ep} cannot load at "
                              f"ep={now.ep} (megatron-core keeps expert parameters in a separate "
                              f"optimizer only when ep > 1); {hint}")
    if not (saved.distributed_optimizer or now.distributed_optimizer):
        return  # the regular optimizer's state is sharded like the model: any layout loads
    if saved.distributed_optimizer != now.distributed_optimizer:
        raise CheckpointError(
            f"{ckpt}: optimizer state saved with parallel.distributed_optimizer="
            f"{str(saved.distributed_optimizer).lower()}, resuming with "
            f"{str(now.distributed_optimizer).lower()}; {hint}"
        )
    if saved.optim_sharding == "dp_reshardable" and \
            (saved.tp, saved.pp, saved.ep) != (now.tp, now.pp, now.ep):
        raise CheckpointError(
            f"{ckpt}: distributed optimizer state saved as dp_reshardable at tp={saved.tp} "
            f"pp={saved.pp} ep={saved.ep} cannot load at tp={now.tp} pp={now.pp} ep={now.ep} "
            f"(only the data-parallel size may change); {hint}, or save with "
            "checkpoint.optim_sharding=fully_reshardable")


def _model_sharded(chunks) -> dict:
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def save_checkpoint(
    root: str | os.PathLike,
    chunks,
    optimizer,
    state: TrainState,
    *,
    layout: SavedLayout,
    recipe_yaml: str,
    keep_last: int | None = None,
) -> Path:
    """Save model, optimizer, RNG and `state` as step `state.step`; every rank calls this."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = _iter_dir(root, state.step)
    partial = final.with_name(final.name + ".partial")
    rank0 = dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    dist.barrier()
    sharded = {"model": _model_sharded([_unwrap(c) for c in chunks])}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded["model"], metadata=layout.optimizer_metadata()
        )
    sharded["rng_state"] = _rng_object(*_rng_layout())
    sharded["train_state"] = asdict(state)
    dist_checkpointing.save(sharded, str(partial), content_metadata={"layout": asdict(layout)})
    dist.barrier()
    if rank0:
        _write_atomic(partial / "recipe.yaml", recipe_yaml)
        _write_atomic(partial / "train_state.json", json.dumps(asdict(state), indent=1))
        if final.exists():  # re-saving a step (e.g. after a crash before the tracker moved)
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(root / TRACKER, f"{state.step}\n")
        _apply_retention(root, keep_last, keep=final)
    dist.barrier()
    return final


def _apply_retention(root: Path, keep_last: int | None, *, keep: Path) -> None:
    if keep_last is None:
        return
    saved = sorted(p for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    for old in saved[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed old checkpoint %s (checkpoint.keep_last=%d)", old, keep_last)


def _load(sharded: dict, ckpt: Path) -> dict:
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load(sharded, str(ckpt))
    except CheckpointError:
        raise
    # megatron raises many types, torch's CheckpointException is a BaseException: the user
    # needs the path and the reason in one line.
    except (Exception, CheckpointException) as e:
        reason = " ".join(str(e).split())[:400]
        raise CheckpointError(f"{ckpt}: cannot load ({type(e).__name__}: {reason})") from e


def load_weights(ckpt: Path, chunks) -> None:
    """Model weights only, at any layout: the start of continual pretraining."""
    models = [_unwrap(c) for c in chunks]
    loaded = _load({"model": _model_sharded(models)}, ckpt)
    for i, model in enumerate(models):
        model.load_state_dict(loaded["model"][f"chunk{i}"])


def load_checkpoint(
    ckpt: Path,
    chunks,
    optimizer,
    *,
    layout: SavedLayout,
    load_optim: bool = True,
    load_rng: bool = True,
) -> TrainState:
    """Resume: model, optimizer (unless load_optim is false), RNG (when the layout matches).

    The optimizer state is read in the format it was saved in (the checkpoint's metadata). A
    step-0 checkpoint (`train.steps=0`: initial weights) has no optimizer state to read."""
    models = [_unwrap(c) for c in chunks]
    sharded = {"model": _model_sharded(models)}
    saved = read_saved_layout(ckpt)
    if optimizer is not None and load_optim and read_train_state(ckpt).step > 0:
        _check_optimizer_compatible(ckpt, saved, layout)
        fmt = replace(layout, optim_sharding=saved.optim_sharding) if saved else layout
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded["model"], is_loading=True, metadata=fmt.optimizer_metadata()
        )
    rng_shape, rng_offset = _rng_layout()
    saved_rng_shape = (saved.pp, saved.tp, saved.dp) if saved else None
    if load_rng and saved_rng_shape == rng_shape:
        sharded["rng_state"] = _rng_object(rng_shape, rng_offset)
    elif load_rng:
        log.warning(
            "%s: RNG state saved at (pp, tp, dp)=%s, running at %s: not restored",
            ckpt,
            saved_rng_shape,
            rng_shape,
        )
    loaded = _load(sharded, ckpt)
    for i, model in enumerate(models):
        model.load_state_dict(loaded["model"][f"chunk{i}"])
    if "optimizer" in sharded:
        with torch.no_grad():  # fp32 main params are views of the (grad-requiring) model params
            optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        optimizer.reload_model_params()
    if "rng_state" in sharded:
        rng = loaded["rng_state"]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(rng["tracker"])
    return TrainState(**loaded["train_state"])

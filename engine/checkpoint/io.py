"""Save and load training checkpoints with megatron-core `dist_checkpointing`.

Layout of `checkpoint.save` (Megatron-LM's names, so its tools recognise it):

    <save>/iter_0000100/            one dist_checkpointing directory per saved step
        recipe.yaml, train_state.json   the recipe and the step beside the weights
    <save>/latest_checkpointed_iteration.txt   the tracker: written last, atomically

A checkpoint is written into `iter_XXXXXXX.partial`, renamed when every rank has finished, and
only then named by the tracker: a crash mid-save leaves the previous checkpoint as the latest.
Tensors are stored sharded by their global shape (ShardedTensor), so a checkpoint saved at one
TP/PP/DP layout loads at another. Everything read back goes through `torch.load(weights_only=True)`
(megatron-core's default on torch >= 2.6) or JSON. The train state is `state.py`, the layout
rules `layout.py`, the RNG objects `rng.py`; a whole model in one process is `unsharded.py`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.layout import SavedLayout, check_optimizer_compatible, read_saved_layout
from engine.checkpoint.rng import restore_rng, rng_layout, rng_object
from engine.checkpoint.state import TrainState, read_train_state
from engine.config.loader import recipe_to_yaml
from engine.config.recipe import Recipe
from engine.files import write_atomic

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"


def _iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


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
    recipe: Recipe,
    keep_last: int | None = None,
) -> Path:
    """Save model, optimizer (None: none), RNG and `state` as step `state.step`, with `recipe`
    beside the weights; every rank calls this."""
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
    sharded["rng_state"] = rng_object(*rng_layout())
    sharded["train_state"] = asdict(state)
    dist_checkpointing.save(sharded, str(partial), content_metadata={"layout": asdict(layout)})
    dist.barrier()
    if rank0:
        write_atomic(partial / "recipe.yaml", recipe_to_yaml(recipe))
        write_atomic(partial / "train_state.json", json.dumps(asdict(state), indent=1))
        if final.exists():  # re-saving a step (e.g. after a crash before the tracker moved)
            shutil.rmtree(final)
        os.replace(partial, final)
        write_atomic(root / TRACKER, f"{state.step}\n")
        apply_retention(root, keep_last, keep=final)
    dist.barrier()
    return final


def apply_retention(root: Path, keep_last: int | None, *, keep: Path) -> None:
    """Remove all but the newest `keep_last` iter_ directories (never `keep`)."""
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
        check_optimizer_compatible(ckpt, saved, layout)
        fmt = replace(layout, optim_sharding=saved.optim_sharding) if saved else layout
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded["model"], is_loading=True, metadata=fmt.optimizer_metadata()
        )
    rng_shape, rng_offset = rng_layout()
    saved_rng_shape = (saved.pp, saved.tp, saved.dp) if saved else None
    if load_rng and saved_rng_shape == rng_shape:
        sharded["rng_state"] = rng_object(rng_shape, rng_offset)
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
        restore_rng(loaded["rng_state"])
    return TrainState(**loaded["train_state"])

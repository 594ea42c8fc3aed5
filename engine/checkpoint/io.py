"""Save and load training checkpoints with megatron-core `dist_checkpointing`.

Layout of `checkpoint.save` (Megatron-LM's names, so its tools recognise it):

    <save>/iter_0000100/            one dist_checkpointing directory per saved step
        recipe.yaml, train_state.json   the recipe and the step beside the weights
    <save>/latest_checkpointed_iteration.txt   the tracker: written last, atomically

A checkpoint is written into `iter_XXXXXXX.partial`, gets its manifest (every file's size and
CRC-32, engine.checkpoint.integrity), is renamed when every rank has finished, and only then
named by the tracker: a crash mid-save leaves the previous checkpoint as the latest, a save that
fails (a full disk) is one line and leaves the tracker alone, and a resume verifies the manifest
(`intact_checkpoint`, with checkpoint.fallback the newest intact earlier one).
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
from engine.checkpoint.integrity import (
    checkpoint_files,
    damage,
    describe,
    read_manifest,
    saved_steps,
    write_manifest,
)
from engine.checkpoint.layout import SavedLayout, check_optimizer_compatible, read_saved_layout
from engine.checkpoint.rng import restore_rng, rng_layout, rng_object
from engine.checkpoint.shapes import check_model_shapes
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
    extra=None,
) -> Path:
    """Save model, optimizer (None: none), RNG and `state` as step `state.step`, with `recipe`
    beside the weights; every rank calls this. `extra(model_sharded)` returns more top-level
    entries built on the model's sharded state dict (engine.train.mer's anchor)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

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
    if extra is not None:
        sharded.update(extra(sharded["model"]))
    try:
        dist_checkpointing.save(sharded, str(partial),
                                content_metadata={"layout": asdict(layout)})
        dist.barrier()
        if rank0:
            write_atomic(partial / "recipe.yaml", recipe_to_yaml(recipe))
            write_atomic(partial / "train_state.json", json.dumps(asdict(state), indent=1))
        dist.barrier()
        _write_manifest(partial)
    # a full disk, a quota, a vanished directory; megatron and torch raise many types, torch's
    # CheckpointException is a BaseException
    except (Exception, CheckpointException) as e:
        if rank0:
            shutil.rmtree(partial, ignore_errors=True)
        cause = _root_cause(e)
        raise CheckpointError(
            f"{root}: saving step {state.step} failed ({type(cause).__name__}: "
            f"{' '.join(str(cause).split())[:160]}; {_free_space(root)}); the tracker and the "
            "checkpoints before it are unchanged") from None
    _pause_for_tests()
    if rank0:
        if final.exists():  # re-saving a step (e.g. after a crash before the tracker moved)
            shutil.rmtree(final)
        os.replace(partial, final)
        write_atomic(root / TRACKER, f"{state.step}\n")
        apply_retention(root, keep_last, keep=final)
    dist.barrier()
    return final


def _free_space(root: Path) -> str:
    """How full the save's file system is: a full disk shows up in torch's writer as a torn
    file ('unexpected pos'), not as ENOSPC."""
    try:
        usage = shutil.disk_usage(root)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:,.1f} MiB free of {usage.total / 2**20:,.1f} MiB"


def _root_cause(error: BaseException) -> BaseException:
    """The first OSError (a full disk, a quota) behind a save's error, else the first failure
    torch's CheckpointException recorded, else the error itself."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
            todo += [x for f in failures.values() if isinstance(f, tuple) for x in f
                     if isinstance(x, BaseException)]
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return error


SAVE_PAUSE_ENV = "ENGINE_FAULT_SAVE_PAUSE"
"""Seconds to wait after every file of a save is written, before the rename and the tracker:
the window in which tests/chaos.py kills a save that is all but done."""


def _pause_for_tests() -> None:
    import time

    pause = float(os.environ.get(SAVE_PAUSE_ENV) or 0)
    if pause > 0:
        log.info("pausing %.1f s before the tracker (%s)", pause, SAVE_PAUSE_ENV)
        time.sleep(pause)


def _share(files: list[str]) -> list[str]:
    """This rank's share of `files` (every rank checks or checksums a part)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return files
    return files[dist.get_rank()::dist.get_world_size()]


def _gather(value) -> list:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _write_manifest(partial: Path) -> None:
    """Sizes and checksums of every file, the ranks sharing the work; rank 0 writes it."""
    import torch.distributed as dist

    described = describe(partial, _share(checkpoint_files(partial)))
    entries = {k: v for part in _gather(described) for k, v in part.items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_manifest(partial, entries)


def verify_checkpoint(ckpt: Path, *, checksums: bool = True) -> str | None:
    """What is damaged in `ckpt` (one line), None when it is intact; every rank calls it and
    checks a share of the files, and every rank gets the same answer."""
    found = [d for d in _gather(damage(ckpt, _share(sorted(read_manifest(ckpt) or {})),
                                       checksums=checksums)) if d]
    return found[0] if found else None


def intact_checkpoint(root: Path, *, fallback: bool, checksums: bool = True) -> Path | None:
    """The checkpoint to resume from in save directory `root`: the tracker's when it is intact;
    with `fallback`, else the newest intact earlier one (said in a warning); otherwise a damaged
    latest checkpoint is a CheckpointError naming the file."""
    try:
        latest = find_checkpoint(root)
    except CheckpointError as e:  # the tracker names a step that is not there
        if not fallback:
            raise
        latest, problem = None, str(e)
    else:
        if latest is None:
            return None
        problem = verify_checkpoint(latest, checksums=checksums)
        if problem is None:
            return latest
        if not fallback:
            raise CheckpointError(f"{problem}; set checkpoint.fallback=true to resume from the "
                                  "newest complete earlier checkpoint")
    for candidate in saved_steps(Path(root)):
        if candidate == latest:
            continue
        if verify_checkpoint(candidate, checksums=checksums) is None:
            log.warning("%s; resuming from %s instead (checkpoint.fallback)", problem, candidate)
            return candidate
    raise CheckpointError(f"{problem}; and no earlier checkpoint in {root} is complete")


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

    check_model_shapes(sharded.get("model", {}), ckpt)  # another model: one line, not a trace
    try:
        return dist_checkpointing.load(sharded, str(ckpt))
    except CheckpointError:
        raise
    # megatron raises many types, torch's CheckpointException is a BaseException: the user
    # needs the path and the reason in one line.
    except (Exception, CheckpointException) as e:
        reason = " ".join(str(e).split())[:400]
        raise CheckpointError(f"{ckpt}: cannot load ({type(e).__name__}: {reason})") from e


def load_extra(ckpt: Path, chunks, build) -> tuple[dict, dict]:
    """(what `build(model_sharded)` declares, read from `ckpt`; the model's sharded state dict
    it was built on): entries saved through save_checkpoint's `extra`; no weights are read."""
    model = _model_sharded([_unwrap(c) for c in chunks])
    return _load(build(model), ckpt), model


_FRESH = ("router.expert_bias",)
"""State a pretrained start may lack and then begins from the model's own initial value: the
aux-loss-free expert bias (model.moe.load_balancing=aux_free; zeros) of a checkpoint trained,
or upcycled, without it."""


def _drop_fresh(sharded: dict, ckpt: Path) -> set[str]:
    """Remove from `sharded` ({chunk: {name: ShardedTensor}}) the _FRESH entries `ckpt` does not
    hold; returns their names."""
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_tensors_metadata(str(ckpt))
    dropped = set()
    for chunk in sharded.values():
        for name in [n for n, t in chunk.items() if n.endswith(_FRESH) and t.key not in saved]:
            del chunk[name]
            dropped.add(name)
    return dropped


def load_weights(ckpt: Path, chunks) -> None:
    """Model weights only, at any layout: the start of continual pretraining."""
    models = [_unwrap(c) for c in chunks]
    sharded = _model_sharded(models)
    fresh = _drop_fresh(sharded, ckpt)
    if fresh:
        log.info("%s holds no %s: starting from zeros (model.moe.load_balancing=aux_free)", ckpt,
                 ", ".join(f for f in _FRESH if any(n.endswith(f) for n in fresh)))
    loaded = _load({"model": sharded}, ckpt)
    for i, model in enumerate(models):
        missing, unexpected = model.load_state_dict(loaded["model"][f"chunk{i}"], strict=False)
        if unexpected or set(missing) - fresh:
            raise CheckpointError(f"{ckpt}: the model's state does not match the checkpoint's "
                                  f"(missing {sorted(set(missing) - fresh)[:3]}, unexpected "
                                  f"{sorted(unexpected)[:3]})")


def holds_optimizer_state(ckpt: Path) -> bool:
    """Whether `ckpt` was saved with an optimizer's state."""
    from megatron.core import dist_checkpointing

    return any(k.startswith("optimizer.") for k in dist_checkpointing.load_tensors_metadata(
        str(ckpt)))


def load_checkpoint(
    ckpt: Path,
    chunks,
    optimizer,
    *,
    layout: SavedLayout,
    load_optim: bool = True,
    load_rng: bool = True,
    require_optim: bool = False,
) -> TrainState:
    """Resume: model, optimizer (unless load_optim is false), RNG (when the layout matches).

    The optimizer state is read in the format it was saved in (the checkpoint's metadata). A
    step-0 checkpoint (`train.steps=0`: initial weights) has no optimizer state to read, unless
    it was written with one (Scale-Up's --carry-optimizer); `require_optim` reads it and says
    in one line when there is none."""
    models = [_unwrap(c) for c in chunks]
    sharded = {"model": _model_sharded(models)}
    saved = read_saved_layout(ckpt)
    if require_optim and not holds_optimizer_state(ckpt):
        raise CheckpointError(f"{ckpt}: holds no optimizer state (an import, a step-0 "
                              "checkpoint, or an upcycle without --carry-optimizer)")
    has_optim = require_optim or read_train_state(ckpt).step > 0
    if optimizer is not None and load_optim and has_optim:
        check_optimizer_compatible(ckpt, saved, layout)
        fmt = replace(layout, optim_sharding=saved.optim_sharding) if saved else layout
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded["model"], is_loading=True, metadata=fmt.optimizer_metadata()
        )
    rng_shape, rng_offset = rng_layout()
    saved_rng_shape = (saved.pp, saved.tp, saved.dp * saved.cp) if saved else None
    if load_rng and saved_rng_shape == rng_shape:
        sharded["rng_state"] = rng_object(rng_shape, rng_offset)
    elif load_rng:
        log.warning(
            "%s: RNG state saved at (pp, tp, dp x cp)=%s, running at %s: not restored",
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

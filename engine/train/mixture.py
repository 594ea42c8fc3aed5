"""The data mixture a stage reads, and what a resume may change of it.

A mixture is the recipe's data blend, replay blend and fraction, global batch size and sequence
length (`signature`); the checkpoint stores it (TrainState.mixture) with where it began: `start`,
the consumed_samples at which it took over, and `offsets`, the samples each source had been read
before (engine.data.streams starts each source there). Training samples no longer depend on
train.steps (engine.data.streams), so a resume with more steps continues the same order.

A resume whose mixture differs stops in one line naming old -> new, like the LR schedule
(engine.train.stage), unless `data.override_on_resume` is true: then the new mixture starts at
the resumed step, every source continuing where it stopped (at the same seq_length; another
seq_length packs other samples, so its sources start from their beginning), and the change is
logged. Pure functions on the recipe and JSON; no I/O.
"""

from __future__ import annotations

import logging

from engine.checkpoint import CheckpointError, TrainState
from engine.config.recipe import Recipe

log = logging.getLogger(__name__)


def _entries(blend) -> list[list]:
    from engine.config.data import source_name

    return [[source_name(b), b.path, b.weight] for b in blend]


def signature(recipe: Recipe, global_batch_size: int) -> dict:
    """What defines the order of the training samples, by recipe key."""
    data = recipe.data
    replay = None if data.replay is None else {"blend": _entries(data.replay.blend),
                                               "fraction": data.replay.fraction}
    return {"data.blend": _entries(data.blend), "data.replay": replay,
            "train.global_batch_size": global_batch_size, "data.seq_length": data.seq_length}


def new_mixture(recipe: Recipe, global_batch_size: int) -> dict:
    return {"signature": signature(recipe, global_batch_size), "start": 0, "offsets": {}}


def resumed_mixture(recipe: Recipe, ckpt, saved: TrainState, global_batch_size: int) -> dict:
    """The mixture a run resuming `saved` reads: the checkpoint's when the recipe's is the same;
    a new one from the resumed step when it differs and data.override_on_resume is true; else a
    CheckpointError naming each change."""
    now = signature(recipe, global_batch_size)
    if saved.mixture is None:  # saved before mixtures were recorded: their order is gone
        log.warning("%s records no data mixture (an older checkpoint): the training data is "
                    "read from the start of each source", ckpt)
        return {"signature": now, "start": saved.consumed_samples, "offsets": {}}
    was = saved.mixture["signature"]
    changes = [(key, was.get(key), value) for key, value in now.items() if was.get(key) != value]
    if not changes:
        return saved.mixture
    listed = "; ".join(f"{key} {_show(old)} -> {_show(new)}" for key, old, new in changes)
    if not recipe.data.override_on_resume:
        raise CheckpointError(
            f"{ckpt}: the data differs from the checkpoint's ({listed}); set "
            f"data.override_on_resume=true to start the new mixture at step {saved.step}")
    same_packing = was.get("data.seq_length") == now["data.seq_length"]
    seq = now["data.seq_length"]
    offsets = {name: tokens // seq for name, tokens in saved.source_tokens.items()} \
        if same_packing else {}
    log.warning("data.override_on_resume: the data mixture changes at step %d (%s); each source "
                "continues %s", saved.step, listed,
                "where it stopped" if same_packing else "from its start (another seq_length)")
    return {"signature": now, "start": saved.consumed_samples, "offsets": offsets}


def _show(value) -> str:
    if isinstance(value, list):  # blend entries: name:weight
        return "[" + ", ".join(f"{e[0]}:{e[2]:g}" for e in value) + "]"
    if isinstance(value, dict):
        return f"{{{_show(value['blend'])} x {value['fraction']:g}}}"
    return "null" if value is None else str(value)

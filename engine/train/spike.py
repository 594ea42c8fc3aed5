"""Loss spikes (train.spike, engine.config.spike): judged against a running median, then warned
about or rewound.

Every rank sees the same global mean loss (engine.train.step), so every rank judges alike. A
rewind leaves the training loop (`run` returns with `TrainResult.spike` set) and `rewind` builds
the session again from the latest checkpoint, as a resume would, then moves its data position on
by `skip_batches` global batches: the mixture's `start` (engine.data.mixing: index i reads
position i - start) goes back by that many samples, and since the checkpoint stores the mixture,
a later resume reads from the same moved position.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from dataclasses import dataclass, replace

from engine.checkpoint import find_checkpoint
from engine.config.spike import SpikeConfig

log = logging.getLogger(__name__)


class SpikeError(RuntimeError):
    """A spike after train.spike.max_rewinds rewinds, or one with no checkpoint to go back to."""


@dataclass(frozen=True)
class Spike:
    step: int
    loss: float
    median: float


def spike_of(loss: float, recent: list[float], config: SpikeConfig) -> float | None:
    """The median `loss` is judged against when it is a spike, else None (also while fewer than
    `window` losses are known)."""
    if len(recent) < config.window:
        return None
    median = statistics.median(recent[-config.window:])
    return median if loss > config.factor * median else None


class SpikeWatch:
    """The running window of a stage's losses; spikes stay out of it."""

    def __init__(self, config: SpikeConfig, history: list[float] = ()):
        self.config = config
        self.recent: deque[float] = deque(history, maxlen=config.window)

    def check(self, step: int, loss: float) -> Spike | None:
        median = spike_of(loss, list(self.recent), self.config)
        if median is None:
            self.recent.append(loss)
            return None
        return Spike(step, loss, median)


def rewind(session, spike: Spike, build_session):
    """The session after a rewind: `build_session(recipe, runtime)` from the latest checkpoint in
    checkpoint.save (before the spike: the loop judges a step before saving it), its data
    position moved on by train.spike.skip_batches global batches and the rewind recorded."""
    recipe, config = session.recipe, session.recipe.train.spike
    rewinds = list(session.state.rewinds)
    if len(rewinds) >= config.max_rewinds:
        raise SpikeError(f"loss spike at step {spike.step} ({spike.loss:.4f} > {config.factor} x "
                         f"median {spike.median:.4f}) after {len(rewinds)} rewinds: stopping at "
                         f"train.spike.max_rewinds={config.max_rewinds}")
    save = recipe.checkpoint.save
    ckpt = find_checkpoint(save)
    if ckpt is None:
        raise SpikeError(f"loss spike at step {spike.step} ({spike.loss:.4f} > {config.factor} x "
                         f"median {spike.median:.4f}): no checkpoint in checkpoint.save={save} "
                         "to rewind to")
    batch = session.runtime.layout.global_batch_size
    skip = config.skip_batches
    # The position moves on from this session's (earlier rewinds since the checkpoint included:
    # a second spike in the same window skips further, not the same batches again).
    start = session.train_data.start - skip * batch
    # Reload from where this run saves (checkpoint.load may name where it started).
    again = replace(recipe, checkpoint=replace(recipe.checkpoint, load=save))
    runtime = session.runtime
    _release(session)  # the new session's model and optimizer replace, not join, the old ones
    fresh = build_session(again, runtime)
    state = fresh.state
    if state.step + skip < spike.step:
        log.warning("train.spike.skip_batches=%d does not reach past the spike: the batches of "
                    "steps %d..%d are read again", skip, state.step + skip + 1, spike.step)
    fresh.train_data.start = start
    record = {"spike_step": spike.step, "loss": spike.loss, "median": spike.median,
              "to_step": state.step, "skipped_batches": skip}
    fresh.state = replace(state, mixture={**state.mixture, "start": start},
                          rewinds=[*rewinds, record])
    log.warning("loss spike at step %d (%.4f > %g x median %.4f): rewound to step %d (%s), "
                "skipping the next %d global batches of data", spike.step, spike.loss,
                config.factor, spike.median, state.step, ckpt, skip)
    return fresh


def _release(session) -> None:
    """Drop the session's model, optimizer, data and what holds them, so that building the
    rewound session does not hold two models and optimizers at once (peak memory)."""
    import gc

    session.chunks, session.optimizer = [], None
    session.train_data, session.valid_data = None, {}
    session.probes = session.mer = session.drift = session.moe_monitor = None
    gc.collect()

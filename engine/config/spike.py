"""Recipe section `train.spike`: what a loss spike does.

A step's loss above `factor` x the median of the `window` steps before it is a spike (the median
ignores the spikes themselves). `warn` logs it; `rewind` does what PaLM did by hand (Chowdhery
et al. 2022, arXiv 2204.02311, sec. 5.1: "restart training from a checkpoint roughly 100 steps
before the spike started, and skip roughly 200-500 data batches"): reload the latest checkpoint
before the spike and skip the next `skip_batches` global batches of data, recorded in the train
state (TrainState.rewinds, and the data position) so that a later resume skips them too.
"""

from dataclasses import dataclass

from engine.config.checks import at_least, one_of
from engine.config.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class SpikeConfig:
    """Key `train.spike` (null = off)."""

    factor: float = 2.0
    """A spike: loss > factor x the median loss of the previous `window` steps (> 1)."""
    window: int = 50
    """Steps of the running median; no step is judged before the stage has this many (a resumed
    run counts from its resume)."""
    action: str = "warn"
    """warn (log `spike at step N`, TensorBoard `train/spikes`) | rewind (reload the latest
    checkpoint before the spike, skip `skip_batches` global batches of data, go on)."""
    skip_batches: int = 200
    """rewind: global batches skipped after the reloaded checkpoint's position (PaLM: 200-500);
    at least the steps from that checkpoint to the spike, or the spike's batch is read again."""
    max_rewinds: int = 5
    """rewind: the run stops with an error at a spike after this many rewinds in the stage."""

    def __post_init__(self):
        if not self.factor > 1.0:
            raise ConfigError(f"train.spike.factor: expected a value above 1, got {self.factor}")
        at_least("train.spike.window", self.window, 1)
        one_of("train.spike.action", self.action, ("warn", "rewind"))
        at_least("train.spike.skip_batches", self.skip_batches, 1)
        at_least("train.spike.max_rewinds", self.max_rewinds, 0)

"""Recipe section `train.freeze`: train only the vocabulary rows first, then everything.

After a vocabulary extension (engine upcycle vocab) the new rows are untrained while the rest of
the model is; the language-adaptation recipes warm them up first with the transformer frozen:
Chinese-LLaMA's stage 1 "fix[es] the parameters of the transformer encoders ... and only
train[s] the embeddings" (Cui et al. 2023, arXiv 2304.08177 §3.2), then trains everything.
engine.train.freeze carries it out under DDP and the distributed optimizer, exactly.
"""

from dataclasses import dataclass

from engine.config.checks import at_least, one_of
from engine.config.errors import ConfigError

FREEZE_TRAINS = ("embeddings", "new_rows")


@dataclass(frozen=True, kw_only=True, slots=True)
class FreezeConfig:
    """Key `train.freeze`: for the first `steps` optimizer steps of the stage only the embedding
    and output layer train (frozen parameters keep every bit and their optimizer state stays
    zero), then every parameter trains."""

    steps: int = 0
    """Optimizer steps, counted from the stage's start, with the rest of the model frozen; 0 =
    no freezing."""
    train: str = "embeddings"
    """What trains during those steps: embeddings (the embedding and output layer, all rows) or
    new_rows (only their rows from new_rows_from on: the old rows get zero gradients and, like
    the whole embedding and output layer then, no weight decay)."""
    new_rows_from: int | None = None
    """train=new_rows: the first new token id (the base vocabulary's size; engine upcycle vocab's
    report.json `old_vocab_size`)."""

    def __post_init__(self):
        p = "train.freeze"
        at_least(f"{p}.steps", self.steps, 0)
        one_of(f"{p}.train", self.train, FREEZE_TRAINS)
        at_least(f"{p}.new_rows_from", self.new_rows_from, 1)
        if (self.train == "new_rows") != (self.new_rows_from is not None):
            raise ConfigError(f"{p}.train={self.train} and {p}.new_rows_from="
                              f"{self.new_rows_from}: new_rows needs the first new id, and only "
                              "new_rows uses it")

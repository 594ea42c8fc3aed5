"""Recipe section `data`: training blends, replay and named validation sets."""

import math
from dataclasses import dataclass, field

from engine.config.checks import at_least, fraction
from engine.config.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class BlendEntry:
    """One weighted dataset of `data.blend` (or `data.replay.blend`), YAML `{path, weight, name}`;
    DataConfig checks it."""

    path: str
    """Path prefix of a megatron IndexedDataset (the `.bin`/`.idx` pair without extension)."""
    weight: float = 1.0
    """Relative sampling weight; finite and > 0 (weights are normalized over the blend)."""
    name: str | None = None
    """The source's name in token accounting (TensorBoard `tokens/source/<name>`,
    `tokens/fraction/<name>`, checkpoints); null = the last component of `path`. Names are
    unique over data.blend and data.replay.blend."""


def source_name(entry: BlendEntry) -> str:
    """The name `entry` is counted under: its `name`, else the last component of its path."""
    return entry.name or entry.path.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplayConfig:
    """Key `data.replay`: general (pretraining-like) data mixed into every global batch of a
    continual-pretraining run, against forgetting (Ibrahim et al. 2024, arXiv 2403.08763 §5).

    Each global batch of G samples holds exactly round(fraction x G) replay samples (halves up),
    spread evenly over its positions, so its content does not depend on TP/PP/DP; the replay
    samples come from this blend, the others from data.blend."""

    blend: tuple[BlendEntry, ...]
    """The replay datasets, a list of `{path, weight, name}` like data.blend."""
    fraction: float
    """Share of every global batch's samples taken from the replay blend, in (0, 1)."""

    def samples_per_batch(self, global_batch_size: int) -> int:
        """round(fraction x global_batch_size), halves up: the replay samples of every batch."""
        return math.floor(self.fraction * global_batch_size + 0.5)


@dataclass(frozen=True, kw_only=True, slots=True)
class ValidSet:
    """One named validation dataset; YAML writes `data.valid` as a mapping `name: path`."""

    name: str
    """Name of the validation set, used in log lines and TensorBoard tags."""
    path: str
    """Path prefix of its megatron IndexedDataset."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Key `data`: what the model trains and evaluates on."""

    blend: tuple[BlendEntry, ...] = ()
    """Training datasets, a list of `{path, weight}`; may be empty only when synthetic."""
    valid: tuple[ValidSet, ...] = field(default=(), metadata={"yaml": "name_to_path"})
    """Validation datasets; in YAML a mapping `name: path prefix`, kept in file order."""
    seq_length: int = 2048
    """Tokens per training sample."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    cache_dir: str | None = None
    """Where dataset index caches go; null = next to the data (megatron's default)."""
    synthetic: bool = False
    """Train on random tokens (benchmarks, smoke tests); the blend is then ignored."""
    replay: ReplayConfig | None = None
    """Replay of general data in every global batch, `{blend, fraction}`; null = none."""
    override_on_resume: bool = False
    """A resume whose blend, replay, global batch size or seq_length differ from the checkpoint's
    stops in one line; true starts the new mixture at the resumed step, each source continuing
    where it stopped (engine.train.mixture)."""
    reset_attention_mask: bool = False
    """Document masking of packed samples (megatron GPTDataset's reset_attention_mask): a token
    attends only to earlier tokens of its own document, the documents being separated by the
    tokenizer's end-of-document token. Samples then carry megatron's [1, s, s] attention mask;
    the local spec's attention applies it (engine.models.cp_attention). With RoPE (every family
    here) attention scores depend on i - j only, so this alone makes each document's positions
    start at 0 as far as the model can tell: a packed document's losses equal its own."""
    reset_position_ids: bool = False
    """position_ids restart at 0 after every end-of-document token (megatron's
    reset_position_ids). megatron-core applies RoPE by sequence index and reads position_ids only
    for learned absolute position embeddings, so with RoPE this changes nothing by itself: use
    reset_attention_mask for per-document positions."""
    eod_mask_loss: bool = False
    """No loss where the input is an end-of-document token (the prediction of the next
    document's first token, which document masking leaves without context; megatron's
    eod_mask_loss)."""

    def __post_init__(self):
        p = "data"
        if not self.blend and not self.synthetic:
            raise ConfigError(
                f"{p}.blend: expected at least one {{path, weight}} entry "
                f"(or {p}.synthetic: true), got []"
            )
        _check_blend(f"{p}.blend", self.blend)
        if self.replay is not None:
            if self.synthetic:
                raise ConfigError(f"{p}.replay needs real data, but {p}.synthetic is true")
            if not self.replay.blend:
                raise ConfigError(f"{p}.replay.blend: expected at least one {{path, weight}} "
                                  "entry, got []")
            _check_blend(f"{p}.replay.blend", self.replay.blend)
            fraction(f"{p}.replay.fraction", self.replay.fraction, open_low=True)
        seen: dict[str, str] = {}
        for key, entry in _sources(self):
            name = source_name(entry)
            if name in seen:
                raise ConfigError(f"{key}: source name {name!r} is also {seen[name]}'s; "
                                  f"give one of them a distinct `name`")
            seen[name] = key
        names = [v.name for v in self.valid]
        for v in self.valid:
            if names.count(v.name) > 1:
                raise ConfigError(f"{p}.valid: name {v.name!r} appears {names.count(v.name)} times")
            if not v.path:
                raise ConfigError(f"{p}.valid.{v.name}: expected a path prefix, got ''")
        if self.synthetic:
            for name in ("reset_attention_mask", "reset_position_ids", "eod_mask_loss"):
                if getattr(self, name):
                    raise ConfigError(f"{p}.{name} needs documents with end-of-document tokens, "
                                      f"but {p}.synthetic is true")
        at_least(f"{p}.seq_length", self.seq_length, 1)
        at_least(f"{p}.num_workers", self.num_workers, 0)


def _check_blend(key: str, blend: tuple[BlendEntry, ...]) -> None:
    for i, entry in enumerate(blend):
        if not entry.path:
            raise ConfigError(f"{key}[{i}].path: expected a path prefix, got ''")
        if not (math.isfinite(entry.weight) and entry.weight > 0.0):
            raise ConfigError(
                f"{key}[{i}].weight: expected a finite number > 0, got {entry.weight}")
        if entry.name is not None and not entry.name:
            raise ConfigError(f"{key}[{i}].name: expected a name or null, got ''")


def _sources(data: DataConfig) -> list[tuple[str, BlendEntry]]:
    """(recipe key, entry) of every training source: data.blend, then data.replay.blend."""
    out = [(f"data.blend[{i}]", e) for i, e in enumerate(data.blend)]
    if data.replay is not None:
        out += [(f"data.replay.blend[{i}]", e) for i, e in enumerate(data.replay.blend)]
    return out


def source_names(data: DataConfig) -> tuple[str, ...]:
    """The training sources' names in token-accounting order: data.blend, then the replay blend
    (data.synthetic: the one source `synthetic`)."""
    if data.synthetic:
        return ("synthetic",)
    return tuple(source_name(e) for _, e in _sources(data))


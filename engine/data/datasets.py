"""Training and validation datasets: megatron-core GPTDatasets over `.bin/.idx` pairs, blended.

Owns `build_sources` (one epoch of each training source, read epoch after epoch by
engine.data.streams), `build_datasets` (a weighted blend sized by a sample count, megatron's way,
plus one dataset per named validation set; built by megatron-core's BlendedMegatronDatasetBuilder
so sample i is a pure function of the files, the seed, seq_length and the sample counts), the
check that an `.idx/.bin` pair is sound (`inspect_indexed_dataset`) and the tokenizer-vs-model
vocabulary check (`check_vocab`).
Takes no process group: under torch.distributed megatron itself builds on rank 0 first, then the
other ranks load its cached indices. Does not import models or training code.
"""

import copy
import logging
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType

from engine.data import DataError
from engine.data.tokenizer import NO_PAD, Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

_INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron indexed_dataset._INDEX_HEADER
_INDEX_FIELDS = struct.Struct("<QBQQ")  # version, dtype code, sequence count, document count
_INDEX_PREAMBLE = len(_INDEX_HEADER) + _INDEX_FIELDS.size  # 34 bytes before the arrays


def check_vocab(tokenizer_vocab_size: int, model_vocab_size: int) -> None:
    """Raise unless every token id fits the model's embedding table.

    A model vocabulary larger than the tokenizer's is fine (HF models pad it for fast matmuls).
    """
    if tokenizer_vocab_size > model_vocab_size:
        raise DataError(
            f"tokenizer vocab {tokenizer_vocab_size} is larger than "
            f"model.vocab_size={model_vocab_size}"
        )


@dataclass(frozen=True, slots=True)
class IndexInfo:
    """What an `.idx` says about its dataset, once checked against its `.bin`."""

    prefix: str
    documents: int
    sequences: int
    tokens: int
    dtype: type


def inspect_indexed_dataset(prefix: str) -> IndexInfo:
    """Check `<prefix>.idx` against megatron's format and `<prefix>.bin`; return its counts.

    megatron-core reads a damaged index with `assert`s (gone under `python -O`) or numpy errors
    that do not name the file, or not at all (garbage appended to an `.idx` is silently ignored).
    """
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DataError(
                f"{path}: not found; expected the .bin/.idx pair written by "
                f"`engine preprocess --output-prefix {prefix}`"
            )
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as stream:
        preamble = stream.read(_INDEX_PREAMBLE)
    if len(preamble) < _INDEX_PREAMBLE or not preamble.startswith(_INDEX_HEADER):
        raise DataError(f"{idx_path}: not a megatron index (bad header; {size} bytes)")
    version, code, sequences, documents = _INDEX_FIELDS.unpack(preamble[len(_INDEX_HEADER) :])
    if version != 1:
        raise DataError(f"{idx_path}: index version {version}; expected 1")
    try:
        dtype = DType.dtype_from_code(code)
    except ValueError:
        raise DataError(f"{idx_path}: unknown token dtype code {code}") from None
    expected = _INDEX_PREAMBLE + sequences * (4 + 8) + documents * 8
    if size != expected:
        raise DataError(
            f"{idx_path}: {size} bytes; expected {expected} for {sequences} sequences and "
            f"{documents} document boundaries (truncated or overwritten?)"
        )
    lengths, pointers, bounds = _index_arrays(idx_path, sequences, documents)
    if documents < 1 or bounds[0] != 0 or bounds[-1] != sequences or (numpy.diff(bounds) < 0).any():
        raise DataError(f"{idx_path}: document boundaries are not 0..{sequences} ascending")
    if (lengths < 0).any():
        raise DataError(f"{idx_path}: negative sequence lengths")
    itemsize = DType.size(dtype)
    starts = numpy.concatenate(([0], numpy.cumsum(lengths, dtype=numpy.int64)))
    if not numpy.array_equal(pointers, starts[:-1] * itemsize):
        raise DataError(f"{idx_path}: sequence pointers do not match sequence lengths")
    tokens = int(starts[-1])
    if bin_path.stat().st_size != tokens * itemsize:
        raise DataError(
            f"{bin_path}: {bin_path.stat().st_size} bytes; expected {tokens * itemsize} "
            f"({tokens} {dtype.__name__} tokens, per {idx_path.name})"
        )
    return IndexInfo(str(prefix), documents - 1, sequences, tokens, dtype)


def _index_arrays(idx_path: Path, sequences: int, documents: int):
    """The sequence lengths, byte pointers and document boundaries, in megatron's order."""
    raw = numpy.memmap(idx_path, dtype=numpy.uint8, mode="r")
    offset = _INDEX_PREAMBLE
    lengths = numpy.frombuffer(raw, numpy.int32, sequences, offset)
    offset += lengths.nbytes
    pointers = numpy.frombuffer(raw, numpy.int64, sequences, offset)
    offset += pointers.nbytes
    bounds = numpy.frombuffer(raw, numpy.int64, documents, offset)
    return lengths, pointers, bounds


def check_blend(blend: list[tuple[str, float]]) -> tuple[list[str], list[float]]:
    """Prefixes and normalized weights of a blend; weights must be finite and > 0."""
    if not blend:
        raise DataError("data blend is empty; expected at least one (path, weight)")
    for path, weight in blend:
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise DataError(f"blend weight for {path}: expected a number, got {weight!r}")
        if not (math.isfinite(weight) and weight > 0):
            raise DataError(f"blend weight for {path}: expected a finite number > 0, got {weight}")
    total = math.fsum(weight for _, weight in blend)
    return [str(path) for path, _ in blend], [weight / total for _, weight in blend]


def _check_fits(info: IndexInfo, tok, seq_length: int) -> None:
    if info.tokens < seq_length + 1:
        # megatron would loop forever on an empty file and build no sample from a short one.
        raise DataError(
            f"{info.prefix}: {info.tokens} tokens; expected at least seq_length+1={seq_length + 1}"
        )
    if tok.vocab_size is not None and numpy.iinfo(info.dtype).max < tok.vocab_size - 1:
        raise DataError(
            f"{info.prefix}.idx stores {info.dtype.__name__} tokens, too small for the tokenizer's "
            f"vocab {tok.vocab_size}: was it preprocessed with another tokenizer?"
        )


def _always() -> bool:
    return True


class _Pretokenized:
    """What GPTDataset reads of a tokenizer, for data tokenized elsewhere (tokenizer.type none):
    an unknown vocab_size, no pad id, and an eod it never uses (no eod loss mask, no resets)."""

    vocab_size = None
    eod = None
    pad = NO_PAD

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "pretokenized"}

    def __repr__(self) -> str:
        return "Pretokenized()"


class _Builder(BlendedMegatronDatasetBuilder):
    """megatron's builder, except that a single process never touches torch.distributed.

    megatron-core 0.16.1 `BlendedDataset._build_indices` calls `torch.distributed.get_rank()` on a
    cache miss whenever `path_to_cache` is set, which raises without a process group. Without one,
    the blend's indices (a fast C++ pass) are built in memory instead; the GPTDataset indices
    below it are still cached.
    """

    @staticmethod
    def build_generic_dataset(dataset_cls, is_built_on_rank, synchronize_ranks, *args):
        if dataset_cls is BlendedDataset and not torch.distributed.is_initialized():
            datasets, weights, size, config = args
            config = copy.copy(config)
            config.path_to_cache = None
            return BlendedDataset(datasets, weights, size, config)
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            dataset_cls, is_built_on_rank, synchronize_ranks, *args
        )


def _config(seed: int, seq_length: int, tok, cache_dir: str | None, blend_per_split: list, *,
            full_validation: bool, reset_position_ids: bool, reset_attention_mask: bool,
            eod_mask_loss: bool) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=blend_per_split,
        multiple_validation_sets=True,
        full_validation=full_validation,
        path_to_cache=cache_dir,
        tokenizer=tok,
        # Packed documents, separated at eod when asked (recipe data.reset_attention_mask, ...):
        # then each sample carries megatron's [1, s, s] mask (True = masked); without it the
        # model builds its own causal mask.
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=reset_attention_mask,
    )


def _tokenizer(tokenizer: Tokenizer | tuple[str, str] | None):
    if tokenizer is None:
        return _Pretokenized()
    return tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(*tokenizer)


def build_sources(
    prefixes: list[str],
    *,
    tokenizer: Tokenizer | tuple[str, str] | None,
    seq_length: int,
    seed: int,
    data_cache_dir: str | None = None,
    is_built_on_rank: Callable[[], bool] = _always,
    reset_attention_mask: bool = False,
    reset_position_ids: bool = False,
    eod_mask_loss: bool = False,
) -> list[torch.utils.data.Dataset | None]:
    """One megatron GPTDataset per prefix holding exactly one epoch of it (the training
    sources of engine.data.streams, which read them epoch after epoch); built like
    `build_datasets` (rank 0 first, index caches beside each file or in `data_cache_dir`)."""
    tok = _tokenizer(tokenizer)
    out = []
    for prefix in prefixes:
        if is_built_on_rank():
            info = inspect_indexed_dataset(prefix)
            _check_fits(info, tok, seq_length)
            logger.info("dataset %s: %d documents, %d tokens", prefix, info.documents, info.tokens)
        config = _config(seed, seq_length, tok, data_cache_dir, [([prefix], None), None, None],
                         full_validation=False, reset_position_ids=reset_position_ids,
                         reset_attention_mask=reset_attention_mask, eod_mask_loss=eod_mask_loss)
        train, _, _ = _Builder(GPTDataset, [None, None, None], is_built_on_rank, config).build()
        out.append(train)
    return out


def build_datasets(
    *,
    blend: list[tuple[str, float]],
    valid: dict[str, str],
    tokenizer: Tokenizer | tuple[str, str] | None,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int | None,
    data_cache_dir: str | None = None,
    is_built_on_rank: Callable[[], bool] = _always,
    reset_attention_mask: bool = False,
    reset_position_ids: bool = False,
    eod_mask_loss: bool = False,
) -> tuple[torch.utils.data.Dataset | None, dict[str, torch.utils.data.Dataset | None]]:
    """The training blend (at least `train_samples` samples) and one dataset per validation set.

    Items are dicts of `tokens`, `labels`, `loss_mask`, `position_ids` (int64/float tensors of
    length seq_length; a multi-entry blend adds `dataset_id`). Each validation set covers its
    whole file: `valid_samples=None` is exactly one pass, an int is at least that many samples
    (repeating the file when it is shorter). The order of samples depends on `train_samples`
    too: keep it fixed across resumptions (it sizes each dataset's epochs and shuffles).
    `tokenizer=None` is for data tokenized elsewhere: no check of token ids against a vocabulary.
    reset_attention_mask, reset_position_ids, eod_mask_loss: megatron's document masking (the
    recipe's data keys); with reset_attention_mask items also hold `attention_mask` [1, s, s].

    Call on every rank: under torch.distributed megatron builds the indices on rank 0, writes
    them to `data_cache_dir` (None: `<prefix>/cache/GPTDataset_indices/` beside each file), then
    the other ranks read them, so the directory must be shared by all nodes. Ranks where
    `is_built_on_rank()` is False get None datasets.
    """
    tok = _tokenizer(tokenizer)
    prefixes, weights = check_blend(blend)
    if train_samples < 1:
        raise DataError(f"train_samples={train_samples}: expected at least 1")
    if valid_samples is not None and valid_samples < 1:
        raise DataError(f"valid_samples={valid_samples}: expected at least 1, or None for one pass")
    if is_built_on_rank():
        for prefix in dict.fromkeys([*prefixes, *valid.values()]):
            info = inspect_indexed_dataset(prefix)
            _check_fits(info, tok, seq_length)
            logger.info("dataset %s: %d documents, %d tokens", prefix, info.documents, info.tokens)
    config = _config(
        seed, seq_length, tok, data_cache_dir,
        [(prefixes, weights), (list(valid.values()), None) if valid else None, None],
        full_validation=valid_samples is None, reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask, eod_mask_loss=eod_mask_loss)
    sizes = [train_samples, valid_samples if valid else None, None]
    train, valid_built, _ = _Builder(GPTDataset, sizes, is_built_on_rank, config).build()
    return train, _named(valid, valid_built)


def _named(valid: dict[str, str], built) -> dict:
    if len(valid) == 1:
        built = [built]  # megatron returns a lone dataset, not a list, for one prefix
    elif built is None:
        built = [None] * len(valid)
    return dict(zip(valid, built, strict=True))


def build_valid_sets(valid: dict[str, str], *, tokenizer, seq_length: int, seed: int,
                     valid_samples: int | None, data_cache_dir: str | None = None,
                     is_built_on_rank: Callable[[], bool] = _always,
                     reset_attention_mask: bool = False, reset_position_ids: bool = False,
                     eod_mask_loss: bool = False) -> dict:
    """The validation sets of `build_datasets` without a training blend."""
    tok = _tokenizer(tokenizer)
    if is_built_on_rank():
        for prefix in dict.fromkeys(valid.values()):
            _check_fits(inspect_indexed_dataset(prefix), tok, seq_length)
    config = _config(seed, seq_length, tok, data_cache_dir,
                     [None, (list(valid.values()), None), None],
                     full_validation=valid_samples is None,
                     reset_position_ids=reset_position_ids,
                     reset_attention_mask=reset_attention_mask, eod_mask_loss=eod_mask_loss)
    _, built, _ = _Builder(GPTDataset, [None, valid_samples, None], is_built_on_rank,
                           config).build()
    return _named(valid, built)

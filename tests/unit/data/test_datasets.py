"""engine.data.datasets: megatron GPTDataset blends, validation sets, resumability, index checks."""

import collections
import math
from pathlib import Path

import numpy
import pytest
import torch

from engine.data import DataError
from engine.data.datasets import (
    build_datasets,
    check_vocab,
    inspect_indexed_dataset,
)
from engine.data.preprocess import preprocess

SEQ = 32


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory, sp_tokenizer, documents, write_jsonl):
    """Two datasets, A (first 100 documents) and B (the other 100), and C (one long document)."""
    root = tmp_path_factory.mktemp("indexed")
    out = {}
    for name, texts in {
        "a": documents[:100],
        "b": documents[100:],
        "c": ["\n".join(documents[:40])],
    }.items():
        jsonl = write_jsonl(root / f"{name}.jsonl", texts)
        preprocess([str(jsonl)], str(root / name), sp_tokenizer, progress=False)
        out[name] = str(root / name)
    return out


def build(prefixes, sp_tokenizer, tmp_path, **overrides):
    kwargs = {
        "blend": [(prefixes["a"], 0.8), (prefixes["b"], 0.2)],
        "valid": {},
        "tokenizer": sp_tokenizer,
        "seq_length": SEQ,
        "seed": 1234,
        "train_samples": 1000,
        "valid_samples": None,
        "data_cache_dir": str(tmp_path / "cache"),
    }
    kwargs.update(overrides)
    return build_datasets(**kwargs)


def tokens_of(dataset, indices) -> list[list[int]]:
    return [dataset[i]["tokens"].tolist() for i in indices]


def test_helpers_cpp_is_compiled():
    from megatron.core.datasets import helpers_cpp

    assert hasattr(helpers_cpp, "build_blending_indices")


def test_blend_follows_the_weights(prefixes, sp_tokenizer, tmp_path):
    train, valid = build(prefixes, sp_tokenizer, tmp_path)
    assert valid == {}
    assert len(train) >= 1000
    counts = collections.Counter(int(train[i]["dataset_id"]) for i in range(1000))
    assert abs(counts[0] / 1000 - 0.8) <= 0.01 and abs(counts[1] / 1000 - 0.2) <= 0.01


def test_item_layout(prefixes, sp_tokenizer, tmp_path):
    train, _ = build(prefixes, sp_tokenizer, tmp_path, blend=[(prefixes["a"], 1.0)])
    item = train[5]
    assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert item["tokens"].shape == item["labels"].shape == (SEQ,)
    assert torch.equal(item["labels"][:-1], item["tokens"][1:])  # next-token targets
    assert torch.equal(item["position_ids"], torch.arange(SEQ))  # no reset at eod
    assert torch.equal(item["loss_mask"], torch.ones(SEQ))
    eods = sum(int((train[i]["tokens"] == sp_tokenizer.eod).sum()) for i in range(50))
    assert eods > 0  # documents are packed, separated by eod


def test_same_seed_same_samples_and_rebuild_is_resumable(prefixes, sp_tokenizer, tmp_path):
    first, _ = build(prefixes, sp_tokenizer, tmp_path)
    indices = range(0, 1000, 7)
    reference = tokens_of(first, indices)
    cached, _ = build(prefixes, sp_tokenizer, tmp_path)  # loads the cached indices
    fresh, _ = build(prefixes, sp_tokenizer, tmp_path, data_cache_dir=str(tmp_path / "other"))
    assert tokens_of(cached, indices) == reference
    assert tokens_of(fresh, indices) == reference  # rebuilt from scratch: same order
    reseeded, _ = build(prefixes, sp_tokenizer, tmp_path, seed=99)
    assert tokens_of(reseeded, indices) != reference


def test_cache_location(prefixes, sp_tokenizer, tmp_path):
    build(prefixes, sp_tokenizer, tmp_path, blend=[(prefixes["c"], 1.0)])
    assert any((tmp_path / "cache").glob("*-GPTDataset-train-shuffle_index.npy"))
    # megatron's default (data_cache_dir=None): a directory named after the prefix, beside it.
    build(prefixes, sp_tokenizer, tmp_path, blend=[(prefixes["c"], 1.0)], data_cache_dir=None)
    assert any((Path(prefixes["c"]) / "cache" / "GPTDataset_indices").glob("*train*.npy"))


def test_validation_sets_cover_their_whole_file(prefixes, sp_tokenizer, tmp_path, documents):
    valid_map = {"a": prefixes["a"], "long": prefixes["c"]}
    _, valid = build(prefixes, sp_tokenizer, tmp_path, valid=valid_map)
    assert list(valid) == ["a", "long"]
    for name, prefix in valid_map.items():
        info = inspect_indexed_dataset(prefix)
        assert len(valid[name]) == (info.tokens - 1) // SEQ  # exactly one pass
    # one document: every sample is the next window of it, in some order
    ids = sp_tokenizer.encode("\n".join(documents[:40])) + [sp_tokenizer.eod]
    windows = {tuple(ids[k * SEQ : (k + 1) * SEQ]) for k in range(len(valid["long"]))}
    assert {tuple(t) for t in tokens_of(valid["long"], range(len(valid["long"])))} == windows


def test_one_validation_set_and_a_sample_count(prefixes, sp_tokenizer, tmp_path):
    _, valid = build(
        prefixes, sp_tokenizer, tmp_path, valid={"b": prefixes["b"]}, valid_samples=500
    )
    assert list(valid) == ["b"] and len(valid["b"]) >= 500  # repeats the file as needed


@pytest.mark.parametrize("weight", [0, -1.0, math.nan, math.inf, "0.5", True])
def test_bad_weight_names_path_and_value(prefixes, sp_tokenizer, tmp_path, weight):
    blend = [(prefixes["a"], 1.0), (prefixes["b"], weight)]
    with pytest.raises(DataError, match=f"blend weight for {prefixes['b']}: expected"):
        build(prefixes, sp_tokenizer, tmp_path, blend=blend)


def test_empty_blend_and_bad_counts(prefixes, sp_tokenizer, tmp_path):
    with pytest.raises(DataError, match="blend is empty"):
        build(prefixes, sp_tokenizer, tmp_path, blend=[])
    with pytest.raises(DataError, match="train_samples=0"):
        build(prefixes, sp_tokenizer, tmp_path, train_samples=0)


def test_dataset_shorter_than_a_sample(prefixes, sp_tokenizer, tmp_path):
    tokens = inspect_indexed_dataset(prefixes["a"]).tokens
    with pytest.raises(DataError, match=f"{prefixes['a']}: {tokens} tokens; expected at least"):
        build(prefixes, sp_tokenizer, tmp_path, seq_length=tokens)


def test_check_vocab():
    check_vocab(32000, 32000)
    check_vocab(49152, 49280)  # a padded model vocabulary is fine
    with pytest.raises(
        DataError, match=r"^tokenizer vocab 50000 is larger than model.vocab_size=32000$"
    ):
        check_vocab(50000, 32000)


def test_inspect_counts(prefixes, sp_tokenizer):
    info = inspect_indexed_dataset(prefixes["a"])
    assert (info.documents, info.sequences, info.dtype) == (100, 100, numpy.uint16)
    assert info.tokens == Path(prefixes["a"] + ".bin").stat().st_size // 2


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:-5], r"\.idx: \d+ bytes; expected \d+ for 100 sequences"),
        (lambda b: b + b"\x00" * 8, r"\.idx: \d+ bytes; expected"),
        (lambda b: b"garbage" * 10, r"\.idx: not a megatron index"),
        (lambda b: b[:20], r"\.idx: not a megatron index"),
        (lambda b: b[:34] + b"\xff" * 400 + b[434:], r"\.idx: (sequence pointers|negative)"),
    ],
)
def test_damaged_index_is_a_data_error(prefixes, sp_tokenizer, tmp_path, damage, message):
    prefix = _copy_pair(prefixes["a"], tmp_path / "d")
    idx = Path(prefix + ".idx")
    idx.write_bytes(damage(idx.read_bytes()))
    with pytest.raises(DataError, match=f"{prefix}{message}"):
        build(prefixes, sp_tokenizer, tmp_path, blend=[(prefix, 1.0)])


def test_truncated_bin_and_missing_files(prefixes, sp_tokenizer, tmp_path):
    prefix = _copy_pair(prefixes["a"], tmp_path / "t")
    data = Path(prefix + ".bin")
    data.write_bytes(data.read_bytes()[:-2])
    with pytest.raises(DataError, match=rf"{prefix}\.bin: \d+ bytes; expected"):
        inspect_indexed_dataset(prefix)
    data.unlink()
    with pytest.raises(DataError, match=rf"{prefix}\.bin: not found"):
        build(prefixes, sp_tokenizer, tmp_path, valid={"x": prefix})


def test_index_dtype_too_small_for_tokenizer(prefixes, tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {"</s>": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match=r"stores uint16 tokens, too small for the tokenizer's"):
        build_datasets(
            blend=[(prefixes["a"], 1.0)],
            valid={},
            tokenizer=("hf", str(tmp_path)),
            seq_length=SEQ,
            seed=0,
            train_samples=10,
            valid_samples=None,
        )


def _copy_pair(prefix, dest) -> str:
    for ext in ("bin", "idx"):
        Path(f"{dest}.{ext}").write_bytes(Path(f"{prefix}.{ext}").read_bytes())
    return str(dest)


def test_pretokenized_data_without_tokenizer(prefixes, sp_tokenizer, tmp_path):
    """tokenizer.type none: same samples as with the tokenizer, which only named eod and pad."""
    with_tokenizer, _ = build(prefixes, sp_tokenizer, tmp_path)
    without, _ = build(prefixes, None, tmp_path / "none")
    assert tokens_of(without, range(0, 1000, 50)) == tokens_of(with_tokenizer, range(0, 1000, 50))

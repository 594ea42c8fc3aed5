"""Token ids against the vocabulary: int32 past 65,500 ids, the max-id sidecar, the start check."""

import json
import os

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

from engine.data import DataError, token_range
from engine.data.preprocess import preprocess
from engine.data.token_range import check_token_range, max_token_id, sidecar_path
from engine.data.tokenizer import load_tokenizer


def word_tokenizer(directory, vocab_size: int):
    """A word-level tokenizer.json with `vocab_size` ids: w0 ... w{n-2} and <|endoftext|> last."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<|endoftext|>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return load_tokenizer("hf", directory)


def write_documents(path, vocab_size: int, count: int = 40):
    """Documents of word tokens spread over the whole id range, the largest ids included."""
    rng = numpy.random.default_rng(vocab_size)
    docs = [" ".join(f"w{i}" for i in rng.integers(0, vocab_size - 1, size=rng.integers(5, 60)))
            for _ in range(count)]
    docs[3] += f" w{vocab_size - 2} w65535 w65499"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs


def test_dtype_codes_are_megatrons():
    for code, dtype in token_range.DTYPE_CODES.items():
        assert DType.dtype_from_code(code) is dtype
    assert DType.code_from_dtype(numpy.int32) == 4 and DType.code_from_dtype(numpy.uint16) == 8


@pytest.mark.parametrize(("vocab_size", "dtype"), [(65_499, numpy.uint16),
                                                    (65_500, numpy.int32),
                                                    (70_000, numpy.int32)])
def test_dtype_follows_the_vocabulary_and_ids_read_back(tmp_path, vocab_size, dtype):
    """megatron's rule (uint16 below 65,500 ids, else int32), ids above 65,535 exact."""
    tok = word_tokenizer(tmp_path / "tok", vocab_size)
    assert tok.vocab_size == vocab_size and tok.eod == vocab_size - 1
    jsonl, docs = write_documents(tmp_path / "docs.jsonl", vocab_size)
    preprocess([str(jsonl)], str(tmp_path / "d"), tok, progress=False)
    dataset = IndexedDataset(str(tmp_path / "d"))
    assert dataset.index.dtype == dtype
    expected = [tok.encode(d) + [tok.eod] for d in docs]
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    assert max(map(max, expected)) == vocab_size - 1
    assert any(i > 65_535 for ids in expected for i in ids) == (vocab_size > 65_536)
    assert max_token_id(tmp_path / "d") == vocab_size - 1  # from the sidecar preprocess wrote


@pytest.fixture
def dataset(tmp_path):
    tok = word_tokenizer(tmp_path / "tok", 70_000)
    jsonl, _ = write_documents(tmp_path / "docs.jsonl", 70_000)
    preprocess([str(jsonl)], str(tmp_path / "data"), tok, progress=False)
    return tmp_path / "data"


def test_sidecar_is_used_then_recomputed_when_stale(dataset, monkeypatch):
    tokens = numpy.fromfile(f"{dataset}.bin", dtype=numpy.int32)
    record = json.loads(sidecar_path(dataset).read_text())
    assert record["max_id"] == tokens.max() == 69_999
    assert record["bin_bytes"] == os.path.getsize(f"{dataset}.bin")

    def no_scan(*args):
        raise AssertionError("scanned although the sidecar is current")

    monkeypatch.setattr(token_range, "scan_max_id", no_scan)
    assert max_token_id(dataset) == 69_999
    monkeypatch.undo()
    # The .bin changes (same size, new mtime): the sidecar is stale, the file is scanned again.
    tokens[5] = 12
    tokens[tokens == 69_999] = 7
    tokens.tofile(f"{dataset}.bin")
    os.utime(f"{dataset}.bin", ns=(1, record["bin_mtime_ns"] + 1_000_000_000))
    assert max_token_id(dataset) == tokens.max() < 69_999
    assert json.loads(sidecar_path(dataset).read_text())["max_id"] == tokens.max()
    for broken in ("", "{not json", '{"max_id": 3}', "[]"):  # missing or not ours: rescan
        sidecar_path(dataset).write_text(broken)
        assert max_token_id(dataset) == tokens.max()
    sidecar_path(dataset).unlink()
    assert max_token_id(dataset) == tokens.max() and sidecar_path(dataset).is_file()


def test_scan_reads_every_chunk(dataset, monkeypatch):
    tokens = numpy.fromfile(f"{dataset}.bin", dtype=numpy.int32)
    monkeypatch.setattr(token_range, "CHUNK_TOKENS", 7)
    for position in (0, 6, 7, len(tokens) - 1):  # chunk edges and the ragged tail
        changed = tokens.copy()
        changed[position] = 123_456
        changed.tofile(f"{dataset}.bin")
        assert token_range.scan_max_id(f"{dataset}.bin", numpy.int32) == 123_456


def test_check_token_range(dataset):
    check_token_range([dataset], 70_000)
    message = (rf"{dataset}\.bin: token id 69999 >= model\.vocab_size=49152 "
               r"\(the data was tokenized with another tokenizer\?\)")
    with pytest.raises(DataError, match=message):
        check_token_range([dataset], 49_152)


def test_errors_name_the_file(tmp_path, dataset):
    with pytest.raises(DataError, match=r"nope\.idx: not found; expected the \.bin/\.idx pair"):
        check_token_range([tmp_path / "nope"], 10)  # the pair is checked first
    with pytest.raises(DataError, match=r"nope\.bin: not found; expected a preprocessed"):
        max_token_id(tmp_path / "nope")
    sidecar_path(dataset).unlink()
    with open(f"{dataset}.bin", "ab") as stream:
        stream.write(b"\x00")  # no longer a whole number of int32 tokens
    with pytest.raises(DataError, match=r"data\.bin: \d+ bytes is not a whole number of int32"):
        max_token_id(dataset)
    (tmp_path / "x.bin").write_bytes(b"")
    (tmp_path / "x.idx").write_bytes(b"not an index at all")
    with pytest.raises(DataError, match=r"x\.idx: not a megatron IndexedDataset index"):
        max_token_id(tmp_path / "x")

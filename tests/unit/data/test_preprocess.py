"""engine.data.preprocess and its command line: exact ids, determinism across workers, errors."""

import json
import sys

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from engine.data import DataError
from engine.data.cli import preprocess_main
from engine.data.preprocess import Progress, preprocess


def read_back(prefix) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_output_is_the_tokenizer_ids_plus_eod(tmp_path, sp_tokenizer, corpus_jsonl, documents):
    txt = tmp_path / "one.txt"
    txt.write_text("A whole file is one document.\nSecond line.", encoding="utf-8")
    stats = preprocess(
        [str(corpus_jsonl), str(txt)], str(tmp_path / "out"), sp_tokenizer, progress=False
    )
    expected = [sp_tokenizer.encode(t) + [sp_tokenizer.eod] for t in [*documents, txt.read_text()]]
    assert read_back(tmp_path / "out") == expected
    assert IndexedDataset(str(tmp_path / "out")).index.dtype == numpy.uint16  # vocab 400
    assert (stats.documents, stats.tokens) == (len(expected), sum(map(len, expected)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one.txt", "out.bin", "out.idx", "out.maxid.json"]


def test_workers_output_is_byte_identical(tmp_path, sp_tokenizer, corpus_jsonl):
    for workers in (1, 2):
        preprocess(
            [str(corpus_jsonl)],
            str(tmp_path / f"w{workers}"),
            sp_tokenizer,
            workers=workers,
            progress=False,
        )
    for ext in ("bin", "idx"):
        assert (tmp_path / f"w1.{ext}").read_bytes() == (tmp_path / f"w2.{ext}").read_bytes()


def test_hf_tokenizer_by_kind_and_path(tmp_path, hf_tokenizer_json, corpus_jsonl, documents):
    stats = preprocess(
        [str(corpus_jsonl)],
        str(tmp_path / "hf"),
        ("hf", str(hf_tokenizer_json)),
        append_eod=False,
        progress=False,
    )
    from engine.data.tokenizer import load_tokenizer

    tok = load_tokenizer("hf", hf_tokenizer_json)
    assert read_back(tmp_path / "hf") == [tok.encode(t) for t in documents]
    assert stats.documents == len(documents)


def test_empty_documents_are_skipped(tmp_path, sp_tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "e.jsonl", ["first", "", "third"])
    stats = preprocess([str(path)], str(tmp_path / "e"), sp_tokenizer, progress=False)
    assert (stats.documents, stats.skipped) == (2, 1)
    assert read_back(tmp_path / "e")[1] == sp_tokenizer.encode("third") + [sp_tokenizer.eod]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl:3: not a JSON object"),
        ('{"body": "x"}', r"bad\.jsonl:3: no key 'text' \(keys: body\)"),
        ('{"text": 7}', r"bad\.jsonl:3: 'text' is int; expected a string"),
        ('["text"]', r"bad\.jsonl:3: expected a JSON object, got list"),
    ],
)
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_jsonl_line_names_file_and_line(tmp_path, sp_tokenizer, line, message, workers):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n' + line + "\n")  # line 2 is blank, and skipped
    with pytest.raises(DataError, match=message):
        preprocess([str(bad)], str(tmp_path / "o"), sp_tokenizer, workers=workers, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no temporary left


def test_failure_keeps_the_previous_pair(tmp_path, sp_tokenizer, corpus_jsonl):
    preprocess([str(corpus_jsonl)], str(tmp_path / "o"), sp_tokenizer, progress=False)
    before = {ext: (tmp_path / f"o.{ext}").read_bytes() for ext in ("bin", "idx")}
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        preprocess([str(corpus_jsonl), str(bad)], str(tmp_path / "o"), sp_tokenizer, progress=False)
    assert {ext: (tmp_path / f"o.{ext}").read_bytes() for ext in ("bin", "idx")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.jsonl", "o.bin", "o.idx", "o.maxid.json"]


def test_missing_or_unknown_inputs_fail_before_work(tmp_path, sp_tokenizer, corpus_jsonl):
    with pytest.raises(DataError, match=r"nope\.jsonl: input file not found"):
        preprocess(
            [str(corpus_jsonl), str(tmp_path / "nope.jsonl")],
            str(tmp_path / "o"),
            sp_tokenizer,
            progress=False,
        )
    with pytest.raises(DataError, match=r"data\.csv: unknown input kind '\.csv'"):
        preprocess([str(tmp_path / "data.csv")], str(tmp_path / "o"), sp_tokenizer)
    assert not list(tmp_path.iterdir())


def test_progress_line_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    bar = Progress("corpus", interval=0.0)
    bar.update(3, 1200)
    bar.close(5, 2000)
    err = capsys.readouterr().err
    assert "\rcorpus: 3 documents | 1,200 tokens | " in err
    assert err.rstrip().split("\r")[-1].startswith("corpus: 5 documents | 2,000 tokens | ")
    assert err.endswith("tokens/s\n")


def test_progress_disabled_is_silent(capsys):
    bar = Progress("corpus", enabled=False, interval=0.0)
    bar.update(1, 10)
    bar.close(1, 10)
    assert capsys.readouterr().err == ""


def test_cli(tmp_path, sp_tokenizer, corpus_jsonl, capsys):
    argv = [
        "--input",
        str(corpus_jsonl),
        "--output-prefix",
        str(tmp_path / "c"),
        "--tokenizer-type",
        "sentencepiece",
        "--tokenizer",
        str(sp_tokenizer.path),
        "--workers",
        "1",
        "--no-progress",
    ]
    assert preprocess_main(argv) == 0
    assert "200 documents" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"txt": "x"}) + "\n")
    argv[1] = str(bad)
    assert preprocess_main(argv) == 2
    assert capsys.readouterr().err == f"error: {bad}:1: no key 'text' (keys: txt)\n"

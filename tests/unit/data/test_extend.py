"""engine tokenizer extend: base ids never move, new tokens are reachable merges, text round-trips.

Base tokenizers are trained here on Python's standard library (the "general" text); the domain is
Czech (Debian's manpages-cs), or, where that package can be neither found nor downloaded, the
English prose of Python's reference documentation (pydoc_data), so these tests always run.
"""

import json
import random
import re
import unicodedata
from collections import Counter

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from engine.cli import main as engine_main
from engine.data import DataError
from engine.data.corpus import build_stdlib_corpus
from engine.data.extend import (
    _merge_pair,
    append_pieces,
    dead_pieces,
    extend_tokenizer,
    fertility,
    learn_merges,
    select_pieces,
)
from engine.data.tokenizer import load_tokenizer, train_sentencepiece

ADD = 300


def read_texts(path) -> list[str]:
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="session")
def general(tmp_path_factory):
    """(base training text, general validation text): stdlib sources. The held-out 5% of files
    of so small a corpus is a few hundred characters, so the validation text is the training
    text (the base's, not the extension's: the domain is what the extension learns from)."""
    out = build_stdlib_corpus(tmp_path_factory.mktemp("stdlib"), max_bytes=300_000)
    return out / "code-train.jsonl", out / "code-train.jsonl"


@pytest.fixture(scope="session")
def domain(request, tmp_path_factory):
    """(train.jsonl, valid.jsonl) of the domain text."""
    try:
        out = request.getfixturevalue("manpages_cs")
        return out / "manpages-cs-train.jsonl", out / "manpages-cs-valid.jsonl"
    except pytest.skip.Exception:
        from pydoc_data.topics import topics

        out = tmp_path_factory.mktemp("pydoc")
        texts = [topics[k] for k in sorted(topics)]
        for name, part in (("train", texts[4:]), ("valid", texts[:4])):
            (out / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                       for t in part))
        return out / "train.jsonl", out / "valid.jsonl"


@pytest.fixture(scope="session")
def hf_base(tmp_path_factory, bpe_tokenizer, general):
    return bpe_tokenizer(general[0], tmp_path_factory.mktemp("hf-base") / "tok", 512)


@pytest.fixture(scope="session")
def sp_base(tmp_path_factory, general):
    return train_sentencepiece([str(general[0])], str(tmp_path_factory.mktemp("sp") / "sp"), 512)


def extend(base, domain, general, out, add=ADD):
    return extend_tokenizer(base, [str(domain[0])], add, out, valid_domain=str(domain[1]),
                            valid_general=str(general[1]), progress=False)


@pytest.fixture(scope="session")
def hf_extended(tmp_path_factory, hf_base, domain, general):
    out = tmp_path_factory.mktemp("hf-ext") / "tok"
    return out, extend(hf_base, domain, general, out)


@pytest.fixture(scope="session")
def sp_extended(tmp_path_factory, sp_base, domain, general):
    out = tmp_path_factory.mktemp("sp-ext") / "tok"
    return out, extend(sp_base, domain, general, out)


def check_ids_and_reachability(base, new, report, domain_texts):
    """Base ids unchanged; new ids right after them; `unreachable` recomputed independently."""
    assert all(new.vocab[piece] == i for piece, i in base.vocab.items())
    first = max(base.vocab.values()) + 1
    new_ids = sorted(set(new.vocab.values()) - set(base.vocab.values()))
    assert new_ids == list(range(first, first + report["added"]))
    assert new.vocab_size == base.vocab_size + report["added"]
    counts = Counter(i for t in domain_texts for i in new.encode(t) if i >= first)
    unreachable = [i for i in new_ids if not counts[i] and i not in new.encode(new.decode([i]))]
    assert report["unreachable"] == len(unreachable)
    assert report["top_new_tokens"] == [
        {"id": i, "text": new.decode([i]), "piece": new.inv_vocab[i], "count": n}
        for i, n in counts.most_common(20)]
    return unreachable


def check_fertility_and_round_trip(base, new, report, domain, general, exact: bool):
    for name, path in (("domain", domain[1]), ("general", general[1])):
        texts = read_texts(path)
        f = report["fertility"][name]
        assert (f["before"], f["after"]) == (fertility(base.encode, texts),
                                             fertility(new.encode, texts))
        for text in texts:
            back = new.decode(new.encode(text))
            assert back == base.decode(base.encode(text))
            assert back == text or not exact
        assert report["round_trip"][name] == {"documents": len(texts),
                                              "exact": len(texts) if exact else
                                              sum(new.decode(new.encode(t)) == t for t in texts)}
    domain_f = report["fertility"]["domain"]
    assert domain_f["after"] < 0.85 * domain_f["before"]  # what the new tokens are for


def test_hf_extension(hf_base, hf_extended, domain, general):
    out, report = hf_extended
    base, new = load_tokenizer("hf", hf_base), load_tokenizer("hf", out)
    assert report["added"] == report["requested"] == ADD
    assert json.loads((out / "report.json").read_text()) == report
    unreachable = check_ids_and_reachability(base, new, report, read_texts(domain[0]))
    # Unreachable ones are merge steps only: parts (often partial UTF-8) of longer new tokens.
    assert report["unreachable_merge_steps"] == len(unreachable) <= ADD // 20
    check_fertility_and_round_trip(base, new, report, domain, general, exact=True)
    # New tokens are vocabulary entries with merges ranked after every base merge.
    spec, base_spec = (json.loads((d / "tokenizer.json").read_text()) for d in (out, hf_base))
    assert spec["added_tokens"] == base_spec["added_tokens"]
    assert spec["model"]["merges"][: len(base_spec["model"]["merges"])] == \
        base_spec["model"]["merges"]
    new_merges = spec["model"]["merges"][len(base_spec["model"]["merges"]):]
    assert [spec["model"]["vocab"][a + b] for a, b in new_merges] == list(
        range(base.vocab_size, new.vocab_size))
    # Extra merges ranked last can only join tokens: never more tokens on any text.
    for text in read_texts(general[1]) + read_texts(domain[1]):
        assert len(new.encode(text)) <= len(base.encode(text))
    assert (out / "tokenizer_config.json").read_text() == \
        (hf_base / "tokenizer_config.json").read_text()


def test_hf_extension_loads_in_transformers(hf_extended, domain):
    from transformers import AutoTokenizer

    out, _ = hf_extended
    auto, engine = AutoTokenizer.from_pretrained(str(out)), load_tokenizer("hf", out)
    samples = read_texts(domain[1])[:3] + ["print('ahoj')\n", "Příliš žluťoučký kůň úpěl"]
    for text in samples:
        ids = engine.encode(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == ids
        assert any(i >= engine.vocab_size - ADD for i in ids) or text.isascii()
    assert len(auto) == engine.vocab_size


def test_learn_merges_matches_a_naive_reference(hf_base, domain):
    """The incremental pair bookkeeping equals recounting every pair after every merge."""
    import tokenizers

    from engine.data.extend import _bpe_words

    tok = tokenizers.Tokenizer.from_file(str(hf_base / "tokenizer.json"))
    words = _bpe_words(tok, read_texts(domain[1]), progress=False)
    pieces = {i: t for t, i in tok.get_vocab().items()}
    merges = learn_merges(words, pieces, 40, next_id=len(pieces))
    seqs, texts = {w: list(w) for w in words}, dict(pieces)
    for step in merges:
        counts = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                counts[pair] += words[w]
        best = min((p for p, c in counts.items() if texts[p[0]] + texts[p[1]] not in
                    texts.values()), key=lambda p: (-counts[p], p))
        assert (step.left, step.right, step.count) == (texts[best[0]], texts[best[1]],
                                                       counts[best])
        texts[step.id] = step.text
        seqs = {w: _merge_pair(seq, best, step.id) for w, seq in seqs.items()}


def test_learn_merges_small_cases():
    pieces = {0: "a", 1: "b", 2: "c"}
    merges = learn_merges({(0, 1, 2): 5, (0, 1): 3, (1, 2): 1}, pieces, 10, next_id=3)
    # ab (8), then abc (5); bc occurs once (< min_frequency 2): stop early.
    assert [(m.left, m.right, m.id, m.count) for m in merges] == [("a", "b", 3, 8),
                                                                 ("ab", "c", 4, 5)]
    existing = learn_merges({(0, 1, 2): 5, (1, 2): 3}, {**pieces, 9: "ab"}, 1, next_id=10)
    assert [(m.text, m.count) for m in existing] == [("bc", 8)]  # "ab" exists: never merged
    banned = learn_merges({(0, 1, 2): 5}, pieces, 1, next_id=3, banned=lambda a, b: a == "a")
    assert [m.text for m in banned] == ["bc"]
    assert _merge_pair([0, 0, 0], (0, 0), 7) == [7, 0]  # left to right, as the tokenizer


def test_sentencepiece_extension(sp_base, sp_extended, domain, general):
    out, report = sp_extended
    base, new = load_tokenizer("sentencepiece", sp_base), load_tokenizer("sentencepiece", out)
    assert report["added"] == ADD
    unreachable = check_ids_and_reachability(base, new, report, read_texts(domain[0]))
    assert len(unreachable) <= ADD // 20
    # What stays unreachable is a merge step: without it some domain line segments otherwise.
    lines = [line for t in read_texts(domain[0]) for line in t.split("\n")]
    grown = model_pb2.ModelProto()
    grown.ParseFromString((out / "tokenizer.model").read_bytes())
    for i in unreachable:
        trial = model_pb2.ModelProto()
        trial.CopyFrom(grown)
        del trial.pieces[i]
        a, b = (sentencepiece.SentencePieceProcessor(model_proto=m.SerializeToString())
                for m in (grown, trial))
        assert a.encode(lines, out_type=str) != b.encode(lines, out_type=str)
    check_fertility_and_round_trip(base, new, report, domain, general, exact=True)
    old, grown = model_pb2.ModelProto(), model_pb2.ModelProto()
    old.ParseFromString(open(sp_base, "rb").read())
    grown.ParseFromString((out / "tokenizer.model").read_bytes())
    assert grown.pieces[: len(old.pieces)] == old.pieces  # text, score and type of every piece
    assert grown.normalizer_spec == old.normalizer_spec
    assert (base.eod, base.bos, base.pad) == (new.eod, new.bos, new.pad)
    added = grown.pieces[len(old.pieces):]
    assert {p.type for p in added} == {model_pb2.ModelProto.SentencePiece.NORMAL}
    scores = [p.score for p in added]
    assert scores[0] < min(p.score for p in old.pieces) and scores == sorted(scores, reverse=True)


def tiny_bpe_proto():
    """A hand-made sentencepiece BPE model: <unk> <s> </s> and the pieces ▁ a b c."""
    proto = model_pb2.ModelProto()
    Piece = model_pb2.ModelProto.SentencePiece
    for text, kind in (("<unk>", Piece.UNKNOWN), ("<s>", Piece.CONTROL), ("</s>", Piece.CONTROL),
                       ("\u2581", Piece.NORMAL), ("a", Piece.NORMAL), ("b", Piece.NORMAL),
                       ("c", Piece.NORMAL)):
        proto.pieces.add(piece=text, score=-len(proto.pieces), type=kind)
    proto.trainer_spec.model_type = model_pb2.TrainerSpec.BPE
    return proto


def test_dead_pieces_keeps_merge_steps():
    base = tiny_bpe_proto()
    pieces = ["\u2581a", "\u2581ab", "\u2581abc", "cc"]
    grown = sentencepiece.SentencePieceProcessor(
        model_proto=append_pieces(base, pieces).SerializeToString())
    assert grown.encode("abc", out_type=str) == ["\u2581abc"]  # through ▁a and ▁ab
    # ▁a and ▁ab never come out, but "abc" needs them; cc is in no line: dead.
    assert dead_pieces(base, pieces, ["\u2581a", "\u2581ab", "cc"], ["abc", "ba"]) == {"cc"}


def test_select_pieces():
    domain = ["\u2581ab", "ab", "\u2581abc", "x", "a", "ž"]
    assert select_pieces(["a", "ab"], domain, 3) == ["\u2581ab", "x", "ž"]  # characters first
    assert select_pieces(["a", "ab"], domain, 10) == ["\u2581ab", "\u2581abc", "x", "ž"]


def test_sentencepiece_normalizing_base(tmp_path, general, domain):
    """An NFKC base that collapses spaces: the text that comes back is the base's, not x."""
    lines = [line for t in read_texts(general[0]) for line in t.split("\n") if line.strip()]
    model = tmp_path / "nfkc.model"
    with open(model, "wb") as writer:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=writer, vocab_size=400, model_type="bpe",
            normalization_rule_name="nmt_nfkc", byte_fallback=True, minloglevel=2,
            pad_id=3, num_threads=1)
    report = extend_tokenizer(model, [str(domain[0])], 100, tmp_path / "out", progress=False)
    base, new = load_tokenizer("sentencepiece", model), load_tokenizer("sentencepiece",
                                                                       tmp_path / "out")
    assert report["added"] == 100
    assert all(unicodedata.normalize("NFKC", new.inv_vocab[i]) == new.inv_vocab[i]
               for i in range(base.vocab_size, new.vocab_size))  # learned on normalized text
    for text in read_texts(domain[1])[:3] + ["ﬁle  ｆｕｌｌ   width ①"]:
        assert new.decode(new.encode(text)) == base.decode(base.encode(text))
    assert new.decode(new.encode("a  ｂ")) == "a b" != "a  ｂ"  # normalized, as by the base


@pytest.mark.parametrize("case", ["missing base", "add 0", "out not empty", "empty domain",
                                  "not a tokenizer", "not BPE"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, sp_base, domain, capsys):
    base, inputs, add, out = sp_base, [str(domain[0])], 5, tmp_path / "out"
    if case == "missing base":
        base, message = tmp_path / "nope.model", r"nope\.model: base tokenizer not found"
    elif case == "add 0":
        add, message = 0, r"--add 0: expected a positive number of new tokens"
    elif case == "out not empty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
        message = r"out: exists and is not empty"
    elif case == "empty domain":
        (tmp_path / "e.jsonl").write_text('{"text": ""}\n{"text": "  \\n"}\n')
        inputs, message = [str(tmp_path / "e.jsonl")], r"e\.jsonl: no text; expected non-empty"
    elif case == "not a tokenizer":
        (tmp_path / "bad.model").write_bytes(random.Random(0).randbytes(64))
        base, message = tmp_path / "bad.model", r"bad\.model: not a sentencepiece model"
    else:
        from tokenizers import Tokenizer, models, pre_tokenizers

        words = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="a"))
        words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        words.save(str(tmp_path / "words.json"))
        base, message = tmp_path / "words.json", r"words\.json: model 'WordLevel'; expected a BPE"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match=message):
        extend_tokenizer(base, inputs, add, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary
    argv = ["tokenizer", "extend", "--base", str(base), "--input", *inputs, "--add", str(add),
            "--out", str(out), "--no-progress"]
    assert engine_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_a_moved_base_id_is_refused(tmp_path, sp_base):
    """The invariant check that guards the output: a tokenizer whose base ids moved is refused."""
    from engine.data.extend import _measure

    proto = model_pb2.ModelProto()
    proto.ParseFromString(open(sp_base, "rb").read())
    a, b = proto.pieces[300].piece, proto.pieces[301].piece
    proto.pieces[300].piece, proto.pieces[301].piece = b, a
    (tmp_path / "moved.model").write_bytes(proto.SerializeToString())
    base, moved = (load_tokenizer("sentencepiece", m) for m in (sp_base, tmp_path / "moved.model"))
    with pytest.raises(DataError, match=rf"moved\.model: base token {re.escape(repr(a))} moved "
                                        r"from id 300 to 301; base ids must not move"):
        _measure(base, moved, ["text"], {}, progress=False)


def test_cli_prints_the_report(tmp_path, sp_base, domain, general, capsys):
    argv = ["tokenizer", "extend", "--base", str(sp_base), "--input", str(domain[0]), "--add",
            "50", "--out", str(tmp_path / "o"), "--valid-general", str(general[1]),
            "--no-progress"]
    assert engine_main(argv) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert lines[0].startswith(f"{tmp_path / 'o' / 'tokenizer.model'}: 512 + 50 new tokens")
    assert any(line.startswith("fertility general") for line in lines)
    assert f"unreachable new tokens: {report['unreachable']}" in "\n".join(lines)

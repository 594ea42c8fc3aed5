"""A new vocabulary against its base (engine.data.subtokens): moved ids named, and each new token
split by the base's own model into base tokens that spell exactly its piece, both kinds."""

import pytest

from engine.data.extend import extend_tokenizer
from engine.data.subtokens import base_split, first_moved, new_pieces, open_tokenizer
from engine.data.tokenizer import load_tokenizer, train_sentencepiece

CZECH = ("soubor souboru soubory příručky dokumentace překladu novější nebo jako jsou které "
         "být této Pokud").split()


@pytest.fixture(scope="module")
def domain(tmp_path_factory, write_jsonl):
    import random

    rng = random.Random(3)
    texts = [" ".join(rng.choice(CZECH) for _ in range(40)) + "." for _ in range(150)]
    return write_jsonl(tmp_path_factory.mktemp("cs") / "cs.jsonl", texts)


@pytest.fixture(scope="module", params=["hf", "sentencepiece"])
def extended(request, tmp_path_factory, domain, sp_tokenizer, hf_tokenizer_json):
    """(base tokenizer, extended tokenizer) of each kind, 40 tokens added on the Czech words."""
    base_path = hf_tokenizer_json if request.param == "hf" else sp_tokenizer.path
    out = tmp_path_factory.mktemp(f"ext-{request.param}") / "tok"
    extend_tokenizer(base_path, [str(domain)], 40, out, progress=False)
    base = load_tokenizer(request.param, base_path)
    kind, new = open_tokenizer(out)
    assert kind == request.param
    return base, new


def test_an_extension_moves_no_base_id_and_adds_ids_after_them(extended):
    base, new = extended
    assert first_moved(base, new) is None
    pieces = new_pieces(base, new)
    assert len(pieces) == new.vocab_size - base.vocab_size > 0
    assert [new.vocab[p] for p in pieces] == list(range(base.vocab_size, new.vocab_size))


def test_the_base_split_spells_each_new_piece_with_base_tokens(extended):
    base, new = extended
    pieces = new_pieces(base, new)
    splits = base_split(base, pieces)
    assert len(splits) == len(pieces)
    for piece, ids in zip(pieces, splits, strict=True):
        assert len(ids) >= 2, piece  # a new token replaces at least two base tokens
        assert all(0 <= i < base.vocab_size for i in ids)
        assert base.decode(list(ids)) == new.decode([new.vocab[piece]])
        if base.kind == "hf":  # byte-level pieces concatenate (sentencepiece's may be bytes)
            assert "".join(base.inv_vocab[i] for i in ids) == piece


def test_the_split_is_what_the_base_tokenizer_gives_for_a_whole_word(extended):
    """A word-initial new token standing alone as a word: the base tokenizer's encoding of that
    word is the split (the split applies the base's merges to the same characters)."""
    base, new = extended
    pieces = new_pieces(base, new)
    checked = 0
    word_initial = "\u0120" if base.kind == "hf" else "\u2581"  # byte-level "Ġ", spm "▁"
    for piece, ids in zip(pieces, base_split(base, pieces), strict=True):
        word = new.decode([new.vocab[piece]]).strip()
        if piece.startswith(word_initial) and word.isalpha():
            text = " " + word if base.kind == "hf" else word  # spm adds its dummy prefix
            assert base.encode(text) == list(ids), piece
            checked += 1
    assert checked >= 5


def test_a_retrained_tokenizer_names_the_first_moved_id(tmp_path, corpus_jsonl, sp_tokenizer):
    other = load_tokenizer("sentencepiece", train_sentencepiece(
        [str(corpus_jsonl)], str(tmp_path / "other"), 420))
    moved = first_moved(sp_tokenizer, other)
    assert moved is not None and moved.id >= 4  # the special pieces 0..3 stay where they were
    assert moved.line().startswith(f"base token {moved.piece!r} (id {moved.id}) ")

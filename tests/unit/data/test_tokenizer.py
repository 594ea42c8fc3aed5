"""engine.data.tokenizer: loading, round trips, megatron's interface, sentencepiece training."""

import json
import pickle
from pathlib import Path

import pytest
from megatron.core.tokenizers import MegatronTokenizerBase

from engine.data import DataError
from engine.data.tokenizer import NO_PAD, load_tokenizer, train_sentencepiece

TEXTS = [
    "the king is dead.",
    "  def f(x):\n\treturn x  # two  spaces, a tab\n\n",
    "Ünïcødé, 王, emoji 🎭, digits 12345",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trip(sp_tokenizer, text):
    ids = sp_tokenizer.encode(text)
    assert sp_tokenizer.decode(ids) == text
    assert all(0 <= i < sp_tokenizer.vocab_size for i in ids)


def test_sentencepiece_special_ids(sp_tokenizer):
    assert sp_tokenizer.vocab_size == 400
    assert (sp_tokenizer.eod, sp_tokenizer.bos, sp_tokenizer.pad) == (2, 1, 3)
    assert sp_tokenizer.inv_vocab[0] == "<unk>"
    ids = sp_tokenizer.encode("the king")
    assert sp_tokenizer.eod not in ids and sp_tokenizer.bos not in ids  # content ids only
    assert "<0x0A>" in sp_tokenizer.vocab  # byte fallback: no text is ever <unk>
    assert 0 not in sp_tokenizer.encode("unseen characters: ß ø ж ✓")


def test_megatron_interface(sp_tokenizer):
    assert isinstance(sp_tokenizer, MegatronTokenizerBase)
    assert sp_tokenizer.tokenize("a sword") == sp_tokenizer.encode("a sword")
    assert sp_tokenizer.detokenize(sp_tokenizer.tokenize("a sword")) == "a sword"
    assert sp_tokenizer.eos == sp_tokenizer.eod
    ids = sp_tokenizer.unique_identifiers
    json.dumps(ids)  # megatron serializes it into its dataset cache description
    assert str(sp_tokenizer.path) not in json.dumps(ids)  # content identity, not location
    clone = pickle.loads(pickle.dumps(sp_tokenizer))
    assert clone.encode(TEXTS[1]) == sp_tokenizer.encode(TEXTS[1])


def test_train_sentencepiece_is_deterministic_and_atomic(tmp_path, corpus_jsonl, sp_tokenizer):
    model = train_sentencepiece([str(corpus_jsonl)], str(tmp_path / "sp"), 400)
    assert model == str(tmp_path / "sp.model")
    assert (tmp_path / "sp.model").read_bytes() == Path(sp_tokenizer.path).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sp.model", "sp.vocab"]


def test_train_sentencepiece_reads_txt_and_json_key(tmp_path, documents):
    txt = tmp_path / "a.txt"
    txt.write_text(documents[0])
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in documents[1:]))
    model = train_sentencepiece([str(txt), str(jsonl)], str(tmp_path / "m"), 380, json_key="body")
    assert load_tokenizer("sentencepiece", model).vocab_size == 380
    with pytest.raises(DataError, match=r"b\.jsonl:1: no key 'text'"):
        train_sentencepiece([str(jsonl)], str(tmp_path / "m2"), 380)


def test_train_sentencepiece_vocab_too_large_is_one_line(tmp_path, corpus_jsonl):
    with pytest.raises(DataError, match="sentencepiece training failed") as err:
        train_sentencepiece([str(corpus_jsonl)], str(tmp_path / "big"), 100_000)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_json_round_trip(hf_tokenizer_json, text):
    tok = load_tokenizer("hf", hf_tokenizer_json)
    assert tok.decode(tok.encode(text)) == text


def test_hf_bare_tokenizer_json_specials(hf_tokenizer_json):
    tok = load_tokenizer("hf", hf_tokenizer_json.parent)  # the directory works too
    assert tok.eod == tok.vocab["<|endoftext|>"]
    assert tok.pad == NO_PAD  # nothing says <pad> is the pad token without a config
    assert tok.bos is None
    assert tok.vocab_size == 500
    assert tok.eod not in tok.encode("the king")


def test_hf_directory_matches_autotokenizer(tmp_path, hf_tokenizer_json, documents):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    saved = PreTrainedTokenizerFast(
        tokenizer_file=str(hf_tokenizer_json), eos_token="<|endoftext|>", pad_token="<pad>"
    )
    saved.save_pretrained(tmp_path)
    ours = load_tokenizer("hf", tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    assert ours.eod == reference.eos_token_id
    assert ours.pad == reference.pad_token_id != ours.eod
    for text in documents[:20] + TEXTS:
        assert ours.encode(text) == reference(text, add_special_tokens=False)["input_ids"]


def test_hf_pad_equal_to_eos_is_no_pad(tmp_path, hf_tokenizer_json):
    (tmp_path / "tokenizer.json").write_bytes(hf_tokenizer_json.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|endoftext|>"})
    )
    tok = load_tokenizer("hf", tmp_path)
    assert tok.eod == tok.vocab["<|endoftext|>"]
    assert tok.pad == NO_PAD  # else GPTDataset would mask the loss on every eod target


def test_hf_unknown_eos_token(tmp_path, hf_tokenizer_json):
    (tmp_path / "tokenizer.json").write_bytes(hf_tokenizer_json.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(DataError, match=r"eos_token '</s>' is not in the vocabulary"):
        load_tokenizer("hf", tmp_path)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="unknown tokenizer kind 'bpe'"):
        load_tokenizer("bpe", tmp_path)
    with pytest.raises(DataError, match=f"{tmp_path}/missing.model: tokenizer not found"):
        load_tokenizer("sentencepiece", tmp_path / "missing.model")
    with pytest.raises(DataError, match=f"{tmp_path}: no tokenizer.json in this directory"):
        load_tokenizer("hf", tmp_path)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00not a model")
    with pytest.raises(DataError, match=f"{garbage}: not a sentencepiece model"):
        load_tokenizer("sentencepiece", garbage)
    with pytest.raises(DataError, match=f"{garbage}: not a Hugging Face tokenizer.json"):
        load_tokenizer("hf", garbage)

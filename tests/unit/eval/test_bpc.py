"""Bits per character (engine.eval.bpc): nats over the documents / (ln 2 x characters), whole
documents read up to the limits."""

import json
import math

import pytest

from engine.eval.bpc import bits_per_character, read_documents


class FakeLM:
    """An lm-eval model whose documents cost 1 nat per token, a token being 2 characters."""

    def tok_encode(self, text):
        return list(range(math.ceil(len(text) / 2)))

    def loglikelihood_rolling(self, requests):
        return [-float(len(self.tok_encode(r.args[0]))) for r in requests]


def test_bits_per_character_is_nats_over_ln2_characters():
    figures = bits_per_character(FakeLM(), ["abcd", "efghij"])
    assert figures == {"documents": 2, "characters": 10, "tokens": 5, "nats": 5.0,
                       "bpc": pytest.approx(5 / (math.log(2) * 10)), "tokens_per_char": 0.5}


def test_documents_are_read_whole_up_to_the_limits(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("aaaa", " ", "bbbb", "cc")))
    assert read_documents(str(path), max_documents=None, max_chars=None) == ["aaaa", "bbbb", "cc"]
    assert read_documents(str(path), max_documents=2, max_chars=None) == ["aaaa", "bbbb"]
    assert read_documents(str(path), max_documents=None, max_chars=5) == ["aaaa", "bbbb"]

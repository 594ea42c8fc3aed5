"""Fixtures of the data tests: a small deterministic corpus and two tokenizers trained on it."""

import json
import random

import pytest

_VOCABULARY = (
    "the king queen crown sword night day love death blood honour fool ghost castle storm "
    "sea ship letter poison ring wood moon star heart hand eye word tongue friend enemy "
    "def return import class for while if else None True False self print lambda yield"
)
WORDS = tuple(_VOCABULARY.split())


def make_documents(count: int, seed: int = 0) -> list[str]:
    """`count` documents of pseudo-English lines; some indented, some non-ASCII, all distinct."""
    rng = random.Random(seed)
    documents = []
    for d in range(count):
        lines = []
        for _ in range(rng.randint(2, 8)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
            indent = " " * rng.choice((0, 0, 4, 8))
            lines.append(indent + " ".join(words) + rng.choice((".", ",", ":", "!", " é", " 王")))
        documents.append(f"Document {d}.\n" + "\n".join(lines))
    return documents


def _write_jsonl(path, texts, key="text"):
    lines = (json.dumps({key: text, "meta": 1}, ensure_ascii=False) + "\n" for text in texts)
    with open(path, "w", encoding="utf-8") as stream:
        stream.writelines(lines)
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    """`write_jsonl(path, texts, key="text") -> path`: one JSON object per text."""
    return _write_jsonl


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return make_documents(200)


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory, documents):
    return _write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", documents)


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory, corpus_jsonl):
    """A 400-piece sentencepiece BPE trained on the corpus (well under a second)."""
    from engine.data.tokenizer import load_tokenizer, train_sentencepiece

    model = train_sentencepiece([str(corpus_jsonl)], str(tmp_path_factory.mktemp("sp") / "sp"), 400)
    return load_tokenizer("sentencepiece", model)


@pytest.fixture(scope="session")
def hf_tokenizer_json(tmp_path_factory, documents):
    """A bare tokenizer.json: byte-level BPE with <|endoftext|> and <pad> (`tokenizers`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def manpages_cs(tmp_path_factory):
    """Debian's manpages-cs rendered by `build_manpages_corpus` (the installed package, else
    `apt-get download`): the directory of manpages-cs-{train,valid}.jsonl. Skips, saying why,
    only when the package is neither installed nor downloadable (.ci/run installs it)."""
    from engine.data import DataError
    from engine.data.manpages import build_manpages_corpus

    out = tmp_path_factory.mktemp("manpages")
    try:
        build_manpages_corpus(out, "cs", cache=out / "debs", progress=False)
    except DataError as err:
        if "apt-get" not in str(err):
            raise
        pytest.skip(f"no Czech man pages: {err}")
    return out

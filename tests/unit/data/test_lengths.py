"""Length-aware data (engine.data.lengths): the histograms' arithmetic, the pieces of a packed
sample, the split of a dataset by document length (every document lands in exactly one part,
unchanged and in order), and `engine data lengths` on a blend that up-samples the long part."""

import json

import numpy as np
import pytest

from engine.data import DataError
from engine.data.lengths import (
    bucket_edges,
    bucket_labels,
    context_histogram,
    document_histogram,
    document_lengths,
    histogram,
    sample_pieces,
    split_by_length,
)


def test_buckets_double_up_to_the_sequence_length():
    assert bucket_edges(256) == [64, 128, 256]
    assert bucket_edges(300) == [64, 128, 256, 512]
    assert bucket_labels([64, 128]) == ["<=64", "65-128", ">128"]


def test_histogram_shares_by_bucket():
    # lengths 10 (w 1), 64 (w 3) -> (0, 64]; 65 (w 2) -> (64, 128]; 1000 (w 4) -> past the end
    shares = histogram(np.array([10, 64, 65, 1000]), np.array([1, 3, 2, 4]), [64, 128])
    assert shares == pytest.approx([0.4, 0.2, 0.4])
    # a document of n tokens weighs n: 60 + 100 + 100 tokens
    assert document_histogram(np.array([60, 100, 100]), [64, 128]) == \
        pytest.approx([60 / 260, 200 / 260, 0.0])


def test_sample_pieces_end_at_eod_and_the_rest_runs_to_the_end():
    eod = 2
    assert sample_pieces(np.array([5, 6, 2, 7, 2, 8, 9, 9]), eod).tolist() == [3, 2, 3]
    assert sample_pieces(np.array([2, 5, 6]), eod).tolist() == [1, 2]
    assert sample_pieces(np.array([5, 6, 7, 2]), eod).tolist() == [4]
    # two samples: pieces 3, 2, 3 and 4 -> 8 of 12 tokens in pieces <= 3
    assert context_histogram([np.array([5, 6, 2, 7, 2, 8, 9, 9]), np.array([5, 6, 7, 2])], eod,
                             [3, 4]) == pytest.approx([8 / 12, 4 / 12, 0.0])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, write_jsonl, sp_tokenizer, documents):
    """The 200 test documents and ten long ones (six of them each) as a .bin/.idx pair."""
    from engine.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("lengths")
    docs = list(documents) + ["\n".join(documents[i:i + 6]) for i in range(0, 60, 6)]
    write_jsonl(out / "docs.jsonl", docs)
    preprocess([str(out / "docs.jsonl")], str(out / "docs"), sp_tokenizer, progress=False)
    return out


def test_split_by_length_keeps_every_document_once_in_order(dataset):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    lengths = document_lengths(str(dataset / "docs"))
    cut = int(np.quantile(lengths, 0.9))
    stats = split_by_length(str(dataset / "docs"), cut, str(dataset / "long"),
                            str(dataset / "short"))
    long_, short = (IndexedDataset(str(dataset / p)) for p in ("long", "short"))
    source = IndexedDataset(str(dataset / "docs"))
    want_long = [source[i] for i in range(len(lengths)) if lengths[i] >= cut]
    want_short = [source[i] for i in range(len(lengths)) if lengths[i] < cut]
    assert [long_[i].tolist() for i in range(len(long_))] == [d.tolist() for d in want_long]
    assert [short[i].tolist() for i in range(len(short))] == [d.tolist() for d in want_short]
    assert (stats.long_documents, stats.short_documents) == (len(want_long), len(want_short))
    assert stats.long_tokens + stats.short_tokens == int(lengths.sum())
    assert not list(dataset.glob("*.tmp*"))


def test_split_by_length_refuses_bad_input(dataset):
    with pytest.raises(DataError, match="min_tokens=0: expected at least 1"):
        split_by_length(str(dataset / "docs"), 0, str(dataset / "a"), str(dataset / "b"))
    with pytest.raises(DataError, match="need their own prefixes"):
        split_by_length(str(dataset / "docs"), 5, str(dataset / "docs"), str(dataset / "b"))


def test_lengths_command_shows_up_sampling(dataset, sp_tokenizer, tmp_path, capsys):
    """A blend of the short and long parts (the long part: 10 documents of 6 short ones each):
    giving the long part more weight puts more of the drawn tokens into long pieces (129-256
    tokens of one document in a 256-token sample)."""
    from engine.cli import main

    lengths = document_lengths(str(dataset / "docs"))
    split_by_length(str(dataset / "docs"), 200, str(dataset / "long"), str(dataset / "short"))
    base = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
            "model.num_attention_heads=4", "model.max_position_embeddings=256",
            "data.seq_length=256", "train.steps=10", "train.global_batch_size=8",
            "tokenizer.type=sentencepiece", f"tokenizer.path={sp_tokenizer.path}"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {}\ndata: {synthetic: true}\n")
    shares = {}
    for weight in (0.1, 0.7):
        blend = f"data.blend=[{{path: {dataset / 'short'}, weight: {1 - weight:.1f}}}, " \
                f"{{path: {dataset / 'long'}, weight: {weight}}}]"
        out = tmp_path / f"h{weight}.json"
        assert main(["data", "lengths", "--config", str(recipe), "data.synthetic=false",
                     blend, *base, "--samples", "40", "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["labels"] == ["<=64", "65-128", "129-256", ">256"]
        assert report["samples"] == 40 and sum(report["drawn"]) == pytest.approx(1.0)
        assert report["drawn"][3] == 0.0  # a piece is at most a sample
        long_share = sum(lengths[lengths >= 200]) / sum(lengths)  # the long part's documents
        assert sum(report["files"]["long"][:2]) == 0.0  # documents of >= 200 tokens
        assert report["files"]["short"][3] == 0.0 and long_share < 0.5
        shares[weight] = report["drawn"][2]
    assert "drawn" in capsys.readouterr().out
    assert shares[0.7] > shares[0.1] + 0.3, shares

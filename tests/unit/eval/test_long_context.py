"""Loss by position (engine.eval.long_context): which documents give rows, the bucket means,
and the tables of the summaries."""

import numpy as np
import pytest

from engine.eval.long_context import (
    format_passkey,
    format_positions,
    long_rows,
    per_position_report,
    position_buckets,
)


def test_long_rows_take_the_first_tokens_of_long_enough_documents():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9] * 4, [7, 7, 7, 7, 7, 7]]
    assert long_rows(docs, 3, 10) == [[4, 5, 6, 7], [9, 9, 9, 9], [7, 7, 7, 7]]
    assert long_rows(docs, 3, 1) == [[4, 5, 6, 7]]
    assert long_rows(docs, 8, 10) == []


def test_buckets_average_the_per_position_means():
    losses = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                       [3.0, 2.0, 1.0, 0.0, 1.0, 2.0]])  # per position: 2 2 2 2 3 4
    out = position_buckets(losses, 3)
    assert (out["starts"], out["ends"]) == ([0, 2, 4], [2, 4, 6])
    assert out["loss"] == pytest.approx([2.0, 2.0, 3.5])
    assert out["per_position"] == pytest.approx([2, 2, 2, 2, 3, 4])
    uneven = position_buckets(losses, 4)  # edges 0, 2, 3, 4, 6 (rounded)
    assert uneven["starts"] == [0, 2, 3, 4] and uneven["ends"] == [2, 3, 4, 6]
    with pytest.raises(ValueError, match="buckets=7: expected 1..6"):
        position_buckets(losses, 7)
    report = per_position_report(losses, 2, seq_length=6)
    assert report["documents"] == 2 and report["positions"] == 6 and report["seq_length"] == 6


def test_tables():
    grid = {256: {0.0: 1.0, 0.5: 0.5}, 512: {0.0: 0.0, 0.5: 0.25}}
    text = format_passkey({"after": grid})
    assert "after: passkey accuracy" in text
    assert text.splitlines()[2].split() == ["256", "100", "50", "75"]
    report = position_buckets(np.ones((2, 4)), 2)
    assert format_positions({"a": report, "b": report}).splitlines()[1].split() == \
        ["0-1", "1.0000", "1.0000"]

"""Checkpoint directory rules that need no model: the tracker, atomic saves, retention."""

from pathlib import Path

import pytest

from engine.checkpoint import CheckpointError
from engine.checkpoint.io import apply_retention, find_checkpoint


def fake_checkpoint(root: Path, step: int) -> Path:
    d = root / f"iter_{step:07d}"
    d.mkdir(parents=True)
    (d / "metadata.json").write_text("{}")
    return d


def test_empty_directory_holds_no_checkpoint(tmp_path):
    assert find_checkpoint(tmp_path) is None


def test_an_interrupted_save_never_becomes_latest(tmp_path):
    good = fake_checkpoint(tmp_path, 3)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3\n")
    (tmp_path / "iter_0000006.partial").mkdir()  # a save that died before its rename
    assert find_checkpoint(tmp_path) == good
    assert find_checkpoint(good) == good  # an iter_ directory names itself


def test_bad_tracker_is_one_clear_error(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release\n")
    with pytest.raises(CheckpointError, match="expected a step number, found 'release'"):
        find_checkpoint(tmp_path)


def test_retention_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    apply_retention(tmp_path, 2, keep=tmp_path / "iter_0000008")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000006", "iter_0000008"]

"""Checkpoint directory rules that need no model: the tracker, atomic saves, retention, and which
optimizer states can load at which layout."""

from pathlib import Path

import pytest

from engine.checkpoint.io import (
    CheckpointError,
    SavedLayout,
    _apply_retention,
    _check_optimizer_compatible,
    find_checkpoint,
)


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
    _apply_retention(tmp_path, 2, keep=tmp_path / "iter_0000008")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000006", "iter_0000008"]


def layout(tp=1, pp=1, dp=1, distopt=True, sharding="dp_reshardable") -> SavedLayout:
    return SavedLayout(tp=tp, pp=pp, dp=dp, distributed_optimizer=distopt, optim_sharding=sharding)


def test_dp_reshardable_state_loads_at_another_dp_only(tmp_path):
    _check_optimizer_compatible(tmp_path, layout(dp=2), layout(dp=1))
    with pytest.raises(CheckpointError, match=r"saved as dp_reshardable at tp=2 pp=1 ep=1 cannot "
                                              r"load at tp=1 pp=1 ep=1.*load_optim=false"):
        _check_optimizer_compatible(tmp_path, layout(tp=2), layout(tp=1))


def test_fully_reshardable_and_regular_optimizer_states_load_anywhere(tmp_path):
    _check_optimizer_compatible(tmp_path, layout(tp=2, sharding="fully_reshardable"), layout(pp=2))
    _check_optimizer_compatible(tmp_path, layout(tp=2, distopt=False), layout(pp=2, distopt=False))

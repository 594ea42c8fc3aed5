"""Atomic writes: a file or a directory appears whole or not at all, with normal permissions."""

import os

import pytest

from engine.files import new_directory, unwritable, write_atomic


def test_a_written_file_replaces_the_old_one_with_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "f.json"
    write_atomic(path, "old")
    old = os.umask(0o022)
    try:
        write_atomic(path, "new")
    finally:
        os.umask(old)
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]  # no temporary left


def test_a_failed_directory_leaves_nothing_and_a_finished_one_appears_whole(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError), new_directory(out) as tmp:
        (tmp / "part").write_text("half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()  # an empty directory may be there already
    with new_directory(out) as tmp:
        (tmp / "weights").write_text("all")
        assert not (out / "weights").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "weights").is_file()


def test_unwritable_says_why_nothing_can_be_written(tmp_path):
    assert unwritable(tmp_path) is None and unwritable(tmp_path / "new" / "deeper") is None
    (tmp_path / "file").write_text("x")
    assert unwritable(tmp_path / "file" / "out") == (
        f"not writable ({tmp_path / 'file'} is a file, not a directory)")
    if os.geteuid() != 0:  # file modes stop everyone but root
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert unwritable(ro / "out") == f"not writable ({ro}: no write permission)"
    elif os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
        assert unwritable("/proc/sys/out") == "not writable (/proc/sys: no write permission)"

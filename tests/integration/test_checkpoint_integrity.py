"""A checkpoint is complete or it is not used (engine/checkpoint/integrity.py, io.py): a
truncated or corrupted shard is one line naming the file, checkpoint.fallback resumes from the
newest intact earlier checkpoint, leftovers of an interrupted save are removed at the next start,
and a save that fails on a full disk is one line with the tracker and the earlier checkpoint
intact."""

import json
import os
import shutil
import subprocess
import uuid

import pytest
import yaml

from engine.checkpoint import CheckpointError, find_checkpoint, read_train_state
from engine.checkpoint.integrity import MANIFEST, damage
from engine.cli import main
from engine.config.loader import recipe_from_dict
from engine.train.loop import train

pytestmark = pytest.mark.slow


def recipe(make_recipe, save, steps=4, **checkpoint):
    return recipe_from_dict(make_recipe(  # constant LR: more steps on resume is no change
        train={"steps": steps, "schedule": {"style": "constant", "warmup_steps": 0}},
        checkpoint={"save": str(save), "save_interval": 2, **checkpoint}))


@pytest.fixture
def saved(make_recipe, tmp_path):
    """A run with checkpoints at steps 2 and 4, each with its manifest."""
    train(recipe(make_recipe, tmp_path / "ck"))
    ckpt = find_checkpoint(tmp_path / "ck")
    assert ckpt.name == "iter_0000004" and (ckpt / MANIFEST).is_file()
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {"recipe.yaml", "train_state.json", "metadata.json"} <= set(files)
    return tmp_path / "ck", ckpt


def largest_shard(ckpt):
    return max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_a_damaged_checkpoint_is_one_line_and_fallback_resumes_earlier(
        saved, make_recipe, how, caplog):
    root, ckpt = saved
    shard = largest_shard(ckpt)
    data = bytearray(shard.read_bytes())
    if how == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte flipped: only the checksum sees it
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    expected = "truncated" if how == "truncated" else "corrupted"
    assert expected in damage(ckpt)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: .*\({expected}\?*\); set "
                                              r"checkpoint\.fallback=true"):
        train(recipe(make_recipe, root, steps=6))
    result = train(recipe(make_recipe, root, steps=6, fallback=True))
    assert sorted(result.losses) == [3, 4, 5, 6]  # resumed from step 2
    assert "resuming from" in caplog.text and "iter_0000002" in caplog.text
    assert read_train_state(find_checkpoint(root)).step == 6


def test_leftovers_of_an_interrupted_save_are_removed_at_the_next_start(saved, make_recipe):
    root, ckpt = saved
    partial = root / "iter_0000006.partial"
    shutil.copytree(ckpt, partial)
    train(recipe(make_recipe, root, steps=6))
    assert not partial.exists() and find_checkpoint(root).name == "iter_0000006"


def _mount_tmpfs(path, size: int) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    name = f"engine-{uuid.uuid4().hex[:8]}"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", name, str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_last_checkpoint(
        saved, make_recipe, tmp_path, capsys):
    _, ckpt = saved
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, int(size * 1.6)):  # room for one checkpoint, not two
        pytest.skip("a full-disk test needs root and `mount -t tmpfs` (here: not available)")
    try:
        r = make_recipe(train={"steps": 4}, checkpoint={"save": str(disk / "ck"),
                                                        "save_interval": 2})
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
        code = main(["train", "--config", str(tmp_path / "r.yaml")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("error: ") and len(err[-1]) < 500, err[-3:]
        assert "saving step 4 failed (" in err[-1] and " MiB free of " in err[-1], err[-1]
        assert (disk / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
        assert damage(disk / "ck" / "iter_0000002") is None
        assert sorted(p.name for p in (disk / "ck").iterdir()) == \
            ["iter_0000002", "latest_checkpointed_iteration.txt"]  # no partial left behind
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)

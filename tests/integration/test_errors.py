"""Bad input ends in one clear line naming the file/key/value and a non-zero exit code."""

import shutil
import subprocess
import sys

import pytest
import yaml

from engine.cli import main


@pytest.fixture
def recipe_file(make_recipe, tmp_path):
    def write(**sections):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(make_recipe(**sections)))
        return str(path)

    return write


def run_cli(capsys, *argv) -> str:
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unknown_key_suggests_the_right_one(recipe_file, capsys):
    line = run_cli(capsys, "--config", recipe_file(), "train.lr=1e-3")
    assert "unknown config key 'train.lr'" in line and "did you mean 'optim.lr'?" in line


def test_world_size_not_divisible(recipe_file, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    line = run_cli(capsys, "--config", recipe_file(parallel={"tp": 2}))
    assert "world_size=3 is not divisible by tp*pp*cp=2" in line


def test_missing_checkpoint_to_load(recipe_file, capsys, tmp_path):
    line = run_cli(capsys, "--config", recipe_file(checkpoint={"load": str(tmp_path / "nothing")}))
    assert f"checkpoint.load={tmp_path / 'nothing'}: no checkpoint there" in line


def test_missing_pretrained(recipe_file, capsys, tmp_path):
    line = run_cli(
        capsys, "--config", recipe_file(checkpoint={"pretrained": str(tmp_path / "nothing")})
    )
    assert "checkpoint.pretrained=" in line and "no checkpoint there" in line


def test_tracker_pointing_at_a_missing_step(recipe_file, capsys, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("5\n")
    line = run_cli(capsys, "--config", recipe_file(checkpoint={"save": str(tmp_path / "ck")}))
    assert "names step 5" in line and "iter_0000005 is missing or incomplete" in line


def test_corrupt_checkpoint_shard(recipe_file, capsys, tmp_path):
    ck = str(tmp_path / "ck")
    assert (
        main(
            [
                "train",
                "--config",
                recipe_file(checkpoint={"save": ck}),
                "train.steps=0",
                "train.schedule.warmup_steps=0",
            ]
        )
        == 0
    )
    for shard in (tmp_path / "ck" / "iter_0000000").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    line = run_cli(capsys, "--config", recipe_file(checkpoint={"save": ck}))
    # the manifest names the file before megatron reads it
    assert "iter_0000000/__0_0.distcp: 100 bytes, expected " in line and "(truncated?)" in line


def test_corrupt_idx(recipe_file, capsys, tiny_data, tmp_path):
    for ext in (".bin", ".idx"):
        shutil.copy(tiny_data["train"] + ext, tmp_path / f"bad{ext}")
    idx = tmp_path / "bad.idx"
    idx.write_bytes(idx.read_bytes()[:-40])
    line = run_cli(
        capsys,
        "--config",
        recipe_file(data={"blend": [{"path": str(tmp_path / "bad"), "weight": 1.0}]}),
    )
    assert str(tmp_path / "bad") in line


def test_tokenizer_larger_than_the_model(recipe_file, capsys):
    line = run_cli(capsys, "--config", recipe_file(model={"vocab_size": 100}))
    assert "tokenizer vocab 512" in line and "model.vocab_size=100" in line


def test_bad_blend_weight(recipe_file, capsys, tiny_data):
    line = run_cli(
        capsys,
        "--config",
        recipe_file(data={"blend": [{"path": tiny_data["train"], "weight": -1}]}),
    )
    assert "data.blend[0].weight" in line and "-1" in line


def test_the_real_command_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {num_layers: 2}\ntrain: {steps: ten}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "train", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: "), proc.stderr

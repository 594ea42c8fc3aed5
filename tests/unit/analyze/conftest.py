"""Runs on disk for the analysis tests: real TensorBoard event files written with torch's
SummaryWriter (the engine's own writer), recipes from configs/tiny-cpu.yaml with overrides, and
the checkpoint files the analyses read (tracker, recipe.yaml, train_state.json)."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def write_events(tb_dir: Path, scalars: dict[str, list[tuple[int, float]]]) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    return tb_dir


def write_recipe(path: Path, overrides: dict) -> Path:
    """configs/tiny-cpu.yaml with `overrides` ({dotted key: value}) as the run's recipe."""
    from engine.config.loader import (
        apply_overrides,
        dump_recipe,
        read_recipe_yaml,
        recipe_from_dict,
    )

    base = ROOT / "configs" / "tiny-cpu.yaml"
    data = apply_overrides(read_recipe_yaml(base), overrides, str(base))
    dump_recipe(recipe_from_dict(data, str(base)), path)
    return path


def write_checkpoint(save: Path, step: int, recipe_yaml: Path, earlier_steps: list[int],
                     records: list[dict] | None = None) -> Path:
    """The files of a checkpoint the analyses read (no weights); `records`: the earlier
    stages' learning-rate records (engine.train.lr_record)."""
    ckpt = save / f"iter_{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "metadata.json").write_text("{}")
    (ckpt / "recipe.yaml").write_text(recipe_yaml.read_text())
    stages = [{"stage": f"s{i}", "steps": s, "tokens": 0, "source_tokens": {}}
              for i, s in enumerate(earlier_steps)]
    for stage, record in zip(stages, records or [], strict=False):
        stage["lr"] = record
    (ckpt / "train_state.json").write_text(json.dumps({
        "step": step, "consumed_samples": 0, "consumed_tokens": 0, "schedule": {},
        "earlier_stages": stages}))
    (save / "latest_checkpointed_iteration.txt").write_text(str(step))
    return ckpt


@pytest.fixture
def run_files():
    """The helpers above, as one fixture."""
    return type("RunFiles", (), {"events": staticmethod(write_events),
                                 "recipe": staticmethod(write_recipe),
                                 "checkpoint": staticmethod(write_checkpoint)})

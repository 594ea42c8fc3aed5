"""Long-context evaluation through the commands: `engine eval --per-position` equals the per-token
losses megatron's own loss gives the same documents (averaged per position bucket), and the
passkey tasks run through `engine eval` into `engine tasks summary` (table, heat-map)."""

import json

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.config.loader import recipe_from_dict
from engine.train.loop import train

SEQ = 96  # positions per document in the per-position test


@pytest.fixture(scope="module")
def ckpt(make_recipe, tmp_path_factory):
    """The tiny model after 20 steps, with a context of 256 positions."""
    save = tmp_path_factory.mktemp("long_eval") / "ckpt"
    train(recipe_from_dict(make_recipe(model={"max_position_embeddings": 256},
                                       train={"steps": 20}, checkpoint={"save": str(save)})))
    return save


def test_per_position_equals_megatron_per_token_losses(ckpt, tiny_data, tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from engine.distributed import destroy_distributed
    from engine.eval.long_context import long_rows, position_buckets
    from engine.eval.model import load_for_eval

    out = tmp_path / "pp"
    assert main(["eval", "--ckpt", str(ckpt), "--per-position", tiny_data["train"],
                 "--seq-length", str(SEQ), "--documents", "6", "--buckets", "4",
                 "--out", str(out)]) == 0
    report = json.loads((out / "per_position.json").read_text())
    assert (out / "per_position.png").stat().st_size > 0
    assert report["documents"] == 6 and report["positions"] == SEQ
    assert "positions" in capsys.readouterr().out

    # the same documents through the model's own loss (megatron's cross-entropy with labels)
    index = IndexedDataset(tiny_data["train"])
    docs = [index[i] for i in range(len(index))]
    rows = torch.tensor(long_rows(docs, SEQ, 6))
    model = load_for_eval(ckpt)
    try:
        net = model.chunks[0].eval()
        with torch.no_grad():
            losses = net(rows[:, :-1], torch.arange(SEQ).expand(6, SEQ), None,
                         labels=rows[:, 1:]).double().numpy()
    finally:
        destroy_distributed()
    direct = position_buckets(losses, 4)
    assert report["starts"] == direct["starts"] and report["ends"] == direct["ends"]
    diff = np.abs(np.array(report["per_position"]) - direct["per_position"]) / \
        np.array(direct["per_position"])
    print(f"per-position vs megatron's loss: max relative difference {diff.max():.1e}")
    assert diff.max() < 1e-5
    assert report["loss"] == pytest.approx(direct["loss"], rel=1e-5)


def test_passkey_tasks_run_and_summarize(ckpt, tmp_path, capsys):
    tasks, results = tmp_path / "tasks", tmp_path / "results"
    assert main(["tasks", "build", "passkey", "--lengths", "192,256", "--depths", "0,0.5,1",
                 "--samples", "3", "--ckpt", str(ckpt), "--out", str(tasks)]) == 0
    assert len(list(tasks.glob("passkey_*.yaml"))) == 6
    assert main(["eval", "--ckpt", str(ckpt), "--include-path", str(tasks),
                 "--tasks", "passkey_*", "--out", str(results)]) == 0
    scores = json.loads((results / "results.json").read_text())["results"]
    assert sorted(scores) == sorted(p.stem for p in tasks.glob("passkey_*.yaml"))
    assert all(0.0 <= s["acc,none"] <= 1.0 for s in scores.values())
    capsys.readouterr()
    out = tmp_path / "summary"
    assert main(["tasks", "summary", "passkey", str(results / "results.json"),
                 str(results / "results.json"), "--labels", "before,after",
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "before: passkey accuracy" in table and "after: passkey accuracy" in table
    summary = json.loads((out / "passkey_summary.json").read_text())
    assert sorted(summary["after"]) == ["192", "256"]
    assert sorted(summary["after"]["256"]) == ["0.0", "0.5", "1.0"]
    assert (out / "passkey.png").stat().st_size > 0

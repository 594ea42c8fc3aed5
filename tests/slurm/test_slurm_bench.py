"""launch/slurm/bench-submit.sh on a real one-node Slurm cluster: a job array over two parallel
layouts (bench.sbatch, one row a task) and the collector after it (collect.sbatch) give one
table with one row per layout."""

import csv
import re

import pytest

from engine.bench.row import read_rows

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=1000",
        "data.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=4"]


def test_job_array_over_two_layouts_gives_one_table(slurm, launch, tmp_path):
    layouts = tmp_path / "layouts.txt"
    layouts.write_text("# the tiny recipe's TP=2 layout, and the same two processes as DP=2\n"
                       "tp=2,sp=1\n\ntp=1,sp=0\n")
    out = tmp_path / "bench"
    proc = slurm.run("launch/slurm/bench-submit.sh", "--gpus-per-node=0",
                     f"--output={tmp_path}/%x-%j.out", "--", str(layouts),
                     "configs/tiny-cpu.yaml", *TINY,
                     env=launch.env(ENGINE_BENCH_OUT=str(out), ENGINE_NPROC_PER_NODE="2",
                                    ENGINE_BENCH_STEPS="2", ENGINE_BENCH_WARMUP="1"))
    array_id, collect_id = re.search(r"array job (\d+) \(2 layouts\), collector job (\d+)",
                                     proc.stdout).groups()
    info = slurm.wait(collect_id, timeout=600, release_requeued=False)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs
    assert info["Dependency"] == "(null)"  # it waited for the array
    for task in (0, 1):
        assert slurm.job(f"{array_id}_{task}")["JobState"] == "COMPLETED"

    rows = sorted(p.name for p in (out / "rows").iterdir())
    assert rows == ["000-tp2-sp1.json", "001-tp1-sp0.json"]
    assert [r.layout for r in read_rows(out / "rows" / rows[0])] == ["tp2 pp1 dp1 sp"]
    with open(out / "table.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["layout"], r["devices"]) for r in table] == [("tp2 pp1 dp1 sp", "2"),
                                                           ("tp1 pp1 dp2", "2")]
    assert all(float(r["tokens_per_s"]) > 0 for r in table)
    assert len(read_rows(out / "table.json")) == 2
    assert "2 row(s) -> " in logs

"""`engine pipeline submit` on the two-node cluster (conftest.py): a train stage whose own
`sbatch: [--nodes=2]` makes its job span both nodes (one process a node, DP=2 over the
network), then a Scale-Up stage as a one-node job waiting (afterok) for it; both complete."""

import dataclasses
import re
import sys
from datetime import datetime

import pytest
import yaml

from engine.checkpoint.io import find_checkpoint, read_train_state
from engine.pipeline.config import load_pipeline
from engine.pipeline.stages import done, output

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_train_stage_on_two_nodes_then_growth_on_one(two_nodes, launch, make_recipe, tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(make_recipe()))
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump({
        "name": "two", "out": "run", "recipe": str(tmp_path / "base.yaml"),
        "overrides": {"model": {"num_layers": 2}, "train": {"steps": 2}},
        "stages": [
            {"name": "pretrain", "kind": "train", "sbatch": ["--nodes=2"]},
            {"name": "grow", "kind": "scale_up", "source": "pretrain",
             "args": {"num_layers": 4, "width_method": "exact", "depth_method": "identity"}},
        ]}, sort_keys=False))
    env = launch.env(ENGINE_LOG_DIR=str(tmp_path / "logs"), ENGINE_NPROC_PER_NODE="1",
                     GLOO_SOCKET_IFNAME=two_nodes.iface)
    proc = two_nodes.slurm.run(sys.executable, "-m", "engine", "pipeline", "submit", "pipe.yaml",
                               "--sbatch-arg=--gpus-per-node=0", env=env, cwd=tmp_path,
                               timeout=120)
    jobs = dict(re.findall(r"^(\w+): job (\d+)$", proc.stdout, re.M))
    assert list(jobs) == ["pretrain", "grow"], proc.stdout + proc.stderr
    waiting = two_nodes.slurm.job(jobs["grow"])
    assert waiting["Dependency"].startswith(f"afterok:{jobs['pretrain']}("), waiting
    pipe = load_pipeline(tmp_path / "pipe.yaml")
    pipe = dataclasses.replace(pipe, out=str(tmp_path / pipe.out))

    def why() -> str:
        files = [*(pipe.stage_dir(n) / f"slurm-{j}.out" for n, j in jobs.items()),
                 *sorted((tmp_path / "logs").glob("*.log"))]
        return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in files if p.exists())

    try:
        train, ranks = two_nodes.follow(jobs["pretrain"], timeout=300)
        grow = two_nodes.slurm.wait(jobs["grow"], timeout=300, release_requeued=False,
                                    until=lambda i: i["Reason"] == "DependencyNeverSatisfied")
    finally:
        two_nodes.slurm.run("scancel", *jobs.values(), check=False)
    assert train["JobState"] == grow["JobState"] == "COMPLETED", (train, grow, why())
    assert train["NodeList"] == "node[1-2]" and ranks == {0: "node1", 1: "node2"}, why()
    assert grow["NodeList"] in ("node1", "node2") and grow["NumNodes"] == "1", grow
    assert datetime.fromisoformat(train["EndTime"]) <= datetime.fromisoformat(grow["StartTime"])
    log = next((tmp_path / "logs").glob(f"two-pretrain-{jobs['pretrain']}-r0.log")).read_text()
    assert "rank 0/2 on cpu (gloo): tp=1 pp=1 vpp=None dp=2" in log, why()
    assert all(done(pipe, s) for s in pipe.stages)
    state = read_train_state(find_checkpoint(output(pipe, pipe.stage("grow"))))
    assert [s["stage"] for s in state.earlier_stages] == ["pretrain"]

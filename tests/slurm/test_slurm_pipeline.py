"""`engine pipeline submit` on a real one-node Slurm cluster (tests/slurm/conftest.py): a micro
pipeline (pretrain -> grow (Scale-Up, exact) -> cpt) becomes three launch/slurm/pipeline.sbatch
jobs chained with --dependency=afterok; all of them complete, each starting only after its
source's job ended, and the last checkpoint knows the stage its weights were pretrained in."""

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

STAGES = ("pretrain", "grow", "cpt")


def _pipeline(tmp_path, make_recipe) -> str:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(make_recipe()))
    pipe = {
        "name": "micro", "out": "run", "recipe": str(tmp_path / "base.yaml"),
        "overrides": {"model": {"num_layers": 2}, "train": {"steps": 2}},
        "stages": [
            {"name": "pretrain", "kind": "train"},
            {"name": "grow", "kind": "scale_up", "source": "pretrain",
             "args": {"num_layers": 4, "width_method": "exact", "depth_method": "identity"}},
            {"name": "cpt", "kind": "train", "source": "grow"},
        ],
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return "pipe.yaml"  # relative, as is `out`: the jobs run in the directory they came from


def _time(info: dict[str, str], key: str) -> datetime:
    return datetime.fromisoformat(info[key])


def test_submit_chains_the_stages_as_jobs(slurm, launch, make_recipe, tmp_path):
    """Submitted from outside the repository: the jobs find the engine all the same."""
    path = _pipeline(tmp_path, make_recipe)
    env = launch.env(ENGINE_LOG_DIR=str(tmp_path / "logs"))
    proc = slurm.run(sys.executable, "-m", "engine", "pipeline", "submit", path,
                     "--sbatch-arg=--gpus-per-node=0", env=env, cwd=tmp_path, timeout=120)
    jobs = dict(re.findall(r"^(\w+): job (\d+)$", proc.stdout, re.M))
    assert list(jobs) == list(STAGES), proc.stdout + proc.stderr
    # The later stages wait for their source's job, not just for a free node.
    for source, name in zip(STAGES, STAGES[1:]):
        info = slurm.job(jobs[name])
        assert info["JobState"] == "PENDING" and info["Reason"].startswith("Dependency"), info
        assert info["Dependency"].startswith(f"afterok:{jobs[source]}("), info

    try:  # a stage that fails leaves the later ones pending for ever (DependencyNeverSatisfied)
        infos = {name: slurm.wait(jobs[name], timeout=300, release_requeued=False,
                                  until=lambda i: i["Reason"] == "DependencyNeverSatisfied")
                 for name in STAGES}
    finally:
        slurm.run("scancel", *jobs.values(), check=False)
    # `out` is relative: the stages write under the directory submit ran in.
    pipe = load_pipeline(tmp_path / path)
    pipe = dataclasses.replace(pipe, out=str(tmp_path / pipe.out))

    def logs(name: str) -> str:
        out = pipe.stage_dir(name) / f"slurm-{jobs[name]}.out"
        engine = sorted((tmp_path / "logs").glob(f"micro-{name}-{jobs[name]}-r*.log"))
        return "\n".join(p.read_text()[-3000:] for p in [out, *engine] if p.exists())

    for name in STAGES:
        info = infos[name]
        assert info["JobState"] == "COMPLETED", \
            f"{name}: {info}\n" + "\n".join(f"--- {n}\n{logs(n)}" for n in STAGES)
        assert info["Restarts"] == "0" and info["JobName"] == f"micro-{name}"
    for before, after in zip(STAGES, STAGES[1:]):
        assert _time(infos[before], "EndTime") <= _time(infos[after], "StartTime"), \
            (infos[before], infos[after])

    assert all(done(pipe, s) for s in pipe.stages)
    assert "finished; see" in logs("cpt")  # train.sbatch ran the train stages
    state = read_train_state(find_checkpoint(output(pipe, pipe.stage("cpt"))))
    assert [s["stage"] for s in state.earlier_stages] == ["pretrain"]
    assert state.stage == "cpt" and state.step == 2

"""launch/slurm/train.sbatch on a real one-node Slurm cluster (tests/slurm/conftest.py), 1 node x
2 processes of the tiny recipe (TP=2 + SP):

- a job's losses equal those of the same recipe run by launch/local.sh, bit for bit;
- a job signalled with USR1 twice (the batch shell, then its processes) stops after the step in
  flight each time, saves, requeues itself and resumes: every step runs exactly once, the loss
  curve and the final checkpoint equal the uninterrupted run's;
- `scancel` (SIGTERM to the batch shell and every process) saves on the way out, and the job
  stays cancelled;
- a bad recipe path fails the job once, with the engine's one-line error in the log;
- convert.sbatch runs `engine convert` on the job's checkpoint.
"""

import subprocess
import time
from pathlib import Path

import pytest

from engine.checkpoint import find_checkpoint, read_train_state

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
RECIPE = "configs/tiny-cpu.yaml"


def submit(slurm, tmp, *args, **env):
    """train.sbatch with its defaults (job name engine-train), no GPUs, 2 processes."""
    return slurm.sbatch("--gpus-per-node=0", f"--output={tmp}/%x-%j.out",
                        "launch/slurm/train.sbatch", *args,
                        env={"ENGINE_NPROC_PER_NODE": "2", "ENGINE_LOG_DIR": str(tmp / "logs"),
                             **env})


@pytest.fixture(scope="module")
def uninterrupted(slurm, launch, tiny_overrides, tmp_path_factory):
    """The recipe run straight through twice, at the same time: a job (train.sbatch) and
    launch/local.sh (torchrun on this machine, no Slurm)."""
    runs = {name: tmp_path_factory.mktemp(name) for name in ("sbatch", "local")}
    start = time.monotonic()
    job = submit(slurm, runs["sbatch"], RECIPE, *tiny_overrides(runs["sbatch"], STEPS),
                 **launch.env())
    local = subprocess.run(["launch/local.sh", RECIPE, *tiny_overrides(runs["local"], STEPS)],
                           cwd=ROOT, env={**slurm.env, **launch.env()}, capture_output=True,
                           text=True, timeout=900)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    info = slurm.wait(job, timeout=900, release_requeued=False)
    print(f"sbatch job {job} and local.sh: {time.monotonic() - start:.1f} s")
    return runs, job, info


def test_sbatch_matches_local(launch, uninterrupted):
    runs, job, info = uninterrupted
    tmp = runs["sbatch"]
    out = (tmp / f"engine-train-{job}.out").read_text()
    log = tmp / "logs" / f"engine-train-{job}-r0.log"
    assert info["JobState"] == "COMPLETED", out + log.read_text()[-3000:]
    assert info["Restarts"] == "0"
    # The rendezvous came from Slurm: the node list's first host, a port from the job id.
    port = 20000 + (int(job) % 10000) * 4
    assert f"1 node(s) x 2 process(es), rendezvous {info['BatchHost']}:{port}" in out
    assert "rank 0/2 on cpu (gloo): tp=2" in log.read_text()
    assert launch.steps(log) == list(range(1, STEPS + 1))
    losses = launch.losses(tmp / "tb")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == launch.losses(runs["local"] / "tb")  # exact: same processes, same numbers
    assert read_train_state(find_checkpoint(tmp / "ckpt")).step == STEPS
    assert not list((tmp / "logs").glob(".engine-train-*"))  # the control files are cleaned up


def _wait_for_step(slurm, launch, job, log, step):
    """Wait (starting the job again when it sits requeued) until `log` shows `step`."""
    return slurm.wait(job, until=lambda _: log.exists() and step in launch.steps(log),
                      timeout=600)


def test_preempted_job_requeues_and_resumes_exactly(slurm, launch, tiny_overrides, uninterrupted,
                                                    tmp_path):
    job = submit(slurm, tmp_path, RECIPE, *tiny_overrides(tmp_path, STEPS), **launch.env())
    logs = [tmp_path / "logs" / f"engine-train-{job}-r{r}.log" for r in range(3)]
    # USR1 twice: to the batch shell only, as `sbatch --signal=B:USR1@N` sends it, then to the
    # job's processes but not the batch shell, as `--signal=USR1@N` does (torchrun and the
    # workers get it, and the checkpoint writer's helper process too).
    signals = [["--batch", "--signal=USR1"], ["--signal=USR1"]]
    first = 2
    for restart, args in enumerate(signals):
        info = _wait_for_step(slurm, launch, job, logs[restart], first)
        assert info["JobState"] == "RUNNING" and info["Restarts"] == str(restart)
        slurm.run("scancel", *args, job)
        first = max(launch.steps(logs[restart])) + 2  # the next run's second step, at least
    info = slurm.wait(job, timeout=600)
    out = (tmp_path / f"engine-train-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", out + logs[-1].read_text()[-3000:]
    assert info["Restarts"] == "2"

    runs = [launch.steps(log) for log in logs]
    assert all(runs), runs
    # Every step exactly once: each run stopped after the step in flight, saved it, and the next
    # run resumed at the following step.
    assert [s for run in runs for s in run] == list(range(1, STEPS + 1)), runs
    for restart, run in enumerate(runs[:-1]):
        assert len(run) >= 2
        assert f"resumed from {tmp_path}/ckpt/iter_{run[-1]:07d} at step {run[-1]}" in \
            logs[restart + 1].read_text()
        assert f"stopped at step {run[-1]}" in out
    assert out.count("requeueing") == 2 and "SIGUSR1: asking the engine to stop" in out
    assert f"stopping at step {runs[0][-1]}: stop file" in logs[0].read_text()
    assert f"stopping at step {runs[1][-1]}: SIGUSR1" in logs[1].read_text()

    straight = uninterrupted[0]["sbatch"]
    assert launch.losses(tmp_path / "tb") == launch.losses(straight / "tb")  # the same curve
    state = read_train_state(find_checkpoint(tmp_path / "ckpt"))
    assert state.step == STEPS and state.consumed_samples == STEPS * 4


def test_scancel_saves_and_the_job_stays_cancelled(slurm, launch, tiny_overrides, tmp_path):
    """`scancel` is SIGTERM to every process of the job: the engine saves on its way out (its
    checkpoint helper survives the signal), and the job is not requeued."""
    job = submit(slurm, tmp_path, RECIPE, *tiny_overrides(tmp_path, 500), **launch.env())
    log = tmp_path / "logs" / f"engine-train-{job}-r0.log"
    _wait_for_step(slurm, launch, job, log, 4)  # after the save at step 3
    slurm.run("scancel", job)
    info = slurm.wait(job, timeout=300, release_requeued=False,
                      until=lambda i: i["JobState"] == "PENDING")
    out = (tmp_path / f"engine-train-{job}.out").read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", out
    stopped = launch.steps(log)[-1]
    assert "SIGTERM: asking the engine to stop" in out  # the batch shell's trap
    assert f"stopped at step {stopped} (" in out and "cancelled: not requeued" in out
    assert f"stopping at step {stopped}: " in log.read_text()
    assert read_train_state(find_checkpoint(tmp_path / "ckpt")).step == stopped


def test_bad_recipe_fails_once_with_the_engine_error(slurm, launch, tmp_path):
    job = submit(slurm, tmp_path, "configs/no-such-recipe.yaml", **launch.env())
    info = slurm.wait(job, timeout=300, release_requeued=False)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"
    error = "error: configs/no-such-recipe.yaml: cannot read recipe (No such file or directory)"
    log = (tmp_path / "logs" / f"engine-train-{job}-r0.log").read_text()
    assert [line for line in log.splitlines() if line.startswith("error: ")] == [error]
    out = (tmp_path / f"engine-train-{job}.out").read_text()
    assert f"the engine failed (exit 1): {error}" in out
    time.sleep(2)  # nothing brings it back
    info = slurm.job(job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"


def test_convert_job_exports_the_checkpoint(slurm, launch, uninterrupted, tmp_path):
    ckpt = uninterrupted[0]["sbatch"] / "ckpt"
    job = slurm.sbatch("--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/%x-%j.out",
                       "launch/slurm/convert.sbatch", "engine-to-hf", "--ckpt", str(ckpt),
                       "--out", str(tmp_path / "hf"), "--dtype", "fp32", env=launch.env())
    info = slurm.wait(job, timeout=300, release_requeued=False)
    out = (tmp_path / f"engine-convert-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    assert (tmp_path / "hf" / "config.json").is_file()

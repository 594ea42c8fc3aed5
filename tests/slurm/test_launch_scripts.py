"""The launch scripts without a cluster: dry runs print the exact commands and environment, the
rendezvous is derived from the job, and bad input ends in one line. Plain bash, no Slurm needed
(scontrol is only called for a job's node list, which these runs do not have)."""

import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCED = [ROOT / "launch" / "slurm" / name for name in ("env.sh", "lib.sh")]
SCRIPTS = [ROOT / "launch" / "local.sh", *sorted((ROOT / "launch" / "slurm").glob("*.sbatch")),
           *sorted(set((ROOT / "launch" / "slurm").glob("*.sh")) - set(SOURCED))]


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "SBATCH_", "ENGINE_"))}
    return subprocess.run(["bash", str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**clean, **env})


def dry_run(script: str, *args: str, **env: str) -> tuple[dict[str, str], list[str]]:
    """(the printed environment, the printed command as words)."""
    proc = run(script, "--dry-run", *args, **env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    exports = dict(shlex.split(line[len("export "):])[0].split("=", 1)
                   for line in lines if line.startswith("export "))
    command = lines[lines.index("# command") + 1]
    return exports, shlex.split(command)


def test_scripts_are_strict_bash():
    for script in SCRIPTS:
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script
        assert "\nset -euo pipefail\n" in text, script
        assert os.access(script, os.X_OK), f"{script} is not executable"
        subprocess.run(["bash", "-n", str(script)], check=True)
    for sourced in SOURCED:
        assert sourced.read_text().startswith("# shellcheck shell=bash\n"), sourced
        subprocess.run(["bash", "-n", str(sourced)], check=True)
    if shutil.which("shellcheck"):  # not a dependency; where it exists it must be satisfied
        subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], check=True, cwd=ROOT)


def test_local_dry_run_prints_the_command_and_environment():
    env, cmd = dry_run("launch/local.sh", "configs/tiny-cpu.yaml", "train.steps=3",
                       "data.blend=[{path: d, weight: 1.0}]", ENGINE_NPROC_PER_NODE="2")
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                       "-m", "engine", "train", "--config", "configs/tiny-cpu.yaml",
                       "train.steps=3", "data.blend=[{path: d, weight: 1.0}]"]
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and env["NCCL_DEBUG"] == "WARN"
    assert "SIGUSR1" in env["PET_SIGNALS_TO_HANDLE"].split(",")
    assert env["PYTHONUNBUFFERED"] == "1"
    # ENGINE_DRY_RUN=1 is the same as --dry-run; a value set by the user beats env.sh's default.
    proc = run("launch/local.sh", "configs/tiny-cpu.yaml", ENGINE_DRY_RUN="1",
               NCCL_DEBUG="INFO")
    assert proc.returncode == 0 and "export NCCL_DEBUG=INFO" in proc.stdout


def test_train_dry_run_derives_the_rendezvous_from_the_job():
    env, cmd = dry_run("launch/slurm/train.sbatch", "configs/tiny-cpu.yaml", "train.steps=3",
                       SLURM_JOB_ID="12345", SLURM_NNODES="4", SLURM_CPUS_ON_NODE="96",
                       SLURM_GPUS_ON_NODE="8", ENGINE_LOG_DIR="/logs")
    host = socket.gethostname()
    assert cmd[:6] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=96",
                       "--kill-on-bad-exit=1", cmd[5]]
    assert cmd[6:] == ["-m", "torch.distributed.run", "--nnodes=4", "--nproc-per-node=8",
                       "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:29380",
                       "--rdzv-id=12345", "--max-restarts=0", "-m", "engine", "train",
                       "--config", "configs/tiny-cpu.yaml", "train.steps=3"]
    assert env["ENGINE_STOP_FILE"] == "/logs/.engine-train-12345/stop"
    assert env["ENGINE_RESUME_FILE"] == "/logs/.engine-train-12345/resume"
    # Another job on the same node, and the same job after a requeue, get other ports.
    ports = set()
    for job, restart in (("12345", "0"), ("12346", "0"), ("12345", "1")):
        _, cmd = dry_run("launch/slurm/train.sbatch", "r.yaml", SLURM_JOB_ID=job,
                         SLURM_RESTART_COUNT=restart)
        ports.add(next(w for w in cmd if w.startswith("--rdzv-endpoint")))
    assert len(ports) == 3


def test_train_refuses_outside_slurm_and_past_the_restart_limit():
    proc = run("launch/slurm/train.sbatch", "configs/tiny-cpu.yaml")
    assert proc.returncode == 2 and proc.stderr.startswith("train.sbatch: error: not inside")
    proc = run("launch/slurm/train.sbatch", "configs/tiny-cpu.yaml", SLURM_JOB_ID="7",
               SLURM_RESTART_COUNT="4", ENGINE_MAX_RESTARTS="3")
    assert proc.returncode == 2
    assert proc.stderr == ("train.sbatch: error: restart 4 exceeds ENGINE_MAX_RESTARTS=3: "
                           "not starting again\n")
    proc = run("launch/slurm/train.sbatch")
    assert proc.returncode == 2 and "usage: sbatch launch/slurm/train.sbatch" in proc.stderr


def test_bench_task_runs_its_layout(tmp_path):
    layouts = tmp_path / "layouts.txt"
    layouts.write_text("# comment\ntp=2,sp=1\n\npp=2\n")
    _, cmd = dry_run("launch/slurm/bench.sbatch", str(layouts), "configs/tiny-cpu.yaml",
                     "train.steps=3", SLURM_ARRAY_JOB_ID="40", SLURM_ARRAY_TASK_ID="1",
                     SLURM_JOB_ID="42", ENGINE_BENCH_OUT=str(tmp_path / "out"))
    i = cmd.index("bench")
    assert cmd[i:] == ["bench", "train", "--config", "configs/tiny-cpu.yaml", "--steps", "20",
                       "--warmup", "3", "--data", "synthetic", "--json",
                       str(tmp_path / "out" / "rows" / "001-pp2.json"), "train.steps=3",
                       "parallel.pp=2"]
    proc = run("launch/slurm/bench.sbatch", str(layouts), "r.yaml", SLURM_ARRAY_TASK_ID="2")
    assert proc.returncode == 2 and "has 2 layout(s) (tasks 0-1)" in proc.stderr
    layouts.write_text("tq=2\n")
    proc = run("launch/slurm/bench.sbatch", str(layouts), "r.yaml")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: layout 'tq=2': expected key=int pairs with keys tp|pp|vpp|cp|ep|dp|sp, "
        "got 'tq=2'"]


def test_bench_submit_dry_run_prints_array_and_collector(tmp_path):
    layouts = tmp_path / "layouts.txt"
    layouts.write_text("tp=1\ntp=2\npp=2\n")
    proc = run("launch/slurm/bench-submit.sh", "--dry-run", "-p", "gpu", "--", str(layouts),
               "configs/tiny-cpu.yaml", ENGINE_BENCH_OUT=str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    array, collect = (shlex.split(line) for line in proc.stdout.splitlines()[1:])
    assert array == ["sbatch", "--parsable", "--array=0-2", "-p", "gpu",
                     str(ROOT / "launch/slurm/bench.sbatch"), str(layouts),
                     "configs/tiny-cpu.yaml"]
    assert collect == ["sbatch", "--parsable", "--dependency=afterany:<array job id>", "-p",
                       "gpu", str(ROOT / "launch/slurm/collect.sbatch"), str(tmp_path / "out"),
                       str(layouts)]


@pytest.mark.parametrize("kind,args", [("upcycle", ["scale-up", "--ckpt", "a", "--out", "b"]),
                                       ("convert", ["engine-to-hf", "--ckpt", "a", "--out", "b"])])
def test_single_process_jobs_dry_run(kind, args):
    _, cmd = dry_run(f"launch/slurm/{kind}.sbatch", *args)
    assert cmd[1:] == ["-m", "engine", kind, *args]
    text = (ROOT / "launch" / "slurm" / f"{kind}.sbatch").read_text()
    assert re.search(r"^#SBATCH --gpus-per-node=\d+$", text, re.M)

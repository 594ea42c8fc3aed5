"""A real one-node Slurm cluster on localhost for the launch scripts' tests, and their helpers.

`slurm` (session) brings up munged, slurmctld and slurmd with every file (config, key, state,
spool, logs, pid files, the munge socket) in one temporary directory, on free ports, and tears it
down by the pid files; clients find it through SLURM_CONF. Nothing outside that directory is
touched: no /etc/slurm, no /run/munge, no systemd. Facts it relies on (Debian 12, slurm 22.05):
munged refuses root-owned files and world-accessible key directories, so it runs as `munge`
(runuser) on its own socket, which slurm.conf names (AuthInfo=socket=...); the node line comes
from `slurmd -C` (a node that disagrees with its hardware is drained); proctrack/pgid (linuxproc
leaked the orphans of a batch shell that exited after a requeue); no accounting, so jobs are
followed with `scontrol show job`, never sacct. A requeued job waits ~120 s (Reason=BeginTime)
before it runs again: `Slurm.wait` starts such a job at once, as an impatient admin would.

Without the binaries (or not as root: slurmd and munged need it), the tests skip with the reason;
CI installs them (.ci/run).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun", "munged",
            "runuser")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _why_no_slurm() -> str | None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"Slurm binaries missing ({', '.join(missing)}): apt-get install slurmctld " \
               "slurmd slurm-client munge (.ci/run does)"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd, munged as the munge user)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return None


def _wait_until(check, timeout: float, what: str, period: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(period)


class Slurm:
    """A running cluster: `env` for clients, job submission and polling."""

    def __init__(self, base: Path, daemon_logs: tuple[str, ...] = ("log/slurmctld.log",
                                                                   "log/slurmd.log")):
        self.base = base
        self.daemon_logs = daemon_logs
        """The daemons' log files under `base`, whose tails a failed command shows."""
        self.env = {**os.environ, "SLURM_CONF": str(base / "slurm.conf")}
        for name in list(self.env):  # a test run inside a Slurm job must not leak into this one
            if name.startswith(("SLURM_", "SBATCH_", "SRUN_")) and name != "SLURM_CONF":
                del self.env[name]

    def run(self, *cmd: str, timeout: float = 30, check: bool = True,
            env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(env or {})}, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}"
                                 f"\n{proc.stderr}\n{self.logs()}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        """Submit from the repository root (as the README says); returns the job id."""
        out = self.run("sbatch", "--parsable", *args, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", out))

    def wait(self, job_id: str, *, timeout: float = 300, release_requeued: bool = True,
             until=None) -> dict[str, str]:
        """Poll until the job has finished (or `until(info)` is true); a requeued job waiting
        for its BeginTime is started at once."""

        def check():
            info = self.job(job_id)
            if until is not None and until(info):
                return info
            if info["JobState"] in FINISHED:
                return info
            if (release_requeued and info["JobState"] == "PENDING"
                    and info.get("Reason") == "BeginTime"):
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            return None

        return _wait_until(check, timeout, f"job {job_id}", period=0.2)

    def logs(self) -> str:
        parts = []
        for name in self.daemon_logs:
            path = self.base / name
            if path.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(
                    path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)


def _slurm_conf(base: Path, *, controller: str, slurmd: str, nodes: str, name: str) -> str:
    """slurm.conf of a test cluster: slurmctld on `controller` (an address), the slurmd file
    lines `slurmd` (spool, pid, log), the node lines `nodes`; one partition of all nodes."""
    return f"""\
ClusterName={name}
SlurmctldHost={socket.gethostname()}({controller})
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={base}/state
SlurmctldPidFile={base}/slurmctld.pid
SlurmctldLogFile={base}/log/slurmctld.log
{slurmd}
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
InactiveLimit=0
KillWait=30
MinJobAge=600
# Start a submitted or requeued batch job at once (the default waits up to 3 s to batch them).
SchedulerParameters=batch_sched_delay=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _write_conf(base: Path, node_line: str) -> None:
    slurmd = (f"SlurmdSpoolDir={base}/spool\nSlurmdPidFile={base}/slurmd.pid\n"
              f"SlurmdLogFile={base}/log/slurmd.log")
    (base / "slurm.conf").write_text(_slurm_conf(
        base, controller="127.0.0.1", slurmd=slurmd, name="enginetest",
        nodes=f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN"))


def _kill_by_pidfile(path: Path, timeout: float = 10) -> None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _start_munge(base: Path) -> None:
    """munged on `base`/munge/munge.socket (its pid file beside it), as slurm.conf's AuthInfo
    names it: a private key and socket; it wants its files owned by munge and the socket's
    directory reachable by everyone (clients connect to it)."""
    munge = pwd.getpwnam("munge")
    mdir = base / "munge"
    mdir.mkdir(mode=0o755)
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    for path in (mdir, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={mdir}/munge.socket",
                    f"--key-file={key}", f"--pid-file={mdir}/munged.pid",
                    f"--log-file={mdir}/munged.log", f"--seed-file={mdir}/munged.seed"],
                   check=True, capture_output=True, timeout=30)


def _start(base: Path) -> Slurm:
    for sub in ("state", "spool", "log"):
        (base / sub).mkdir()
    _start_munge(base)
    node = subprocess.run(["slurmd", "-C"], check=True, capture_output=True, text=True,
                          timeout=30).stdout.splitlines()[0]
    node = re.sub(r"\s*UpTime=\S*", "", node)
    _write_conf(base, node)
    cluster = Slurm(base)
    for daemon in ("slurmctld", "slurmd"):
        proc = subprocess.run([daemon], capture_output=True, text=True, env=cluster.env,
                              timeout=30)
        if proc.returncode != 0:
            raise AssertionError(f"{daemon} did not start: {proc.stderr}\n{cluster.logs()}")

    def idle():
        out = cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.split()
        return out == ["idle"]

    _wait_until(idle, 30, "the node to be idle")
    return cluster


def _cancel_all(cluster: Slurm | None) -> None:
    """Jobs first, while slurmd is alive to end their processes."""
    if cluster is None:
        return
    cluster.run("scancel", "--user", "root", "--full", check=False)
    try:
        _wait_until(lambda: not cluster.run("squeue", "-h", check=False).stdout.strip(),
                    60, "the queue to empty")
    except AssertionError:
        pass


def _stop(base: Path, cluster: Slurm | None) -> None:
    _cancel_all(cluster)
    for pidfile in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
        _kill_by_pidfile(base / pidfile)


@pytest.fixture(scope="session")
def slurm():
    reason = _why_no_slurm()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="engine-slurm-"))
    base.chmod(0o755)  # munged (user munge) must reach its directory inside
    cluster = None
    try:
        start = time.monotonic()
        cluster = _start(base)
        print(f"slurm cluster up in {time.monotonic() - start:.1f} s: {base}", file=sys.stderr)
        yield cluster
    finally:
        _stop(base, cluster)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_parts():
    """The pieces this cluster is made of, for the two-node cluster (tests/slurm/two_nodes)."""
    return SimpleNamespace(why_not=_why_no_slurm, start_munge=_start_munge, Slurm=Slurm,
                           slurm_conf=_slurm_conf, cancel_all=_cancel_all,
                           kill_by_pidfile=_kill_by_pidfile, wait_until=_wait_until)


# --- the tiny recipe, as the tests run it ---------------------------------------------------

@pytest.fixture(scope="session")
def tiny_overrides(tiny_data):
    """configs/tiny-cpu.yaml on the test corpus (the stdlib, a 512-piece tokenizer), short
    sequences: the recipe's model and TP=2+SP layout, a few seconds a run."""

    def overrides(tmp: Path, steps: int, **extra: str) -> list[str]:
        values = {
            "data.blend": f"[{{path: {tiny_data['train']}, weight: 1.0}}]",
            "data.valid": f"{{code: {tiny_data['valid']}}}",
            "tokenizer.path": tiny_data["tokenizer"],
            "data.seq_length": "128",
            "train.micro_batch_size": "2",
            "train.global_batch_size": "4",
            "train.steps": str(steps),
            "train.schedule.warmup_steps": "2",
            "train.eval_interval": "null",
            "eval.tasks": "[]",  # the recipe's probes read data/demo/tasks (make demo-data)
            "checkpoint.save": str(tmp / "ckpt"),
            "checkpoint.save_interval": "3",  # a stop's save is then never a run's first save
            "logging.log_interval": "1",
            "logging.tensorboard_dir": str(tmp / "tb"),
            **extra,
        }
        return [f"{k}={v}" for k, v in values.items()]

    return overrides


def _job_env(**extra: str) -> dict[str, str]:
    """The environment both launchers get: this Python, one thread per process."""
    return {"ENGINE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def _tensorboard_losses(tb_dir: Path) -> dict[int, float]:
    """train/loss by step, read with TensorBoard's own reader (restarts' files merged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def _logged_steps(log: Path) -> list[int]:
    """The steps a run's console printed (`step 3/8 | loss ...`)."""
    return [int(m) for m in re.findall(r"^step (\d+)/\d+ \|", log.read_text(), re.M)]


@pytest.fixture(scope="session")
def launch():
    """Helpers for the tests: `env(**extra)` (what both launchers get: this Python, one thread
    per process), `losses(tb_dir)` and `steps(log)`."""
    return SimpleNamespace(env=_job_env, losses=_tensorboard_losses, steps=_logged_steps)

"""No process of ours outlives the command that started it (engine/train/signals.py
`CheckpointHelper`): dist_checkpointing's helper is shut down when training ends, normally or by
an error, and killed by the kernel when its worker dies; a user error under torchrun, piped
into another program, returns at once and leaves nothing running."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import os, sys
from engine.train.signals import StopRequest
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
try:
    with StopRequest().watching():
        print(fa._get_write_results_queue()._manager._process.pid, flush=True)
        how = sys.argv[1]
        if how == "killed":
            sys.stdin.readline()
            os.kill(os.getpid(), 9)
        if how == "error":
            raise RuntimeError("a user error")
except RuntimeError:
    pass
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout: float = 20) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", ["normal", "error", "killed"])
def test_the_checkpoint_helper_never_outlives_its_worker(how):
    child = subprocess.Popen([sys.executable, "-c", CHILD, how], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        helper = int(child.stdout.readline())
        assert _alive(helper)
        if how == "killed":  # SIGKILL: no finally, no atexit; the kernel's parent-death signal
            child.stdin.write("\n")
            child.stdin.flush()
        child.wait(timeout=60)
        assert _wait_gone(helper), f"helper {helper} still runs after its worker ended ({how})"
    finally:
        child.kill()


def _ours(mark: str) -> list[int]:
    """Pids of processes whose environment carries `mark`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if mark.encode() in (proc / "environ").read_bytes() and _alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.dist
@pytest.mark.slow
def test_a_user_error_under_torchrun_piped_returns_and_leaves_nothing(make_recipe, tmp_path):
    import yaml

    recipe = make_recipe(data={"valid": {"code": str(tmp_path / "missing")}},
                         train={"eval_interval": 2})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    mark = f"ENGINE_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           mark.split("=")[0]: mark.split("=")[1]}
    torchrun = (f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node 2 "
                f"-m engine train --config {tmp_path / 'r.yaml'}")
    start = time.time()
    # `| cat`: the pipeline ends only when every writer of the pipe has exited
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {torchrun} 2>&1 | cat"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          start_new_session=True)
    assert proc.returncode != 0 and time.time() - start < 240
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error: ")]
    assert errors and "missing" in errors[0], proc.stdout[-2000:]
    leftover = _ours(mark)
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover, f"processes left behind: {leftover}"

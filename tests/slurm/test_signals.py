"""engine/train/signals.py without Slurm: the signal and stop-file routes set the request, the
handlers are put back, the resume file appears only after a stop that saved, and a run that is
asked to stop saves the step in flight and resumes exactly where it stopped."""

import os
import signal
import subprocess
import sys
import time

import pytest

from engine.checkpoint import find_checkpoint, read_train_state
from engine.config.loader import recipe_from_dict
from engine.train.loop import train
from engine.train.signals import RESUME_FILE_ENV, STOP_FILE_ENV, StopRequest, write_resume_file


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_the_request_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    with StopRequest().watching() as request:
        assert request.reason() is None and not request.agreed("cpu")
        os.kill(os.getpid(), sig)
        assert request.reason() == sig.name and request.agreed("cpu")
    assert signal.getsignal(sig) is before


def test_checkpoint_helper_survives_a_signal_to_the_whole_step():
    """Slurm signals every process of a job step; dist_checkpointing's spawned Manager must
    outlive SIGTERM/SIGUSR1, or the stop's save dies with EOFError. In a fresh process: the
    Manager exists once per process, and this one's may predate `watching()`."""
    child = subprocess.Popen([sys.executable, "-c", """
import sys
from engine.train.signals import StopRequest
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
with StopRequest().watching():
    queue = fa._get_write_results_queue()
    print(queue._manager._process.pid, flush=True)
    sys.stdin.readline()  # the test signals the helper meanwhile
    queue.put("still there")
    print(queue.get(timeout=10), flush=True)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(child.stdout.readline())
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            os.kill(pid, sig)
        time.sleep(0.5)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "still there"
    finally:
        child.stdin.close()
        assert child.wait(timeout=60) == 0


def test_stop_file_is_a_request_for_local_rank_zero_only(tmp_path, monkeypatch):
    stop = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    request = StopRequest.from_env()
    assert request.reason() is None
    stop.touch()
    assert request.reason() == f"stop file {stop}"
    monkeypatch.setenv("LOCAL_RANK", "1")  # other ranks learn it from the all-reduce
    assert StopRequest.from_env().reason() is None


def test_resume_file_only_when_asked_for(tmp_path, monkeypatch):
    monkeypatch.delenv(RESUME_FILE_ENV, raising=False)
    assert write_resume_file(3, tmp_path / "ckpt" / "iter_0000003") is None
    target = tmp_path / "control" / "resume"
    monkeypatch.setenv(RESUME_FILE_ENV, str(target))
    assert write_resume_file(3, tmp_path / "ckpt" / "iter_0000003") == target
    assert target.read_text() == f"3 {tmp_path}/ckpt/iter_0000003\n"
    assert [p.name for p in target.parent.iterdir()] == ["resume"]  # no temporary left behind


def test_a_stopped_run_saves_the_step_in_flight_and_resumes_exactly(make_recipe, tmp_path,
                                                                    monkeypatch):
    stop, resume = tmp_path / "stop", tmp_path / "resume"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    monkeypatch.setenv(RESUME_FILE_ENV, str(resume))

    def recipe(name):
        return recipe_from_dict(make_recipe(train={"steps": 4},
                                            checkpoint={"save": str(tmp_path / name)}))

    full = train(recipe("full"))
    assert full.stopped is None and not resume.exists()
    stop.touch()  # present from the start: the run stops after its first step
    first = train(recipe("split"))
    assert sorted(first.losses) == [1] and first.stopped == f"stop file {stop}"
    assert read_train_state(find_checkpoint(tmp_path / "split")).step == 1
    assert resume.read_text() == f"1 {first.checkpoint}\n"
    stop.unlink()
    second = train(recipe("split"))
    assert second.stopped is None and sorted(second.losses) == [2, 3, 4]
    assert {**first.losses, **second.losses} == full.losses

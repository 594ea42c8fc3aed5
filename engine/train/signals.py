"""Stop requests: SIGUSR1, SIGTERM or a stop file end training after the current step.

A batch job learns that it must stop (preemption, the time limit: `sbatch --signal=B:USR1@300`)
from a signal. Where the signal lands depends on how it was sent (the batch shell, torchrun, or
every process of the job), and torchrun turns the signals it handles into a shutdown of its
workers, so the engine accepts two routes and treats them alike:

- the workers' own handlers: SIGUSR1 or SIGTERM sets a flag. torchrun forwards the signals named
  in `PET_SIGNALS_TO_HANDLE` to its workers (launch/slurm/env.sh adds SIGUSR1) and kills them
  `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds later, so the step and the save must fit in that;
- `ENGINE_STOP_FILE`: stop once this file exists. The Slurm batch shell traps USR1/TERM and
  creates it, which does not depend on torchrun's signal handling. The local rank 0 of each node
  looks for it (one stat per node and step); on a file system only the batch node sees, the
  agreement below still stops every rank.

After every step all ranks agree (one all-reduce of the flag, MAX), so all stop after the same
step; the loop saves a checkpoint and returns normally, and the process exits 0. When a checkpoint
was saved, rank 0 writes `ENGINE_RESUME_FILE` (when set) with the step and the checkpoint: the
launcher requeues the job only when that file exists, so a crash or a stop with nothing to resume
from ends the job instead of looping.

A signal sent to a whole job step (Slurm's time limit and `scancel` send SIGTERM, `--signal=USR1@N`
sends USR1, to every process of the step) also reaches the helper processes the workers started.
dist_checkpointing saves through a Manager process it spawns once per process: a fresh interpreter,
without these handlers, that the default action of SIGTERM/SIGUSR1 kills, so the stop's own save
failed (EOFError) whenever an earlier save had started it. `watching()` starts that helper itself
(`CheckpointHelper`), ignoring the stop signals, and it must never outlive its worker: it asks the
kernel to kill it when the worker dies (PR_SET_PDEATHSIG: a worker killed by SIGKILL, OOM or a
crash), and `watching()` shuts it down on every exit of its block (normal end, an error, a stop).
Found by hand before: after a user error under torchrun the helpers outlived the ranks, ignored
SIGTERM and kept stdout open, so `torchrun ... | tail` never returned.

The handlers only set a flag: a hung process still needs SIGKILL (torchrun and Slurm send it after
their grace periods). Owns the handlers and the two files; never imports the training code.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOP_FILE_ENV = "ENGINE_STOP_FILE"
"""Path of the stop request: training stops after the step during which it appears."""
RESUME_FILE_ENV = "ENGINE_RESUME_FILE"
"""Path rank 0 writes after a requested stop that saved a checkpoint: `<step> <checkpoint>`."""


class StopRequest:
    """Whether this process was asked to stop; `watching()` installs the signal handlers."""

    def __init__(self, stop_file: str | os.PathLike | None = None):
        self.stop_file = Path(stop_file) if stop_file else None
        self.signal_name: str | None = None
        """The first stop signal this process received, e.g. 'SIGUSR1'."""
        self._checks_file = os.environ.get("LOCAL_RANK", "0") == "0"

    @classmethod
    def from_env(cls) -> StopRequest:
        return cls(os.environ.get(STOP_FILE_ENV) or None)

    def _on_signal(self, signum: int, frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name

    @contextmanager
    def watching(self) -> Iterator[StopRequest]:
        """Handle SIGUSR1/SIGTERM by setting the flag, then restore the previous handlers.
        Signal handlers belong to the main thread: elsewhere only the stop file works."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        helper = CheckpointHelper.start()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if helper is not None:
                helper.stop()

    def reason(self) -> str | None:
        """This process's reason to stop (a signal's name, or the stop file), or None."""
        if self.signal_name:
            return self.signal_name
        if self.stop_file is not None and self._checks_file and self.stop_file.exists():
            return f"stop file {self.stop_file}"
        return None

    def agreed(self, device) -> bool:
        """Whether any rank has a reason to stop. A collective: every rank calls it each step."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if self.reason() is None else 1], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


PR_SET_PDEATHSIG = 1
"""prctl option (linux/prctl.h): the signal a process gets when its parent thread exits."""


def _helper_init(parent: int) -> None:
    """Runs first in the helper process: ignore the job's stop signals, die with the worker."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: shut down by stop() only
        return
    if os.getppid() != parent:  # the worker died before the request took effect
        os._exit(0)


class CheckpointHelper:
    """dist_checkpointing's write-results Manager process, started by us so that it ignores the
    stop signals and dies with this process (megatron-core 0.16.1 creates it lazily in
    `filesystem_async._get_write_results_queue` as `spawn` context `Manager().Queue()`; we put
    an equal queue from our own manager into that module's `_results_queue` first)."""

    def __init__(self, manager, module):
        self.manager, self.module = manager, module

    @classmethod
    def start(cls) -> CheckpointHelper | None:
        try:
            from megatron.core.dist_checkpointing.strategies import filesystem_async as module

            module._get_write_results_queue  # noqa: B018 - the function whose global we fill
        except (ImportError, AttributeError):
            log.warning("megatron-core's _get_write_results_queue moved: a job-wide SIGTERM may "
                        "kill the checkpoint writer's helper (engine/train/signals.py)")
            return None
        if module._results_queue is not None:  # another block of this process started one
            return None
        import multiprocessing
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(_helper_init, (os.getpid(),))
        module._results_queue = manager.Queue()
        return cls(manager, module)

    @property
    def pid(self) -> int | None:
        process = getattr(self.manager, "_process", None)
        return process.pid if process is not None else None

    def stop(self) -> None:
        """Shut the helper down and forget its queue (the next block starts a new one)."""
        self.module._results_queue = None
        try:
            self.manager.shutdown()
        except (OSError, EOFError):  # already gone (killed with the job)
            pass


def write_resume_file(step: int, checkpoint: Path) -> Path | None:
    """Tell the launcher there is a checkpoint to resume from (`ENGINE_RESUME_FILE`, if set);
    written to a temporary name and renamed, so the launcher never reads half a line."""
    path = os.environ.get(RESUME_FILE_ENV)
    if not path:
        return None
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(f"{step} {checkpoint}\n")
    os.replace(tmp, target)
    return target

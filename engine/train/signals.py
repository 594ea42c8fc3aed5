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
failed (EOFError) whenever an earlier save had started it. `watching()` starts it first, with the
stop signals ignored: an ignored disposition survives exec, a handler does not. (Forked helpers
inherit the handlers and only set a flag; a helper orphaned by a killed worker needs SIGKILL,
which Slurm sends at the end of every job.)

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
        start_checkpoint_helper_ignoring_stop_signals()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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


def start_checkpoint_helper_ignoring_stop_signals() -> int | None:
    """Start dist_checkpointing's write-results Manager (once per process, as its first save
    would) with SIGUSR1/SIGTERM ignored, so a signal to the whole job step leaves it alive.
    Returns its pid, or None where megatron-core no longer has it (then a warning says so)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        get_queue = filesystem_async._get_write_results_queue
    except (ImportError, AttributeError):
        log.warning("megatron-core's _get_write_results_queue moved: a job-wide SIGTERM may kill "
                    "the checkpoint writer's helper (engine/train/signals.py)")
        return None
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        queue = get_queue()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    manager = getattr(queue, "_manager", None)
    process = getattr(manager, "_process", None)
    return process.pid if process is not None else None


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

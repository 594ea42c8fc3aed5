"""Run a pipeline's stages in order on this machine, each as its own process (the same
commands a Slurm job runs), skipping stages whose output is complete. An interrupted stage is
rerun: a train stage resumes from its latest checkpoint, an upcycle or export starts over (they
write to a temporary directory and rename, so nothing half-written is ever taken as done)."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from engine.pipeline.config import Pipeline, Stage
from engine.pipeline.stages import done, plan, stale
from engine.pipeline.sweep import member

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A stage failed; the message names it and its log."""


def _run(command: tuple[str, ...], logfile: Path) -> int:
    """Run `command`, its output to the console and appended to `logfile`."""
    with open(logfile, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
            return proc.wait()
        except BaseException:  # Ctrl-C: stop the child too; a rerun resumes
            proc.terminate()
            proc.wait()
            raise


def run_stage(pipe: Pipeline, stage: Stage) -> float:
    """Run one stage whose sources are done; returns its wall time in seconds."""
    p = plan(pipe, stage)
    d = pipe.stage_dir(stage.name)
    d.mkdir(parents=True, exist_ok=True)
    for path in stale(pipe, stage):  # e.g. an export whose verification failed: redo it
        log.info("removing %s (stage %s is not done)", path, stage.name)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    start = time.time()
    for command in p.commands:
        rc = _run(command, d / "log.txt")
        if rc != 0:
            raise PipelineError(f"stage {stage.name} failed (exit code {rc}); see "
                                f"{d / 'log.txt'}")
    seconds = time.time() - start
    record = d / "stage.json"
    runs = json.loads(record.read_text())["runs"] if record.is_file() else []
    runs.append({"started": start, "seconds": seconds,
                 "commands": [shlex.join(c) for c in p.commands]})
    record.write_text(json.dumps({"stage": stage.name, "kind": stage.kind, "runs": runs},
                                 indent=1))
    return seconds


def run_pipeline(pipe: Pipeline, only: list[str] | None = None) -> None:
    """Every stage (or those in `only`: stages or sweep members `<sweep>/<label>`) in file
    order; done stages are skipped."""
    stages = [member(pipe, n) for n in only] if only else list(pipe.stages)
    for i, stage in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {stage.name} ({stage.kind})"
        if done(pipe, stage):
            log.info("%s: done, skipped (%s)", head, pipe.stage_dir(stage.name))
            continue
        for name in stage.waits_for:
            if not done(pipe, pipe.stage(name)):
                raise PipelineError(f"stage {stage.name}: {name} is not done; run it first")
        log.info("%s: running", head)
        seconds = run_stage(pipe, stage)
        if not done(pipe, stage):  # a train stage stopped on request (signal, stop file)
            raise PipelineError(f"stage {stage.name} stopped before its end after {seconds:.0f} "
                                "s; run the pipeline again to continue from its checkpoint")
        log.info("%s: finished in %.0f s", head, seconds)

"""`engine pipeline run|report|submit FILE`: run the stages here, write the report, or submit
the stages as Slurm jobs chained with `--dependency=afterok`."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from engine.pipeline.config import load_pipeline
from engine.pipeline.stages import done

log = logging.getLogger(__name__)

SLURM_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "slurm" / "pipeline.sbatch"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the stages that are not done, then write the report")
    run.add_argument("file")
    run.add_argument("--stage", action="append", help="only this stage (repeatable)")
    run.add_argument("--no-report", action="store_true")
    rep = sub.add_parser("report", help="(re)write report.md and the plots from what is on disk")
    rep.add_argument("file")
    rc = sub.add_parser("recipe", help="write a train stage's recipe and print its path (what "
                        "launch/slurm/pipeline.sbatch trains); prints nothing for other stages")
    rc.add_argument("file")
    rc.add_argument("stage")
    sb = sub.add_parser("submit", help="one sbatch job per stage not done, chained afterok")
    sb.add_argument("file")
    sb.add_argument("--sbatch-arg", action="append", default=[],
                    help="extra sbatch option for every job, e.g. --sbatch-arg=--partition=gpu")
    sb.add_argument("--dry-run", action="store_true", help="print the sbatch commands only")
    return p


def _jobs(pipe) -> list:
    """The stages as jobs: a sweep's members each on their own, side by side (each waits only
    for the sweep's source; engine.pipeline.sweep)."""
    from engine.pipeline.sweep import members

    return [m for s in pipe.stages for m in (members(s) if s.kind == "sweep" else [s])]


def submit(file: str, extra: list[str], dry_run: bool) -> list[str]:
    """Submit each stage that is not done; a stage waits (afterok) for its source's job.
    Returns the job ids (placeholders in a dry run)."""
    pipe = load_pipeline(file)
    # sbatch runs a copy of the script from its spool, which then falls back to the submit
    # directory for the repository: name this one, wherever `submit` is run from.
    root = os.environ.get("ENGINE_ROOT") or str(SLURM_SCRIPT.parents[2])
    env = {**os.environ, "ENGINE_ROOT": root}
    jobs: dict[str, str] = {}
    for stage in _jobs(pipe):
        if done(pipe, stage):
            print(f"# {stage.name}: done")
            continue
        d = pipe.stage_dir(stage.name)
        # --kill-on-invalid-dep: a failed stage cancels the jobs waiting on it (else they pend
        # for ever with Reason=DependencyNeverSatisfied)
        command = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes",
                   f"--job-name={pipe.name}-{stage.name.replace('/', '-')}",
                   f"--output={d}/slurm-%j.out", *extra, *stage.sbatch]
        # baselines need only their source: they run side by side; best_of/lr_from stages
        # wait for the stages they choose from
        waits = [jobs[n] for n in stage.waits_for if n in jobs]
        if waits:
            command.append(f"--dependency=afterok:{':'.join(waits)}")
        command += [str(SLURM_SCRIPT), file, stage.name]
        if dry_run or os.environ.get("ENGINE_DRY_RUN") == "1":
            print(shlex.join(command))
            jobs[stage.name] = f"<{stage.name}>"
            continue
        d.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            from engine.pipeline.run import PipelineError

            why = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
            raise PipelineError(f"sbatch of stage {stage.name} failed: {why[0]}")
        jobs[stage.name] = result.stdout.strip().split(";")[0]
        print(f"{stage.name}: job {jobs[stage.name]}")
    return list(jobs.values())


def pipeline_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from engine.pipeline.report import write_report
    from engine.pipeline.run import PipelineError, run_pipeline

    if args.command == "submit":
        try:
            submit(args.file, args.sbatch_arg, args.dry_run)
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    pipe = load_pipeline(args.file)
    if args.command == "recipe":
        from engine.pipeline.stages import plan
        from engine.pipeline.sweep import member

        stage = member(pipe, args.stage)  # a stage, or a sweep's member: <sweep>/<label>
        if stage.kind == "train":
            if "/" in stage.name:  # what a member must log (engine.pipeline.sweep)
                from engine.pipeline.stages import stage_recipe
                from engine.pipeline.sweep import check_member_recipe

                check_member_recipe(stage_recipe(pipe, stage), f"{pipe.name}: stage {stage.name}")
            print(plan(pipe, stage).recipe)
        return 0
    if args.command == "run":
        try:
            run_pipeline(pipe, args.stage)
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if args.no_report or args.stage:
            return 0
    path = write_report(pipe)
    log.info("report: %s", path)
    return 0

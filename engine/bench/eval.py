"""`engine bench eval`: the engine's lm-eval backend against lm-eval's own `hf` backend on the
same tasks, the same requests and the same CPU threads.

Each system runs in its own process (`engine bench eval --system engine|hf ...`: a fresh
interpreter, its thread count set before any work), loads its model untimed, then times
lm-eval's `evaluate` on the same task set (engine.eval.harness.run_tasks, the path of
`engine eval`): the engine on its checkpoint (`--ckpt`), `hf` on the exported HF directory
(`--hf`). With `--repeats R` the two alternate R times (a change in the machine's load hits both
alike); the table keeps each system's fastest run and the engine/hf requests-per-second ratio is
given per round with min/median/max. Writes eval_bench.json into --out.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SYSTEMS = ("engine", "hf")


@dataclass(frozen=True, slots=True)
class EvalRow:
    system: str
    tasks: str
    requests: int
    seconds: float
    """Wall time of lm-eval's evaluate (requests built, scored, metrics), model load excluded."""
    threads: int
    batch_size: int
    metrics: dict
    """{task: {acc, ...}}: both systems must agree (the oracle tests check it; shown here)."""

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds


class _CountingLM:
    """Counts the requests lm-eval sends to `lm` (the hf backend keeps no count)."""

    def __init__(self, lm):
        self.lm, self.requests = lm, 0

    def __getattr__(self, name):
        attr = getattr(self.lm, name)
        if name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            def counted(requests, *args, **kwargs):
                self.requests += len(requests)
                return attr(requests, *args, **kwargs)
            return counted
        return attr


def run_system(system: str, *, ckpt: str | None, hf: str | None, tasks: list[str],
               include_path: list[str], limit: int | None, batch_size: int,
               threads: int) -> EvalRow:
    """Load `system`'s model (untimed), then time the tasks on it (this process)."""
    import torch

    from engine.eval.harness import load_tasks, quiet, run_tasks, task_metrics

    torch.set_num_threads(threads)
    quiet()
    task_set = load_tasks(tasks, include_path)
    if system == "engine":
        from engine.eval.lm import engine_lm
        from engine.eval.model import load_for_eval

        model = load_for_eval(ckpt, batch_size=batch_size)
        lm = engine_lm(model.scorer, model.tokenizer,
                       max_length=model.recipe.model.max_position_embeddings)
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=str(hf), dtype="float32", device="cpu", batch_size=batch_size)
    counted = _CountingLM(lm)
    start = time.perf_counter()
    results = run_tasks(counted, task_set, limit=limit)
    seconds = time.perf_counter() - start
    return EvalRow(system, ",".join(tasks), counted.requests, seconds, threads, batch_size,
                   task_metrics(results))


def _run_process(system: str, args: list[str], out: Path, threads: int) -> EvalRow:
    row_path = out / f"{system}.json"
    cmd = [sys.executable, "-m", "engine", "bench", "eval", "--system", system,
           "--json", str(row_path), "--threads", str(threads), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"engine bench eval --system {system} failed (exit "
                           f"{proc.returncode}):\n{proc.stdout[-3000:]}")
    data = json.loads(row_path.read_text())
    return EvalRow(**{k: data[k] for k in EvalRow.__dataclass_fields__})


def compare(args: list[str], out: Path, *, repeats: int, threads: int) -> dict:
    """Both systems `repeats` times, interleaved; the figures written to out/eval_bench.json."""
    from engine.files import write_atomic

    rounds = []
    for r in range(repeats):
        rows = {s: _run_process(s, args, out, threads) for s in SYSTEMS}
        rounds.append(rows)
        print(f"round {r + 1}/{repeats}: " + " | ".join(
            f"{s} {row.requests_per_s:.1f} requests/s" for s, row in rows.items()), flush=True)
    best = {s: min((rows[s] for rows in rounds), key=lambda row: row.seconds) for s in SYSTEMS}
    ratios = [rows["engine"].requests_per_s / rows["hf"].requests_per_s for rows in rounds]
    figures = {"rows": {s: {**asdict(row), "requests_per_s": row.requests_per_s}
                        for s, row in best.items()},
               "ratios": ratios, "ratio_min": min(ratios),
               "ratio_median": statistics.median(ratios), "ratio_max": max(ratios)}
    print(format_table(best.values()))
    print("engine / hf requests/s per round: " + ", ".join(f"{x:.2f}x" for x in ratios)
          + f" (median {figures['ratio_median']:.2f}x)")
    write_atomic(out / "eval_bench.json", json.dumps(figures, indent=1) + "\n")
    return figures


def format_table(rows) -> str:
    lines = ["| system | tasks | requests | seconds | requests/s | threads | batch | metrics |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        shown = "; ".join(f"{t} " + " ".join(f"{k} {v:.3f}" for k, v in m.items())
                          for t, m in row.metrics.items())
        lines.append(f"| {row.system} | {row.tasks} | {row.requests} | {row.seconds:.1f} | "
                     f"{row.requests_per_s:.1f} | {row.threads} | {row.batch_size} | "
                     f"{shown} |")
    return "\n".join(lines)


def eval_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="engine bench eval", description=(
        "engine eval's backend vs lm-eval's hf backend on the same tasks and threads."))
    p.add_argument("--ckpt", required=True, help="engine checkpoint")
    p.add_argument("--hf", required=True, help="the same model exported to HF")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include-path", action="append", default=[])
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--out", help="directory for eval_bench.json (and each system's row)")
    p.add_argument("--system", choices=SYSTEMS, help="run one system in this process")
    p.add_argument("--json", help="with --system: write its row here")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if args.system:
        row = run_system(args.system, ckpt=args.ckpt, hf=args.hf, tasks=tasks,
                         include_path=args.include_path, limit=args.limit,
                         batch_size=args.batch_size, threads=args.threads)
        print(format_table([row]))
        if args.json:
            from engine.files import write_atomic

            write_atomic(Path(args.json), json.dumps({**asdict(row),
                                                      "requests_per_s": row.requests_per_s}))
        return 0
    if not args.out:
        p.error("--out is required without --system")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    passed = ["--ckpt", args.ckpt, "--hf", args.hf, "--tasks", args.tasks,
              "--batch-size", str(args.batch_size)]
    passed += [x for path in args.include_path for x in ("--include-path", path)]
    passed += ["--limit", str(args.limit)] if args.limit else []
    compare(passed, out, repeats=args.repeats, threads=args.threads)
    return 0

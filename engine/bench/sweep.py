"""`engine bench sweep` and `engine bench collect`: one recipe over several parallel layouts.

A layout is `key=value` pairs joined by commas: tp, pp, vpp, cp, ep, dp and sp (0/1, sequence
parallel), e.g. `tp=2,sp=1` or `pp=2,dp=2`; unset keys keep the recipe's values (dp defaults to
1 here). Each layout runs as its own torchrun job,

    torchrun --standalone --nproc-per-node WORLD -m engine bench train --config R \\
        --json OUT/rows/LAYOUT.json [overrides] parallel.tp=... parallel.pp=...

exactly what one task of a Slurm job array runs (one layout per task, on its own nodes), and the
rows are then merged by `collect` into OUT/sweep.csv and OUT/sweep.json. On CPU the thread
budget (--threads, default all cores) is split evenly over each layout's processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.bench.row import BenchRow, format_table, read_rows, write_rows

LAYOUT_KEYS = {"tp": "tp", "pp": "pp", "vpp": "vpp", "cp": "cp", "ep": "ep", "dp": "dp",
               "sp": "sequence_parallel"}


def parse_layout(text: str) -> dict[str, int]:
    """'tp=2,pp=1' -> {'tp': 2, 'pp': 1}, with a one-line error naming a bad part."""
    layout = {}
    for part in filter(None, text.replace(" ", "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in LAYOUT_KEYS or not value.isdigit():
            raise ValueError(f"layout {text!r}: expected key=int pairs with keys "
                             f"{'|'.join(LAYOUT_KEYS)}, got {part!r}")
        layout[key] = int(value)
    return layout


def layout_overrides(layout: dict[str, int]) -> list[str]:
    out = []
    for key, value in layout.items():
        if key == "sp":
            out.append(f"parallel.sequence_parallel={'true' if value else 'false'}")
        else:
            out.append(f"parallel.{LAYOUT_KEYS[key]}={value}")
    return out


def world_size(layout: dict[str, int]) -> int:
    return (layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1)
            * layout.get("dp", 1))


def layout_name(layout: dict[str, int]) -> str:
    return "-".join(f"{k}{v}" for k, v in layout.items()) or "default"


def torchrun_command(config: str, layout: dict[str, int], row_path: Path, *, steps: int,
                     warmup: int, data: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(world_size(layout)), "-m", "engine", "bench", "train",
            "--config", config, "--steps", str(steps), "--warmup", str(warmup),
            "--data", data, "--json", str(row_path), *overrides, *layout_overrides(layout)]


def sweep(config: str, layouts: list[str], out: Path, *, steps: int, warmup: int, data: str,
          overrides: list[str], threads: int, timeout: int = 3600) -> tuple[list[BenchRow], int]:
    """Run every layout; (rows of those that finished, number that failed)."""
    parsed = [parse_layout(text) for text in layouts]  # all errors before any run
    rows, failed = [], 0
    for layout in parsed:
        world = world_size(layout)
        row_path = out / "rows" / f"{layout_name(layout)}.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // world))}
        print(f"sweep: {layout_name(layout)} on {world} process(es)", file=sys.stderr,
              flush=True)
        cmd = torchrun_command(config, layout, row_path, steps=steps, warmup=warmup, data=data,
                               overrides=overrides)
        proc = subprocess.run(cmd, env=env, timeout=timeout, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            failed += 1
            print(f"sweep: {layout_name(layout)} failed (exit {proc.returncode}):\n"
                  f"{proc.stdout[-2000:]}", file=sys.stderr)
            continue
        rows += read_rows(row_path)
    if rows:
        collect_rows(rows, out / "sweep.csv")
        write_rows(rows, out / "sweep.json")
    return rows, failed


def collect_rows(rows: list[BenchRow], out: Path) -> Path:
    """Write the merged table (.csv or .json by suffix) and print it."""
    write_rows(rows, out)
    print(format_table(rows))
    return out


def collect(paths: list[str], out: Path) -> list[BenchRow]:
    """`engine bench collect ROW.json... --out TABLE`: rows (or lists of rows) into one table."""
    rows = [row for path in paths for row in read_rows(path)]
    if not rows:
        raise ValueError("engine bench collect: no rows in " + " ".join(paths))
    collect_rows(rows, out)
    return rows

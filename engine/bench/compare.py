"""`engine bench compare`: one shape through the engine and what users would use instead.

Each system runs in its own process (`engine bench train --system ...`: fresh memory peak, same
thread count, the same recipe file), against one CPU peak measured here before and after the
runs (the better of the two; squares and the model's own GEMM shapes, engine.bench.peak).
`--repeats R` runs the systems round-robin R times (interleaved, so a change in the machine's
load hits every system alike): the table keeps each system's fastest run, and the ratio of the
engine's tokens/s to each other system's is given per round with its min/median/max. The load
average before each run is recorded with it.

Writes `compare.csv`, `compare.json` (rows, per-round ratios, load averages) and `compare.png`
(tokens/s and MFU per system) into --out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from engine.bench.peak import Peak, cpu_peak, model_gemm_shapes
from engine.bench.row import BenchRow, format_table, read_rows, write_rows

SYSTEMS = ("engine", "transformers", "megatron-core")

CPU_TARGET = {
    "model": {"num_layers": 8, "hidden_size": 512, "ffn_hidden_size": 1408,
              "num_attention_heads": 8, "vocab_size": 32000, "max_position_embeddings": 512},
    "data": {"synthetic": True, "seq_length": 512},
    "train": {"micro_batch_size": 4, "global_batch_size": 4, "precision": "fp32", "seed": 1234},
    "optim": {"lr": 3.0e-4, "weight_decay": 0.1},
}
"""The issue's CPU target shape: a tiny-but-real Llama (8 layers, hidden 512, 8 heads, seq 512,
vocab 32k, fp32), 4 x 512 tokens per step."""


def _run_system(system: str, recipe_path: Path, out: Path, *, steps: int, warmup: int,
                threads: int, peak, timeout: int) -> BenchRow:
    row_path = out / "rows" / f"{system}.json"
    cmd = [sys.executable, "-m", "engine", "bench", "train", "--system", system,
           "--config", str(recipe_path), "--steps", str(steps), "--warmup", str(warmup),
           "--threads", str(threads), "--json", str(row_path)]
    if peak is not None:
        cmd += ["--peak-tflops", repr(peak.tflops), "--peak-source", peak.source]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, timeout=timeout, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"engine bench train --system {system} failed "
                           f"(exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return read_rows(row_path)[0]


def with_peak(row: BenchRow, peak: Peak) -> BenchRow:
    """The row measured against another peak."""
    return dataclasses.replace(
        row, peak_tflops_per_device=peak.tflops, peak_source=peak.source,
        mfu=row.tflops_per_device / peak.tflops,
        mfu_megatron=row.tflops_per_device_megatron / peak.tflops)


def ratios(rows: list[BenchRow]) -> dict[str, float]:
    """Engine tokens/s over each other system's."""
    by = {r.system: r for r in rows}
    if "engine" not in by:
        return {}
    return {f"engine/{name}": by["engine"].tokens_per_s / r.tokens_per_s
            for name, r in by.items() if name != "engine"}


def round_ratios(rounds: list[dict[str, BenchRow]]) -> dict[str, dict]:
    """Per ratio: its value in every round (systems run back to back) and min/median/max."""
    per_round = [ratios(list(r.values())) for r in rounds]
    out = {}
    for name in per_round[0] if per_round else ():
        values = [r[name] for r in per_round]
        out[name] = {"per_round": values, "min": min(values),
                     "median": statistics.median(values), "max": max(values)}
    return out


def plot(rows: list[BenchRow], path: Path, title: str) -> Path | None:
    """A two-panel bar chart (tokens/s, MFU); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install '.[bench]')", file=sys.stderr)
        return None
    names = [r.system for r in rows]
    colors = ["#1f77b4" if n == "engine" else "#999999" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    panels = ((axes[0], [r.tokens_per_s for r in rows], "tokens/s", "{:,.0f}"),
              (axes[1], [100 * (r.mfu or 0) for r in rows], "MFU (%)", "{:.1f}%"))
    for ax, values, label, fmt in panels:
        bars = ax.bar(names, values, color=colors)
        ax.set_ylabel(label)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(recipe, out: Path, *, systems=SYSTEMS, steps: int, warmup: int, threads: int,
            repeats: int = 1, timeout: int = 3600) -> dict:
    """Run `systems` on `recipe` (written to out/recipe.yaml for them) and write the results."""
    import torch

    from engine.config.loader import dump_recipe

    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out / "recipe.yaml"
    dump_recipe(recipe, recipe_path)
    from engine.bench.baselines import recipe_padded_vocab_size

    torch.set_num_threads(threads)
    shapes = model_gemm_shapes(recipe.model, recipe.train.micro_batch_size *
                               recipe.data.seq_length, recipe_padded_vocab_size(recipe))
    peak = None if torch.cuda.is_available() else \
        cpu_peak(recipe.train.precision, threads, shapes)
    best: dict[str, BenchRow] = {}
    rounds: list[dict[str, BenchRow]] = []
    loads: dict[str, list[float]] = {s: [] for s in systems}
    for round_ in range(repeats):
        rounds.append({})
        for system in systems:
            loads[system].append(os.getloadavg()[0])
            print(f"[{round_ + 1}/{repeats}] {system} (load average {loads[system][-1]:.2f})",
                  file=sys.stderr, flush=True)
            row = _run_system(system, recipe_path, out, steps=steps, warmup=warmup,
                              threads=threads, peak=peak, timeout=timeout)
            rounds[-1][system] = row
            if system not in best or row.tokens_per_s > best[system].tokens_per_s:
                best[system] = row
    rows = [best[s] for s in systems]
    if peak is not None:  # measured again after the runs; the better of the two is the peak
        again = cpu_peak(recipe.train.precision, threads, shapes)
        if again.tflops > peak.tflops:
            peak = Peak(again.tflops, again.source + " (the better of before/after the runs)")
            rows = [with_peak(r, peak) for r in rows]
    result = {"rows": [dataclasses.asdict(r) for r in rows],
              "ratios": ratios(rows), "round_ratios": round_ratios(rounds),
              "rounds": [{s: dataclasses.asdict(r) for s, r in rnd.items()} for rnd in rounds],
              "load_average_before_runs": loads, "repeats": repeats, "threads": threads}
    write_rows(rows, out / "compare.csv")
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    chart = plot(rows, out / "compare.png", rows[0].model + f" | {rows[0].precision} | "
                 + rows[0].device)
    result["chart"] = str(chart) if chart else None
    print(format_table(rows))
    for name, value in result["ratios"].items():
        r = result["round_ratios"][name]
        print(f"{name} tokens/s: {value:.2f}x (fastest runs) | per round over {repeats} "
              f"interleaved rounds: min {r['min']:.2f}x, median {r['median']:.2f}x, max "
              f"{r['max']:.2f}x")
    return result

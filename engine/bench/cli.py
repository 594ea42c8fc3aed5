"""`engine bench train|compare|kernels|sweep|collect`: benchmarks are programs that print figures.

    engine bench train [--config R] [--system engine|transformers|megatron-core] [--steps N]
                       [--warmup W] [--data synthetic|recipe] [--threads T] [--json ROW.json]
                       [key=value ...]
    engine bench compare [--config R] [--systems a,b,c] [--repeats R] --out DIR [key=value ...]
    engine bench kernels [--device cpu|cuda] [--precision fp32|bf16] [shape flags] [--out DIR]
    engine bench sweep --config R --layout tp=2 --layout pp=2,dp=2 ... --out DIR [key=value ...]
    engine bench collect ROW.json... --out TABLE.csv|TABLE.json
    engine bench eval --ckpt C --hf DIR --tasks T [--limit N] [--repeats R] --out DIR

Without --config, train and compare use the CPU target shape (`engine.bench.compare.CPU_TARGET`).
`train` works under torchrun (rank 0 prints and writes); `--json` writes its one row, the contract
that `collect` (and a Slurm job array of `train` runs) relies on: see `engine.bench.row`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def _load(config: str | None, overrides: list[str]):
    from engine.config.loader import load_recipe

    if config is not None:
        return load_recipe(config, overrides)
    import yaml

    from engine.bench.compare import CPU_TARGET

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="bench-cpu-target-") as f:
        yaml.safe_dump(CPU_TARGET, f)
        f.flush()
        return load_recipe(f.name, overrides)


def _common(parser: argparse.ArgumentParser, *, steps: int = 10, warmup: int = 2) -> None:
    parser.add_argument("--steps", type=int, default=steps, help="timed steps")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per process (default: torch's)")


def _threads(value: int | None) -> int:
    import torch

    if value is not None:
        torch.set_num_threads(value)
    return torch.get_num_threads()


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine bench train",
                                description="Time real training steps; print one table row.")
    p.add_argument("--config", help="recipe YAML (default: the CPU target shape)")
    p.add_argument("--system", choices=("engine", "transformers", "megatron-core"),
                   default="engine")
    p.add_argument("--data", choices=("synthetic", "recipe"), default="synthetic",
                   help="random tokens, or the recipe's data blend (engine only)")
    p.add_argument("--json", help="also write the row to this JSON file (rank 0)")
    p.add_argument("--peak-tflops", type=float, help="peak per device instead of measuring it")
    p.add_argument("--peak-source", default="given on the command line")
    p.add_argument("--profile", action="store_true",
                   help="print the profiled step's GEMMs by shape (time, GFLOP/s) and top ops")
    _common(p)
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides")
    args = p.parse_args(argv)
    _threads(args.threads)
    from engine.bench.peak import Peak, device_peak
    from engine.bench.row import format_table, write_rows
    from engine.bench.train import bench_recipe, run_engine

    recipe = bench_recipe(_load(args.config, args.overrides), steps=args.steps,
                          warmup=args.warmup, data=args.data)
    peak = Peak(args.peak_tflops, args.peak_source) if args.peak_tflops else None
    if args.system == "engine":
        row = run_engine(recipe, steps=args.steps, warmup=args.warmup, peak=peak,
                         show_profile=args.profile)
    else:
        from engine.bench import baselines

        run = {"transformers": baselines.run_transformers,
               "megatron-core": baselines.run_megatron}[args.system]
        from engine.bench.peak import model_gemm_shapes

        shapes = model_gemm_shapes(recipe.model, recipe.train.micro_batch_size *
                                   recipe.data.seq_length,
                                   baselines.recipe_padded_vocab_size(recipe))
        peak = peak or device_peak(recipe.train.precision, shapes)
        row = run(recipe, steps=args.steps, warmup=args.warmup, peak=peak,
                  show_profile=args.profile)
    if os.environ.get("RANK", "0") == "0":
        print(format_table([row]))
        if args.json:
            write_rows([row], args.json)
    return 0


def compare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine bench compare", description=(
        "The same shape through the engine, a plain transformers loop and megatron-core's "
        "GPTModel; CSV/JSON/PNG into --out."))
    p.add_argument("--config", help="recipe YAML (default: the CPU target shape)")
    p.add_argument("--systems", default="engine,transformers,megatron-core")
    p.add_argument("--repeats", type=int, default=1, help="rounds; each system's best is kept")
    p.add_argument("--out", required=True, help="output directory")
    _common(p)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from engine.bench.compare import SYSTEMS, compare

    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        print(f"error: --systems: unknown {sorted(unknown)}; expected some of {SYSTEMS}",
              file=sys.stderr)
        return 2
    compare(_load(args.config, args.overrides), Path(args.out), systems=systems,
            steps=args.steps, warmup=args.warmup, threads=_threads(args.threads),
            repeats=args.repeats)
    return 0


def kernels_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine bench kernels",
                                description="Each fused kernel vs its PyTorch reference.")
    shape = {"tokens": 2048, "batch": 4, "hidden-size": 512, "ffn-hidden-size": 1408,
             "num-attention-heads": 8, "kv-channels": 64, "vocab-size": 32000}
    for name, default in shape.items():  # the model keys' names (model.hidden_size, ...)
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="also write kernels.csv and kernels.json here")
    args = p.parse_args(argv)
    _threads(args.threads)
    from engine.bench.kernels import bench_kernels, format_kernel_table, kernel_rows_as_dicts

    rows = bench_kernels(tokens=args.tokens, batch=args.batch, hidden=args.hidden_size,
                         ffn=args.ffn_hidden_size, heads=args.num_attention_heads,
                         head_dim=args.kv_channels, vocab=args.vocab_size,
                         precision=args.precision, device=args.device, repeats=args.repeats)
    print(format_kernel_table(rows))
    if args.out:
        import csv
        import json

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        data = kernel_rows_as_dicts(rows)
        (out / "kernels.json").write_text(json.dumps(data, indent=1) + "\n")
        with open(out / "kernels.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)
    failed = [r.kernel for r in rows if not r.ok]
    if failed:
        print(f"error: {', '.join(failed)}: output or gradients beyond tolerance of the "
              "reference (err/tol > 1)", file=sys.stderr)
    return 1 if failed else 0


def sweep_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine bench sweep",
                                description="One recipe over parallel layouts, one torchrun each.")
    p.add_argument("--config", required=True)
    p.add_argument("--layout", action="append", required=True,
                   help="e.g. tp=2,sp=1 (repeat the flag for each layout)")
    p.add_argument("--data", choices=("synthetic", "recipe"), default="synthetic")
    p.add_argument("--out", required=True)
    _common(p)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from engine.bench.sweep import parse_layout, sweep

    try:
        for text in args.layout:
            parse_layout(text)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count() or 1
    _, failed = sweep(args.config, args.layout, Path(args.out), steps=args.steps,
                      warmup=args.warmup, data=args.data, overrides=args.overrides,
                      threads=threads)
    return 1 if failed else 0


def collect_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine bench collect",
                                description="Merge bench rows (JSON) into one table.")
    p.add_argument("rows", nargs="+", help="row JSON files from engine bench train --json")
    p.add_argument("--out", required=True, help="TABLE.csv or TABLE.json")
    args = p.parse_args(argv)
    from engine.bench.sweep import collect

    try:
        collect(args.rows, Path(args.out))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def eval_main(argv: list[str]) -> int:
    from engine.bench.eval import eval_main as run

    return run(argv)


COMMANDS = {
    "train": (train_main, "time real training steps of a recipe (any layout) as one row"),
    "compare": (compare_main, "the engine vs transformers vs megatron-core on one shape"),
    "kernels": (kernels_main, "each fused kernel vs its reference: speed and max error"),
    "sweep": (sweep_main, "one `bench train` per layout, rows merged into a table"),
    "collect": (collect_main, "merge row JSON files into one table"),
    "eval": (eval_main, "engine eval's lm-eval backend vs lm-eval's hf backend: requests/s"),
}


def main(argv: list[str]) -> int:
    from engine.cli import dispatch

    return dispatch("engine bench", COMMANDS, argv)

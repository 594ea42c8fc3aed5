"""One benchmark row: what a run measured, the FLOP arithmetic on it, and its file formats.

The row is the CLI contract between `engine bench train --json ROW.json` (one run, e.g. one task
of a Slurm job array) and `engine bench collect ROW.json... --out TABLE.csv|.json` (the table):
a flat JSON object with the fields of `BenchRow`, in this order. Add fields at the end; never
rename one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from engine.files import write_atomic

FLOP_FORMULA = ("palm: 6*N_matmul + 6*L*2*H_q*head_dim*T per token, no causal discount (the MFU "
                "column); megatron: causal attention counted at half (mfu_megatron)")


@dataclass(frozen=True, slots=True)
class BenchRow:
    system: str
    """engine | transformers | megatron-core."""
    model: str
    """Shape and parameter count, e.g. 'llama L8 H512 F1408 A8/8 V32000 (58.7M)'."""
    layout: str
    """Parallel layout: 'tp1 pp1 dp1' plus vpp/cp/ep/sp when used."""
    devices: int
    """Processes (GPUs, or CPU processes) the run used."""
    device: str
    """'NVIDIA H200', or 'cpu (2 threads)' per process."""
    precision: str
    global_batch: int
    """Samples per optimizer step."""
    micro_batch: int
    seq_length: int
    steps: int
    """Timed steps (after the warm-up steps)."""
    warmup: int
    tokens_per_s: float
    """Global batch tokens / median step time, all devices together."""
    tokens_per_s_per_device: float
    step_time_median_s: float
    step_time_p90_s: float
    flops_per_token: float
    """Training FLOPs per token, PaLM convention (see flop_formula)."""
    tflops_per_device: float
    """Model TFLOP/s per device, PaLM convention."""
    tflops_per_device_megatron: float
    """Model TFLOP/s per device, Megatron's convention (causal attention at half)."""
    peak_tflops_per_device: float | None
    peak_source: str
    mfu: float | None
    """tflops_per_device / peak_tflops_per_device (PaLM convention)."""
    mfu_megatron: float | None
    peak_memory_gib: float
    """Largest over the devices: CUDA max allocated, or the process's max RSS on CPU."""
    memory_kind: str
    loss_first: float
    """Training loss of the first timed step and of the last: the run really trained."""
    loss_last: float
    kernels: str
    """Fused kernels: 'csrc' (the built ops), 'reference' (PyTorch fallbacks), 'off', or '-'."""
    flop_formula: str = FLOP_FORMULA
    data_wait_share: float | None = None
    """Share of the timed steps' wall time spent making their batches (reading, collating,
    moving to the device): what a faster data loader could save at most."""
    gemm_time_share: float | None = None
    """Share of one profiled step's time spent in GEMMs (engine.bench.profile)."""
    gemm_tflops_per_device: float | None = None
    """The GEMM rate that step achieved: GEMM FLOPs / GEMM time (at most the CPU peak, which
    is measured on the model's own GEMM shapes)."""


FIELDS = [f.name for f in dataclasses.fields(BenchRow)]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of a non-empty list."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def throughput(step_times: list[float], *, tokens_per_step: int, devices: int,
               flops_per_token: float, flops_per_token_megatron: float,
               peak_tflops: float | None) -> dict:
    """The row's timing and FLOP fields from the measured step times (seconds)."""
    median = statistics.median(step_times)
    tokens_per_s = tokens_per_step / median
    tflops = flops_per_token * tokens_per_s / devices / 1e12
    tflops_megatron = flops_per_token_megatron * tokens_per_s / devices / 1e12
    return {
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / devices,
        "step_time_median_s": median,
        "step_time_p90_s": percentile(step_times, 90),
        "flops_per_token": flops_per_token,
        "tflops_per_device": tflops,
        "tflops_per_device_megatron": tflops_megatron,
        "peak_tflops_per_device": peak_tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "mfu_megatron": tflops_megatron / peak_tflops if peak_tflops else None,
    }


def model_name(model, padded_vocab_size: int, params: int) -> str:
    groups = model.num_query_groups or model.num_attention_heads
    return (f"{model.family} L{model.num_layers} H{model.hidden_size} F{model.ffn_hidden_size} "
            f"A{model.num_attention_heads}/{groups} V{padded_vocab_size} ({params / 1e6:.1f}M)")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


COLUMNS = [("system", "system"), ("layout", "layout"), ("devices", "dev"),
           ("global_batch", "gbs"), ("seq_length", "seq"), ("tokens_per_s", "tok/s"),
           ("tokens_per_s_per_device", "tok/s/dev"), ("step_time_median_s", "step_s"),
           ("step_time_p90_s", "p90_s"), ("tflops_per_device", "TFLOP/s/dev"),
           ("mfu", "MFU"), ("mfu_megatron", "MFU_mcore"), ("gemm_time_share", "GEMM%"),
           ("gemm_tflops_per_device", "GEMM_TF/s"), ("data_wait_share", "data%"),
           ("peak_memory_gib", "mem_GiB"), ("kernels", "kernels")]
"""The console table: the fields that differ between rows; the rest is printed once below it."""


def format_table(rows: list[BenchRow]) -> str:
    cells = [[title for _, title in COLUMNS]]
    for row in rows:
        cells.append([f"{100 * getattr(row, name):.1f}%" if (name.startswith("mfu") or
                                                             name.endswith("_share"))
                      and getattr(row, name) is not None else _fmt(getattr(row, name))
                      for name, _ in COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    first = rows[0]
    lines += [f"model: {first.model} | {first.precision} | device: {first.device}",
              f"peak: {_fmt(first.peak_tflops_per_device)} TFLOP/s/device ({first.peak_source})",
              f"memory: {first.memory_kind} | FLOPs: {first.flop_formula}"]
    return "\n".join(lines)


def write_rows(rows: list[BenchRow], path: str | Path) -> Path:
    """Rows to .json (one object, or a list when several) or .csv, atomically."""
    path = Path(path)
    data = [dataclasses.asdict(r) for r in rows]
    if path.suffix == ".csv":
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(data)
        write_atomic(path, buf.getvalue())
    else:
        write_atomic(path, json.dumps(data[0] if len(data) == 1 else data, indent=1) + "\n")
    return path


def read_rows(path: str | Path) -> list[BenchRow]:
    """Rows from a file `write_rows` wrote (.json object or list); unknown fields are an error."""
    path = Path(path)
    data = json.loads(path.read_text())
    out = []
    for item in data if isinstance(data, list) else [data]:
        unknown = set(item) - set(FIELDS)
        if unknown:
            raise ValueError(f"{path}: unknown bench row fields {sorted(unknown)}")
        out.append(BenchRow(**item))
    return out

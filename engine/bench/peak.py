"""The hardware limit MFU is measured against: a table of GPU peaks, a measured CPU peak.

GPU: dense (no sparsity) tensor-core peaks per device from the vendors' datasheets.
CPU: there is no honest datasheet number for a shared VM's cores, so the benchmark measures this
machine's own GEMM rate on the threads the run uses, in the same run, as the best of several
shapes: large squares and the model's own GEMMs in all three orientations (forward, input
gradient, weight gradient; `model_gemm_shapes`). A ceiling, then: the GEMMs of a training step
cannot run faster than the best of those shapes in isolation, so MFU against it is at most the
step's GEMM share (engine.bench.profile).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

GPU_PEAKS_TFLOPS = {
    # name substring -> precision -> dense TFLOP/s per device (fp32: without TF32)
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "fp8": 1513.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}
"""Checked in order: the first substring found in torch.cuda.get_device_name() wins."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, slots=True)
class Peak:
    tflops: float | None
    """Peak TFLOP/s per device; None when unknown (MFU is then not reported)."""
    source: str
    """Where the number comes from, printed with the row."""


def gpu_peak(device_name: str, precision: str) -> Peak:
    """The table's peak for this GPU and precision ('fp8' when training in FP8)."""
    for key, peaks in GPU_PEAKS_TFLOPS.items():
        if key in device_name:
            if precision not in peaks:
                break
            return Peak(peaks[precision], f"table: {key} {precision} dense")
    return Peak(None, f"unknown peak for {device_name!r} {precision}: add it to "
                      "engine/bench/peak.py GPU_PEAKS_TFLOPS")


SQUARES = ((2048, 2048, 2048), (3072, 3072, 3072))
"""(m, k, n) of the square GEMMs every CPU peak includes."""


def model_gemm_shapes(model, tokens: int, padded_vocab_size: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every GEMM of a Llama-family layer and the output layer on `tokens` rows
    (one microbatch): forward [m, k] x [k, n], input gradient [m, n] x [n, k], weight gradient
    [k, m] x [m, n]. Pure."""
    h, heads = model.hidden_size, model.num_attention_heads
    d = model.kv_channels or h // heads
    groups = model.num_query_groups or heads
    ffn = model.ffn_hidden_size if model.moe is None else \
        (model.moe.ffn_hidden_size or model.ffn_hidden_size)
    forward = [(tokens, h, (heads + 2 * groups) * d), (tokens, heads * d, h),
               (tokens, h, 2 * ffn), (tokens, ffn, h), (tokens, h, padded_vocab_size)]
    shapes = []
    for m, k, n in forward:
        shapes += [(m, k, n), (m, n, k), (k, m, n)]
    return list(dict.fromkeys(shapes))


def measure_gemm_tflops(precision: str, shapes, *, repeats: int = 3,
                        device: str = "cpu") -> tuple[float, tuple[int, int, int]]:
    """(best TFLOP/s, its shape) over `repeats` timed matmuls of each (m, k, n) on the current
    threads (the best, since other jobs on a shared machine can only slow a matmul down)."""
    dtype = DTYPES[precision]
    g = torch.Generator(device="cpu").manual_seed(0)
    best, where = 0.0, None
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
        a @ b  # warm up the BLAS and its thread pool
        for _ in range(repeats):
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if device != "cpu":
                torch.cuda.synchronize()
            rate = 2 * m * k * n / (time.perf_counter() - start) / 1e12
            if rate > best:
                best, where = rate, (m, k, n)
    return best, where


def cpu_peak(precision: str, threads: int, shapes=()) -> Peak:
    """The best GEMM rate of the squares and `shapes` (the model's, `model_gemm_shapes`)."""
    tflops, (m, k, n) = measure_gemm_tflops(precision, [*SQUARES, *shapes])
    return Peak(tflops, f"measured {precision} GEMM, best of {len(SQUARES) + len(shapes)} shapes "
                        f"({m}x{k}x{n}), {threads} threads, this run")


def device_peak(precision: str, shapes=()) -> Peak:
    """The peak for where this process trains: the GPU table on CUDA, a measurement on CPU
    (over the squares and `shapes`)."""
    if torch.cuda.is_available():
        return gpu_peak(torch.cuda.get_device_name(), precision)
    return cpu_peak(precision, torch.get_num_threads(), shapes)

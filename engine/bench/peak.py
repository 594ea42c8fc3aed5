"""The hardware limit MFU is measured against: a table of GPU peaks, a measured CPU peak.

GPU: dense (no sparsity) tensor-core peaks per device from the vendors' datasheets.
CPU: there is no honest datasheet number for a shared VM's cores, so the benchmark measures this
machine's own GEMM rate (a large square matmul in the training dtype, on the threads the run
uses, in the same run) and reports MFU against it: a ratio to what this machine does, not a guess.
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


def measure_gemm_tflops(precision: str = "fp32", size: int = 2048, repeats: int = 10,
                        device: str = "cpu") -> float:
    """Best rate of `repeats` square matmuls of `size` on the current threads, in TFLOP/s (the
    best, since other jobs on a shared machine can only slow a matmul down)."""
    dtype = DTYPES[precision]
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    a @ b  # warm up the BLAS and its thread pool
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def cpu_peak(precision: str, threads: int, size: int = 2048) -> Peak:
    tflops = measure_gemm_tflops(precision, size)
    return Peak(tflops, f"measured {precision} GEMM {size}x{size}, {threads} threads, this run")


def device_peak(precision: str) -> Peak:
    """The peak for where this process trains: the GPU table on CUDA, a measurement on CPU."""
    if torch.cuda.is_available():
        return gpu_peak(torch.cuda.get_device_name(), precision)
    return cpu_peak(precision, torch.get_num_threads())

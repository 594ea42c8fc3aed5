"""Where a training step's time goes: one step under torch.profiler, its GEMMs summed by shape.

`profile_step(step)` runs `step()` once with shapes and FLOPs recorded and returns a
`StepProfile`: the step's wall time, the time and FLOPs of its matrix products (aten::mm, addmm,
bmm, baddbmm: the ops torch counts FLOPs for) per input shape, and the time of every op by name.
The GEMM rate it reports (FLOPs / GEMM time) is what the step achieved; the peak of
engine.bench.peak is measured on the same shapes, so the rate cannot exceed it by construction
of the measurement, only by noise. On CUDA the device time of the kernels is used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


@dataclass(frozen=True, slots=True)
class GemmShape:
    op: str
    shapes: str
    """The op's input shapes, e.g. [[2048, 512], [512, 1536]]."""
    calls: int
    seconds: float
    flops: float

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12 if self.seconds else 0.0


@dataclass(frozen=True, slots=True)
class StepProfile:
    step_s: float
    """Wall time of the profiled step (profiler overhead included)."""
    gemms: list[GemmShape]
    """By time, largest first."""
    ops_s: dict[str, float] = field(default_factory=dict)
    """Self time per op name, largest first."""

    @property
    def gemm_s(self) -> float:
        return sum(g.seconds for g in self.gemms)

    @property
    def gemm_flops(self) -> float:
        return sum(g.flops for g in self.gemms)

    @property
    def gemm_share(self) -> float:
        return self.gemm_s / self.step_s

    @property
    def gemm_tflops(self) -> float:
        return self.gemm_flops / self.gemm_s / 1e12 if self.gemm_s else 0.0

    def table(self, top: int = 12) -> str:
        lines = [f"profiled step {self.step_s:.3f} s | GEMMs {self.gemm_s:.3f} s "
                 f"({100 * self.gemm_share:.1f}%) at {1e3 * self.gemm_tflops:.1f} GFLOP/s",
                 f"{'op':<14} {'input shapes':<44} {'calls':>5} {'ms':>9} {'GFLOP/s':>8}"]
        lines += [f"{g.op:<14} {g.shapes:<44} {g.calls:>5} {1e3 * g.seconds:>9.1f} "
                  f"{1e3 * g.tflops:>8.1f}" for g in self.gemms[:top]]
        lines.append("ops by self time: " + ", ".join(
            f"{name} {1e3 * s:.0f} ms" for name, s in list(self.ops_s.items())[:top]))
        return "\n".join(lines)


def profile_step(step: Callable[[], object]) -> StepProfile:
    """Run `step()` once under the profiler (after the timed steps: warm)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True, with_flops=True) as prof:
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        step_s = time.perf_counter() - start

    def seconds(event) -> float:  # microseconds in the profiler
        return (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6

    gemms = [GemmShape(e.key, str(e.input_shapes), e.count, seconds(e), float(e.flops or 0))
             for e in prof.key_averages(group_by_input_shape=True) if e.key in GEMM_OPS]
    ops = {e.key: seconds(e) for e in prof.key_averages()}
    return StepProfile(step_s=step_s, gemms=sorted(gemms, key=lambda g: -g.seconds),
                       ops_s=dict(sorted(ops.items(), key=lambda kv: -kv[1])))

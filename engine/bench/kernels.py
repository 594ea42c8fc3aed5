"""`engine bench kernels`: each fused kernel against its PyTorch reference, forward + backward.

Shapes come from one model shape (default: the CPU target of `engine bench compare`, 4 x 512
tokens): RMSNorm on [tokens, hidden], SwiGLU on [tokens, 2 * ffn], RoPE on query-shaped
[seq, batch, heads, head_dim], and the output layer + cross-entropy on [tokens, hidden] x
[vocab, hidden]. Times are medians of `--repeats` runs after one warm-up; on CUDA the peak extra
memory of each is reported too (the point of the chunked cross-entropy).

Each kernel's output and input gradients are also compared with its reference's (so a GPU check
verifies correctness, not only speed), tensor by tensor at the tensor's scale: `error` is the
largest max|fused - reference| / max|reference| over the dtype's tolerance of the kernel tests
(engine.kernels.ops.TOLERANCES) times `SLACK`; above 1 the kernel is wrong (a wrong kernel is off
by its whole scale, 1e4 x the fp32 tolerance and more).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from engine.kernels.cross_entropy import fused_linear_cross_entropy, linear_cross_entropy
from engine.kernels.ops import TOLERANCES, has_kernel
from engine.kernels.rmsnorm import fused_rms_norm, rms_norm
from engine.kernels.rope import fused_rope, rope
from engine.kernels.swiglu import fused_swiglu, swiglu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SLACK = 4.0
"""Tolerance multiple for every compared tensor: weight gradients sum over all rows in another
order than the reference (the kernel tests allow 2-4x for them at far fewer rows)."""


@dataclass(frozen=True, slots=True)
class KernelRow:
    kernel: str
    shape: str
    dtype: str
    device: str
    reference_ms: float
    """Median forward + backward time of the PyTorch reference."""
    fused_ms: float
    speedup: float
    reference_mem_mib: float | None
    """Peak memory above the inputs during forward + backward (CUDA only)."""
    fused_mem_mib: float | None
    implementation: str
    """'csrc' when the built kernel ran, 'reference' when it is not built for this device."""
    max_abs_error: float
    """Largest |fused - reference| over the output and the input gradients."""
    error: float
    """max |fused - reference| / max |reference| / (SLACK * tolerance): <= 1 passes."""

    @property
    def ok(self) -> bool:
        return self.error <= 1.0


def _cases(tokens, batch, hidden, ffn, heads, head_dim, vocab, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)

    seq = tokens // batch
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    freqs = torch.cat((angles, angles), -1)[:, None, None, :].to(device)
    target = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    return [
        ("rms_norm", "rms_norm_fwd", f"{tokens}x{hidden}", rms_norm, fused_rms_norm,
         [rand(tokens, hidden), 1 + rand(hidden, scale=0.1)], [1e-5]),
        ("swiglu", "swiglu_fwd", f"{tokens}x{2 * ffn}", swiglu, fused_swiglu,
         [rand(tokens, 2 * ffn)], []),
        ("rope", "rope_fwd", f"{seq}x{batch}x{heads}x{head_dim}", rope, fused_rope,
         [rand(seq, batch, heads, head_dim)], [freqs]),
        ("linear_cross_entropy", "xent_fwd_bwd_", f"{tokens}x{hidden} @ {vocab}x{hidden}",
         linear_cross_entropy, fused_linear_cross_entropy,
         [rand(tokens, hidden), rand(vocab, hidden, scale=0.05)], [target]),
    ]


def _outputs(fn, inputs, args) -> list[torch.Tensor]:
    """The output and the gradients of the inputs for a fixed cotangent (ones)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, *args)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return [out.detach(), *grads]


def compare_outputs(fused: list[torch.Tensor], reference: list[torch.Tensor],
                    dtype: torch.dtype) -> tuple[float, float]:
    """(max |fused - reference|, the largest error at the tensor's scale over the tolerance)."""
    tol = TOLERANCES[dtype] * SLACK
    abs_err = err = 0.0
    for a, b in zip(fused, reference, strict=True):
        diff = (a.double() - b.double()).abs().max().item()
        scale = max(b.double().abs().max().item(), torch.finfo(torch.float64).tiny)
        abs_err, err = max(abs_err, diff), max(err, diff / scale / tol)
    return abs_err, err


def _time(fn, inputs, args, repeats: int, device: str) -> tuple[float, float | None]:
    """(median ms, peak extra MiB on CUDA) of forward + backward."""
    leaves = [t.detach().requires_grad_() for t in inputs]

    def once():
        out = fn(*leaves, *args)
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None

    once()
    times, mem = [], None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        once()
        mem = (torch.cuda.max_memory_allocated() - base) / 2**20
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        once()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), mem


def bench_kernels(*, tokens=2048, batch=4, hidden=512, ffn=1408, heads=8, head_dim=64,
                  vocab=32000, precision="fp32", device="cpu", repeats=10) -> list[KernelRow]:
    dtype = DTYPES[precision]
    rows = []
    for name, op, shape, ref, fused, inputs, args in _cases(tokens, batch, hidden, ffn, heads,
                                                            head_dim, vocab, dtype, device):
        abs_err, err = compare_outputs(_outputs(fused, inputs, args),
                                       _outputs(ref, inputs, args), dtype)
        ref_ms, ref_mem = _time(ref, inputs, args, repeats, device)
        fused_ms, fused_mem = _time(fused, inputs, args, repeats, device)
        rows.append(KernelRow(
            kernel=name, shape=shape, dtype=precision, device=device, reference_ms=ref_ms,
            fused_ms=fused_ms, speedup=ref_ms / fused_ms, reference_mem_mib=ref_mem,
            fused_mem_mib=fused_mem,
            implementation="csrc" if has_kernel(op, device) else "reference",
            max_abs_error=abs_err, error=err))
    return rows


def format_kernel_table(rows: list[KernelRow]) -> str:
    head = ["kernel", "shape", "dtype", "device", "reference_ms", "fused_ms", "speedup",
            "ref_MiB", "fused_MiB", "impl", "max_abs_err", "err/tol", "check"]
    cells = [head] + [[r.kernel, r.shape, r.dtype, r.device, f"{r.reference_ms:.2f}",
                       f"{r.fused_ms:.2f}", f"{r.speedup:.2f}x",
                       "-" if r.reference_mem_mib is None else f"{r.reference_mem_mib:.0f}",
                       "-" if r.fused_mem_mib is None else f"{r.fused_mem_mib:.0f}",
                       r.implementation, f"{r.max_abs_error:.2e}", f"{r.error:.3f}",
                       "ok" if r.ok else "FAILED"] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
                     for row in cells)


def kernel_rows_as_dicts(rows: list[KernelRow]) -> list[dict]:
    return [asdict(r) for r in rows]

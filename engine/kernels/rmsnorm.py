"""RMSNorm for the local (non-Transformer-Engine) layer spec, and its fused kernel.

megatron-core's local spec uses `torch.nn.RMSNorm`, which refuses sequence parallelism: under
SP each tensor-parallel rank normalizes its own slice of the sequence, so the weight gradient is
partial and must be all-reduced over the TP group. megatron-core does that for every parameter
marked `sequence_parallel=True`; this module marks its weight. The arithmetic follows HF's
`LlamaRMSNorm` (normalize in fp32, cast back, then scale) so converted models match bit for bit.

`FusedRMSNorm` computes the same in one pass per row (`engine::rms_norm_fwd/_bwd`, csrc/), keeping
only the per-row 1/rms for the backward; without the built kernel it runs `rms_norm`.
"""

import torch

from engine.kernels.ops import use_kernel


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * x / sqrt(mean(x^2) + eps), the statistic computed in fp32 (fp64 for fp64)."""
    dtype = x.dtype
    x32 = x.to(torch.promote_types(dtype, torch.float32))
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = torch.ops.engine.rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = torch.ops.engine.rms_norm_bwd(dy, x, weight, rstd)
        return dx, dweight, None


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` by the csrc kernel where it is built for x's device (and x, weight share a
    dtype); otherwise by `rms_norm` itself."""
    if x.dtype == weight.dtype and use_kernel("rms_norm_fwd", x.device.type):
        return _FusedRMSNorm.apply(x, weight, eps)
    return rms_norm(x, weight, eps)


class RMSNorm(torch.nn.Module):
    """Spec module: built by megatron-core as `RMSNorm(config=..., hidden_size=..., eps=...)`."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class FusedRMSNorm(RMSNorm):
    """`RMSNorm` through the fused kernel: same parameters, same checkpoint keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_rms_norm(x, self.weight, self.eps)

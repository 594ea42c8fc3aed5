"""SwiGLU on megatron's fused fc1 output, and its fused kernel.

With `gated_linear_unit`, megatron's `linear_fc1` produces [gate | up] along the last dimension
(per tensor-parallel rank: each rank holds its own gate and up slices), and its MLP computes
`silu(gate) * up` with `torch.chunk`: three elementwise kernels and two saved intermediates.
`engine::swiglu_fwd/_bwd` (csrc/) do it in one pass and save only the fc1 output.
"""

import torch
import torch.nn.functional as F

from engine.kernels.ops import use_kernel


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] on the last dimension (megatron's `glu`)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


class _FusedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.ops.engine.swiglu_fwd(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return torch.ops.engine.swiglu_bwd(dy, x)


def fused_swiglu(x: torch.Tensor) -> torch.Tensor:
    """`swiglu` by the csrc kernel where it is built for x's device, else by `swiglu`."""
    if use_kernel("swiglu_fwd", x.device.type):
        return _FusedSwiGLU.apply(x)
    return swiglu(x)

"""Rotary position embedding in megatron's rotate-half layout, and its fused kernel.

megatron-core (`rope_utils._apply_rotary_pos_emb_bshd`, `rotary_interleaved=False`) rotates the
first `rot` channels of each head, t -> t * cos + rotate_half(t) * sin with
rotate_half([t1, t2]) = [-t2, t1], cos/sin rounded to t's dtype, the remaining channels passed
through. `engine::rope_fwd/_bwd` (csrc/) do it in one pass from the frequencies, with no
intermediate tensors; the backward applies the transposed rotation.
"""

import torch

from engine.kernels.ops import use_kernel


def rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """t: [s, b, heads, dim]; freqs: [s, 1, 1, rot] (angles, rot <= dim and even)."""
    rot = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    cos = torch.cos(freqs).to(t.dtype)
    sin = torch.sin(freqs).to(t.dtype)
    x1, x2 = torch.chunk(t_rot, 2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((t_rot * cos + rotated * sin, t_pass), dim=-1)


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs):
        ctx.save_for_backward(freqs)
        return torch.ops.engine.rope_fwd(t, freqs)

    @staticmethod
    def backward(ctx, grad):
        (freqs,) = ctx.saved_tensors
        return torch.ops.engine.rope_bwd(grad, freqs), None


def fused_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """`rope` by the csrc kernel where it is built for t's device, else by `rope`. The
    frequencies get no gradient (megatron's are computed under no_grad)."""
    if use_kernel("rope_fwd", t.device.type):
        return _FusedRope.apply(t, freqs.detach())
    return rope(t, freqs)

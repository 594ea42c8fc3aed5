"""engine::rope_fwd/_bwd against engine.kernels.rope.rope and megatron-core's own RoPE."""

import pytest
import torch

from engine.kernels.rope import fused_rope, rope

pytestmark = pytest.mark.usefixtures("built")


def _inputs(seq, batch, heads, dim, rot, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(seq, batch, heads, dim, generator=g).to(dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv)
    freqs = torch.cat((angles, angles), dim=-1)[:, None, None, :]  # megatron's [s, 1, 1, rot]
    freqs = freqs.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return t.to(device), freqs.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq,batch,heads,dim,rot", [
    (16, 2, 4, 64, 64), (7, 3, 5, 10, 10), (9, 1, 2, 24, 12),  # rot < dim: rotary_percent < 1
    (512, 2, 8, 64, 64)])
def test_forward_and_backward_match_the_reference(seq, batch, heads, dim, rot, dtype, device,
                                                  run, close):
    t, freqs = _inputs(seq, batch, heads, dim, rot, dtype, device=device)
    out, dt = run(fused_rope, [t], freqs)
    out_ref, dt_ref = run(rope, [t], freqs)
    close(out, out_ref, dtype, scale=2)
    close(dt, dt_ref, dtype, scale=2)


def test_non_contiguous_query_view():
    t, freqs = _inputs(8, 2, 4, 32, 32, torch.float32)
    view = t.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not view.is_contiguous()
    torch.testing.assert_close(fused_rope(view, freqs), rope(t, freqs), rtol=2e-6, atol=2e-6)


def test_gradcheck_float64(device):
    t, freqs = _inputs(5, 2, 3, 8, 6, torch.float64, device=device)
    assert torch.autograd.gradcheck(fused_rope, (t.requires_grad_(), freqs))


def test_mismatched_freqs_are_refused():
    t, freqs = _inputs(8, 1, 2, 16, 16, torch.float32)
    with pytest.raises(RuntimeError, match="freqs must be"):
        torch.ops.engine.rope_fwd(t, freqs[:4])

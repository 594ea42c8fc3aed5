"""engine::rms_norm_fwd/_bwd against engine.kernels.rmsnorm.rms_norm (HF LlamaRMSNorm math)."""

import pytest
import torch

from engine.kernels.rmsnorm import fused_rms_norm, rms_norm

pytestmark = pytest.mark.usefixtures("built")


def _inputs(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(device, dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 6, 64), (3, 67), (1, 1, 1), (2, 515), (300, 512)])
def test_forward_and_backward_match_the_reference(shape, dtype, device, run, close):
    x, w = _inputs(shape, dtype, device=device)
    y, dx, dw = run(fused_rms_norm, [x, w], 1e-5)
    y_ref, dx_ref, dw_ref = run(rms_norm, [x, w], 1e-5)
    assert y.dtype == dtype and dw.dtype == dtype
    close(y, y_ref, dtype)
    close(dx, dx_ref, dtype)
    # The weight gradient sums over rows: allow for the rows' rounding adding up.
    close(dw, dw_ref, dtype, scale=2 if dtype == torch.float32 else 4)


def test_gradcheck_float64(device):
    x, w = _inputs((3, 13), torch.float64, device=device)
    assert torch.autograd.gradcheck(fused_rms_norm, (x.requires_grad_(), w.requires_grad_(), 1e-5))


def test_non_contiguous_input():
    x, w = _inputs((16, 24), torch.float32)
    xt = x.t()  # [24, 16], not contiguous
    torch.testing.assert_close(fused_rms_norm(xt, w[:16], 1e-5), rms_norm(xt, w[:16], 1e-5),
                               rtol=2e-6, atol=2e-6)


def test_shape_errors_name_the_shapes():
    x, w = _inputs((4, 8), torch.float32)
    with pytest.raises(RuntimeError, match=r"weight must be \[8\]"):
        torch.ops.engine.rms_norm_fwd(x, w[:5], 1e-5)

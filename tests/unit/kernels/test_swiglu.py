"""engine::swiglu_fwd/_bwd against engine.kernels.swiglu.swiglu and megatron's MLP `glu`."""

import pytest
import torch

from engine.kernels.swiglu import fused_swiglu, swiglu

pytestmark = pytest.mark.usefixtures("built")


def _x(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 4).to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 2 * 64), (5, 2 * 45), (1, 2), (64, 2 * 1408)])
def test_forward_and_backward_match_the_reference(shape, dtype, device, run, close):
    x = _x(shape, dtype, device=device)
    y, dx = run(fused_swiglu, [x])
    y_ref, dx_ref = run(swiglu, [x])
    assert y.shape == (*shape[:-1], shape[-1] // 2)
    close(y, y_ref, dtype)
    close(dx, dx_ref, dtype)


def test_large_magnitudes_saturate_like_silu():
    x = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(fused_swiglu(x), swiglu(x), rtol=1e-6, atol=1e-6)


def test_gradcheck_float64(device):
    x = _x((3, 2 * 7), torch.float64, device=device).requires_grad_()
    assert torch.autograd.gradcheck(fused_swiglu, (x,))


def test_odd_width_is_refused():
    with pytest.raises(RuntimeError, match="must be even"):
        torch.ops.engine.swiglu_fwd(torch.zeros(2, 5))

"""Kernel tests compare each engine:: op with its PyTorch reference in engine/kernels/; they need
engine/_C built (test_ops.py fails, rather than skips, when it could have been built). Tests
taking `device` also run on CUDA where a GPU and the CUDA kernels are there."""

import pytest
import torch

from engine.kernels import ops

TOLERANCES = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2,
              torch.float16: 4e-3}
"""Fused vs reference (rtol = atol): a few ulp of the dtype, since the kernels round once where
the references round after each elementwise op."""


@pytest.fixture
def built():
    if not ops.has_kernel("rms_norm_fwd", "cpu"):
        pytest.skip("engine/_C is not built: pip install --no-build-isolation -e .")


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not (torch.cuda.is_available()
                                        and ops.has_kernel("rms_norm_fwd", "cuda")):
        pytest.skip("no CUDA device with engine/_C built with its CUDA kernels")
    return request.param


@pytest.fixture
def close():
    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale=1.0):
        tol = TOLERANCES[dtype] * scale
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)

    return check


@pytest.fixture
def run():
    """run(fn, inputs, *args): (output, *gradients w.r.t. inputs) for a fixed random cotangent."""

    def forward_backward(fn, inputs, *args, seed=0):
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*inputs, *args)
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        cot = cot.to(out.device, out.dtype)
        return (out, *torch.autograd.grad(out, inputs, cot))

    return forward_backward

"""Kernel tests compare each engine:: op with its PyTorch reference in engine/kernels/; they need
engine/_C built. They skip without it, except under ENGINE_REQUIRE_CSRC=1 (set by .ci/run on a
machine with a C++ compiler), where they fail: CI cannot pass with the kernels silently untested.
Tests taking `device` also run on CUDA where a GPU and the CUDA kernels are there; reference-only
checks live in test_references.py and always run."""

import os

import pytest
import torch

from engine.kernels import ops
from engine.kernels.ops import TOLERANCES


@pytest.fixture
def built():
    if not ops.has_kernel("rms_norm_fwd", "cpu"):
        why = "engine/_C is not built: pip install --no-build-isolation -e ."
        if os.environ.get("ENGINE_REQUIRE_CSRC") == "1":
            pytest.fail(f"{why} (ENGINE_REQUIRE_CSRC=1: CI needs the CPU kernels tested)")
        pytest.skip(why)


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

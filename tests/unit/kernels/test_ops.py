"""The engine:: library: schemas and fake implementations work without the built kernels, the
build is there wherever it could have been made, and the references run (said once) without it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from engine.kernels import ops

ROOT = Path(__file__).resolve().parents[3]


def test_every_op_has_a_schema_and_a_fake_implementation():
    for name in ops.SCHEMAS:
        assert hasattr(torch.ops.engine, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"engine::{name}", "Meta"), name


@pytest.mark.parametrize("device", ["meta", "fake"])
def test_shapes_propagate_without_kernels(device):
    def make(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta")

    with FakeTensorMode() if device == "fake" else torch.device("meta"):
        y, rstd = torch.ops.engine.rms_norm_fwd(make(2, 3, 8), make(8), 1e-5)
        dx, dw = torch.ops.engine.rms_norm_bwd(make(2, 3, 8), make(2, 3, 8), make(8), rstd)
        h = torch.ops.engine.swiglu_fwd(make(4, 2 * 11))
        r = torch.ops.engine.rope_fwd(make(5, 2, 3, 16), make(5, 1, 1, 16, dtype=torch.float32))
        loss = torch.ops.engine.xent_fwd_bwd_(make(6, 50), make(6, dtype=torch.long), None, -100)
    assert y.shape == (2, 3, 8) and rstd.shape == (2, 3) and rstd.dtype == torch.float32
    assert dx.shape == (2, 3, 8) and dw.shape == (8,)
    assert h.shape == (4, 11) and r.shape == (5, 2, 3, 16)
    assert loss.shape == (6,) and loss.dtype == torch.float32


def test_library_is_built_where_it_can_be():
    """CI installs with --no-build-isolation and a compiler: every kernel test must then run."""
    if os.environ.get("ENGINE_NO_CSRC") or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler (or ENGINE_NO_CSRC): the references run instead")
    assert ops.library_path() is not None, (
        "engine/_C is not built: pip install --no-build-isolation -e . (or python setup.py "
        "build_ext --inplace)")
    for name in ops.SCHEMAS:
        assert ops.has_kernel(name, "cpu"), name
    assert not ops.has_kernel("rms_norm_fwd", "xla")
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    want = "avx2" if {"avx2", "fma"} <= set(flags) and "ENGINE_CPU_ISA" not in os.environ \
        else "base"
    assert ops.cpu_isa() == want


def _python(script: str, **env: str) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter (the op library loads once per process)."""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)


def test_references_run_unbuilt_and_say_so_once():
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from engine.kernels.rmsnorm import fused_rms_norm, rms_norm\n"
        "from engine.kernels.swiglu import fused_swiglu, swiglu\n"
        "x, w = torch.randn(3, 8), torch.rand(8)\n"
        "for _ in range(3):\n"
        "    assert torch.equal(fused_rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5))\n"
        "    assert torch.equal(fused_swiglu(x), swiglu(x))\n"
    )
    proc = _python(script, ENGINE_DISABLE_CSRC="1")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "using the PyTorch reference" in line]
    assert len(lines) == 2, proc.stderr  # one per op, not one per call
    assert "engine::rms_norm_fwd: no cpu kernel (ENGINE_DISABLE_CSRC is set)" in lines[0]


@pytest.mark.usefixtures("built")
def test_baseline_isa_build_matches_the_references():
    """On x86-64 the kernels also exist as a baseline (SSE2) build for CPUs without AVX2; it is
    forced here with ENGINE_CPU_ISA=base and checked against the references."""
    script = (
        "import torch\n"
        "from engine.kernels import ops\n"
        "from engine.kernels.rmsnorm import fused_rms_norm, rms_norm\n"
        "from engine.kernels.swiglu import fused_swiglu, swiglu\n"
        "from engine.kernels.rope import fused_rope, rope\n"
        "from engine.kernels.cross_entropy import fused_linear_cross_entropy as fce, "
        "linear_cross_entropy as ce\n"
        "assert ops.cpu_isa() == 'base', ops.cpu_isa()\n"
        "close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)\n"
        "x, w = torch.randn(33, 70), torch.rand(70)\n"
        "close(fused_rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5))\n"
        "close(fused_swiglu(x), swiglu(x))\n"
        "t, f = torch.randn(5, 2, 3, 8), torch.randn(5, 1, 1, 8)\n"
        "close(fused_rope(t, f), rope(t, f))\n"
        "h, W, tg = x[:, :16].contiguous(), torch.randn(70, 16), torch.randint(0, 70, (33,))\n"
        "close(fce(h, W, tg, rows=8), ce(h, W, tg))\n"
    )
    proc = _python(script, ENGINE_CPU_ISA="base")
    assert proc.returncode == 0, proc.stderr[-3000:]

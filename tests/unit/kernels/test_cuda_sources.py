"""The CUDA sources compile here, without a GPU: every csrc/cuda/*.cu with nvcc for sm_90 and the
flags torch's cpp_extension uses (its __CUDA_NO_*_CONVERSIONS__ defines catch implicit bf16/half
conversions), and the ATen binding syntax-checked against torch's and CUDA's headers. Running the
CUDA kernels needs a GPU machine (launch/ and the issue's GPU check)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None and os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        found = str(candidate) if candidate.exists() else None
    return found


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (no CUDA toolkit)")


def _torch_nvcc_flags() -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return ["-std=c++20", "-O3", *COMMON_NVCC_FLAGS]


def test_there_is_a_cuda_kernel_per_cpu_kernel():
    cpu = {p.stem for p in (ROOT / "csrc" / "cpu").glob("*.cpp")} - {"binding"}
    assert {p.stem for p in CUDA_SOURCES} == cpu


@needs_nvcc
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_for_sm90(source, tmp_path):
    proc = subprocess.run([NVCC, "-c", "-arch=sm_90", *_torch_nvcc_flags(), str(source), "-o",
                           str(tmp_path / "out.o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_kernels_include_no_torch_headers():
    """Only binding.cpp sees ATen; the kernels compile with nvcc alone (the test above)."""
    cuda = ROOT / "csrc" / "cuda"
    for path in [*CUDA_SOURCES, *cuda.glob("*.cuh"), *cuda.glob("*.h")]:
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", path.read_text()), path


def _cuda_include(nvcc: str) -> Path | None:
    """The toolkit's include directory (nvcc may be a wrapper script on PATH)."""
    proc = subprocess.run([nvcc, "-v", "-E", "-x", "cu", os.devnull], capture_output=True,
                          text=True, timeout=60)
    for line in proc.stderr.splitlines():
        if line.startswith("#$ TOP="):
            top = Path(line.split("=", 1)[1].strip())
            for inc in (top / "include", top / "targets" / "x86_64-linux" / "include"):
                if (inc / "cuda_runtime_api.h").exists():
                    return inc
    return None


@pytest.mark.slow
@needs_nvcc
def test_cuda_binding_syntax(tmp_path):
    """g++ -fsyntax-only on csrc/cuda/binding.cpp (~30 s: ATen headers). A CPU torch ships the
    c10/cuda headers but not their generated cuda_cmake_macros.h: a one-line stand-in is used."""
    from torch.utils.cpp_extension import include_paths

    include = _cuda_include(NVCC)
    if include is None:
        pytest.skip("the CUDA toolkit's include directory was not found")
    paths = [*include_paths(), str(include)]
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in paths):
        stub = tmp_path / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        paths.append(str(tmp_path))
    cxx = os.environ.get("CXX", "c++")
    proc = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", *(f"-I{p}" for p in paths),
                           str(ROOT / "csrc" / "cuda" / "binding.cpp")],
                          capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 0, "\n".join(errors[:20])

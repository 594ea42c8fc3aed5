"""Package + csrc build.

CPU: `pip install torch==2.13.0` first, then `pip install --no-build-isolation -e '.[dev]'`: the
kernels in csrc/ are compiled against the torch already installed, so pip must not build in an
isolated environment (it would download another, multi-GB CUDA torch into it). The `engine._C`
library holds the C++ CPU kernels (OpenMP) always, and the CUDA kernels when torch is a CUDA build
and nvcc is found (set TORCH_CUDA_ARCH_LIST, e.g. "9.0", to build for one architecture only).
Without torch or a C++ compiler at build time, or with ENGINE_NO_CSRC=1, the package installs
without `engine._C` and the engine runs the PyTorch references of the kernels (saying so once).
Rebuild after editing csrc/: `python setup.py build_ext --inplace` (or reinstall as above).
"""

import os
import shutil
import sys
import warnings
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# -fno-trapping-math: lets GCC vectorize loops with selects (clamps); no value changes.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3"]  # cpp_extension adds -std and its half/bf16 flags


def _skip(why: str):
    print(f"engine: not building csrc kernels ({why}); the PyTorch references will run",
          file=sys.stderr)
    return [], {}


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def csrc_extensions():
    """([engine._C extension], cmdclass), or ([], {}) with a message when it cannot be built."""
    if os.environ.get("ENGINE_NO_CSRC"):
        return _skip("ENGINE_NO_CSRC is set")
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return _skip("torch is not importable here: install torch first, then "
                     "pip install --no-build-isolation -e .")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return _skip(f"no C++ compiler {compiler!r} on PATH")
    sources = _sources("csrc/cpu/*.cpp") + _sources("csrc/cpu/avx2/*.cpp")  # x86: AVX2 builds
    link = ["-fopenmp"]
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and not os.environ.get("ENGINE_NO_CUDA"))
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "engine._C", sources + _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=link)
    else:
        ext = cpp_extension.CppExtension(
            "engine._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=link)
    print(f"engine: building csrc kernels (CPU{' + CUDA' if with_cuda else ''}) against torch "
          f"{torch.__version__}", file=sys.stderr)
    build_ext = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = csrc_extensions()

setup(
    name="engine",
    version="0.1.0",
    description="Megatron-style training engine for continual pretraining and EfficientScale",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "psutil",  # undeclared dependency of megatron-core's dist_checkpointing async writer
        "einops",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "tensorboard",
        "safetensors",
        "tokenizers",  # HF tokenizer.json files
    ],
    extras_require={
        # transformer-engine: within what megatron-core 0.16.1 supports (its dev extra: <2.12).
        # Pick the core wheel matching the cluster's CUDA: transformer-engine[core_cu12|core_cu13].
        "gpu": ["transformer-engine[pytorch]>=2.3,<2.12", "flash-attn"],
        # HF interop; gguf + accelerate let transformers read GGUF files (engine model fetch)
        "hf": ["transformers", "gguf", "accelerate"],
        # engine eval and the task probes: the engine as an lm-evaluation-harness backend
        "eval": ["lm-eval==0.4.13"],
        # `engine bench compare`: the transformers baseline and the PNG bar chart.
        "bench": ["transformers", "matplotlib"],
        "dev": ["pytest", "pytest-timeout", "hypothesis", "ruff", "transformers", "gguf",
                "accelerate", "lm-eval==0.4.13", "matplotlib"],
    },
    entry_points={"console_scripts": ["engine=engine.cli:main"]},
)

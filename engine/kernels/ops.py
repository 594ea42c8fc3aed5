"""The `engine::` operator library: schemas and fake implementations here, kernels in csrc/.

Schemas are defined in Python, with fake (meta) implementations, so shapes propagate under
`FakeTensorMode` and on the meta device whether or not the C++/CUDA library was built.
`engine/_C.so` (built by setup.py from csrc/) registers the CPU kernels and, in a CUDA build, the
CUDA kernels. Each op's Python front (`engine.kernels.<op>`) asks `use_kernel` whether to call the
op or its PyTorch reference; a missing kernel is reported once per op and device.

Set ENGINE_DISABLE_CSRC=1 to run the references even where the library is built.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NAMESPACE = "engine"

SCHEMAS = {
    "rms_norm_fwd": "(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)",
    "rms_norm_bwd": "(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)",
    "swiglu_fwd": "(Tensor x) -> Tensor",
    "swiglu_bwd": "(Tensor dy, Tensor x) -> Tensor",
    "rope_fwd": "(Tensor t, Tensor freqs) -> Tensor",
    "rope_bwd": "(Tensor grad, Tensor freqs) -> Tensor",
    "xent_fwd": "(Tensor logits, Tensor target, int ignore_index) -> Tensor",
    "xent_fwd_bwd_": (
        "(Tensor(a!) logits, Tensor target, Tensor? row_scale, int ignore_index) -> Tensor"
    ),
}
"""Op name -> schema. The C++ signatures in csrc/*/binding.cpp must match."""

TOLERANCES = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2,
              torch.float16: 4e-3}
"""Fused vs reference, rtol = atol (as torch.testing.assert_close): a few ulp of the dtype, since
the kernels round once where the references round after each elementwise op. The kernel tests
and `engine bench kernels` judge by it (sums over many rows, like a weight gradient, get a
small multiple)."""

_LIBRARY = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _LIBRARY.define(_name + _schema)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("engine::rms_norm_fwd")
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=_acc_dtype(x))


@torch.library.register_fake("engine::rms_norm_bwd")
def _(dy, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


@torch.library.register_fake("engine::swiglu_fwd")
def _(x):
    torch._check(x.shape[-1] % 2 == 0, lambda: f"swiglu_fwd: odd last dimension {x.shape}")
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.register_fake("engine::swiglu_bwd")
def _(dy, x):
    return torch.empty_like(x)


@torch.library.register_fake("engine::rope_fwd")
def _(t, freqs):
    return torch.empty_like(t)


@torch.library.register_fake("engine::rope_bwd")
def _(grad, freqs):
    return torch.empty_like(grad)


@torch.library.register_fake("engine::xent_fwd")
def _(logits, target, ignore_index):
    return logits.new_empty(logits.shape[:1], dtype=_acc_dtype(logits))


@torch.library.register_fake("engine::xent_fwd_bwd_")
def _(logits, target, row_scale, ignore_index):
    return logits.new_empty(logits.shape[:1], dtype=_acc_dtype(logits))


def library_path() -> Path | None:
    """The built `engine/_C` library, or None."""
    found = sorted(Path(__file__).resolve().parents[1].glob("_C*.so"))
    return found[0] if found else None


_loaded: Path | None = None
_load_error: str | None = None


def load_library() -> bool:
    """Load engine/_C once (registering its kernels); False when absent, disabled or broken."""
    global _loaded, _load_error
    if _loaded is not None or _load_error is not None:
        return _loaded is not None
    path = library_path()
    if os.environ.get("ENGINE_DISABLE_CSRC"):
        _load_error = "ENGINE_DISABLE_CSRC is set"
    elif path is None:
        _load_error = ("engine/_C is not built (pip install --no-build-isolation -e . with torch "
                       "installed, or python setup.py build_ext --inplace)")
    else:
        try:
            torch.ops.load_library(str(path))
            _loaded = path
        except OSError as err:  # built against another torch: say so, run the references
            _load_error = f"{path} failed to load: {err}"
    return _loaded is not None


def cpu_isa() -> str | None:
    """Which build of the CPU kernels runs here: 'avx2' (x86-64 with AVX2 + FMA) or 'base';
    None when the library is not loaded. ENGINE_CPU_ISA=base forces the baseline build."""
    if not load_library():
        return None
    import ctypes

    fn = ctypes.CDLL(str(_loaded)).engine_cpu_isa
    fn.restype = ctypes.c_char_p
    return fn().decode()


def has_kernel(op: str, device_type: str) -> bool:
    """Whether `engine::op` has a kernel for `device_type` ('cpu', 'cuda') in this process."""
    load_library()
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{NAMESPACE}::{op}", key)


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log `message` at WARNING the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def use_kernel(op: str, device_type: str) -> bool:
    """True when `engine::op` runs on `device_type`; else warns once that the reference runs."""
    if has_kernel(op, device_type):
        return True
    why = _load_error or f"it was built without {device_type} kernels"
    warn_once(f"{op}:{device_type}",
              f"engine::{op}: no {device_type} kernel ({why}); using the PyTorch reference")
    return False

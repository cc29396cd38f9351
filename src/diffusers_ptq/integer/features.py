"""What the running machine offers the integer path: oneDNN int8 ops, VNNI, and `torch._int_mm`'s rules.

- `torch._int_mm` runs on CPU with no shape rules (any M, K, N >= 1), but it is a naive loop, far slower
  than an fp32 GEMM of the same size. It is kept as the exact reference kernel and for CUDA, where
  cuBLASLt needs M > 16 and K, N multiples of 8 (`int_mm_padding`).
- oneDNN's u8 x s8 GEMM (`torch.ops.onednn.qlinear_pointwise`) is the CPU kernel (timings against fp32:
  benchmarks/results/gemm_split.json and BENCHMARKS.md §7). Without VNNI
  it multiplies with `vpmaddubsw`, which adds two u8 x s8 products into a saturating int16: exact only while
  2 * max|u| * max|w| <= 32767. With VNNI/AMX the products go straight into int32 and are always exact.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

INT16_MAX = 32767
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
KERNELS = ("auto", "onednn", "int_mm", "triton")


def onednn_available() -> bool:
    """True when this torch build exposes oneDNN's int8 linear (x86 CPU builds do)."""
    try:
        ops = torch.ops.onednn
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(ops, "qlinear_prepack")
            and hasattr(ops, "qlinear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def cpu_has_vnni() -> bool:
    """True when the CPU has an int8 dot product into int32 (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False  # unknown: assume the saturating path, which is always correct
    return any(flag in flags for flag in VNNI_FLAGS)


def onednn_exact(act_max_code: int, weight_max_abs: int) -> bool:
    """Whether oneDNN's u8 x s8 GEMM is exact for codes u in [0, act_max_code] and |w| <= weight_max_abs."""
    return cpu_has_vnni() or 2 * act_max_code * weight_max_abs <= INT16_MAX


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device) -> bool:
    """True when the Triton conv kernel runs on `device`: CUDA with triton installed, or any device under
    Triton's CPU interpreter (TRITON_INTERPRET=1; slow, for tests)."""
    return triton_installed() and (device.type == "cuda" or interpreting())


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The GEMM kernel for `device`: on CPU 'onednn' when available; on CUDA 'triton' (3x3 convs as a
    Triton implicit GEMM, the rest on `torch._int_mm`) when triton is installed; 'int_mm' otherwise."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(repr(k) for k in KERNELS)}")
    if kernel == "auto":
        if device.type == "cpu":
            return "onednn" if onednn_available() else "int_mm"
        return "triton" if device.type == "cuda" and triton_available(device) else "int_mm"
    if kernel == "triton" and not triton_available(device):
        why = "triton is not installed" if not triton_installed() else f"the model is on {device}"
        raise ValueError(
            f"kernel='triton' needs a CUDA model with triton installed ({why}); use kernel='auto' or "
            "'int_mm' (set TRITON_INTERPRET=1 to run it in Triton's slow CPU interpreter)"
        )
    if kernel == "onednn" and (device.type != "cpu" or not onednn_available()):
        raise ValueError(
            f"kernel='onednn' needs a CPU model and a torch build with oneDNN int8 ops (device {device}); "
            "use kernel='auto' or 'int_mm'"
        )
    return kernel


def int_mm_padding(m: int, k: int, n: int, device_type: str) -> tuple[int, int, int]:
    """Padded (M, K, N) that `torch._int_mm` accepts on `device_type` ('cuda': M > 16, K and N % 8 == 0)."""
    if device_type != "cuda":
        return max(m, 1), max(k, 1), max(n, 1)
    return max(m, 17), -(-max(k, 1) // 8) * 8, -(-max(n, 1) // 8) * 8

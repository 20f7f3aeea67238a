"""Which low-precision units a device has, and the fused CPU kernels for a tensor (csrc/native_*.cpp)."""
from __future__ import annotations

import functools
import logging
from typing import Optional, Tuple

import torch
from torch import Tensor

from fracpass.quant import constant_when_traced


log = logging.getLogger("fracpass.native")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


_INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


# CUDA compute capabilities with the units each path needs: int8 tensor cores (cuBLASLt's int8 GEMM behind
# torch._int_mm: Turing, sm_75), bfloat16 tensor cores (Ampere, sm_80), FP8 e4m3 (Ada and Hopper, sm_89;
# torch._scaled_mm). These paths have not run on a GPU in this project's CI (see the README): they are the
# same code as the CPU's torch-op path, with CUDA's shape limits checked (_cuda_mm_reason).
_CUDA_INT8, _CUDA_BF16, _CUDA_FP8 = (7, 5), (8, 0), (8, 9)


_warned: set = set()


def _once(why: str) -> str:
    """``why`` a path is not used, logged the first time it is seen."""
    if why not in _warned:
        _warned.add(why)
        log.warning("fracpass native execution: %s; they run simulated", why)
    return why


def device_kind(device) -> str:
    """The native backend of ``device``: "cpu", "cuda" (NVIDIA), "rocm" (a ROCm build's cuda device), or
    the device's type. Every device-dependent choice of this module goes through here."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return "rocm" if kind == "cuda" and torch.version.hip is not None else kind


@functools.lru_cache(maxsize=None)
def _cuda_capability(device) -> Optional[Tuple[int, int]]:
    """The GPU's compute capability (asked once per device: every native call checks it), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


@constant_when_traced
def _has_any(flags: Tuple[str, ...]) -> bool:
    """Whether this CPU has one of ``flags``: a constant to torch.compile, which runs it once while it traces
    (reading /proc/cpuinfo is nothing Dynamo can trace)."""
    return any(f in _cpu_flags() for f in flags)


def _instructions_reason(flags: Tuple[str, ...], kind: str, products: str) -> Optional[str]:
    """None if this CPU has one of ``flags`` (``kind`` dot-product instructions), else why the path is
    not used, warned once."""
    if _has_any(flags):
        return None
    return _once(f"this CPU has none of {', '.join(flags)} (no {kind} dot-product instructions), so {products} "
                 "would not be faster than float32")


def _support(device, flags: Tuple[str, ...], kind: str, products: str, capability: Tuple[int, int]) -> Optional[str]:
    where = "cpu" if device is None else device_kind(device)
    if where == "cpu":
        return _instructions_reason(flags, kind, products)
    if where == "cuda":
        cap = _cuda_capability(device)
        if cap is None:
            return "a CUDA tensor, but CUDA is not available in this process"
        if cap < capability:
            return _once(f"this GPU (sm_{cap[0]}{cap[1]}) has no {kind} tensor cores (sm_{capability[0]}"
                         f"{capability[1]} and later), so {products} would not be faster than float32")
        return None
    return _once(f"{where} tensors (native paths exist for CPUs and NVIDIA GPUs only), so {products}")


def int8_support(device=None) -> Optional[str]:
    """None if ``device`` (default: this CPU) has int8 dot-product units, else why the int8 path is not used."""
    return _support(device, _INT8_FLAGS, "int8", "int8 products", _CUDA_INT8)


def bf16_support(device=None) -> Optional[str]:
    """None if ``device`` (default: this CPU) has bfloat16 dot-product units, else why the bf16 path is not used."""
    return _support(device, _BF16_FLAGS, "bfloat16", "bf16 products", _CUDA_BF16)


def fp8_support(device=None) -> Optional[str]:
    """None if ``device`` multiplies FP8 (e4m3) in hardware (NVIDIA sm_89 and later), else why an int8
    path's products with codes of <= 4 bits stay on int8. No CPU here has FP8 units: torch._scaled_mm
    runs there, emulated, 6.4x slower than torch._int_mm (4096x1024x1024, Zen 5, 2 threads)."""
    where = "cpu" if device is None else device_kind(device)
    if where != "cuda":
        return f"no FP8 units on {where}"
    cap = _cuda_capability(device)
    if cap is None or cap < _CUDA_FP8:
        return "no FP8 tensor cores on this GPU (sm_89 and later)"
    return None


def ext(t: Optional[Tensor] = None):
    """The fused CPU kernels for ``t`` (fracpass.kernels.NATIVE: csrc/native_*.cpp), or None: ``t`` on another
    device (the torch-op path, which computes the same values, runs there), or the kernels disabled or not built.
    While torch.compile traces, the kernels loaded before (the lower-native pass loads them): Dynamo cannot
    trace the loader, and reads this module's record of them instead."""
    if t is not None and device_kind(t.device) != "cpu":
        return None
    if torch.compiler.is_compiling():
        return _LOADED[0] if _LOADED else None
    return _cpu_ext()


_LOADED: list = []  # the loader's answer, once known (preload)


def _cpu_ext():
    """The fused encode / gradient-code / epilogue kernels as torch ops (fracpass.kernel_ops.NativeKernels),
    built on first use (fracpass.kernels.load_native: same switch, FRACPASS_KERNELS=0, and the same build
    cache); None if disabled or the build fails."""
    preload()
    return _LOADED[0]


def preload() -> None:
    """Load the CPU kernels now if not yet (the lower-native pass does): what ext() gives while torch.compile
    traces, where the loader cannot run."""
    if not _LOADED:
        from fracpass import kernel_ops

        _LOADED[:] = [kernel_ops.load_native()]

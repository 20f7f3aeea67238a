"""Native low-precision execution (issue 11): quantized products on int8 or bfloat16 codes.

The simulated graph computes ``gq(F.linear(aq(x), wq(w), b))`` in float32. With
``fracpass.transform(..., execution="native")`` the ``lower-native`` pass (run after the pipeline)
replaces each such group by one call that receives the quantizer modules::

    x -> linear_aq -> linear(., linear_wq(w), b) -> linear_gq -> y
    becomes
    x -> native_linear(x, w, b, linear_aq, linear_wq, linear_gq) -> y   (quantizers as get_attr nodes)

and picks a path on every call from the quantizers' current bits, so ``set_stage`` needs no re-trace:

* **int8**: the quantizers' integer codes multiplied by ``torch._int_mm`` (int32 accumulation:
  exact), the scales applied to the output. Codes are computed with the simulation's own formula
  (same range, same ``round(x / s)``), so the product equals the simulation's up to float32
  rounding. 8-bit codes span 256 values anywhere in [-255, 255] (after the zero point); they are
  shifted into int8 and the shift is corrected with row and column sums. Gradients are rounded by
  the simulation's own stochastic quantizer (same noise for the same seed) and read back as codes.
  The weight gradient (g x a) is always int8; the input gradient (g x w) is int8 only when the
  weight's scale is per tensor (a plan rule with ``weight_scale="tensor"``): a per-channel weight
  scale lies on that product's contracted axis, so it cannot be applied to the output, and that
  product runs in float32 on the decoded codes.
  Operands are saved for backward as int8 codes.
* **simulated**: the group's own modules in sequence, bit for bit the simulated graph. Used for
  bits above 8, gated products with a weight operand, products too small to pay
  (``MIN_INTENSITY``; batched products: ``MIN_BMM_INTENSITY``; convolutions: ``MIN_CONV_MACS``),
  SDPA (only its q, k and v are quantized: P and dS have no exact codes), non-float32 tensors or ones
  on devices other than CPUs and NVIDIA GPUs, shape-only (fake tensor) runs, and CPUs without int8
  dot-product instructions (AMX-INT8, AVX512-VNNI or AVX-VNNI) or GPUs without int8 tensor cores
  (said once in the log). ONNX export swaps the quantizers for markers,
  which also takes this path, so a native model exports exactly as a simulated one.

* **bf16** (convolutions: conv1d/2d/3d, grouped, depthwise, transposed; ``bf16_conv*``): the codes
  as bfloat16 (integers of magnitude <= 255: exact), oneDNN's bfloat16 convolution accumulating in
  float32, the scales applied to its output in float32. Each product's output is rounded to
  bfloat16 (unit roundoff 2^-8), the one difference from the simulation. Backward runs dw = g x a
  on bfloat16 codes always, dx = g x w too when the weight's scale is per tensor (else in float32 on
  the decoded codes, as for linear); the gradient codes' offset adds a float32 product of window
  sums at 1/N (dx) or 1/C_out (dw) of the size. The input's codes are saved for backward as bytes
  (q - offset, when they span <= 256 values, as per-tensor codes always do) or bfloat16. CPUs
  without AVX512-BF16 or AMX-BF16 run convolutions simulated (said once in the log).
  A channels-last 2-D ungrouped convolution with a per-tensor input scale runs its forward product on
  oneDNN's int8 convolution where the CPU has int8 units (``INT8_FORWARD``; _int8_product): the
  input's bytes (zero point -lo, so the padding is the real zero) times the weight codes as int8,
  int32 accumulation, rounded once to bfloat16: the bf16 convolution's product bit for bit while its
  float32 sums stay under 2^24 (30-40% faster than it on Zen 5; the encoding pass then writes only
  the bytes). 8-bit weight codes span 256 values that need not fit int8: the few outside it (the
  range's ends) split onto copies of their input channels (``SPLIT_CHANNELS``), or where too many
  input channels hold them run shifted per output channel, the shift corrected with the input codes'
  window sums before the one rounding. With a per-tensor weight scale
  a stride-1 convolution's input gradient runs the same way (``INT8_INPUT_GRAD``: the convolution of
  the gradient codes' bytes with the weight flipped and transposed), and its weight gradient on the
  CPU kernels' AVX512-VNNI loop (``INT8_WEIGHT_GRAD``, any weight scale; C_out a multiple of 16, C_in
  of 8, kernels at most 3 wide): exact int32 sums into int64, scaled in float64 and rounded once
  (closer to the simulation than the bf16 product), and without the pass that widens the saved
  bytes back to bfloat16.
  ``fuse-native-bn`` (FuseNativeBNPass, after ``lower-native``) folds a bf16 convolution's only-user
  chain BatchNorm (-> residual add) (-> ReLU) into one op (``bf16_conv*_bn``, _Bf16ConvBN) that keeps
  the convolution's bfloat16 product and the ReLU's mask as bits instead of two float32 tensors. On a
  channels-last product (one input scale for the batch) its BatchNorm runs on the CPU kernels straight
  from that product (``FAST_BN``: statistics from per-channel float64 sums, the output and dL/dy as one
  affine map per channel, dL/dy's range for the gradient quantizer in the same pass), equal to aten's
  BatchNorm to float32 rounding; otherwise (or with ``FAST_BN = False``) on aten's kernels over the
  float32 y = s v + bias, bit for bit the unfused ops. Where such an output's only reader is a 2-D
  convolution (the pass marks the fused call ``sole_reader=True``), that convolution's int8
  input-gradient product goes to the fused op's backward unscaled (``HAND_GRADIENT``, _GradSink): the
  BatchNorm kernels form dx = v s + addend where they read it, the same values without the float32 dx
  pass.
* **bf16 batched products** (``torch.bmm``, ``torch.matmul`` with a batched right operand:
  attention's q k^T and P v): bfloat16 codes with per-tensor scales (per sample when gated),
  forward and both gradients, the gradient's offset corrected through the codes' row and column sums.
  Gated convolutions (FracTrain's DFQ: each sample at its gate's option, over its option group's
  range) take the same path with per-sample scales: the codes per sample, the output and dx scaled
  per sample, dw once per option group (the samples' scales lie on its contracted axis); samples
  whose gradient option exceeds 8 bits run their dx rows and their group's dw in float32; the gate's
  gradient is computed from dx and the float input, which is saved for it. Every activation option
  must have 2..8 bits (else the op stays simulated). Gated linear layers take the bf16 path the same
  way (``_Bf16Linear``: bf16 matmuls over the codes, each sample's rows scaled by its scales).

**CUDA** tensors take the same paths where the GPU has the units (int8: sm_75, bf16: sm_80) with the
torch-op code the CPU runs when its fused kernels are off (``_ext`` is None for them), torch._int_mm's
CUDA shape limits checked per op (``_cuda_mm_reason``); on sm_89 and later an int8 op's products whose
codes are exact in FP8 e4m3 (|code| <= 16: activations and weights up to 4 bits, gradients up to 5) run
on torch._scaled_mm instead (``_fp8_products``, ``_code_mm``). Not run on a GPU yet (no GPU has been
available to this project); tests/test_native_cuda.py runs them on CPU tensors routed as CUDA ones.
Every device-dependent choice goes through ``_device_kind``.

conv2d's forward can run on oneDNN's int8 convolution instead (``native_conv2d``, opt-in:
``LowerNativePass(kinds=NATIVE_KINDS)``, as its per-step weight prepack made it slower end to end
here): uint8 activation codes with their zero point, so zero padding stays the real zero; int8
weight codes, 8-bit weights shifted and corrected with window sums; fp32 output, exact; both
backward products in float32 on the decoded codes. Other compute ops (SDPA, einsum) stay
simulated; ``op_paths`` says why per op.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import operator
import pathlib
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from fracpass import kernels, meta, registry
from fracpass.errors import FracpassError
from fracpass.gating import GatedActQuant, GatedGradQuant, _group_range, _row_range, onehot_grad, quantize_grad_rows
from fracpass.pass_base import PassBase, PassResult
from fracpass.quant import (FULL_PRECISION, ActQuant, GradQuant, WeightQuant, _affine_params, _aminmax, _dense,
                            _fused_kernels, _memory_order, _memory_rows, _rows_outer_dense, _torch_seed, hand_range,
                            quantize_grad_stochastic)

__all__ = ["EXECUTIONS", "check_execution", "native_linear", "native_matmul", "LowerNativePass", "op_paths",
           "int8_support", "NativeInfo", "product_paths", "reuse_large_blocks"]

log = logging.getLogger("fracpass.native")

EXECUTIONS = ("simulate", "native")
NATIVE = "fracpass.native"  # node.meta key: NativeInfo on every compute op of a native model
MAX_INT8_BITS = 8
# |code + offset| <= 255, so a K-long int32 dot product is exact up to K = (2^31 - 1) / 255^2
MAX_CONTRACTION = (2**31 - 1) // (255 * 255)
# FP8 e4m3 codes have |code| <= 16; a float32 sum of such products is exact while it stays below 2^24
MAX_FP8_CONTRACTION = 2**24 // (16 * 16)
# An (M, K) x (K, N) product takes the int8 path only with at least this many multiply-adds per element of
# its operands and output, MKN / (MK + KN + MN). Measured with benchmarks/native_crossover.py on this
# project's CPU (Zen 5, 1 thread, linear forward + backward at 8/8/8): int8 took 1.07-1.58x the
# simulation's time up to 32 (2048x64x64: 1.07x) and 0.47-0.79x from 85 on (256x256x256: 0.79x).
MIN_INTENSITY = 50.0
# A convolution takes the bf16 path only with at least this many forward multiply-adds per call: below,
# its fixed costs (codes, output scaling, the offset's two small convolutions: ~0.3 ms per training step)
# outweigh what bf16 saves. Measured with ``benchmarks/native_crossover.py --conv`` (Zen 5, 2 threads,
# 3x3 conv forward + backward at 8/8/8, NCHW and channels_last): 4.7-19M multiply-adds 1.30-1.53x the
# simulation's time, 75M 0.71-1.18x by shape, 151M 0.65-1.04x, 302M 0.43-0.93x.
MIN_CONV_MACS = 100e6
# A batched matmul (torch.bmm, attention's products) takes the bf16 path only with at least this many
# multiply-adds per operand or output element of one batch entry (m k n / (m k + k n + m n)). Measured
# with ``benchmarks/native_crossover.py --bmm`` (Zen 5, 2 threads, forward + backward at 8/8/8), native
# over simulated time: intensity 5 1.71x, 13-16 0.84-1.14x, 21 0.85x, 27-32 0.42-0.82x, 43-171 0.29-0.61x.
MIN_BMM_INTENSITY = 20.0


@dataclass(frozen=True)
class NativeInfo:
    """Whether the lower-native pass replaced an op by a native call, and if not, why."""

    lowered: bool
    reason: str = ""


def check_execution(execution: str) -> str:
    if execution not in EXECUTIONS:
        raise FracpassError(f"transform: execution={execution!r} is not one of {EXECUTIONS}; use 'simulate' (float32 "
                            "fake quantization, the default) or 'native' (int8 or bf16 products where the bits allow)")
    return execution


# -- device ----------------------------------------------------------------------------------------
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


def _device_kind(device) -> str:
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


def _instructions_reason(flags: Tuple[str, ...], kind: str, products: str) -> Optional[str]:
    """None if this CPU has one of ``flags`` (``kind`` dot-product instructions), else why the path is
    not used, warned once."""
    if any(f in _cpu_flags() for f in flags):
        return None
    return _once(f"this CPU has none of {', '.join(flags)} (no {kind} dot-product instructions), so {products} "
                 "would not be faster than float32")


def _support(device, flags: Tuple[str, ...], kind: str, products: str, capability: Tuple[int, int]) -> Optional[str]:
    where = "cpu" if device is None else _device_kind(device)
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
    where = "cpu" if device is None else _device_kind(device)
    if where != "cuda":
        return f"no FP8 units on {where}"
    cap = _cuda_capability(device)
    if cap is None or cap < _CUDA_FP8:
        return "no FP8 tensor cores on this GPU (sm_89 and later)"
    return None


# -- memory ----------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_large_blocks(limit: int = 1 << 30) -> Optional[str]:
    """Keep glibc's malloc from handing large freed blocks back to the kernel, so that a training step
    reuses the last step's memory instead of faulting fresh pages in. Returns None when applied, else
    why not (the process then runs as before).

    glibc serves a block above its mmap threshold (adjusted at run time, at most 32 MB) with its own
    mapping and unmaps it on free, so the next such block costs a page fault and a zeroed page per
    4 KB on first touch. A d512 transformer step at batch 32 x 128 allocates 16 blocks of 33.5 MB (fc1's
    output, GELU's, and their gradients): 60-120 thousand page faults, about 100 ms of an 800 ms native
    step and of a 2 s FP32 one (bf16 autocast's halves of them stay under the threshold). ResNet-74's
    blocks at batch 128 stay under it (8 MB at most): no change there.

    This sets the mmap threshold and the heap's trim threshold to ``limit`` bytes (``mallopt``), for the
    whole process and every framework in it: blocks up to ``limit`` then come from the heap, and the
    heap keeps up to ``limit`` bytes of freed memory at its top instead of returning them, so the
    resident set stays near its peak. The heap grows to hold a step's blocks over the first steps
    (glibc's aligned allocations do not always fit a block just freed), then no page faults in (the
    transformer: 0-2 a step from the third). The same as starting Python with the environment
    ``MALLOC_MMAP_THRESHOLD_=<limit> MALLOC_TRIM_THRESHOLD_=<limit>``, which also covers what runs
    before fracpass is imported."""
    if type(limit) is not int or not 0 < limit < 2**31:
        raise FracpassError(f"reuse_large_blocks(limit={limit!r}): limit is a number of bytes, a positive int below "
                            "2**31 (mallopt's int); the default 1 << 30 keeps blocks up to 1 GiB on the heap")
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return (f"the C library here is not glibc ({platform.system()}, {platform.libc_ver()[0] or 'unknown'}): its "
                "allocator has other settings (e.g. jemalloc's or tcmalloc's, chosen at process start)")
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError) as e:
        return f"glibc's mallopt could not be loaded ({e})"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, limit) != 1 or mallopt(_M_TRIM_THRESHOLD, limit) != 1:
        return f"glibc refused a threshold of {limit} bytes (mallopt returned 0)"
    return None


# -- codes -----------------------------------------------------------------------------------------
def _ext(t: Optional[Tensor] = None):
    """The fused CPU kernels for ``t`` (fracpass.kernels.NATIVE), or None: ``t`` on another device (the
    torch-op path, which computes the same values, runs there), or the kernels disabled or not built."""
    if t is not None and _device_kind(t.device) != "cpu":
        return None
    return _cpu_ext()


@functools.lru_cache(maxsize=None)
def _cpu_ext():
    """The fused encode / gradient-code / epilogue kernels, built on first use (fracpass.kernels.load_native:
    same switch, FRACPASS_KERNELS=0, and the same build cache); None if disabled or the build fails."""
    return kernels.load_native()


class _Coded(NamedTuple):
    """A 2-D operand as int8 codes: value = s * (t + k) + c.

    s and k (int32) hold one value, or one per index of the operand's free (non-contracted) axis:
    rows for a left operand, columns for a right one. c is a per-tensor float offset (gradients)."""

    t: Tensor
    k: Optional[Tensor]
    s: Tensor
    c: Optional[Tensor] = None
    rows: Optional[Tensor] = None  # int32 sums of t over each row / column, when already known
    cols: Optional[Tensor] = None

    @property
    def T(self) -> "_Coded":
        return _Coded(self.t.t(), self.k, self.s, self.c, self.cols, self.rows)

    def row_sums(self) -> Tensor:
        return self.rows if self.rows is not None else self.t.sum(1, dtype=torch.int32)

    def col_sums(self) -> Tensor:
        return self.cols if self.cols is not None else self.t.sum(0, dtype=torch.int32)

    def decode(self, free: int) -> Tensor:
        """The float values, with s and k along axis ``free`` (0: rows, 1: columns)."""
        ext = _ext(self.t)
        if ext is not None and self.c is None and self.t.is_contiguous() and (free == 0 or self.s.numel() == 1):
            return ext.decode(self.t, _NONE_I if self.k is None else self.k, self.s)
        if ext is not None and self.c is None and self.t.t().is_contiguous() and (free == 1 or self.s.numel() == 1):
            return ext.decode(self.t.t(), _NONE_I if self.k is None else self.k, self.s).t()
        shape = (-1, 1) if free == 0 else (1, -1)
        q = self.t.float() if self.k is None else self.t.to(torch.int32).add_(self.k.view(shape)).float()
        q.mul_(self.s.view(shape))
        return q if self.c is None else q.add_(self.c)


def _encode(x: Tensor, mn: Tensor, mx: Tensor, bits: int) -> _Coded:
    """The codes of fake_quantize(x) over [mn, mx] (per tensor, or per row of 2-D x with mn (R, 1),
    or per column with mn (1, C)): up to 7 bits the codes (zero point included) lie in [-127, 127]
    and k is None; at 8 bits they span 256 values in [-255, 255], so t = q - lo - 128, k = lo + 128."""
    scale, lo, hi = _affine_params(mn, mx, float(2**bits - 1))
    eight = bits >= MAX_INT8_BITS
    shift = lo + 128 if eight else torch.zeros_like(lo)
    ext = _ext(x)
    per_row = scale.dim() == 2 and scale.shape == (x.shape[0], 1)
    if ext is not None and x.is_contiguous() and (scale.numel() == 1 or per_row):
        t, rows, cols = ext.encode(x, scale.reshape(-1), lo.reshape(-1), hi.reshape(-1), shift.reshape(-1))
    else:
        q = torch.div(x, scale).round_()  # the simulation's formula (fracpass.quant.fake_quantize)
        q.clamp_min_(lo)
        q.clamp_max_(hi)
        t, rows, cols = (q.sub_(shift) if eight else q).to(torch.int8), None, None
    k = shift.reshape(-1).to(torch.int32) if eight else None
    return _Coded(t, k, scale.reshape(-1), None, rows, cols)


def _grad_codes(grad: Tensor, bits: int, values: bool = True) -> Tuple[Optional[Tensor], _Coded]:
    """The simulation's stochastic rounding of ``grad`` (fracpass.quant.quantize_grad_stochastic: same
    noise for the same seed) as values ghat and as codes with s * t + c == ghat, t = q - 2^(b-1). Without
    ``values`` ghat may be None (the CPU kernel then writes the codes alone)."""
    levels = float(2**bits - 1)
    mn, mx = torch.aminmax(grad)
    scale = (mx / levels - mn / levels).clamp_(min=torch.finfo(grad.dtype).tiny)
    half = float(2 ** (bits - 1))
    ext = _ext(grad)
    if ext is not None and _fused_kernels(grad) is not None:  # the simulation uses grad_sr's dither then
        ghat, t, rows, cols = ext.grad_codes(grad, mn, mx, levels, _torch_seed(), values)
        ghat = ghat if values else None
    else:
        ghat = quantize_grad_stochastic(grad, bits)
        t, rows, cols = torch.sub(ghat, mn).div_(scale).round_().sub_(half).to(torch.int8), None, None
    return ghat, _Coded(t, None, scale.reshape(1), mn + scale * half, rows, cols)


def _bias_grad(ghat: Optional[Tensor], coded: Optional[_Coded]) -> Tensor:
    """dL/d bias, the sum of ghat over rows: from the codes' column sums where they are known,
    s (sum t) + rows c in float64 rounded once (the sum of s t + c over the rows, which the simulation
    sums in float32), else ghat.sum(0)."""
    if coded is None or coded.cols is None:
        return ghat.sum(0)
    rows = coded.t.shape[0]
    return (coded.cols.double() * coded.s.double() + rows * coded.c.double()).float()


_NONE_F, _NONE_I = torch.empty(0), torch.empty(0, dtype=torch.int32)  # "none" for the CPU kernels
_NONE_B = torch.empty(0, dtype=torch.uint8)


def _given(t: Optional[Tensor]) -> Tensor:
    """An optional float32 argument of the CPU kernels: the tensor (detached), or none."""
    return _NONE_F if t is None else t.detach()


def _code_mm(a: Tensor, b: Tensor, fp8: bool = False) -> Tensor:
    """a @ b of int8 codes, exactly: int32 from torch._int_mm, or, with ``fp8`` (every code of magnitude
    <= 16, contraction <= MAX_FP8_CONTRACTION), float32 from torch._scaled_mm over the same codes in
    FP8 e4m3, the left operand row-major and the right one column-major as cuBLASLt's FP8 GEMM takes them."""
    if not fp8:
        return torch._int_mm(a, b)
    one = torch.ones((), device=a.device)
    a8 = a.to(torch.float8_e4m3fn).contiguous()
    b8 = b.t().to(torch.float8_e4m3fn).contiguous().t()
    return torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.float32)


def _affine_mm(a: _Coded, b: _Coded, bias: Optional[Tensor] = None, fp8: bool = False) -> Tensor:
    """a @ b (+ bias) for a (M, K) and b (K, N) given as codes: one int8 GEMM (int32 accumulation,
    exact for K <= MAX_CONTRACTION; with ``fp8`` an FP8 one, see _code_mm), then the scales and the
    zero-point corrections on the output."""
    k_len = a.t.shape[1]
    acc = _code_mm(a.t, b.t, fp8)
    need_rows, need_cols = b.k is not None or b.c is not None, a.k is not None or a.c is not None
    row_a = a.row_sums() if need_rows else None
    col_b = b.col_sums() if need_cols else None
    ext = _ext(a.t)
    if ext is not None and acc.dtype == torch.int32:
        pick = lambda v, empty: empty if v is None else v.reshape(-1)
        return ext.epilogue(acc, a.s.reshape(-1), b.s.reshape(-1), pick(row_a, _NONE_I), pick(b.k, _NONE_I),
                            pick(a.k, _NONE_I), pick(col_b, _NONE_I), pick(a.c, _NONE_F), pick(b.c, _NONE_F),
                            pick(bias, _NONE_F), k_len)
    sa, sb = a.s.view(-1, 1), b.s.view(1, -1)
    ka = None if a.k is None else a.k.view(-1, 1)
    kb = None if b.k is None else b.k.view(1, -1)
    if row_a is not None:
        row_a = row_a.view(-1, 1)
        if kb is not None:
            acc += row_a * kb
        if ka is not None:
            row_a = row_a + k_len * ka
    if col_b is not None:
        col_b = col_b.view(1, -1) + (k_len * kb if kb is not None else 0)
        if ka is not None:
            acc += ka * col_b
    y = acc.float().mul_(sa * sb)
    if a.c is not None:
        y += (a.c * sb) * col_b.float()
    if b.c is not None:
        y += (b.c * sa) * row_a.float()
    if a.c is not None and b.c is not None:
        y += k_len * a.c * b.c
    return y if bias is None else y.add_(bias)


class _Int8Product(torch.autograd.Function):
    """y = A @ B (+ bias) on int8 codes; backward quantizes dy as the gradient quantizer would.

    Only the codes are saved for backward. dA = dy B^T contracts over B's free axis and dB = A^T dy
    over A's: each runs on int8 when the contracted operand's scale is per tensor, else in float32
    on the decoded codes (a per-channel weight scale cannot be applied to that product's output).
    ``fp8``: which of the three products (forward, dA, dB) run on FP8 codes instead (_fp8_products)."""

    @staticmethod
    def forward(ctx, a, b, bias, ca: _Coded, cb: _Coded, gbits: int, fp8=(False, False, False)):  # type: ignore[override]
        y = _affine_mm(ca, cb, bias, fp8[0])
        ctx.save_for_backward(*ca, *cb)  # int8 codes (and small vectors), never the float operands
        ctx.gbits, ctx.fp8 = gbits, fp8
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        saved = ctx.saved_tensors
        ca, cb = _Coded(*saved[:6]), _Coded(*saved[6:])
        need_a, need_b, need_bias = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        gbits = ctx.gbits
        coded_g = None
        # which of the products run on int8 (the gradient's codes); the others read ghat
        int8_a = need_a and cb.s.numel() == 1 and cb.t.shape[1] <= MAX_CONTRACTION
        int8_b = need_b and ca.s.numel() == 1 and ca.t.shape[0] <= MAX_CONTRACTION
        if 2 <= gbits <= MAX_INT8_BITS:
            ghat, coded_g = _grad_codes(grad, gbits, values=(need_a and not int8_a) or (need_b and not int8_b))
        else:
            ghat = quantize_grad_stochastic(grad, gbits) if gbits < FULL_PRECISION else grad
        da = db = dbias = None
        int8_a, int8_b = int8_a and coded_g is not None, int8_b and coded_g is not None
        if need_a:
            da = _affine_mm(coded_g, cb.T, fp8=ctx.fp8[1]) if int8_a else ghat @ cb.decode(free=1).t()
        if need_b:
            db = _affine_mm(ca.T, coded_g, fp8=ctx.fp8[2]) if int8_b else ca.decode(free=0).t() @ ghat
        if need_bias:
            dbias = _bias_grad(ghat, coded_g)
        return da, db, dbias, None, None, None, None


# -- path choice -----------------------------------------------------------------------------------
def _operand_reason(q, role: str, path: str = "int8") -> Optional[str]:
    if q is None:
        return f"its {role} operand is not quantized by the plan"
    if isinstance(q, GatedActQuant):
        if path != "bf16":
            return (f"its {role} quantizer is gated (per-sample scales): gated ops run native as convolutions, "
                    "linear layers and batched products (bf16) only")
        wide = sorted({b for b in q.options.tolist() if not 2 <= b <= MAX_INT8_BITS})
        if wide:
            return (f"its {role} gate options include {wide} bits: bfloat16 codes need 2..{MAX_INT8_BITS} bits in "
                    "every option")
        return None
    if type(q) not in (ActQuant, WeightQuant):
        return f"its {role} quantizer is {type(q).__name__}: no native path for it"
    if q.bits > MAX_INT8_BITS:
        holds = "int8 holds" if path == "int8" else "bfloat16 holds codes of"
        return f"{role} at {'fp32' if q.bits >= FULL_PRECISION else q.bits} bits: {holds} at most {MAX_INT8_BITS}"
    if q.bits < 2:
        return f"{role} at {q.bits} bits"
    return None


def _grad_bits(gq) -> int:
    """The gradient's bits: a gated quantizer's widest option (what decides its backward path in the
    reports), -1 for a gradient quantizer with no native path."""
    if gq is None:
        return FULL_PRECISION
    if isinstance(gq, GatedGradQuant):
        return max(gq.options.tolist())
    if type(gq) is not GradQuant:
        return -1
    return gq.bits


def decide(qa, qb, gq, path: str = "int8", device=None) -> Tuple[str, str]:
    """(path, note) from the quantizers' current bits and ``device``'s units (default: this CPU): ``path``
    ("int8", or "bf16" for convolutions) or "simulated"; the note says why not native, or which
    backward products run in float32."""
    for q, role in ((qa, "first"), (qb, "second")):
        why = _operand_reason(q, role, path)
        if why is not None:
            return "simulated", why
    gbits = _grad_bits(gq)
    if gbits == -1 or (isinstance(gq, GatedGradQuant) and path != "bf16"):
        return "simulated", (f"its gradient quantizer is {type(gq).__name__}: gated ops run native as convolutions, "
                             "linear layers and batched products (bf16) only")
    why = int8_support(device) if path == "int8" else bf16_support(device)
    if why is not None:
        return "simulated", why
    if isinstance(gq, GatedGradQuant) and gbits > MAX_INT8_BITS:
        return path, (f"backward products in fp32 in batches where a sample chose a gradient option above "
                      f"{MAX_INT8_BITS} bits (gate options g={tuple(gq.options.tolist())})")
    if not 2 <= gbits <= MAX_INT8_BITS:
        return path, f"backward products in fp32 (gradient at {'fp32' if gbits >= FULL_PRECISION else gbits} bits)"
    if any(_fp32_backward(qa, qb, gbits)):
        return path, ("g x w in fp32 (the weight's per-channel scale lies on its contracted axis; a plan rule "
                      f"with weight_scale='tensor' puts it on {path} too)")
    return path, ""


def _per_channel(q) -> bool:
    return isinstance(q, WeightQuant) and q.axis is not None


def _fp32_backward(qa, qb, gbits: int) -> Tuple[bool, bool]:
    """Whether an int8 op's gradient for its first / second operand runs in float32: both when the
    gradient is not int8; the first's (g x b) when b has a per-channel weight scale, which lies on
    that product's contracted axis; the second's (a^T x g) likewise for a."""
    if not 2 <= gbits <= MAX_INT8_BITS:
        return True, True
    return _per_channel(qb), _per_channel(qa)


def _tensor_reason(*tensors: Tensor) -> Optional[str]:
    for t in tensors:
        if isinstance(t, torch._subclasses.FakeTensor):
            return "a shape-only (fake tensor) run"
        if _device_kind(t.device) not in ("cpu", "cuda"):
            return f"a {t.device.type} tensor (native paths exist for CPUs and NVIDIA GPUs only)"
        if t.dtype != torch.float32:
            return f"{t.dtype} operands"
        if t.numel() == 0:
            return "an empty operand"
    return None


def _free_axis(q, free: int) -> bool:
    """True if ``q``'s scale is per tensor or along the free (non-contracted) axis ``free`` of a 2-D operand."""
    return not isinstance(q, WeightQuant) or q.axis is None or q.axis % 2 == free


def _linear_reason(x: Tensor, weight: Tensor, aq, wq) -> Optional[str]:
    if not isinstance(aq, ActQuant) or not _free_axis(wq, 0):
        return "the input's scale is not per tensor or the weight's is not per output channel"
    if weight.dim() != 2 or x.dim() < 1:
        return f"a {weight.dim()}-D weight or {x.dim()}-D input"
    k = x.shape[-1]
    m, n = x.numel() // max(k, 1), weight.shape[0]
    return _size_reason(k) or _tensor_reason(x, weight) or _cuda_mm_reason(x.device, m, k, n) or _intensity_reason(m, k, n)


def _matmul_reason(a: Tensor, b: Tensor, qa, qb) -> Optional[str]:
    if b.dim() != 2 or a.dim() < 1:
        return (f"a {b.dim()}-D right operand: torch._int_mm multiplies 2-D matrices and a batched int8 product is "
                "not implemented here")
    if (a.dim() != 2 and isinstance(qa, WeightQuant)) or not _free_axis(qa, 0) or not _free_axis(qb, 1):
        return "a weight operand's channel axis is the contracted one"
    k = a.shape[-1]
    m, n = a.numel() // max(k, 1), b.shape[1]
    return _size_reason(k) or _tensor_reason(a, b) or _cuda_mm_reason(a.device, m, k, n) or _intensity_reason(m, k, n)


def _batched_matmul_reason(a: Tensor, b: Tensor, qa, qb) -> Optional[str]:
    if a.dim() < 2 or b.dim() < 2:
        return (f"a {min(a.dim(), b.dim())}-D operand (matrix-vector products are left to the simulation)")
    if _per_channel(qa) or _per_channel(qb):
        return "a per-channel weight scale on a batched product's operand"
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    return _tensor_reason(a, b) or _batched_intensity_reason(m, k, n)


def _batched_intensity_reason(m: int, k: int, n: int) -> Optional[str]:
    """Too small a product per batch entry for bfloat16 to pay (the codes and the scaling cost per
    element; benchmarks/native_crossover.py --bmm)."""
    elements = m * k + k * n + m * n
    intensity = m * k * n / elements if elements else 0.0
    if intensity >= MIN_BMM_INTENSITY:
        return None
    return (f"a small batched product ({m}x{k}x{n} per batch entry: {intensity:.0f} multiply-adds per operand or "
            f"output element, under fracpass.native.MIN_BMM_INTENSITY = {MIN_BMM_INTENSITY:g}): encoding and "
            "rescaling would cost more than the bf16 product saves")


def _cuda_mm_reason(device, m: int, k: int, n: int) -> Optional[str]:
    """torch._int_mm's limits on CUDA (aten/src/ATen/native/cuda/Blas.cpp, _int_mm_out_cuda: the left
    operand's rows above 16, its columns and the right operand's a multiple of 8) for all three products
    of an (M, K) x (K, N) op: the forward, (M, N) x (N, K) for the first operand's gradient and
    (K, M) x (M, N) for the second's. Nothing on a CPU, whose int8 GEMM takes any shape."""
    if _device_kind(device) != "cuda" or (min(m, k) > 16 and m % 8 == 0 and k % 8 == 0 and n % 8 == 0):
        return None
    return (f"a {m}x{k}x{n} product: torch._int_mm on CUDA needs M and K above 16 and M, K and N multiples of 8 "
            "(for the forward product and both gradient products)")


def _fp8_products(device, abits: int, bbits: int, gbits: int, m: int, k: int, n: int) -> Tuple[bool, bool, bool]:
    """Which of an int8 op's products run on FP8 e4m3 instead (the forward a x b, then the gradient
    products g x b^T and a^T x g): those whose two operands' codes are exact in e4m3, which holds every
    integer of magnitude <= 16 (activation and weight codes up to 4 bits lie in [-15, 15], gradient
    codes up to 5 bits in [-16, 15]), on a device with FP8 units (fp8_support), with the dimensions
    torch._scaled_mm takes on CUDA (multiples of 16) and a contraction whose float32 accumulation of
    products <= 16^2 stays exact (< 2^24)."""
    if fp8_support(device) is not None or m % 16 or k % 16 or n % 16:
        return False, False, False
    a4, b4, g5 = abits <= 4, bbits <= 4, 2 <= gbits <= 5
    fits = lambda contraction: contraction <= MAX_FP8_CONTRACTION
    return a4 and b4 and fits(k), g5 and b4 and fits(n), a4 and g5 and fits(m)


def _int8_call_fp8(qa, qb, gq, device, m: int, k: int, n: int) -> Tuple[bool, bool, bool]:
    """_fp8_products for an int8 call, its device and (M, K, N) kept on its first quantizer for the
    reports (_last_call_fp8)."""
    qa.__dict__["_native_mm"] = (device, m, k, n)
    return _fp8_products(device, qa.bits, qb.bits, _grad_bits(gq), m, k, n)


def _last_call_fp8(qa, qb, gq) -> Tuple[bool, bool, bool]:
    """_fp8_products at the quantizers' current bits for the device and shape of the op's last int8 call
    (none before one)."""
    last = qa.__dict__.get("_native_mm")
    if last is None:
        return False, False, False
    device, m, k, n = last
    return _fp8_products(device, qa.bits, qb.bits, _grad_bits(gq), m, k, n)


def _size_reason(k: int) -> Optional[str]:
    return None if k <= MAX_CONTRACTION else f"a contraction of {k} > {MAX_CONTRACTION} overflows int32 accumulation"


def _intensity_reason(m: int, k: int, n: int) -> Optional[str]:
    """Too small a product for int8 to pay: the int8 path's passes over the operands and the output
    (codes, sums, the epilogue) cost per element, the GEMM time it saves per multiply-add."""
    elements = m * k + k * n + m * n
    intensity = m * k * n / elements if elements else 0.0
    if intensity >= MIN_INTENSITY:
        return None
    return (f"a small product ({m}x{k}x{n}: {intensity:.0f} multiply-adds per operand or output element, under "
            f"fracpass.native.MIN_INTENSITY = {MIN_INTENSITY:g}): encoding and rescaling would cost more than the "
            "int8 GEMM saves")


def _remember(q, why: Optional[str]) -> None:
    """Keep the last call's shape-dependent fallback reason on the op's first quantizer (for op_paths)."""
    if q is not None and q.__dict__.get("_native_last", 0) != why:
        q.__dict__["_native_last"] = why


# -- the native calls --------------------------------------------------------------------------------
def _call(q, x: Tensor, gate: Optional[Tensor] = None) -> Tensor:
    """q(x), or q(x, gate) for the activation and gradient quantizers of a gated op (a gated op's come
    with its gate: the lowering checked that; export's markers take the same arguments). A gated
    op's weight quantizer is static: it takes no gate."""
    if q is None:
        return x
    return q(x, gate) if gate is not None and getattr(q, "role", None) != "weight" else q(x)


def native_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], aq: Optional[nn.Module],
                  wq: Optional[nn.Module], gq: Optional[nn.Module], gate: Optional[Tensor] = None) -> Tensor:
    """``gq(F.linear(aq(x), wq(weight), bias))``, on int8 codes where the current bits allow; a gated
    linear (``gate``: its gate's one-hot choice) on bfloat16 codes with per-sample scales."""
    if gate is not None:
        return _gated_linear(x, weight, bias, aq, wq, gq, gate)
    why = decide(aq, wq, gq, device=x.device)[0] != "int8" or _linear_reason(x, weight, aq, wq)
    if why:
        if why is not True:
            _remember(aq, why)
        return _call(gq, F.linear(_call(aq, x), _call(wq, weight), bias))
    _remember(aq, None)
    x2 = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        ca = _encode(x2.detach(), *aq.qrange(x), aq.bits)
        cw = _encode(weight.detach(), *wq.qrange(weight), wq.bits)
    fp8 = _int8_call_fp8(aq, wq, gq, x.device, *x2.shape, weight.shape[0])
    y = _Int8Product.apply(x2, weight.t(), bias, ca, cw.T, _grad_bits(gq), fp8)
    return y.view(*x.shape[:-1], weight.shape[0])


def native_matmul(a: Tensor, b: Tensor, qa: Optional[nn.Module], qb: Optional[nn.Module],
                  gq: Optional[nn.Module], gate: Optional[Tensor] = None) -> Tensor:
    """``gq(torch.matmul(qa(a), qb(b)))`` where the bits allow: on int8 codes for a 2-D right operand,
    on bfloat16 codes for a batched one (torch.bmm, attention's products), gated ones (``gate``: its
    gate's one-hot choice) with per-sample scales."""
    if gate is not None:
        return _gated_matmul(a, b, qa, qb, gq, gate)
    path = "int8" if b.dim() == 2 else "bf16"
    why = decide(qa, qb, gq, path=path, device=a.device)[0] != path or (
        _matmul_reason(a, b, qa, qb) if path == "int8" else _batched_matmul_reason(a, b, qa, qb))
    if why:
        if why is not True:
            _remember(qa, why)
        return _call(gq, torch.matmul(_call(qa, a), _call(qb, b)))
    _remember(qa, None)
    qa.__dict__["_native_path"] = path  # op_paths reports the path of the last call
    if path == "bf16":
        with torch.no_grad():
            ca, sa = _bf16_codes(a.detach(), *qa.qrange(a), float(2**qa.bits - 1))
            cb, sb = _bf16_codes(b.detach(), *qb.qrange(b), float(2**qb.bits - 1))
        return _Bf16Matmul.apply(a, b, None, ca, sa, cb, sb, _grad_bits(gq), None)
    a2 = a.reshape(-1, a.shape[-1])
    with torch.no_grad():
        ca = _encode(a2.detach(), *qa.qrange(a), qa.bits)
        cb = _encode(b.detach(), *qb.qrange(b), qb.bits)
    fp8 = _int8_call_fp8(qa, qb, gq, a.device, *a2.shape, b.shape[1])
    y = _Int8Product.apply(a2, b, None, ca, cb, _grad_bits(gq), fp8)
    return y.view(*a.shape[:-1], b.shape[1])


class _Bf16Matmul(torch.autograd.Function):
    """y = a_hat @ b_hat for batched operands (broadcast as torch.matmul does) on bfloat16 codes:
    forward s_a s_b (q_a @ q_b); backward, with ghat = s_g t + c,
    da = s_g s_b (t @ q_b^T) + c s_b rowsum(q_b) and db = s_a s_g (q_a^T @ t) + c s_a colsum(q_a)
    (the offset's products with ones are the codes' sums, exact in float32). The codes are exact in
    bfloat16 and the products accumulate in float32; each product's output is rounded to bfloat16 (unit
    roundoff 2^-8), as on the convolution path. A gradient above 8 bits (or unquantized) runs both
    backward products in float32 on ghat. Saved for backward: the bfloat16 codes.

    Gated (``gating``): the samples lie on dim 0 of both operands and of y, which no product contracts,
    so every scale and offset is per sample (a factor per sample on each output); samples whose
    gradient option exceeds 8 bits get their entries of da and db in float32 on ghat; the gate's
    gradient sums both operands' <dL/d(operand), Q_k(operand)>, from da, db and the saved float inputs."""

    @staticmethod
    def forward(ctx, a, b, onehot, qa, sa, qb, sb, gbits, gating):  # type: ignore[override]
        y = _scale_out(torch.matmul(qa, qb), sa.new_ones(1), None, sa * sb)
        ctx.gate_grad = onehot is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(qa, sa, qb, sb, *((a.detach(), b.detach(), onehot) if ctx.gate_grad else ()))
        ctx.gbits, ctx.shapes, ctx.gating = gbits, (a.shape, b.shape), gating
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        qa, sa, qb, sb = ctx.saved_tensors[:4]
        gating: Optional[_Gating] = ctx.gating
        need_a, need_b = ctx.needs_input_grad[0] or ctx.gate_grad, ctx.needs_input_grad[1] or ctx.gate_grad
        grad = _dense(grad)
        mn, mx, levels = _grad_range(grad, ctx.gbits, gating)
        exact = _exact_codes(levels)
        a_hat = lambda: qa.float().mul_(_per_row_view(sa, qa))
        b_hat = lambda: qb.float().mul_(_per_row_view(sb, qb))
        da = db = None
        if exact is None or not bool(exact.any()):  # float32 products on ghat
            ghat = _simulated_grad(grad, mn, mx, levels, ctx.gbits)
            if need_a:
                da = ghat @ b_hat().transpose(-2, -1)
            if need_b:
                db = a_hat().transpose(-2, -1) @ ghat
        else:
            wide = None if bool(exact.all()) else (~exact).nonzero().view(-1)
            ghat, t, sg, c, _ = _bf16_grad_codes(grad, mn, mx, levels, ctx.gbits, values=wide is not None)
            if gating is not None and gating.one_group:  # one option group: one s_g and c
                sg, c = sg[:1], c[:1]
            if need_a:
                rowsum = qb.sum(-1, dtype=torch.float32).unsqueeze(-2)  # (..., 1, K): ones @ q_b^T
                da = _scale_out(t @ qb.transpose(-2, -1), sg.new_ones(1), None, sg * sb).add_(
                    rowsum.mul_(_per_row_view(c * sb, rowsum)))
            if need_b:
                colsum = qa.sum(-2, dtype=torch.float32).unsqueeze(-1)  # (..., K, 1): q_a^T @ ones
                db = _scale_out(qa.transpose(-2, -1) @ t, sg.new_ones(1), None, sa * sg).add_(
                    colsum.mul_(_per_row_view(c * sa, colsum)))
            if wide is not None:  # those samples' entries again, in float32 on ghat (no product mixes samples)
                g_w = _take(ghat, wide)
                if need_a:
                    da.index_copy_(0, wide, g_w @ _take(b_hat(), wide).transpose(-2, -1))
                if need_b:
                    db.index_copy_(0, wide, _take(a_hat(), wide).transpose(-2, -1) @ g_w)
        d_onehot = None
        if ctx.gate_grad:
            a, b, onehot = ctx.saved_tensors[4:]
            levels_k = gating.act_levels
            d_onehot = (onehot_grad(a, gating.mn, gating.mx, levels_k, onehot, da)
                        + onehot_grad(b, gating.mn_b, gating.mx_b, levels_k, onehot, db))
        a_shape, b_shape = ctx.shapes
        da = da.sum_to_size(a_shape) if da is not None and ctx.needs_input_grad[0] else None  # broadcast: summed
        db = db.sum_to_size(b_shape) if db is not None and ctx.needs_input_grad[1] else None
        return da, db, d_onehot, None, None, None, None, None, None


def _gated_matmul_reason(a: Tensor, b: Tensor, qa, qb, gate: Tensor) -> Optional[str]:
    if not (isinstance(qa, GatedActQuant) and isinstance(qb, GatedActQuant)):
        return "a gated product with a weight operand (gated matmul runs native with two gated activations)"
    if not torch.equal(qa.options, qb.options):
        return "its operands' gate options differ"
    if a.dim() < 3 or a.shape[:-2] != b.shape[:-2] or a.shape[0] != gate.shape[0]:
        return (f"operands {tuple(a.shape)} x {tuple(b.shape)} whose batch dims differ or do not lead with the gate's "
                f"batch of {gate.shape[0]} (per-sample rows back to back are left to the simulation)")
    return _tensor_reason(a, b) or _batched_intensity_reason(a.shape[-2], a.shape[-1], b.shape[-1])


def _gated_matmul(a: Tensor, b: Tensor, qa, qb, gq, gate: Tensor) -> Tensor:
    """A gated batched product (attention's q k^T and P v in a gated block): each sample's entries at
    its option's bits over its option group's range, as bfloat16 codes; the product on bfloat16, each
    sample's scales on its entries of the output."""
    why = decide(qa, qb, gq, path="bf16", device=a.device)[0] != "bf16" or _gated_matmul_reason(a, b, qa, qb, gate)
    if why:
        if why is not True:
            _remember(qa, why)
        return _call(gq, torch.matmul(_call(qa, a, gate), _call(qb, b, gate)), gate)
    _remember(qa, None)
    with torch.no_grad():
        choice = gate.detach().argmax(1)
        act_levels = qa.option_levels.to(torch.float32)
        (mn_a, mx_a), (mn_b, mx_b) = qa.row_range(a, choice), qb.row_range(b, choice)
        mn_a, mx_a, mn_b, mx_b = (v.float().contiguous() for v in (mn_a, mx_a, mn_b, mx_b))
        ca, sa = _bf16_codes(a.detach(), mn_a, mx_a, act_levels[choice])
        cb, sb = _bf16_codes(b.detach(), mn_b, mx_b, act_levels[choice])
        one_group = bool(choice.min() == choice.max())
    gating = _Gating(choice, mn_a, mx_a, act_levels,
                     gq.option_levels.to(torch.float32) if isinstance(gq, GatedGradQuant) else None, one_group,
                     mn_b, mx_b)
    if one_group:
        sa, sb = sa[:1], sb[:1]
    return _Bf16Matmul.apply(a, b, gate, ca, sa, cb, sb, _grad_bits(gq), gating)


# -- conv2d: oneDNN's int8 convolution forward (fp32 output); backward in float32 on decoded codes --------
def _conv_reason(x: Tensor, weight: Tensor, padding, aq, wq) -> Optional[str]:
    if not isinstance(aq, ActQuant) or not isinstance(wq, WeightQuant) or wq.axis not in (0, -4):
        return "the input's scale is not per tensor or the weight's is not per output channel"
    if x.dim() != 4 or weight.dim() != 4:
        return f"a {x.dim()}-D input (oneDNN's int8 convolution here takes a batched 4-D input)"
    if isinstance(padding, str):
        return f"padding={padding!r}"
    if not hasattr(torch.ops.onednn, "qconv_pointwise"):
        return "this torch build has no oneDNN int8 convolution (torch.ops.onednn.qconv_pointwise)"
    if _device_kind(x.device) != "cpu":
        return "not a CPU tensor (oneDNN's int8 convolution runs on CPUs)"
    return _tensor_reason(x, weight)


class _Int8Conv2d(torch.autograd.Function):
    """Forward: oneDNN's int8 convolution over uint8 activation codes (zero point included, so zero
    padding is the real zero) and int8 weight codes, scales applied by oneDNN, int32 accumulation
    (exact). Backward: both products in float32 on the decoded codes, as the simulation computes
    them (oneDNN has no int8 weight-gradient or transposed convolution here); codes are what is saved."""

    @staticmethod
    def forward(ctx, x, weight, bias, u, s, zp, cw, stride, padding, dilation, groups, gbits):  # type: ignore[override]
        x_scale, x_zp = float(s), int(zp)  # CPU tensors: a memory read, no device sync
        cout, cg = weight.shape[0], weight.shape[0] // groups
        tw, w_scale = cw.t, cw.s
        if cw.k is not None:
            # 8-bit weights are shifted (t = q - k): one extra all-ones output channel per group gives the
            # window sums of x-hat that the correction s_w k * sum(x-hat) needs, inside the same int8 conv
            ones = tw.new_ones(groups, 1, *tw.shape[1:])
            tw = torch.cat([tw.view(groups, cg, *tw.shape[1:]), ones], 1).view(-1, *tw.shape[1:])
            w_scale = torch.cat([w_scale.view(groups, cg), w_scale.new_ones(groups, 1)], 1).view(-1)
        w_scale = w_scale.contiguous()
        packed = torch.ops.onednn.qconv_prepack(tw, w_scale, x_scale, x_zp, list(stride), list(padding),
                                                list(dilation), groups, list(u.shape))
        y = torch.ops.onednn.qconv_pointwise(u, x_scale, x_zp, packed, w_scale,
                                             torch.zeros(w_scale.numel(), dtype=torch.int64),
                                             bias if cw.k is None else None, list(stride), list(padding),
                                             list(dilation), groups, 1.0, 0, torch.float32, "none", [], "")
        keep = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        if cw.k is not None:
            n, _, h, w = y.shape
            y5 = y.view(n, groups, cg + 1, h, w) if y.is_contiguous() else y.unflatten(1, (groups, cg + 1))
            out = torch.empty((n, cout, h, w), memory_format=keep)
            corr = (cw.s * cw.k).view(1, groups, cg, 1, 1)
            torch.addcmul(y5[:, :, :cg], y5[:, :, cg:], corr, out=out.unflatten(1, (groups, cg)))
            if bias is not None:
                out += bias.view(1, -1, 1, 1)
            y = out
        else:
            y = y.contiguous(memory_format=keep)
        ctx.save_for_backward(u, s, zp, cw.t, cw.k, cw.s)
        ctx.conv = (stride, padding, dilation, groups, bias is not None, gbits)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        u, s, zp, tw, kw, sw = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias, gbits = ctx.conv
        # the incoming layout, as the simulation's gradient quantizer sees it (same dither, keyed by memory index)
        ghat = quantize_grad_stochastic(grad, gbits) if gbits < FULL_PRECISION else grad
        ext = _ext(u)
        if ext is not None and (u.is_contiguous() or u.is_contiguous(memory_format=torch.channels_last)):
            x_hat = ext.decode_u8(u, zp, s)
        else:
            x_hat = (u.float() - zp).mul_(s)
        w_hat = _Coded(tw.view(tw.shape[0], -1), kw, sw).decode(free=0).view(tw.shape)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.convolution_backward(ghat, x_hat, w_hat, [w_hat.shape[0]] if has_bias else None,
                                                         list(stride), list(padding), list(dilation), False, [0, 0],
                                                         groups, mask)
        return (dx, dw, db) + (None,) * 9


def _tuple_arg(v, n: int) -> list:
    """A convolution's int-or-sequence argument (stride, padding, ...) as a list of n ints."""
    return [v] * n if isinstance(v, int) else list(v)


def native_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int,
                  aq: Optional[nn.Module], wq: Optional[nn.Module], gq: Optional[nn.Module]) -> Tensor:
    """``gq(F.conv2d(aq(x), wq(weight), bias, ...))``, the forward on oneDNN's int8 convolution where the bits allow."""
    why = decide(aq, wq, gq, device=x.device)[0] != "int8" or _conv_reason(x, weight, padding, aq, wq)
    if why:
        if why is not True:
            _remember(aq, why)
        return _call(gq, F.conv2d(_call(aq, x), _call(wq, weight), bias, stride, padding, dilation, groups))
    _remember(aq, None)
    stride, padding, dilation = _tuple_arg(stride, 2), _tuple_arg(padding, 2), _tuple_arg(dilation, 2)
    with torch.no_grad():
        mn, mx = aq.qrange(x)
        scale, lo, _ = _affine_params(mn, mx, float(2**aq.bits - 1))
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            nhwc = x.detach().permute(0, 2, 3, 1)  # contiguous: codes in the same order, a channels-last view
            u = _encode_shifted(nhwc.reshape(-1, nhwc.shape[-1]), mn, mx, aq.bits).view(nhwc.shape).permute(0, 3, 1, 2)
        else:
            u = _encode_shifted(x.detach().contiguous().view(-1, x.shape[-1]), mn, mx, aq.bits).view(x.shape)
        cw = _encode(weight.detach().reshape(weight.shape[0], -1), *(m.reshape(-1, 1) for m in wq.qrange(weight)),
                     wq.bits)
        cw = cw._replace(t=cw.t.view(weight.shape))
    return _Int8Conv2d.apply(x, weight, bias, u, scale, -lo, cw, stride, padding, dilation, groups, _grad_bits(gq))


def _encode_shifted(x: Tensor, mn: Tensor, mx: Tensor, bits: int) -> Tensor:
    """uint8 codes q - lo = q + zero point in [0, 2^b - 1] of a per-tensor fake_quantize(x)."""
    scale, lo, hi = _affine_params(mn, mx, float(2**bits - 1))
    ext = _ext(x)
    if ext is not None and x.is_contiguous():
        t, _, _ = ext.encode(x, scale.reshape(-1), lo.reshape(-1), hi.reshape(-1), lo.reshape(-1))
        return t.view(torch.uint8)  # codes up to 255 wrapped through int8: the same bytes
    q = torch.div(x, scale).round_()
    q.clamp_min_(lo)
    q.clamp_max_(hi)
    return q.sub_(lo).to(torch.uint8)


# -- convolutions on bfloat16 codes (every conv kind) ---------------------------------------------------
def _bf16_codes(x: Tensor, mn: Tensor, mx: Tensor, levels) -> Tuple[Tensor, Tensor]:
    """(codes q = clamp(round(x / s), lo, hi) as bfloat16 in x's layout, s): fake_quantize(x) == s * q,
    with ``levels`` = 2^bits - 1. Per tensor, or per sample (gated: mn, mx, levels one per row of dim
    0, s then too). |q| <= 255, so bfloat16 holds every code exactly; the real zero is code 0."""
    rows = torch.is_tensor(levels) and levels.numel() > 1
    if rows:  # one range per sample: fracpass.gating.fake_quantize_rows's arithmetic
        levels = levels.to(torch.float32)
    scale, lo, hi = _affine_params(mn, mx, levels if rows else float(levels))
    ext = _ext(x)
    along_rows = scale.numel() == 1 or (x.dim() > 0 and scale.dim() > 0 and scale.numel() == scale.shape[0] == x.shape[0]
                                      and _rows_outer_dense(x))
    if ext is not None and along_rows:  # per tensor, per sample, or per output channel of a weight (dim 0)
        return ext.encode_bf16(_dense(x), scale.reshape(-1), lo.reshape(-1), hi.reshape(-1), False, True)[0], scale.reshape(-1)
    if rows:
        scale, lo, hi = (_per_row_view(v, x) for v in (scale, lo, hi))
    q = torch.div(x, scale).round_()  # the simulation's formula (fracpass.quant.fake_quantize)
    q = torch.maximum(q, lo)
    q = torch.minimum(q, hi)
    return q.to(torch.bfloat16), scale.reshape(-1)


class _Kept(NamedTuple):
    """A per-tensor-input convolution's input codes as bytes u = q - lo (what backward keeps; the int8
    forward's operand) and whether its input and weight gradients' products run on int8."""

    u: Tensor
    lo: float
    int8_dx: bool = False
    int8_dw: bool = False  # the weight gradient's on the VNNI kernel (_int8_reasons)
    hand_to: Optional["_GradSink"] = None  # where the input gradient's product goes unscaled (_GradSink)


def _bf16_input_codes(x: Tensor, mn: Tensor, mx: Tensor, bits: int,
                      codes: bool = True) -> Tuple[Optional[Tensor], Tensor, Optional[tuple]]:
    """_bf16_codes of a convolution's input at ``bits`` with one range (per tensor), and ``kept``: the same
    codes as bytes q - lo with lo (what _narrow_codes keeps for backward), written by the kernel in the
    same pass, or None where the kernels do not run (_narrow_codes then narrows q itself). Without
    ``codes`` (the int8 forward reads the bytes) only the bytes where the kernels run: the codes are None."""
    ext = _ext(x)
    if ext is None or not _rows_outer_dense(x) or x.numel() == 0 or bits > MAX_INT8_BITS:
        return _bf16_codes(x, mn, mx, float(2**bits - 1)) + (None,)
    scale, lo, hi = _affine_params(mn, mx, float(2**bits - 1))
    q, u = ext.encode_bf16(x, scale.reshape(-1), lo.reshape(-1), hi.reshape(-1), True, codes)
    return q if codes else None, scale.reshape(-1), _Kept(u, float(lo))


def _per_row_view(v: Tensor, like: Tensor) -> Tensor:
    """A per-tensor or per-sample vector ``v`` shaped to broadcast against ``like`` (N, C, ...)."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1)) if v.numel() > 1 else v.reshape(())


def _simulated_grad(grad: Tensor, mn: Optional[Tensor], mx: Optional[Tensor], levels: Optional[Tensor],
                    gbits: int) -> Tensor:
    """``grad`` as the simulation's gradient quantizer rounds it: per sample over [mn, mx] at ``levels``
    (gated, fracpass.gating.quantize_grad_rows), per tensor at ``gbits``, or as is (``levels`` None)."""
    if levels is None:
        return grad
    if levels.numel() > 1:
        return quantize_grad_rows(grad, mn, mx, levels)
    return quantize_grad_stochastic(grad, gbits)


def _bf16_grad_codes(grad: Tensor, mn: Tensor, mx: Tensor, levels: Tensor, gbits: int,
                     values: bool, bytes: bool = False) -> Tuple[Optional[Tensor], Tensor, Tensor, Tensor, Optional[tuple]]:
    """The simulation's stochastic rounding of ``grad`` over [mn, mx] at ``levels`` (per tensor:
    fracpass.quant.quantize_grad_stochastic; one of each per sample: fracpass.gating.quantize_grad_rows;
    same noise for the same seed) as codes t in bfloat16 with ghat = s * t + c (s, c per tensor or per
    sample); ghat itself only if ``values``. t = q - k with k = round(-min / s) (|t| <= 2^b - 1:
    exact), which leaves |c| <= s / 2 when the range holds zero, so the offset's correction stays small
    beside the product and bfloat16's rounding of the two cannot cancel. Last: with ``bytes`` (one
    range, where the kernels run), q as bytes with -k, t's offset (the int8 input gradient's operand,
    as _bf16_input_codes's ``kept``), else None."""
    grad = _dense(grad)  # the simulation's gradient quantizers read this layout, in memory order
    scale = (mx / levels - mn / levels).clamp_(min=torch.finfo(grad.dtype).tiny)
    zero = torch.minimum(torch.round(-mn / scale).clamp_(min=0.0), levels)
    ext = _ext(grad)
    if ext is not None and _fused_kernels(grad) is not None:  # the simulation uses grad_sr's dither then
        bytes = bytes and levels.numel() == 1
        ghat, t, u = ext.grad_codes_bf16(grad, mn.reshape(-1), mx.reshape(-1), levels.reshape(-1), zero.reshape(-1),
                                         _torch_seed(), values, bytes)
        ghat = ghat if values else None
        kept = (u, -float(zero)) if bytes else None
    else:
        ghat = _simulated_grad(grad, mn, mx, levels, gbits)
        v = lambda a: _per_row_view(a, grad)
        t = torch.sub(ghat, v(mn)).div_(v(scale)).round_().sub_(v(zero)).to(torch.bfloat16)
        kept = None
    return ghat, t, scale.reshape(-1), (mn + scale * zero).reshape(-1), kept


def _scale_out(v: Tensor, scale: Tensor, bias: Optional[Tensor], rows: Optional[Tensor] = None,
               addend: Optional[Tensor] = None) -> Tensor:
    """float32 v * scale (* rows) (+ bias) (+ addend), scale and bias per channel (dim 1) or per tensor,
    ``rows`` a factor per sample (dim 0) or per tensor, ``addend`` (float32, one sample's shape (1, ...))
    the same for every sample, in v's layout; v * scale + addend rounds twice, as the separate ops do."""
    if rows is not None and rows.numel() == 1:  # one factor for every sample: into the scale (the flat loop)
        scale, rows = scale * rows.reshape(()), None
    ext = _ext(v)
    if ext is not None and _rows_outer_dense(v) and (addend is None or _same_sample_layout(addend, v)):
        return ext.scale_bf16(v, scale.reshape(-1).float(), _NONE_F if bias is None else bias.detach().reshape(-1),
                              _NONE_F if rows is None else rows.reshape(-1).float(),
                              _NONE_F if addend is None else _memory_order(addend))
    shape = (1, -1) + (1,) * (v.dim() - 2)
    s = scale.view(shape) if scale.numel() > 1 else scale
    if rows is not None:
        s = s * _per_row_view(rows, v)
    y = torch.mul(v, s.reshape(1) if s.dim() == 0 else s)  # bf16 x fp32 -> fp32 (a 0-dim fp32 would give bf16)
    y = y if bias is None else y.add_(bias.view(shape))
    return y if addend is None else y.add_(addend)


def _same_sample_layout(addend: Tensor, v: Tensor) -> bool:
    """Whether ``addend`` (1, ...) is one float32 sample of ``v`` laid out as v's samples are, densely,
    so that its memory order is each of v's rows' (scale_bf16 adds it row by row)."""
    return (addend.dtype == torch.float32 and addend.dim() == v.dim() and addend.shape[0] == 1
            and addend.shape[1:] == v.shape[1:] and _rows_outer_dense(addend)
            and all(a == b for a, b, n in zip(addend.stride()[1:], v.stride()[1:], v.shape[1:]) if n > 1))


class _Gating(NamedTuple):
    """A gated op's per-sample state for _Bf16Conv: each sample's option (``choice``), the activation's
    per-sample range and its options' level counts (the gate's gradient needs them), and the gradient
    quantizer's options' level counts (None: the gradient is quantized per tensor, ``gbits``). A batch
    whose samples all chose one option shares one range, so it runs as a static op."""

    choice: Tensor
    mn: Tensor
    mx: Tensor
    act_levels: Optional[Tensor]
    grad_levels: Optional[Tensor]
    one_group: bool  # every sample chose the same option: its scales hold one value for the whole batch
    mn_b: Optional[Tensor] = None  # a gated product's second operand's per-sample range
    mx_b: Optional[Tensor] = None


class _Bf16Conv(torch.autograd.Function):
    """A convolution (any dim, grouped, transposed) on bfloat16 codes: forward y = s_a s_w conv(q_a, q_w)
    and, in backward, dx = conv^T(ghat, w_hat) and dw = conv_w(ghat, x_hat) with ghat = s_g t + c.

    The codes are exact in bfloat16 and oneDNN accumulates in float32; what is lost is the rounding of
    each product's output to bfloat16 (unit roundoff 2^-8), before the scales are applied in float32.
    The gradient's offset c multiplies a float32 convolution of ones: over one sample for dx, over the
    batch sum of the input codes and one channel per group for dw (for a 2-D ungrouped convolution, the
    kernels' window sums: _ones_input_grad, _ones_weight_grad). dx runs in float32 on the decoded
    codes when the weight's scale is per output channel (it lies on that product's contracted axis) or
    the gradient has more than 8 bits. Saved for backward: the bfloat16 codes, never the float operands.

    Gated (``gating``): s_a, s_g and c hold one value per sample, on the free axis of y and dx, so they
    scale those outputs per sample; dw contracts over the samples, so it runs once per option group
    (whose samples share their scales). The gate's gradient needs the float input: it is saved then."""

    @staticmethod
    def forward(ctx, x, weight, bias, onehot, qa, sa, qw, sw, conv, gbits, gating, kept=None):  # type: ignore[override]
        y, _, saved = _conv_forward(ctx, x, bias, onehot, qa, sa, qw, sw, conv, gbits, gating, kept)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _conv_backward(ctx, ctx.saved_tensors, grad) + (None,) * 8


def _conv_forward(ctx, x, bias, onehot, qa, sa, qw, sw, conv, gbits, gating, kept, scaled=True):
    """_Bf16Conv's forward: (y, or None unless ``scaled``, its bfloat16 product v, the tensors to save);
    sets ctx's attributes. ``kept``: qa as bytes and their offset (_bf16_input_codes), or None; qa None:
    the product runs on int8 from those bytes (_int8_product)."""
    stride, padding, dilation, transposed, output_padding, groups = conv
    if qa is None:
        v = _int8_product(kept, qw, conv)
    else:
        v = torch.ops.aten.convolution(qa, qw, None, stride, padding, dilation, transposed, output_padding, groups)
    y = _scale_out(v, _out_channel_scale(sw, transposed, groups), bias, sa) if scaled else None
    ctx.gate_grad = onehot is not None and ctx.needs_input_grad[3]
    ctx.int8 = (kept.int8_dx, kept.int8_dw) if kept is not None else (False, False)
    ctx.hand_to = kept.hand_to if kept is not None else None
    keep = (x.detach(), onehot) if ctx.gate_grad else ()
    ctx.conv, ctx.gbits, ctx.gating, ctx.has_bias = conv, gbits, gating, bias is not None
    return y, v, [_narrow_codes(ctx, qa, kept), sa, qw, sw, *keep]


# The bf16 path's forward product of a 2-D convolution on oneDNN's int8 convolution where it applies
# (_int8_reasons); False: always the bf16 convolution (the same product: tests/test_native_int8fwd.py).
INT8_FORWARD = True


# The same for the input gradient's product of a stride-1 one, and the weight gradient's on the
# AVX512-VNNI kernel (_int8_reasons).
INT8_INPUT_GRAD = True
INT8_WEIGHT_GRAD = True

# 8-bit weight codes outside int8 split onto copies of their input channels (_int8_product) while those are
# at most this fraction of the input channels (at least 4), else the shift: ResNet-74's per-tensor 8-bit
# weights put 1-3 of 16-64 input channels there; 4 extra cost oneDNN's convolution 0-7 % here, the shift's
# float32 output and correction pass 25-50 %. 0: always the shift.
SPLIT_CHANNELS = 0.25


def _split_limit(in_channels: int) -> int:
    """How many extra input channels a convolution's split weight codes may take (SPLIT_CHANNELS)."""
    return max(4, int(SPLIT_CHANNELS * in_channels)) if SPLIT_CHANNELS > 0 else 0


def _int8_reasons(x: Tensor, weight: Tensor, conv, sw: Tensor, gbits: int) -> Tuple[Optional[str], ...]:
    """Why each of a per-tensor-input convolution's products does not run on int8 (None where it does):
    (the forward, on oneDNN's int8 convolution: the input codes' bytes (0..255, the zero point -lo) times
    the weight's codes as int8, int32 accumulation, the same bfloat16 product v as the bf16 convolution
    computes (_int8_product); the input gradient, a stride-1 convolution's conv^T(t, q_w) being the
    convolution of the gradient's codes with the weight's flipped and transposed, so the same arithmetic
    (_int8_input_grad); the weight gradient, conv_w(t, q_a) on the CPU kernels' AVX512-VNNI loop from the
    gradient's and the input's bytes, int32 sums into int64, exact (_int8_weight_grad))."""
    stride, padding, dilation = conv[:3]
    common = _int8_conv_reason(x, conv)
    forward = "fracpass.native.INT8_FORWARD is False" if not INT8_FORWARD else common
    if not INT8_INPUT_GRAD:
        dx = "fracpass.native.INT8_INPUT_GRAD is False"
    elif sw.numel() > 1 or not 2 <= gbits <= MAX_INT8_BITS:
        dx = "the weight's scale is per output channel or the gradient is not quantized to 2..8 bits"
    elif any(s != 1 for s in stride) or any(p > d * (k - 1) for p, d, k in zip(padding, dilation, weight.shape[2:])):
        dx = "a strided convolution, or padding beyond the kernel's reach (its input gradient is no convolution)"
    else:
        dx = common
    co, ci, _, kw = weight.shape if weight.dim() == 4 else (0, 0, 0, 0)
    wo = x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) if x.dim() == 4 else 0
    if not INT8_WEIGHT_GRAD:
        dw = "fracpass.native.INT8_WEIGHT_GRAD is False"
    elif not 2 <= gbits <= MAX_INT8_BITS:
        dw = "the gradient is not quantized to 2..8 bits"
    elif common:
        dw = common
    elif any(s != 1 for s in stride):
        dw = "a strided convolution"
    elif co % 16 or ci % 8 or kw > 3 or wo < 4 or wo % 4:
        dw = (f"{co} output channels, {ci} input channels, a kernel {kw} wide and an output {wo} wide: the VNNI "
              "kernel takes multiples of 16, of 8, at most 3 and multiples of 4")
    elif not _ext(x).vnni_weight_grad():
        dw = "the CPU kernels were built without AVX512-VNNI"
    else:
        dw = None
    return forward, dx, dw


def _int8_conv_reason(x: Tensor, conv) -> Optional[str]:
    """What both int8 products need: a 2-D ungrouped convolution over a channels-last tensor on the CPU
    kernels and oneDNN's int8 convolution, on a CPU with int8 units."""
    stride, padding, dilation, transposed, output_padding, groups = conv
    if transposed or groups != 1 or x.dim() != 4:
        return "not a 2-D ungrouped convolution"
    if not x.is_contiguous(memory_format=torch.channels_last) or x.shape[1] == 1:
        return "an NCHW input (oneDNN's int8 convolution runs channels_last)"
    if _ext(x) is None or not hasattr(torch.ops.onednn, "qconv_pointwise"):
        return "no CPU kernels or oneDNN int8 convolution for this tensor"
    return int8_support()


def _int8_product(kept: tuple, qw: Tensor, conv, epilogue: Optional[tuple] = None,
                  hand_to: Optional["_GradSink"] = None) -> Tensor:
    """conv(q_a, q_w) as bfloat16 from the input's bytes u = q_a - lo (zero point -lo: the padding is code
    0, the real zero) and the weight's codes: exact in int32, rounded once to bfloat16, as the bf16
    convolution's float32 sum is while it stays under 2^24. 8-bit weight codes span 256 values that need
    not fit int8: the few outside it (the range's ends) split onto copies of their input channels
    (ext.int8_weight_codes, ext.append_channels: the same exact product, on at most _split_limit extra
    channels); where more input channels hold them, the channels run as t = q_w - k_c, and v =
    bfloat16(y + k_c S) with S the input codes' window sums over every channel and tap
    (ext.shifted_product_bf16). ``epilogue`` (scale, addend): float32 v * scale + addend instead
    (_scale_out's), in the shift's pass where there is one; or, where ``hand_to`` takes the bfloat16
    product with its epilogue (an input gradient that a fused BatchNorm's backward alone reads), a
    placeholder for the gradient, the product then scaled where that backward reads it."""
    stride, padding, dilation, _, _, groups = conv
    u, lo = kept[0], kept[1]
    ext = _ext(u)
    t, k, shifted, dup = ext.int8_weight_codes(qw, _split_limit(qw.shape[1]))
    zp, shifted = int(-lo), bool(shifted)
    if dup.numel():
        u = ext.append_channels(u, dup)
    one = torch.ones(1)  # one weight scale for the tensor: prepack reads a per-channel one value by value
    packed = torch.ops.onednn.qconv_prepack(t, one, 1.0, zp, stride, padding, dilation, groups, list(u.shape))
    y = torch.ops.onednn.qconv_pointwise(u, 1.0, zp, packed, one, torch.zeros(1, dtype=torch.int64), None, stride,
                                         padding, dilation, groups, 1.0, 0,
                                         torch.float32 if shifted else torch.bfloat16, "none", [], "")
    if hand_to is not None and not shifted and epilogue is not None and hand_to.takes(y, *epilogue):
        return hand_to.put(y, *epilogue)
    geometry = (t.shape[2], t.shape[3], stride, padding, dilation)  # (the shift's u has no extra channels)
    scale, addend = epilogue if epilogue is not None else (_NONE_F, _NONE_F)
    if shifted and scale.numel() == 1 and _same_sample_layout(addend, y):  # the epilogue in the shift's pass
        return ext.shifted_product_bf16(y, u, lo, k, *geometry, scale.reshape(1).float(), addend)
    v = ext.shifted_product_bf16(y, u, lo, k, *geometry, _NONE_F, _NONE_F) if shifted else y
    return v if epilogue is None else _scale_out(v, scale, None, addend=addend)


def _int8_weight_grad(kept_g: tuple, u_a: Tensor, lo: float, qw: Tensor, conv, factor: Tensor,
                      offset_factor: Tensor) -> Tensor:
    """dw = s_a s_g conv_w(t, q_a) + c s_a conv_w(1, q_a) from the gradient's bytes (q, zero point k: t = q - k;
    channels-last) and the input's (u_a = q_a - lo): both window products exact in int64 (ext.weight_grad_u8),
    the scales applied in float64, rounded once to float32, in the weight's layout. ``factor`` = s_a s_g,
    ``offset_factor`` = c s_a."""
    _, padding, dilation = conv[:3]
    u_g = kept_g[0]
    prod, sums = _ext(u_g).weight_grad_u8(u_g, -kept_g[1], u_a, lo, qw.shape[2], qw.shape[3], list(padding),
                                          list(dilation))
    dw = prod.mul_(factor.double()).add_(sums.mul_(offset_factor.double()))
    return torch.empty_strided(qw.shape, qw.stride()).copy_(dw)


def _int8_input_grad(kept_g: tuple, qw: Tensor, conv, epilogue: Optional[tuple] = None,
                     hand_to: Optional["_GradSink"] = None) -> Tensor:
    """dx from conv^T(t, q_w) of a stride-1 convolution: the convolution of the gradient's codes (bytes q,
    channels-last, zero point k: t = q - k, the padding t = 0) with q_w flipped and with its channel axes
    swapped, dilated as the forward, padded d (K - 1) - p (_int8_product's arithmetic, with its ``epilogue``)."""
    _, padding, dilation, _, _, _ = conv
    pad = [d * (k - 1) - p for p, d, k in zip(padding, dilation, qw.shape[2:])]
    flipped = qw.flip(2, 3).transpose(0, 1)
    return _int8_product(kept_g, flipped, ([1, 1], pad, list(dilation), False, [0, 0], 1), epilogue, hand_to)


def _narrow_codes(ctx, q: Tensor, kept: Optional[tuple] = None) -> Tensor:
    """The input codes to keep for backward: as bytes q - offset (ctx.code_offset) when they span at most
    256 values, as a per-tensor quantizer's codes always do (a gated op's rows may not), in one byte per
    element instead of bfloat16's two; else q itself (ctx.code_offset None). ``kept``: those bytes and
    their offset, already made by the encoding kernel (no pass over q here)."""
    if kept is not None:
        ctx.code_offset = kept[1]
        return kept[0]
    ctx.code_offset = None
    ext = _ext(q)
    if ext is None or q.numel() == 0 or not _rows_outer_dense(q):
        return q
    lo, hi = (float(m) for m in _aminmax(q))
    if hi - lo > 255:
        return q
    ctx.code_offset = lo
    return ext.codes_to_u8(q, lo)


def _widened_codes(ctx, q: Tensor, batch_sum: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """_narrow_codes's input back: (the bfloat16 codes, exactly; if ``batch_sum``, their _batch_sum from
    the same pass where the codes were narrowed, else None)."""
    if ctx.code_offset is None:
        return q, None
    q, total = _ext(q).u8_to_codes(q, ctx.code_offset, batch_sum)
    return q, total.as_strided((1,) + tuple(q.shape[1:]), q.stride()) if batch_sum else None


def _conv_backward(ctx, saved, grad, grad_minmax=None) -> tuple:
    """_Bf16Conv's backward from dL/dy: (dx, dw, db, d_onehot); ``grad_minmax``: dL/dy's min and max, when
    already known (the fused BatchNorm's backward computes them with dL/dy)."""
    qa, sa, qw, sw = saved[:4]
    stride, padding, dilation, transposed, output_padding, groups = ctx.conv
    args = (stride, padding, dilation, transposed, output_padding, groups)
    gating: Optional[_Gating] = ctx.gating
    grad = _dense(grad)  # the layout the simulation's gradient quantizers read, in memory order: once
    need_x = ctx.needs_input_grad[0] or ctx.gate_grad  # the gate's gradient is computed from dx
    need_w, need_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
    mn, mx, levels = _grad_range(grad, ctx.gbits, gating, grad_minmax)
    dx = dw = db = None
    if gating is None:  # one level count, 2^gbits - 1: exact in bfloat16 at 2..8 bits (no tensor ops, no syncs)
        exact = None if levels is None or not 2 <= ctx.gbits <= MAX_INT8_BITS else True
    else:
        exact = _exact_codes(levels)
    if exact is None or (exact is not True and not bool(exact.any())):
        # the gradient's codes would not be exact in bfloat16 (or it is not quantized): float32 products
        qa, _ = _widened_codes(ctx, qa)
        ghat = _simulated_grad(grad, mn, mx, levels, ctx.gbits)
        x_hat = qa.float().mul_(_per_row_view(sa, qa)) if need_w else _shape_only(qa)
        w_hat = _weight_values(qw, sw, transposed)
        dx, dw, db = torch.ops.aten.convolution_backward(ghat, x_hat, w_hat, [ghat.shape[1]] if need_b else None,
                                                         *args, [need_x, need_w, need_b])
    else:
        # gated, some samples' gradient options above 8 bits ("wide"): their codes are not exact in
        # bfloat16, so their rows of dx and their groups of dw run in float32 on ghat
        wide = None if exact is True or bool(exact.all()) else (~exact).nonzero().view(-1)
        fp32_dx = need_x and sw.numel() > 1
        # dx's product on oneDNN's int8 convolution, dw's on the VNNI kernel (decided in the forward:
        # _int8_reasons), both from the gradient codes' bytes
        int8_dx, int8_dw = need_x and ctx.int8[0] and wide is None, need_w and ctx.int8[1] and wide is None
        ghat, t, sg, c, kept_g = _bf16_grad_codes(grad, mn, mx, levels, ctx.gbits, values=fp32_dx or wide is not None,
                                                  bytes=int8_dx or int8_dw)
        int8_dx, int8_dw = int8_dx and kept_g is not None, int8_dw and kept_g is not None
        if kept_g is not None:  # the codes keep the gradient's layout; both int8 products read them channels-last
            kept_g = (kept_g[0].contiguous(memory_format=torch.channels_last), kept_g[1])
        u_a = qa
        if int8_dw:  # the bfloat16 input codes are not needed: no widening pass
            qa, total = _shape_only(qa, torch.bfloat16), None
        else:  # with the batch sum dw's offset correction needs (_ones_weight_grad)
            qa, total = _widened_codes(ctx, qa, batch_sum=need_w and gating is None)
        if gating is not None and gating.one_group:  # one option group: one s_g and c (dx and dw in one call)
            sg, c = sg[:1], c[:1]
        per_sample = sa.numel() > 1 or sg.numel() > 1
        mask = [need_x and not fp32_dx and not int8_dx, need_w and not per_sample and not int8_dw, False]
        vx, vw, _ = torch.ops.aten.convolution_backward(t, qa, qw, None, *args, mask) if any(mask) else (None,) * 3
        if need_x and fp32_dx:
            dx = torch.ops.aten.convolution_backward(ghat, _shape_only(qa), _weight_values(qw, sw, transposed),
                                                     None, *args, [True, False, False])[0]
        elif need_x:  # dx = s_g s_w conv^T(t, q_w) + c s_w conv^T(1, q_w); the second the same for every sample
            corr = _ones_input_grad(t, qa, qw, args)
            if sg.numel() > 1:
                dx = _scale_out(vx, sw, None, sg).addcmul_(_per_row_view(c, vx), corr.mul_(sw))
            elif int8_dx:  # (never gated)
                dx = _int8_input_grad(kept_g, qw, ctx.conv, (sg * sw, corr.mul_(c * sw)), ctx.hand_to)
            else:
                dx = _scale_out(vx, sg * sw, None, addend=corr.mul_(c * sw))
            if wide is not None:  # conv^T keeps samples apart: the wide samples' rows again, in float32
                w_hat = _weight_values(qw, sw, transposed)
                rows = torch.ops.aten.convolution_backward(_take(ghat, wide), _shape_only(qa[:wide.numel()]), w_hat,
                                                           None, *args, [True, False, False])[0]
                dx.index_copy_(0, wide, rows)
        if int8_dw:
            dw = _int8_weight_grad(kept_g, u_a, ctx.code_offset, qw, ctx.conv, sa * sg, c * sa)
        elif need_w and not per_sample:
            # dw = s_a s_g conv_w(t, q_a) + c s_a conv_w(1, q_a), the second the same for each output channel of a group
            dw = _scale_out(vw, sa * sg, None).add_(_ones_weight_grad(t, qa, qw, args, c * sa, total))
        elif need_w:
            dw = _grouped_weight_grad(t, qa, qw, args, sa, sg, c, gating.choice, ghat, exact)
        if need_b:
            dims = [0] + list(range(2, t.dim()))
            if ghat is not None:
                db = ghat.sum(dims)
            elif sg.numel() > 1:  # sum over samples of s_g t + c
                per = t.sum(dims[1:], dtype=torch.float32) if t.dim() > 2 else t.float()
                db = (per * sg.view(-1, 1)).sum(0).add_(c.sum() * (t.numel() // (t.shape[0] * t.shape[1])))
            else:
                db = t.sum(dims, dtype=torch.float32).mul_(sg).add_(c * (t.numel() // t.shape[1]))
    d_onehot = None
    if ctx.gate_grad:
        x, onehot = saved[4:6]
        d_onehot = onehot_grad(x, gating.mn, gating.mx, gating.act_levels, onehot, dx)
    if not ctx.needs_input_grad[0]:
        dx = None
    return dx, dw, db, d_onehot


def _exact_codes(levels: Optional[Tensor]) -> Optional[Tensor]:
    """Per sample (or per tensor), whether the gradient's codes at ``levels`` are exact in bfloat16 (2..8
    bits); None if the gradient is not quantized, or if a sample's option leaves it unquantized (levels
    0: its rows pass through, as fracpass.gating.quantize_grad_rows does), so that the whole batch's
    backward takes the float32 products on ghat."""
    if levels is None or bool((levels <= 0).any()):
        return None
    return (levels >= 3) & (levels <= 2**MAX_INT8_BITS - 1)


def _grad_range(grad: Tensor, gbits: int, gating: Optional[_Gating], minmax=None):
    """(min, max, level count) the gradient quantizer rounds ``grad`` over: per tensor at ``gbits`` (its
    min and max ``minmax`` when known), or per sample over its option group's range at its option's
    levels (fracpass.gating's GatedGradQuant). The level count is None where the gradient is not quantized."""
    if gating is not None and gating.grad_levels is not None:
        mn, mx = _row_range(grad)
        mn, mx, _, _ = _group_range(mn, mx, gating.choice, gating.grad_levels.numel())
        return mn, mx, gating.grad_levels[gating.choice]
    if gbits >= FULL_PRECISION:
        return None, None, None
    mn, mx = _aminmax(grad) if minmax is None else minmax
    return mn, mx, torch.tensor(float(2**gbits - 1), device=grad.device)


def _option_groups(choice: Tensor):
    """(the samples that chose one option, the first of them, whether they are the whole batch) per option
    chosen: a gated op's samples share their scales within such a group."""
    for option in torch.unique(choice).tolist():
        idx = (choice == option).nonzero().view(-1)
        yield idx, int(idx[0]), idx.numel() == choice.numel()


def _at(v: Tensor, first: int) -> Tensor:
    """A per-sample scale's value for a group (its sample ``first``), or the per-tensor one."""
    return v[first] if v.numel() > 1 else v.reshape(())


def _grouped_weight_grad(t: Tensor, qa: Tensor, qw: Tensor, args, sa: Tensor, sg: Tensor, c: Tensor,
                         choice: Tensor, ghat: Optional[Tensor], exact: Tensor) -> Tensor:
    """dw of a gated convolution: the samples' scales lie on its contracted (batch) axis, so one bf16
    product per option group, whose samples share s_a, s_g and c (their group's range); a group whose
    gradient codes are not exact in bfloat16 (``exact`` False: above 8 bits) runs in float32 on ghat."""
    dw = None
    for idx, first, whole in _option_groups(choice):
        s_a = _at(sa, first)
        qa_k = qa if whole else _take(qa, idx)
        if not bool(exact[first]):
            x_hat = qa_k.float().mul_(s_a)
            probe = torch.empty_like(qw, dtype=torch.float32)
            g_k = ghat if whole else _take(ghat, idx)
            part = torch.ops.aten.convolution_backward(g_k, x_hat, probe, None, *args, [False, True, False])[1]
        else:
            s_g, c_k = _at(sg, first), _at(c, first)
            t_k = t if whole else _take(t, idx)
            vw = torch.ops.aten.convolution_backward(t_k, qa_k, qw, None, *args, [False, True, False])[1]
            part = _scale_out(vw, s_a * s_g, None).add_(_ones_weight_grad(t_k, qa_k, qw, args, c_k * s_a))
        dw = part if dw is None else dw.add_(part)
    return dw


def _take(v: Tensor, idx: Tensor) -> Tensor:
    """The samples ``idx`` of ``v`` in v's memory layout (channels_last stays channels_last)."""
    out = torch.empty_like(v[:idx.numel()])
    return torch.index_select(v, 0, idx, out=out)


def _shape_only(like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A stand-in with ``like``'s shape and layout for a convolution_backward operand whose gradient is not
    asked for: never written or read (an expanded scalar took oneDNN off its fast path: 1.6x slower)."""
    return torch.empty_like(like, dtype=dtype)


def _weight_values(qw: Tensor, sw: Tensor, transposed: bool) -> Tensor:
    shape = [1] * qw.dim()
    shape[1 if transposed else 0] = -1
    return qw.float().mul_(sw.view(shape) if sw.numel() > 1 else sw)


def _out_channel_scale(sw: Tensor, transposed: bool, groups: int) -> Tensor:
    """The weight's scale per output channel of the convolution (a transposed weight's axis 1 holds the
    output channels of one group, repeated across groups)."""
    return sw.repeat(groups) if transposed and groups > 1 and sw.numel() > 1 else sw


def _window_kernels(t: Tensor, qa: Tensor, qw: Tensor, args):
    """The CPU kernels for the offset corrections' window sums (ones_input_grad / window_sums), with the
    output's height and width (t's) and the geometry as they take it, where they apply: a 2-D
    convolution, ungrouped, not transposed; else None (a convolution of ones runs instead)."""
    stride, padding, dilation, transposed, _, groups = args
    ext = _ext(qa)
    if ext is None or transposed or groups != 1 or qw.dim() != 4 or qa.dim() != 4:
        return None
    return ext, (t.shape[2], t.shape[3]), (list(stride), list(padding), list(dilation))


def _ones_input_grad(t: Tensor, qa: Tensor, qw: Tensor, args) -> Tensor:
    """conv^T(1, q_w) over one sample, float32 in q_a's layout: the input gradient of a gradient of ones
    (dx's offset correction), exact (integer sums under 2^24) from the kernels, else a bf16 convolution
    of ones rounded to bfloat16."""
    window = _window_kernels(t, qa, qw, args)
    if window is not None:
        ext, (ho, wo), geometry = window
        corr = ext.ones_input_grad(qw, qa.shape[2], qa.shape[3], ho, wo, *geometry)  # channels_last
        return corr if qa.stride(1) == 1 else corr.contiguous()
    ones = t.new_ones((1,) + tuple(t.shape[1:]))
    return torch.ops.aten.convolution_backward(ones, qa[:1], qw, None, *args, [True, False, False])[0].float()


def _ones_weight_grad(t: Tensor, qa: Tensor, qw: Tensor, args, factor: Tensor,
                      total: Optional[Tensor] = None) -> Tensor:
    """factor * conv_w(1, q_a) as float32 in the weight's shape: the window sums of the input codes.
    They are the same for every sample's ones, so q_a is summed over the batch first (exact in float32:
    |q_a| <= 255; ``total``: that sum, when already made) and the sums are taken once per group, on one
    sample, then expanded to the group's output channels (a one-channel convolution over the whole batch
    cost 60 % of the main product)."""
    stride, padding, dilation, transposed, output_padding, groups = args
    total = _batch_sum(qa) if total is None else total
    window = _window_kernels(t, qa, qw, args)
    if window is not None:  # the window sums from the kernel (float64 sums, rounded once)
        ext, (ho, wo), geometry = window
        return ext.window_sums(total, qw.shape[2], qw.shape[3], ho, wo, *geometry).mul_(factor).expand(qw.shape)
    ones = t.new_ones((1, groups) + tuple(t.shape[2:]), dtype=torch.float32)
    if transposed:  # weight (C_in, C_out / groups, k...)
        probe = total.new_empty((qw.shape[0], 1) + tuple(qw.shape[2:]))
        sums = torch.ops.aten.convolution_backward(ones, total, probe, None, *args, [False, True, False])[1]
        return sums.mul_(factor).expand(qw.shape)
    probe = total.new_empty((groups,) + tuple(qw.shape[1:]))  # weight (C_out, C_in / groups, k...)
    sums = torch.ops.aten.convolution_backward(ones, total, probe, None, *args, [False, True, False])[1]
    if groups == 1:  # one row for every output channel: a broadcast view (the caller adds it)
        return sums.mul_(factor).expand(qw.shape)
    return sums.mul_(factor).repeat_interleave(qw.shape[0] // groups, 0)


def _batch_sum(q: Tensor) -> Tensor:
    """q summed over dim 0 into float32, keepdim, in q's layout: a reduction over memory rows for the
    layouts that keep dim 0 outermost (aten's sum of a channels_last bf16 tensor over dim 0 took 1.4 ms
    for 4 MB here, over memory rows 0.48 ms, the fused kernel less)."""
    if not _rows_outer_dense(q):
        return q.sum(0, keepdim=True, dtype=torch.float32)
    ext = _ext(q)
    if ext is not None and q.dtype == torch.bfloat16:
        total = ext.batch_sum_bf16(q)
    else:
        total = _memory_rows(q).sum(0, dtype=torch.float32)
    return total.as_strided((1,) + tuple(q.shape[1:]), q.stride())


# -- gated linear layers on bfloat16 codes -------------------------------------------------------------
def _gated_linear_reason(x: Tensor, weight: Tensor, aq, wq, gate: Tensor) -> Optional[str]:
    if not isinstance(aq, GatedActQuant) or not _free_axis(wq, 0):
        return "the input's quantizer is not gated or the weight's scale is not per output channel"
    if weight.dim() != 2 or x.dim() < 2 or gate.dim() != 2 or x.shape[0] != gate.shape[0]:
        return (f"a {x.dim()}-D input whose first dimension is not the gate's batch of {gate.shape[0]} (per-sample "
                "rows back to back are left to the simulation)")
    if not x.is_contiguous():
        return "a non-contiguous input"
    k = x.shape[-1]
    return _tensor_reason(x, weight) or _intensity_reason(x.numel() // max(k, 1), k, weight.shape[0])


def _gated_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], aq, wq, gq, gate: Tensor) -> Tensor:
    """A gated linear layer: each sample's rows (x is (B, ..., K)) at its option's bits over its option
    group's range, as bfloat16 codes; the product on bfloat16 (float32 accumulation), the scales per
    row (the sample's) and per output column (the weight's) applied to its output."""
    why = decide(aq, wq, gq, path="bf16", device=x.device)[0] != "bf16" or _gated_linear_reason(x, weight, aq, wq, gate)
    if why:
        if why is not True:
            _remember(aq, why)
        return _call(gq, F.linear(_call(aq, x, gate), _call(wq, weight), bias), gate)
    _remember(aq, None)
    batch = x.shape[0]
    per = x.numel() // (batch * x.shape[-1])  # rows per sample
    with torch.no_grad():
        choice = gate.detach().argmax(1)
        mn, mx = aq.row_range(x, choice)
        mn, mx = mn.float().contiguous(), mx.float().contiguous()
        act_levels = aq.option_levels.to(torch.float32)
        one_group = bool(choice.min() == choice.max())
        qa, sa = _bf16_codes(x.detach().reshape(batch, -1), mn, mx, act_levels[choice])  # per sample, memory order
        qw, sw = _bf16_codes(weight.detach(), *wq.qrange(weight), float(2**wq.bits - 1))
    gating = _Gating(choice, mn, mx, act_levels,
                     gq.option_levels.to(torch.float32) if isinstance(gq, GatedGradQuant) else None, one_group)
    sa = sa[:1] if one_group else sa
    y = _Bf16Linear.apply(x, weight, bias, gate, qa.view(-1, x.shape[-1]), sa, qw, sw, per, _grad_bits(gq), gating)
    return y.view(*x.shape[:-1], weight.shape[0])


def _sample_rows(samples: Tensor, per: int) -> Tensor:
    """The row indices of ``samples`` when each sample holds ``per`` consecutive rows."""
    return (samples.view(-1, 1) * per + torch.arange(per, device=samples.device)).view(-1)


def _rows(v: Tensor, per: int) -> Tensor:
    """A per-sample vector repeated for each of the sample's ``per`` rows (a per-tensor one as is)."""
    return v if v.numel() == 1 else v.repeat_interleave(per)


class _Bf16Linear(torch.autograd.Function):
    """y = x_hat w_hat^T (+ bias) for a gated linear layer on bfloat16 codes, x as R = B x per rows:
    forward s_a[r] s_w[n] (q_a q_w^T); backward dx = s_g[r] (t q_w) s_w + c[r] s_w colsum(q_w) with
    per-tensor weights (with per-channel ones, float32 on ghat: the scale lies on the contracted
    axis), dw once per option group (the rows' scales lie on its contracted axis); rows of samples
    whose gradient option exceeds 8 bits in float32 on ghat. Each product's output is rounded to
    bfloat16 (unit roundoff 2^-8), as on the convolution path."""

    @staticmethod
    def forward(ctx, x, weight, bias, onehot, qa, sa, qw, sw, per, gbits, gating):  # type: ignore[override]
        v = qa @ qw.t()  # bfloat16 codes, float32 accumulation, bfloat16 out
        wscale = sw.reshape(-1)
        y = _scale_out(v, wscale, bias, _rows(sa, per))
        ctx.gate_grad = ctx.needs_input_grad[3]
        ctx.save_for_backward(qa, sa, qw, sw, *((x, onehot) if ctx.gate_grad else ()))
        ctx.per, ctx.gbits, ctx.gating, ctx.has_bias = per, gbits, gating, bias is not None
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        qa, sa, qw, sw = ctx.saved_tensors[:4]
        gating: _Gating = ctx.gating
        per, batch = ctx.per, gating.choice.numel()
        need_x = ctx.needs_input_grad[0] or ctx.gate_grad
        need_w, need_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        g = _dense(grad).view(batch, -1)  # per sample, in the memory order the gradient quantizer reads
        mn, mx, levels = _grad_range(g, ctx.gbits, gating)
        exact = _exact_codes(levels)
        w_hat = lambda: qw.float().mul_(sw.view(-1, 1) if sw.numel() > 1 else sw)
        dx = dw = db = None
        if exact is None or not bool(exact.any()):  # no bf16-exact gradient codes: float32 products on ghat
            ghat = _simulated_grad(g, mn, mx, levels, ctx.gbits).view(-1, qw.shape[0])
            if need_x:
                dx = ghat @ w_hat()
            if need_w:
                dw = ghat.t() @ qa.float().mul_(_rows(sa, per).view(-1, 1) if sa.numel() > 1 else sa)
        else:
            wide = None if bool(exact.all()) else (~exact).nonzero().view(-1)
            fp32_dx = need_x and sw.numel() > 1
            ghat, t, sg, c, _ = _bf16_grad_codes(g, mn, mx, levels, ctx.gbits, values=fp32_dx or wide is not None)
            if gating.one_group:
                sg, c = sg[:1], c[:1]
            t = t.view(-1, qw.shape[0])
            ghat = None if ghat is None else ghat.view(-1, qw.shape[0])
            if need_x and fp32_dx:
                dx = ghat @ w_hat()
            elif need_x:
                colsum = qw.sum(0, dtype=torch.float32)  # exact: integer codes
                if sg.numel() > 1:
                    dx = _scale_out(t @ qw, sw, None, _rows(sg, per)).addr_(_rows(c, per), colsum.mul_(sw))
                else:
                    dx = _scale_out(t @ qw, sg * sw, None).add_(colsum.mul_(c * sw))
                if wide is not None:  # those samples' rows again, in float32 on ghat
                    rows = _sample_rows(wide, per)
                    dx.index_copy_(0, rows, ghat.index_select(0, rows) @ w_hat())
            if need_w:
                dw = _grouped_linear_weight_grad(t, ghat, qa, sa, sg, c, gating, exact, per)
        if need_b:
            if ghat is not None:
                db = ghat.sum(0)
            elif sg.numel() > 1:
                db = (t.float().t() @ _rows(sg, per)).add_(c.sum() * per)
            else:
                db = t.sum(0, dtype=torch.float32).mul_(sg).add_(c * t.shape[0])
        d_onehot = None
        if ctx.gate_grad:
            x, onehot = ctx.saved_tensors[4:]
            d_onehot = onehot_grad(x.reshape(batch, -1), gating.mn, gating.mx, gating.act_levels, onehot,
                                   dx.view(batch, -1))
        if need_x:
            dx = dx.view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return (dx, dw, db, d_onehot) + (None,) * 7


def _grouped_linear_weight_grad(t: Tensor, ghat: Optional[Tensor], qa: Tensor, sa: Tensor, sg: Tensor, c: Tensor,
                                gating: _Gating, exact: Tensor, per: int) -> Tensor:
    """dw = sum over rows of ghat[r]^T x_hat[r]: the rows' scales lie on its contracted axis, so one
    bf16 product per option group (whose rows share s_a, s_g and c), float32 on ghat for a group whose
    gradient codes are not exact in bfloat16."""
    dw = None
    for samples, first, whole in _option_groups(gating.choice):
        rows = None if whole else _sample_rows(samples, per)
        s_a = _at(sa, first)
        qa_k = qa if rows is None else qa.index_select(0, rows)
        if not bool(_at(exact, first)):
            g_k = ghat if rows is None else ghat.index_select(0, rows)
            part = g_k.t() @ qa_k.float().mul_(s_a)
        else:
            t_k = t if rows is None else t.index_select(0, rows)
            s_g, c_k = _at(sg, first), _at(c, first)
            part = _scale_out(t_k.t() @ qa_k, (s_a * s_g).reshape(1), None).add_(
                qa_k.sum(0, dtype=torch.float32).mul_(c_k * s_a))
        dw = part if dw is None else dw.add_(part)
    return dw


def _bf16_conv_reason(x: Tensor, weight: Tensor, padding, aq, wq, transposed: bool, gate) -> Optional[str]:
    axis = 1 if transposed else 0
    if not isinstance(aq, (ActQuant, GatedActQuant)) or not isinstance(wq, WeightQuant) or (
            wq.axis is not None and wq.axis % weight.dim() != axis):
        return "the input's scale is not per tensor or the weight's is not per output channel"
    if isinstance(padding, str):
        return f"padding={padding!r}"
    if x.dim() != weight.dim():
        return f"an unbatched {x.dim()}-D input"
    if gate is not None and (gate.dim() != 2 or gate.shape[0] != x.shape[0]):
        return f"a gate choice of shape {tuple(gate.shape)} for a batch of {x.shape[0]}"
    return _tensor_reason(x, weight)  # the device's bf16 support: decide() checked it


def _conv_macs(x: Tensor, weight: Tensor, stride, padding, dilation, transposed: bool) -> int:
    """Forward multiply-adds of a batched convolution: every output element's window (a transposed one:
    every input element's scatter)."""
    n = weight.dim() - 2
    taps = math.prod(weight.shape[1:])  # C_in / groups x kernel (a transposed weight: C_out / groups x kernel)
    if transposed:
        return x.numel() * taps
    out = 1
    for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], _tuple_arg(stride, n), _tuple_arg(padding, n),
                                _tuple_arg(dilation, n)):
        out *= max(0, (size + 2 * p - d * (k - 1) - 1) // s + 1)
    return x.shape[0] * weight.shape[0] * out * taps


def _conv_size_reason(x: Tensor, weight: Tensor, stride, padding, dilation, transposed: bool) -> Optional[str]:
    macs = _conv_macs(x, weight, stride, padding, dilation, transposed)
    if macs >= MIN_CONV_MACS:
        return None
    return (f"a small convolution ({macs / 1e6:.1f}M multiply-adds, under fracpass.native.MIN_CONV_MACS = "
            f"{MIN_CONV_MACS / 1e6:g}M): the bf16 path's codes, scaling and offset corrections would cost more than "
            "it saves")


def _bf16_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, transposed: bool,
               output_padding, groups: int, aq, wq, gq, gate, simulated, fused=None, sole_reader: bool = False) -> Tensor:
    """The convolution on bf16 codes where the bits and sizes allow, else ``simulated``; ``fused`` (bn,
    act, residual, bn_first): the BatchNorm (then residual add, then ReLU) that follows it, run in the
    same op (_Bf16ConvBN) or, on the simulated route, as the unfused graph runs them. ``sole_reader``: the
    fused op's output has one reader, a 2-D convolution call reading it once (FuseNativeBNPass proved it):
    it then takes that convolution's input-gradient product unscaled (_GradSink on the output, which the
    convolution finds on its x)."""
    why = (decide(aq, wq, gq, path="bf16", device=x.device)[0] != "bf16"
           or _bf16_conv_reason(x, weight, padding, aq, wq, transposed, gate)
           or _conv_size_reason(x, weight, stride, padding, dilation, transposed))
    if why:
        if why is not True:
            _remember(aq, why)
        y = _call(gq, simulated(_call(aq, x, gate), _call(wq, weight)), gate)
        return y if fused is None else _unfused(y, *fused)
    _remember(aq, None)
    n = weight.dim() - 2
    conv = (_tuple_arg(stride, n), _tuple_arg(padding, n), _tuple_arg(dilation, n), transposed,
            _tuple_arg(output_padding, n), groups)
    gating, kept = None, None
    with torch.no_grad():
        qw, sw = _bf16_codes(weight.detach(), *wq.qrange(weight), float(2**wq.bits - 1))
        if isinstance(aq, GatedActQuant) or isinstance(gq, GatedGradQuant):
            choice = gate.detach().argmax(1)
            act = isinstance(aq, GatedActQuant)
            mn, mx = aq.row_range(x, choice) if act else aq.qrange(x)
            levels = aq.option_levels.to(torch.float32)[choice] if act else float(2**aq.bits - 1)
            qa, sa = _bf16_codes(x.detach(), mn.float().contiguous(), mx.float().contiguous(), levels)
            one_group = bool(choice.min() == choice.max())  # every sample at one option: one scale for all
            gating = _Gating(choice, mn.float().contiguous(), mx.float().contiguous(),
                             aq.option_levels.to(torch.float32) if act else None,
                             gq.option_levels.to(torch.float32) if isinstance(gq, GatedGradQuant) else None,
                             one_group)
            sa = sa[:1] if one_group else sa
        else:
            forward, dx, dw = _int8_reasons(x, weight, conv, sw, _grad_bits(gq))
            qa, sa, kept = _bf16_input_codes(x.detach(), *aq.qrange(x), aq.bits, codes=forward is not None)
            if kept is not None:
                int8_dx = x.requires_grad and dx is None
                sink = x.__dict__.get(_SINK) if int8_dx and HAND_GRADIENT else None
                kept = kept._replace(int8_dx=int8_dx, int8_dw=weight.requires_grad and dw is None, hand_to=sink)
    _remember_int8(aq, (qa is None,) + ((kept.int8_dx, kept.int8_dw) if kept is not None else (False, False)))
    onehot = gate if gating is not None and gating.act_levels is not None else None
    unfused = None if fused is None else _fused_reason(x, *fused)
    if fused is None or unfused:  # a BatchNorm the fused op does not take: run it unfused
        if unfused:
            _remember_bn(aq, f"its BatchNorm runs unfused: {unfused}")
        y = _Bf16Conv.apply(x, weight, bias, onehot, qa, sa, qw, sw, conv, _grad_bits(gq), gating, kept)
        return y if fused is None else _unfused(y, *fused)
    bn, act, residual, _ = fused
    out = _Bf16ConvBN.apply(x, weight, bias, onehot, qa, sa, qw, sw, conv, _grad_bits(gq), gating, bn.weight,
                            bn.bias, residual, _bn_state(bn) + (act is not None,), kept, sole_reader)
    _remember_bn(aq, _bn_route(out, sa, residual))
    return out


def _remember_int8(q, products: Tuple[bool, bool, bool]) -> None:
    """Keep which of the last call's products (forward, input gradient, weight gradient) ran on int8
    (product_paths, op_paths)."""
    if q.__dict__.get("_native_int8") != products:
        q.__dict__["_native_int8"] = products


def _remember_bn(q, note: str) -> None:
    """Keep how the last call ran a fused convolution's BatchNorm on its first quantizer (for op_paths)."""
    if q.__dict__.get("_native_bn") != note:
        q.__dict__["_native_bn"] = note


def _bn_route(out: Tensor, sa: Tensor, residual: Optional[Tensor]) -> str:
    """Which kernels the fused op ran its BatchNorm on (``out`` has the convolution product's layout)."""
    why = _fast_bn_reason(out, sa, residual)
    return "BatchNorm fused, on the CPU kernels" if why is None else f"BatchNorm fused, on aten's kernels ({why})"


# -- a bf16 convolution's BatchNorm, residual add and ReLU in one op: what backward keeps ----------------
class _Bf16ConvBN(torch.autograd.Function):
    """_Bf16Conv followed by BatchNorm (training or eval), optionally a residual add and a ReLU, as one
    op that keeps less for backward: the convolution's bfloat16 product v instead of BatchNorm's float32
    input y = s v + bias, and a mask of where the ReLU's output is <= 0 (what threshold_backward reads;
    a bit per element from the kernels, else a bool) instead of its float32 output. Per element of the
    convolution's output, 2 bytes and a bit instead of 8.

    Two routes for the BatchNorm: on a channels-last v with one input scale for the batch, the CPU
    kernels (``FAST_BN``; _fast_bn_forward / _fast_bn_backward): v is read instead of a float32 y
    written and read again, and the ReLU, the residual and the gradient's range ride in the same
    passes; equal to aten's BatchNorm to float32 rounding (tests/test_native_fastbn.py). Otherwise aten's
    kernels on y, which the backward recomputes from v by the call that made it: bit for bit the unfused
    ops (tests/test_native_fuse.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, onehot, qa, sa, qw, sw, conv, gbits, gating, bn_w, bn_b, residual,
                post, kept=None, sole_reader=False):  # type: ignore[override]
        _, v, saved = _conv_forward(ctx, x, bias, onehot, qa, sa, qw, sw, conv, gbits, gating, kept, scaled=False)
        running_mean, running_var, training, momentum, eps, relu = post
        if training and v.numel() == v.shape[1]:  # F.batch_norm's check (aten would divide by n - 1 = 0)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {v.size()}")
        _, _, _, transposed, _, groups = ctx.conv
        scale = _out_channel_scale(sw, transposed, groups)
        ctx.fast = _fast_bn_reason(v, sa, residual) is None
        ctx.hand_from = None
        if ctx.fast:
            out, dead, ref, mean, invstd, (mn, mx) = _fast_bn_forward(_ext(v), v, scale * sa, bias, bn_w, bn_b,
                                                                      residual, post)
            hand_range(out, mn, mx)  # the next op's activation quantizer reads it instead of scanning out
            keep = (ref, mean, invstd)
            if sole_reader and residual is None and HAND_GRADIENT:  # out's gradient may come as a product
                ctx.hand_from = out.__dict__[_SINK] = _GradSink(out)
        else:
            y = _scale_out(v, scale, bias, sa)
            out, mean, invstd = torch.ops.aten.native_batch_norm(y, bn_w, bn_b, running_mean, running_var, training,
                                                                 momentum, eps)
            del y
            if residual is not None:
                out = out.add_(residual)
            dead = _relu_mask_(out) if relu else None
            keep = (mean, invstd)
        ctx.n_conv, ctx.post, ctx.has_residual, ctx.out_stride = len(saved), post, residual is not None, out.stride()
        ctx.save_for_backward(*saved, v, bias, bn_w, dead, *keep)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        saved = ctx.saved_tensors
        n = ctx.n_conv
        v, bias, bn_w, dead = saved[n:n + 4]
        running_mean, running_var, training, _, eps, _ = ctx.post
        qa, sa, qw, sw = saved[:4]
        _, _, _, transposed, _, groups = ctx.conv
        minmax = None
        if ctx.fast:
            ref, mean, invstd = saved[n + 4:]
            handed = ctx.hand_from.take() if ctx.hand_from is not None else None
            if handed is not None:  # the next convolution's product and epilogue, not a float32 gradient
                grad, grad_scale, grad_addend = handed
            else:
                grad_scale = grad_addend = _NONE_F
                if grad.stride() != v.stride():
                    grad = torch.empty_like(v, dtype=torch.float32).copy_(grad)
            scale = _out_channel_scale(sw, transposed, groups) * sa
            dy, minmax, grad, d_bn_w, d_bn_b = _fast_bn_backward(_ext(v), grad, dead, v, ref, scale, bias, bn_w, mean,
                                                                 invstd, training, ctx.has_residual, grad_scale,
                                                                 grad_addend)
        else:
            mean, invstd = saved[n + 4:]
            if dead is not None:
                grad = _relu_grad(grad, dead, ctx.out_stride)
            y = _scale_out(v, _out_channel_scale(sw, transposed, groups), bias, sa)  # forward's call: the same y
            dy, d_bn_w, d_bn_b = torch.ops.aten.native_batch_norm_backward(
                grad, y, bn_w, running_mean, running_var, mean, invstd, training, eps,
                [True, ctx.needs_input_grad[11], ctx.needs_input_grad[12]])
            del y
        dx, dw, db, d_onehot = _conv_backward(ctx, saved[:n], dy, minmax)
        d_residual = grad if ctx.has_residual and ctx.needs_input_grad[13] else None
        d_bn_w = d_bn_w if ctx.needs_input_grad[11] else None
        d_bn_b = d_bn_b if ctx.needs_input_grad[12] else None
        return (dx, dw, db, d_onehot) + (None,) * 7 + (d_bn_w, d_bn_b, d_residual, None, None, None)


# A fused BatchNorm's output whose only reader is a convolution (FuseNativeBNPass marks it, ``sole_reader``)
# takes that convolution's int8 input-gradient product unscaled (_GradSink); False: the product is scaled
# into a float32 gradient first, as everywhere else (the same values: tests/test_native_handgrad.py).
HAND_GRADIENT = True
_SINK = "_fracpass_grad_sink"


class _GradSink:
    """Where a fused convolution-BatchNorm (on the CPU kernels, no residual) takes its output's gradient as
    the next convolution's bfloat16 input-gradient product v with its epilogue (scale, addend) instead of
    as float32 v * scale + addend: the next convolution's backward puts them here and gives autograd a
    placeholder (zeros, one element expanded), and this op's backward takes them and forms the gradient
    where its kernels read it, saving the pass that writes float32 dx and half the bytes they read. Set on
    the output tensor (``_SINK``) in forward, only where the graph proves the convolution the output's
    only reader (``sole_reader``), so that autograd never adds the placeholder to another gradient."""

    __slots__ = ("shape", "stride", "handed")

    def __init__(self, out: Tensor):
        self.shape, self.stride, self.handed = out.shape, out.stride(), None

    def takes(self, v: Tensor, scale: Tensor, addend: Optional[Tensor]) -> bool:
        """Whether the kernels read this product and epilogue: bfloat16 in the output's layout, one scale,
        an addend that is one sample in the same layout with a multiple of 16 values (or none)."""
        return (self.handed is None and v.dtype == torch.bfloat16 and v.shape == self.shape
                and v.stride() == self.stride and scale.numel() == 1
                and (addend is None or (_same_sample_layout(addend, v) and addend.numel() % 16 == 0)))

    def put(self, v: Tensor, scale: Tensor, addend: Optional[Tensor]) -> Tensor:
        self.handed = (v, scale.reshape(1).float(), _NONE_F if addend is None else _memory_order(addend))
        return torch.zeros((), dtype=torch.float32, device=v.device).expand(self.shape)

    def take(self) -> Optional[tuple]:
        handed, self.handed = self.handed, None
        return handed


# The fused op's BatchNorm on the CPU kernels (bn_*_bf16) where they apply; False: aten's BatchNorm on the
# float32 y = s v + bias, bit for bit the unfused ops (tests/test_native_fuse.py checks that route).
FAST_BN = True


def _fast_bn_reason(v: Tensor, sa: Tensor, residual: Optional[Tensor]) -> Optional[str]:
    """None if the fused op's BatchNorm runs on the CPU kernels for the product ``v`` (or a tensor in its
    layout), else why it runs on aten's."""
    if not FAST_BN:
        return "fracpass.native.FAST_BN is False"
    if _ext(v) is None:
        return "no CPU kernels for this tensor"
    if _fast_bn_layout(v, sa, residual):
        return None
    if sa.numel() > 1:
        return "per-sample input scales (gated)"
    if v.stride(1) == 1 and residual is not None:
        return "a residual in another layout"
    return "an NCHW product: a channels_last model and input put it on the CPU kernels"


def _fast_bn_layout(v: Tensor, sa: Tensor, residual: Optional[Tensor]) -> bool:
    """Whether the BatchNorm kernels take this product: channels innermost (channels_last), one input
    scale for the batch (a gated op's per-sample scales are not folded into the statistics), a float32
    residual in the same layout."""
    return (v.dim() >= 3 and v.shape[1] > 1 and v.stride(1) == 1 and _rows_outer_dense(v)
            and sa.numel() == 1 and (residual is None or (residual.dtype == torch.float32
                                                          and residual.stride() == v.stride()
                                                          and residual.shape == v.shape)))


def _fast_bn_forward(ext, v: Tensor, scale: Tensor, bias: Optional[Tensor], bn_w: Optional[Tensor],
                     bn_b: Optional[Tensor], residual: Optional[Tensor], post: tuple):
    """BatchNorm (training or eval; then the residual, then the ReLU) of y = s v + bias from the bf16
    product v: the statistics from per-channel sums of d = v - ref (ref: the first pixel's values, so the
    variance does not come from a difference of large sums) in float64, the running statistics updated as
    aten does (momentum; the unbiased variance), the output one affine map per channel of d. Returns (out,
    the ReLU's mask bits or None, ref, mean, invstd, (out's min, out's max)) with the three per-channel
    vectors in float64 and out's range as torch.aminmax gives it, from the pass that wrote out."""
    running_mean, running_var, training, momentum, eps, relu = post
    out, bits, ref, mean, invstd, mn, mx = ext.bn_forward_bf16(v, _given(scale), _given(bias), _given(bn_w), _given(bn_b),
                                                       _given(running_mean), _given(running_var), training, momentum,
                                                       eps, _given(residual), relu)
    return out, bits if relu else None, ref, mean, invstd, (mn, mx)


def _fast_bn_backward(ext, grad: Tensor, dead: Optional[Tensor], v: Tensor, ref: Tensor, scale: Tensor,
                      bias: Optional[Tensor], bn_w: Optional[Tensor], mean: Tensor, invstd: Tensor, training: bool,
                      keep_grad: bool, grad_scale: Tensor = _NONE_F, grad_addend: Tensor = _NONE_F):
    """_fast_bn_forward's backward: (dL/dy, its min and max, the gradient after the ReLU (the residual's),
    dL/d weight, dL/d bias). With g the gradient after the ReLU and xh = (y - mean) invstd:
    dy = w invstd (g - mean(g) - xh mean(g xh)) in training, w invstd g in eval, an affine map per
    channel of g and d = v - ref whose coefficients come from the sums of g and g d (float64). ``grad`` may
    be the next convolution's bfloat16 input-gradient product with its epilogue's ``grad_scale`` and
    ``grad_addend`` (_GradSink): the gradient is then fl(fl(grad * grad_scale) + grad_addend), as
    _scale_out computes it, formed where the kernels read it."""
    dy, mn, mx, g, d_w, d_b = ext.bn_backward_bf16(grad, _NONE_B if dead is None else dead, v, ref, _given(scale),
                                                   _given(bias), _given(bn_w), mean, invstd, training, keep_grad,
                                                   grad_scale, grad_addend)
    return dy, (mn, mx), g, d_w, d_b


def _relu_mask_(out: Tensor) -> Tensor:
    """torch.relu_(out), returning where out <= 0 (what the ReLU's backward reads): as bits in out's
    memory order (uint8, 8 elements a byte) from the fused kernel, else as a bool tensor in out's layout."""
    ext = _ext(out)
    if ext is not None and _rows_outer_dense(out):
        return ext.relu_bits_(out)
    return out.relu_() <= 0


def _relu_grad(grad: Tensor, dead: Tensor, stride: Tuple[int, ...]) -> Tensor:
    """The ReLU's backward, threshold_backward(grad, out, 0), from _relu_mask_'s mask of out <= 0, with
    threshold_backward's output layout (BatchNorm's backward then reduces in the order it did unfused).
    ``stride``: out's strides."""
    if dead.dtype == torch.uint8:  # bits in out's memory order
        ext = _ext(grad)
        if ext is not None and grad.dtype == torch.float32 and grad.stride() == stride:
            return ext.relu_grad_bits(grad, dead)
        flags = dead.unsqueeze(1).bitwise_and(_BIT_WEIGHTS.to(dead.device)).ne(0).view(-1)[:grad.numel()]
        dead = torch.empty_strided(grad.shape, stride, dtype=torch.bool, device=grad.device)
        _memory_order(dead).copy_(flags)
    # a stand-in for out with its layout and sign
    return torch.ops.aten.threshold_backward(grad, dead.logical_not().float(), 0)


_BIT_WEIGHTS = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8)


def _bn_state(bn: nn.Module) -> tuple:
    """(running_mean, running_var, training, momentum, eps) as ``nn.modules.batchnorm._BatchNorm.forward``
    passes them to F.batch_norm, with its num_batches_tracked update."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    kept = not bn.training or bn.track_running_stats
    return (bn.running_mean if kept else None, bn.running_var if kept else None, training, momentum, bn.eps)


def _fused_reason(y_like: Tensor, bn: nn.Module, act, residual: Optional[Tensor], bn_first: bool) -> Optional[str]:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or type(bn).forward is not nn.modules.batchnorm._BatchNorm.forward:
        return f"its BatchNorm is a {type(bn).__name__}"  # markers at export, or a subclass with its own forward
    if act is not None and not (act == "relu" or type(act) is nn.ReLU):
        return f"its activation is a {type(act).__name__}"
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var, residual):
        if t is not None and (t.dtype != torch.float32 or t.device != y_like.device):
            return "its BatchNorm or residual is not float32 on the convolution's device"
    return None


def _unfused(y: Tensor, bn: nn.Module, act, residual: Optional[Tensor], bn_first: bool) -> Tensor:
    """What the unfused graph computes after the convolution: bn, the residual add, the ReLU."""
    out = bn(y)
    if residual is not None:
        out = out + residual if bn_first else residual + out
    if act is None:
        return out
    return torch.relu(out) if isinstance(act, str) else act(out)


def _conv_call(fn):
    """The native form of ``fn`` (F.conv{1,2,3}d): its arguments, then the three quantizers and, for a
    gated op, its gate's one-hot choice."""
    def call(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, aq=None, wq=None, gq=None, gate=None):
        return _bf16_conv(x, weight, bias, stride, padding, dilation, False, 0, groups, aq, wq, gq, gate,
                          lambda a, w: fn(a, w, bias, stride, padding, dilation, groups))

    call.__doc__ = f"``gq({fn.__name__}(aq(x), wq(weight), ...))``, on bfloat16 codes where the bits allow."
    return call


def _conv_bn_call(fn):
    """The native form of ``fn`` (F.conv{1,2,3}d) followed by a BatchNorm module ``bn``, then optionally
    the residual add (``bn(y) + residual``, or ``residual + bn(y)`` if not ``bn_first``) and a ReLU
    (``act``: an nn.ReLU, or "relu" for the functional one): see FuseNativeBNPass."""
    def call(x, weight, bias, stride, padding, dilation, groups, aq, wq, gq, gate, bn, act=None, residual=None,
             bn_first=True, sole_reader=False):
        return _bf16_conv(x, weight, bias, stride, padding, dilation, False, 0, groups, aq, wq, gq, gate,
                          lambda a, w: fn(a, w, bias, stride, padding, dilation, groups),
                          fused=(bn, act, residual, bn_first), sole_reader=sole_reader)

    call.__doc__ = (f"``act(bn(gq({fn.__name__}(aq(x), wq(weight), ...))) + residual)``, the convolution on "
                    "bfloat16 codes where the bits allow, saving less for backward (_Bf16ConvBN).")
    return call


def _conv_transpose_call(fn):
    """The native form of ``fn`` (F.conv_transpose{1,2,3}d): its arguments, then the three quantizers
    and, for a gated op, its gate's one-hot choice."""
    def call(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, aq=None, wq=None,
             gq=None, gate=None):
        return _bf16_conv(x, weight, bias, stride, padding, dilation, True, output_padding, groups, aq, wq, gq, gate,
                          lambda a, w: fn(a, w, bias, stride, padding, output_padding, groups, dilation))

    call.__doc__ = f"``gq({fn.__name__}(aq(x), wq(weight), ...))``, on bfloat16 codes where the bits allow."
    return call


def _named(fn, name: str):
    fn.__name__ = fn.__qualname__ = name  # module-level names: fx code and pickles find them in this module
    fn.__module__ = __name__
    return fn


bf16_conv1d = _named(_conv_call(F.conv1d), "bf16_conv1d")
bf16_conv2d = _named(_conv_call(F.conv2d), "bf16_conv2d")
bf16_conv3d = _named(_conv_call(F.conv3d), "bf16_conv3d")
bf16_conv_transpose1d = _named(_conv_transpose_call(F.conv_transpose1d), "bf16_conv_transpose1d")
bf16_conv_transpose2d = _named(_conv_transpose_call(F.conv_transpose2d), "bf16_conv_transpose2d")
bf16_conv_transpose3d = _named(_conv_transpose_call(F.conv_transpose3d), "bf16_conv_transpose3d")
bf16_conv1d_bn = _named(_conv_bn_call(F.conv1d), "bf16_conv1d_bn")
bf16_conv2d_bn = _named(_conv_bn_call(F.conv2d), "bf16_conv2d_bn")
bf16_conv3d_bn = _named(_conv_bn_call(F.conv3d), "bf16_conv3d_bn")
_FUSED = {bf16_conv1d: bf16_conv1d_bn, bf16_conv2d: bf16_conv2d_bn, bf16_conv3d: bf16_conv3d_bn}
_FUSED_CALLS = tuple(_FUSED.values())
_SOLE_READERS = (bf16_conv2d, bf16_conv2d_bn)  # 2-D: the int8 input gradient's product (_int8_input_grad)
# the F function each lowers, its kind, and where its quantizer arguments start
_BF16_CONVS = {
    F.conv1d: (bf16_conv1d, "conv1d", 7), F.conv2d: (bf16_conv2d, "conv2d", 7), F.conv3d: (bf16_conv3d, "conv3d", 7),
    F.conv_transpose1d: (bf16_conv_transpose1d, "conv_transpose1d", 8),
    F.conv_transpose2d: (bf16_conv_transpose2d, "conv_transpose2d", 8),
    F.conv_transpose3d: (bf16_conv_transpose3d, "conv_transpose3d", 8),
}
_BF16_BY_ATEN = {torch.ops.aten.conv1d.default: F.conv1d, torch.ops.aten.conv2d.default: F.conv2d,
                 torch.ops.aten.conv3d.default: F.conv3d, torch.ops.aten.conv_transpose1d.default: F.conv_transpose1d,
                 torch.ops.aten.conv_transpose2d.input: F.conv_transpose2d,
                 torch.ops.aten.conv_transpose3d.input: F.conv_transpose3d}
_BF16_FIRST_Q = {fn: first for fn, _, first in _BF16_CONVS.values()}
_BF16_FIRST_Q.update({fused: 7 for fused in _FUSED.values()})


_NATIVE_CALLS = (native_linear, native_matmul, native_conv2d) + tuple(c for c, _, _ in _BF16_CONVS.values()) \
    + tuple(_FUSED.values())

# the native calls are the same op kinds for cost analysis and coverage (operands at args 0 and 1)
for _kind, _fn in (("linear", native_linear), ("matmul", native_matmul), ("conv2d", native_conv2d),
                   *((k, c) for c, k, _ in _BF16_CONVS.values()),
                   *((k, _FUSED[c]) for c, k, _ in _BF16_CONVS.values() if c in _FUSED)):
    _entry = registry._KINDS[_kind]
    registry.register(dataclasses.replace(_entry, functions=_entry.functions + (_fn,)))

NATIVE_KINDS = ("linear", "matmul", "conv", "conv2d_int8")
DEFAULT_KINDS = ("linear", "matmul", "conv")
CONV2D_INT8_OFF = ("conv2d's int8 forward (oneDNN) is opt-in: it is exact, but its per-step weight prepack and "
                   "layout changes made CIFAR ResNet steps slower than the bf16 path (benchmarks/native_step.py); "
                   "opt in with fracpass.native.LowerNativePass(kinds=fracpass.native.NATIVE_KINDS)(qmodel)")
_LINEAR = {F.linear, torch.ops.aten.linear.default}
_MATMUL = {torch.matmul, operator.matmul, torch.ops.aten.matmul.default, torch.mm, torch.ops.aten.mm.default,
           torch.bmm, torch.ops.aten.bmm.default}  # on valid operands, mm and bmm compute what matmul does
_MATMUL_METHODS = {"matmul", "__matmul__", "mm", "bmm"}
_CONV2D = {F.conv2d, torch.ops.aten.conv2d.default}


def _conv_fn(node: torch.fx.Node):
    """The F.conv* function a call_function node computes (aten overloads from torch.export included), else None."""
    if node.op != "call_function":
        return None
    fn = _BF16_BY_ATEN.get(node.target, node.target)
    return fn if fn in _BF16_CONVS else None


def _quantizer_node(node, op: torch.fx.Node, role: str) -> Optional[torch.fx.Node]:
    info = meta.inserted(node) if isinstance(node, torch.fx.Node) else None
    return node if info is not None and info.role == role and info.source == op.name else None


# -- the lowering pass -------------------------------------------------------------------------------
class LowerNativePass(PassBase):
    """Replace each quantized linear / matmul group by one native call that picks its path per call::

        x -> linear_aq -> linear(., linear_wq(w), b) -> linear_gq -> y
        becomes
        x -> native_linear(x, w, b, linear_aq, linear_wq, linear_gq) -> y

    The quantizer modules stay where they are (state_dict, set_stage, export unchanged); the call
    reads them through get_attr nodes that keep the quantizers' names and provenance. A gated
    convolution's call takes its gate's one-hot choice as a last argument. Every other compute op
    gets a NativeInfo saying why it stays simulated.
    """

    name = "lower-native"

    def __init__(self, kinds: Tuple[str, ...] = DEFAULT_KINDS):
        kinds = tuple("conv2d_int8" if k == "conv2d" else k for k in kinds)  # its name before the bf16 path
        unknown = set(kinds) - set(NATIVE_KINDS)
        if unknown:
            raise FracpassError(f"LowerNativePass: no native path for {sorted(unknown)}; choose from {NATIVE_KINDS}")
        self.kinds = tuple(kinds)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        lowered = kept = 0
        for node in list(gm.graph.nodes):
            info, spec = meta.op_info(node), meta.qspec(node)
            if node.target is bf16_conv2d_bn and "conv2d_int8" in self.kinds and node.args[10] is None:
                node = _unfuse(gm, node)  # fused with its BatchNorm at transform: the int8 op runs unfused
            if node.target is bf16_conv2d and "conv2d_int8" in self.kinds and len(node.args) == 10:
                # lowered at transform, the same arguments (a gated one, with its gate, stays on bf16)
                node.target = native_conv2d
                lowered += 1
                continue
            if info is None or spec is None or node.target in _NATIVE_CALLS:
                continue
            why = self._why_not(node, spec)
            if why is None:
                self._lower(gm, node)
                lowered += 1
            else:
                node.meta[NATIVE] = NativeInfo(False, why)
                kept += 1
        return PassResult(gm, modified=lowered > 0, stats={"lowered": lowered, "simulated": kept})

    def _why_not(self, node: torch.fx.Node, spec) -> Optional[str]:
        if spec.excluded:
            return f"excluded: {spec.excluded}"
        if not any(spec.quantizes(role) for role in ("w", "a", "g")):
            return "full precision at every stage (the plan quantizes none of its operands or gradients)"
        is_linear = node.op == "call_function" and node.target in _LINEAR
        is_matmul = (node.op == "call_function" and node.target in _MATMUL) or (
            node.op == "call_method" and node.target in _MATMUL_METHODS)
        is_conv = _conv_fn(node) is not None
        if not (is_linear or is_matmul or is_conv):
            kind = meta.op_info(node).kind
            if kind == "sdpa":  # the plan quantizes q, k and v; P = softmax(q k^T) and dS stay float32
                return ("sdpa: only its inputs are quantized, its inner products also take the float32 attention "
                        "probabilities P = softmax(q k^T) and their gradient, which have no exact bfloat16 or int8 "
                        "codes; attention written as two matmuls quantizes P and runs both products on bf16")
            return f"no native path for {kind} yet (linear, matmul, bmm and convolutions have one)"
        if is_conv and "conv" not in self.kinds and not (node.target in _CONV2D and "conv2d_int8" in self.kinds):
            return f"convolutions are not lowered (LowerNativePass(kinds={self.kinds}))"
        if node.kwargs or len(node.args) < 2:
            return "operands passed by keyword"
        gated = ("gated unit (per-sample scales): gated ops run native as convolutions, linear layers and batched "
                 "products (bf16) only")
        gates, static = set(), 0  # a gated op's activation and gradient quantizers all read one gate
        for arg in node.args[:2]:
            q = next((r for r in ("act", "weight") if _quantizer_node(arg, node, r) is not None), None)
            if q is not None and len(arg.users) != 1:
                return "a quantized operand has other users"
            if q == "act" and len(arg.args) == 2:
                gates.add(arg.args[1])
            elif q is not None and len(arg.args) != 1:
                return gated
            else:
                static += q == "act"
        grads = [u for u in node.users if _quantizer_node(u, node, "grad") is not None]
        if grads and len(node.users) != 1:
            return "its output has users besides its gradient quantizer"
        if grads and len(grads[0].args) == 2:
            gates.add(grads[0].args[1])
        elif grads and len(grads[0].args) != 1:
            return gated
        else:
            static += len(grads)
        if gates and (static or len(gates) > 1):
            return "its quantizers mix gated and static ones (or read different gates)"
        return None

    def _lower(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
        graph = gm.graph
        grad = next(iter(node.users)) if len(node.users) == 1 else None
        grad = _quantizer_node(grad, node, "grad")
        operands, refs, erase = [], [], []
        # a gated op's one-hot choice (the second argument of its gated quantizers)
        gate = next((q.args[1] for q in (*node.args[:2], grad) if isinstance(q, torch.fx.Node) and len(q.args) == 2
                     and meta.inserted(q) is not None and meta.inserted(q).source == node.name), None)
        with graph.inserting_before(node):
            for arg in node.args[:2]:
                role = "act" if _quantizer_node(arg, node, "act") is not None else (
                    "weight" if _quantizer_node(arg, node, "weight") is not None else None)
                if role is None:
                    operands.append(arg)
                    refs.append(None)
                    continue
                operands.append(arg.args[0])
                refs.append(self._ref(graph, arg, role, node))
                erase.append(arg)
            gref = self._ref(graph, grad, "grad", node) if grad is not None else None
            if node.target in _LINEAR:
                bias = node.args[2] if len(node.args) > 2 else None
                new = graph.call_function(native_linear, (operands[0], operands[1], bias, refs[0], refs[1], gref)
                                          + ((gate,) if gate is not None else ()))
            elif node.target in _CONV2D and "conv2d_int8" in self.kinds and gate is None:
                # bias, stride, padding, dilation, groups with F.conv2d's defaults
                rest = list(node.args[2:]) + [None, 1, 0, 1, 1][len(node.args) - 2:]
                new = graph.call_function(native_conv2d, (operands[0], operands[1], *rest, refs[0], refs[1], gref))
            elif _conv_fn(node) is not None:
                call, _, first = _BF16_CONVS[_conv_fn(node)]
                # F's own defaults for the arguments the call left out: bias, stride, padding, ...
                defaults = [None, 1, 0, 1, 1] if first == 7 else [None, 1, 0, 0, 1, 1]
                rest = list(node.args[2:]) + defaults[len(node.args) - 2:]
                new = graph.call_function(call, (operands[0], operands[1], *rest, refs[0], refs[1], gref)
                                          + ((gate,) if gate is not None else ()))
            else:
                new = graph.call_function(native_matmul, (operands[0], operands[1], refs[0], refs[1], gref)
                                          + ((gate,) if gate is not None else ()))
        new.meta.update(node.meta)
        new.meta[NATIVE] = NativeInfo(True)
        (grad if grad is not None else node).replace_all_uses_with(new)
        names = {}
        for old in ([grad] if grad is not None else []) + [node] + erase:
            names[old.target if old.op == "call_module" else None] = old.name
            graph.erase_node(old)
        new.name = node.name
        for ref in [r for r in refs + [gref] if r is not None]:
            ref.name = names.get(ref.target, ref.name)

    @staticmethod
    def _ref(graph: torch.fx.Graph, quantizer: torch.fx.Node, role: str, op: torch.fx.Node) -> torch.fx.Node:
        ref = graph.get_attr(quantizer.target)
        for key in ("nn_module_stack", "stack_trace"):
            if key in quantizer.meta:
                ref.meta[key] = quantizer.meta[key]
        meta.set_inserted(ref, meta.Inserted(role=role, source=op.name, created_by=LowerNativePass.name))
        return ref


# -- fusing a bf16 convolution with the BatchNorm, residual add and ReLU after it ------------------------
_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {F.relu, torch.relu, torch.relu_}


def _only_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _plain(node: torch.fx.Node) -> bool:
    """No fracpass annotation (a gated unit's merge add keeps its node)."""
    return not any(str(k).startswith("fracpass") for k in node.meta)


def _unfuse(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node:
    """FuseNativeBNPass undone for one static conv2d: the convolution call, then the BatchNorm module,
    the residual add and the ReLU as the graph had them. Returns the convolution's node."""
    graph = gm.graph
    bn_ref, act, residual, bn_first = node.args[11:15]
    with graph.inserting_before(node):
        conv = graph.call_function(bf16_conv2d, tuple(node.args[:10]))
        out = graph.call_module(bn_ref.target, (conv,))
        if residual is not None:
            out = graph.call_function(operator.add, (out, residual) if bn_first else (residual, out))
        if act is not None:
            out = (graph.call_module(act.target, (out,)) if isinstance(act, torch.fx.Node)
                   else graph.call_function(torch.relu, (out,)))
    conv.meta.update(node.meta)
    node.replace_all_uses_with(out)
    name = node.name
    graph.erase_node(node)
    for ref in (bn_ref, act):
        if isinstance(ref, torch.fx.Node) and not ref.users:
            graph.erase_node(ref)
    conv.name = name
    return conv


def _runs_before(node: torch.fx.Node, other: torch.fx.Node) -> bool:
    """``node`` comes before ``other`` in graph order."""
    n = node.next
    while n.op != "root":
        if n is other:
            return True
        n = n.next
    return False


def _only_calls(first: torch.fx.Node, last: torch.fx.Node, chain) -> bool:
    """No computation other than ``chain``'s between ``first`` and ``last`` in graph order, so that the fused
    op's autograd node takes the unfused nodes' place in the backward order (the gradient quantizers draw
    their noise in that order)."""
    n = first.next
    while n is not last:
        if n.op in ("call_function", "call_method", "call_module") and n not in chain:
            return False
        n = n.next
    return True


class FuseNativeBNPass(PassBase):
    """Fuse each bf16 convolution with the BatchNorm module it feeds, and the ReLU (and the residual add
    before it) after that, into one call that keeps less for backward (_Bf16ConvBN)::

        x -> bf16_conv2d(x, w, ..., aq, wq, gq) -> bn -> [+ residual] -> relu -> y
        becomes
        x -> bf16_conv2d_bn(x, w, ..., aq, wq, gq, gate, bn, relu, residual, bn_first) -> y

    The fused call computes what the unfused ops compute, bit for bit, on every route (a convolution
    the bits or sizes leave simulated runs the BatchNorm, add and ReLU modules themselves). Each node
    between the convolution and the end of the chain must have that one user, and the add no fracpass
    annotation (a gated block's merge add stays). Then each fused call whose output only a 2-D convolution
    call reads, once, gets ``sole_reader=True`` (_GradSink: that convolution's input-gradient product comes
    to the fused call's backward unscaled). Run after LowerNativePass."""

    name = "fuse-native-bn"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        fused = 0
        for conv in list(gm.graph.nodes):
            if conv.op != "call_function" or conv.target not in _FUSED or conv.kwargs:
                continue
            chain = self._chain(gm, conv)
            if chain is None:
                continue
            bn, add, residual, bn_first, relu = chain
            graph, last = gm.graph, relu or add or bn
            args = list(conv.args) + [None] * (11 - len(conv.args))  # the gate slot, None for a static op
            with graph.inserting_before(last):
                bn_ref = graph.get_attr(bn.target)
                act = None if relu is None else (graph.get_attr(relu.target) if relu.op == "call_module" else "relu")
                new = graph.call_function(_FUSED[conv.target], tuple(args) + (bn_ref, act, residual, bn_first))
            new.meta.update(conv.meta)
            last.replace_all_uses_with(new)
            names = [n.name if n is not None else None for n in (conv, bn, relu)]
            for old in (relu, add, bn, conv):
                if old is not None:
                    graph.erase_node(old)
            new.name, bn_ref.name = names[:2]
            if relu is not None and relu.op == "call_module":
                act.name = names[2]
            fused += 1
        sole = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in _FUSED_CALLS and not node.kwargs and _read_once(node):
                node.kwargs = {"sole_reader": True}
                sole += 1
        return PassResult(gm, modified=fused + sole > 0, stats={"fused": fused, "sole_reader": sole})

    @staticmethod
    def _chain(gm, conv: torch.fx.Node):
        """(bn, add, residual, bn_first, relu) after ``conv``, or None."""
        bn = _only_user(conv)
        if (bn is None or bn.op != "call_module" or bn.args != (conv,) or bn.kwargs or not _plain(bn)
                or not isinstance(gm.get_submodule(bn.target), nn.modules.batchnorm._BatchNorm)):
            return None
        add = residual = relu = None
        bn_first = True
        nxt = _only_user(bn)
        if (nxt is not None and nxt.op == "call_function" and nxt.target in _ADDS and len(nxt.args) == 2
                and not nxt.kwargs and _plain(nxt)):
            other = nxt.args[1] if nxt.args[0] is bn else nxt.args[0]
            if isinstance(other, torch.fx.Node) and other is not bn:
                add, residual, bn_first = nxt, other, nxt.args[0] is bn
                nxt = _only_user(add)
        if nxt is not None and _plain(nxt) and (
                (nxt.op == "call_module" and type(gm.get_submodule(nxt.target)) is nn.ReLU and len(nxt.args) == 1)
                or (nxt.op == "call_function" and nxt.target in _RELUS and len(nxt.args) == 1
                    and set(nxt.kwargs) <= {"inplace"})
                or (nxt.op == "call_method" and nxt.target in ("relu", "relu_") and len(nxt.args) == 1
                    and not nxt.kwargs)):
            relu = nxt
        if add is not None and (relu is None or not _runs_before(residual, conv)):
            # an add without a ReLU after it stays in the graph, and so does one whose residual is computed
            # after the convolution (a downsample branch): fused, the convolution's backward would run
            # before that branch's, which would draw the gradient quantizers' noise in another order (the
            # BatchNorm's one user is that add, so it fuses alone)
            add = residual = relu = None
            bn_first = True
        chain = {bn, add, relu} - {None}
        if not _only_calls(conv, relu or add or bn, chain):
            return None
        return bn, add, residual, bn_first, relu


def _read_once(node: torch.fx.Node) -> bool:
    """``node``'s output has one reader, a 2-D convolution call that takes it as its input and reads it once:
    autograd then hands ``node``'s backward exactly that call's input gradient."""
    reader = _only_user(node)
    if reader is None or reader.op != "call_function" or reader.target not in _SOLE_READERS or not reader.args \
            or reader.args[0] is not node:
        return False
    reads = []
    torch.fx.map_arg((reader.args, reader.kwargs), lambda a: reads.append(a) if a is node else None)
    return len(reads) == 1


# -- reporting ---------------------------------------------------------------------------------------
def product_paths(qmodel: nn.Module) -> Dict[str, Tuple[str, ...]]:
    """op name -> what each of its products runs on at the current stage, "int8", "fp8", "bf16" or "fp32":
    the forward, then the gradient of each operand (the cost report's ``OpCost.products`` order).
    Simulated ops run every product in float32 (on quantized values). A gated op's backward entries
    are those of its samples at <= 8 gradient bits (the others run in fp32)."""
    paths = op_paths(qmodel)
    out = {}
    for node in qmodel.graph.nodes:
        if node.name not in paths:
            continue
        path = paths[node.name][0]
        if path == "simulated":
            info = meta.op_info(node)
            # an unlowered module call (an excluded stem) has its weight as the module's parameter
            out[node.name] = ("fp32",) * (1 + len(info.act_args) + len(info.weight_args) + info.module_weight)
        elif node.target is native_conv2d:  # oneDNN's int8 convolution: forward only
            out[node.name] = ("int8", "fp32", "fp32")
        else:
            first = {native_linear: 3, native_matmul: 2, **_BF16_FIRST_Q}[node.target]
            qa, qb, gq = (None if r is None else qmodel.get_submodule(r.target) for r in node.args[first:first + 3])
            gbits = _grad_bits(gq)
            if isinstance(gq, GatedGradQuant) and min(gq.options.tolist()) <= MAX_INT8_BITS:
                gbits = min(gbits, MAX_INT8_BITS)  # the products of the samples at <= 8 gradient bits
            runs = (path,) + tuple("fp32" if f else path for f in _fp32_backward(qa, qb, gbits))
            if path == "bf16" and node.target in _BF16_FIRST_Q:  # products on oneDNN's int8 convolution
                int8 = qa.__dict__.get("_native_int8", (False, False, False))
                runs = tuple("int8" if f and how == "bf16" else how for how, f in zip(runs, int8)) + runs[3:]
            if path == "int8":  # int8 ops are never gated: gbits is _grad_bits(gq)
                runs = tuple("fp8" if how == "int8" and f else how for how, f in zip(runs, _last_call_fp8(qa, qb, gq)))
            out[node.name] = runs
    return out


def _quantizer_device(mods) -> torch.device:
    """The device an op's quantizers (their buffers) live on: the model's."""
    for q in mods:
        for buf in (q.buffers() if q is not None else ()):
            return buf.device
    return torch.device("cpu")


def op_paths(qmodel: nn.Module) -> Dict[str, Tuple[str, str]]:
    """op name -> (path at the current stage: "int8", "bf16" or "simulated", why not native / what runs in fp32).

    Decided from the quantizers' current bits and their device's units (an int8 op whose products run on
    FP8 says so in the note); a reason that depends on the operands
    (a batched right operand, another dtype or device) is the one seen at the op's last call."""
    from fracpass.api import _state

    execution = getattr(_state(qmodel), "execution", "simulate")
    paths = {}
    for node in qmodel.graph.nodes:
        if meta.op_info(node) is None or meta.qspec(node) is None:
            continue
        if node.target in _NATIVE_CALLS:
            first = {native_linear: 3, native_matmul: 2, native_conv2d: 7, **_BF16_FIRST_Q}[node.target]
            refs = node.args[first:first + 3]
            mods = [None if r is None else qmodel.get_submodule(r.target) for r in refs]
            bf16 = (node.target in _BF16_FIRST_Q or (node.target is native_linear and len(node.args) > 6)  # gated linear
                    or (node.target is native_matmul and len(node.args) > 5)  # gated matmul
                    or (node.target is native_matmul and mods[0] is not None  # batched: bmm, or at the last call
                        and mods[0].__dict__.get("_native_path", "bf16" if meta.op_info(node).kind == "bmm"
                                                 else "int8") == "bf16"))
            path, note = decide(*mods, path="bf16" if bf16 else "int8", device=_quantizer_device(mods))
            if path == "int8" and node.target is native_conv2d:
                note = ("forward only: both backward products in fp32 (oneDNN has no int8 weight-gradient or "
                        "transposed convolution here)")
            if path == "int8" and node.target is not native_conv2d:  # products on FP8 at the last call
                names = [what for what, f in zip(("the forward", "the first operand's gradient", "the second's"),
                                                 _last_call_fp8(*mods)) if f]
                if names:
                    note = "; ".join(filter(None, [note, f"{', '.join(names)} on FP8 e4m3 (<= 4-bit codes: exact)"]))
            int8 = mods[0].__dict__.get("_native_int8", (False,) * 3) if path == "bf16" else (False,) * 3
            if node.target in _BF16_FIRST_Q and any(int8):
                which = ", ".join(w for w, f in zip(("the forward product", "the input gradient's",
                                                     "the weight gradient's"), int8) if f)
                note = "; ".join(filter(None, [note, f"{which} on int8 at the last call (exact integer sums)"]))
            bn_note = mods[0].__dict__.get("_native_bn") if node.target in _FUSED.values() and path == "bf16" else None
            if bn_note:  # how the last call ran the fused BatchNorm
                note = "; ".join(filter(None, [note, bn_note]))
            last = mods[0].__dict__.get("_native_last") if mods[0] is not None else None
            if path != "simulated" and last:  # the bits allow it, the operands of the last call did not
                path, note = "simulated", f"at the last call: {last}"
            paths[node.name] = (path, note)
        elif execution != "native":
            paths[node.name] = ("simulated", "execution='simulate'")
        else:
            info = node.meta.get(NATIVE)
            paths[node.name] = ("simulated", info.reason if info is not None else "not lowered")
    return paths
